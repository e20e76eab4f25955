//! Writes that survive a kill: files and folders are built under temporary names, synced, and
//! published by rename, so a reader sees the old version or the new one, never a partial one.
//! Every error names the path it is about. What is published gets the mode a plain create
//! would give it (0666 for files, 0777 for folders, less the umask), not the owner-only mode of
//! a temporary file, so a web server or another user can read generated images.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`
/// (or, without `overwrite`, fails if `path` exists).
pub fn write_atomically(path: &Path, bytes: &[u8], overwrite: bool) -> anyhow::Result<()> {
    let mut file = builder(PLAIN_FILE_MODE)
        .tempfile_in(parent_dir(path))
        .with_context(|| format!("cannot write into {}", parent_dir(path).display()))?;
    file.write_all(bytes)
        .and_then(|_| file.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let persisted = if overwrite {
        file.persist(path).map(|_| ())
    } else {
        file.persist_noclobber(path).map(|_| ())
    };
    persisted.with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `write` on a temporary path beside `path`, syncs what it wrote, then renames it over
/// `path`: for writers that want a path rather than bytes (safetensors).
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let temp = builder(PLAIN_FILE_MODE)
        .prefix(".tmp-")
        .tempfile_in(parent_dir(path))
        .with_context(|| format!("cannot write into {}", parent_dir(path).display()))?;
    write(temp.path())?;
    sync_file(temp.path())?;
    temp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Creates `path` with `bytes` and syncs it (inside a folder that is published later).
pub fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A fresh temporary folder `out_dir/<prefix>*` to build a folder in before publishing it,
/// after creating `out_dir` and removing the folders that killed runs left under that prefix.
/// Dropped unpublished, it is removed.
pub fn staging_dir(out_dir: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    create_dir(out_dir)?;
    let entries =
        std::fs::read_dir(out_dir).with_context(|| format!("cannot list {}", out_dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            remove_dir_if_present(&entry.path())?;
        }
    }
    builder(PLAIN_DIR_MODE)
        .prefix(prefix)
        .tempdir_in(out_dir)
        .with_context(|| format!("cannot create a temporary folder in {}", out_dir.display()))
}

pub fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Flushes every file under `dir` to disk, so a rename never publishes unwritten data.
pub fn sync_files(dir: &Path) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.is_dir() {
            sync_files(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    Ok(())
}

/// Makes renames inside `dir` durable (a no-op where directories cannot be synced).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    sync_file(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

pub fn create_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

pub fn rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
}

pub fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    ignore_not_found(std::fs::remove_dir_all(dir), dir)
}

pub fn remove_file_if_present(path: &Path) -> anyhow::Result<()> {
    ignore_not_found(std::fs::remove_file(path), path)
}

fn ignore_not_found(result: std::io::Result<()>, path: &Path) -> anyhow::Result<()> {
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// What `File::create` and `create_dir` ask for; the kernel takes the umask off.
const PLAIN_FILE_MODE: u32 = 0o666;
const PLAIN_DIR_MODE: u32 = 0o777;

/// A temporary-file builder creating with `mode` (less the umask) where modes exist.
fn builder(mode: u32) -> tempfile::Builder<'static, 'static> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    builder
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// This process's umask, read without changing it (tests run in parallel).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"));
        u32::from_str_radix(line.expect("Umask in /proc/self/status").trim(), 8).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn published_files_and_folders_get_plain_create_modes() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let expected = 0o666 & !umask();
        assert_eq!(mode(&plain), expected, "what File::create gives");

        let atomic = dir.path().join("atomic");
        write_atomically(&atomic, b"x", false).unwrap();
        assert_eq!(mode(&atomic), expected);

        let with = dir.path().join("with");
        write_atomically_with(&with, |temp| Ok(std::fs::write(temp, b"x")?)).unwrap();
        assert_eq!(mode(&with), expected);

        let staged = staging_dir(dir.path(), ".stage-").unwrap();
        assert_eq!(mode(staged.path()), 0o777 & !umask());
    }
}
