//! The default model, embedded in the binary by `build.rs` and unpacked on first use into the
//! user's cache folder (`$XDG_CACHE_HOME/ldm`, else `~/.cache/ldm`), one folder per content
//! hash: an installed `ldm` needs neither its checkout nor the network. `LDM_DEFAULT_MODEL`
//! points elsewhere (e.g. at a model being trained).

use std::path::{Path, PathBuf};

use anyhow::Context;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/default_model.rs"));
}

/// Environment variable naming another folder to use as the default model.
pub const ENV: &str = "LDM_DEFAULT_MODEL";

/// Written last into an unpacked folder: its presence means every file is complete.
const COMPLETE: &str = ".ldm-complete";

/// The default model's folder, unpacking the embedded files when they are not there yet.
pub fn dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(ENV) {
        return Ok(PathBuf::from(dir));
    }
    let root = cache_root()
        .context("no cache folder for the default model: set HOME or XDG_CACHE_HOME")?;
    let dir = root.join(format!("default-model-{}", embedded::HASH));
    if !dir.join(COMPLETE).is_file() {
        unpack(&root, &dir)
            .with_context(|| format!("unpacking the default model into {}", dir.display()))?;
    }
    Ok(dir)
}

fn cache_root() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty());
    let home = || std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
    xdg.map(PathBuf::from).or_else(home).map(|d| d.join("ldm"))
}

/// Writes the files into a temporary folder beside `dir` and renames it into place, so that a
/// concurrent or interrupted run never sees a partial model.
fn unpack(root: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root)?;
    let staging = tempfile::Builder::new()
        .prefix(".default-model-")
        .tempdir_in(root)?;
    for (relative, bytes) in embedded::FILES {
        let path = staging.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(staging.path().join(COMPLETE), embedded::HASH)?;
    let staging = staging.keep();
    if std::fs::rename(&staging, dir).is_err() {
        // Another process unpacked the same files first, or an incomplete folder (edited by
        // hand) is in the way: replace the latter.
        if !dir.join(COMPLETE).is_file() {
            std::fs::remove_dir_all(dir)?;
            std::fs::rename(&staging, dir)?;
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}
