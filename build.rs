//! Embeds the default model (`weights/`) in the binary, so that an installed `ldm` runs offline
//! with no flags and no checkout: every file a pipeline load reads, plus the model card and the
//! licences that travel with the weights (not the evaluation images or loss plots). Writes
//! `$OUT_DIR/default_model.rs` with the file list and a content hash that names the folder the
//! files are unpacked to (see `src/default_model.rs`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn main() {
    // The manifest folder of this build, not of the one that compiled this script: a target
    // folder shared between checkouts reuses the compiled script.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest).join("weights");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    files.sort();
    assert!(
        files.iter().any(|(name, _)| name == "model_index.json"),
        "no default model in {} (weights/model_index.json is missing)",
        root.display()
    );
    let mut hash = Sha256::new();
    let mut list = String::new();
    for (relative, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let bytes = std::fs::read(path).expect("reading a default-model file");
        hash.update(relative.as_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
        writeln!(
            list,
            "    ({relative:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    let digest: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let code = format!(
        "/// The default model's files, relative to its folder.\n\
         pub const FILES: &[(&str, &[u8])] = &[\n{list}];\n\
         /// A hash of their names and contents.\n\
         pub const HASH: &str = \"{digest}\";\n"
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("default_model.rs");
    std::fs::write(out, code).expect("writing default_model.rs");
}

/// Files under `dir`, skipping the evaluation folder and images (kept in the repository only).
fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "eval" {
                println!("cargo:rerun-if-changed={}", path.display());
                collect(root, &path, files);
            }
        } else if !name.ends_with(".png") {
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            files.push((relative, path));
        }
    }
}
