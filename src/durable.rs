//! Writes that survive a kill: files and folders are built under temporary names, synced, and
//! published by rename, so a reader sees the old version or the new one, never a partial one.
//! Every error names the path it is about.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`
/// (or, without `overwrite`, fails if `path` exists).
pub fn write_atomically(path: &Path, bytes: &[u8], overwrite: bool) -> anyhow::Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(parent_dir(path))
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
    let temp = tempfile::Builder::new()
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
    tempfile::Builder::new()
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

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}
