//! LoRA: low-rank weight deltas merged into the U-Net and text encoder when a pipeline loads.
//!
//! A LoRA is chosen with `--lora FILE[:WEIGHT]` or with A1111's `<lora:NAME:WEIGHT>` prompt tag
//! (`tags`), read in the kohya-ss / A1111 or the diffusers / PEFT layout (`file`), and merged as
//! `W += weight × alpha / rank × up · down` (`merge`), as diffusers' `fuse_lora(lora_scale=weight)`
//! does. Keys that match no weight of the model are an error that names them.

mod file;
mod merge;
pub mod tags;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use file::{Adapter, Component, LoraFile};
pub use merge::merge_into;

/// One LoRA to apply and its weight (diffusers' `lora_scale`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl FromStr for LoraSpec {
    type Err = String;

    /// `FILE` (weight 1) or `FILE:WEIGHT`; a path that itself holds `:` is read whole unless
    /// what follows the last `:` is a number.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (path, weight) = match text.rsplit_once(':') {
            Some((path, weight)) if !path.is_empty() => match weight.trim().parse::<f64>() {
                Ok(weight) if weight.is_finite() => (path, weight),
                Ok(_) => return Err(format!("LoRA weight in {text:?} must be finite")),
                Err(_) => (text, 1.0),
            },
            _ => (text, 1.0),
        };
        if path.is_empty() {
            return Err("empty LoRA path".to_string());
        }
        Ok(Self {
            path: PathBuf::from(path),
            weight,
        })
    }
}

impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.weight)
    }
}

/// The LoRAs named in `prompt`'s `<lora:NAME:WEIGHT>` tags, found as `NAME.safetensors` in
/// `lora_dir` (or its subfolders).
pub fn prompt_loras(prompt: &str, lora_dir: Option<&Path>) -> anyhow::Result<Vec<LoraSpec>> {
    let found = tags::lora_tags(prompt)?;
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let dir = lora_dir.ok_or_else(|| {
        anyhow::anyhow!(
            "the prompt names LoRA {:?} but no --lora-dir says where LoRAs are",
            found[0].name
        )
    })?;
    found
        .into_iter()
        .map(|tag| {
            Ok(LoraSpec {
                path: find_named(dir, &tag.name)?,
                weight: tag.weight,
            })
        })
        .collect()
}

/// `NAME.safetensors` in `dir` or, failing that, in its subfolders.
fn find_named(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let file = format!("{name}.safetensors");
    let direct = dir.join(&file);
    if direct.is_file() {
        return Ok(direct);
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read --lora-dir {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Ok(found) = find_named(&path, name) {
                return Ok(found);
            }
        }
    }
    anyhow::bail!("LoRA {name:?}: no {file} in {}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_path_and_optional_weight() {
        let spec: LoraSpec = "a/b.safetensors:0.6".parse().unwrap();
        assert_eq!(spec.path, PathBuf::from("a/b.safetensors"));
        assert_eq!(spec.weight, 0.6);
        let spec: LoraSpec = "b.safetensors".parse().unwrap();
        assert_eq!(spec.weight, 1.0);
        let spec: LoraSpec = "C:/x/b.safetensors".parse().unwrap();
        assert_eq!(spec.path, PathBuf::from("C:/x/b.safetensors"));
        let spec: LoraSpec = "b.safetensors:-1.5".parse().unwrap();
        assert_eq!(spec.weight, -1.5);
        assert!("".parse::<LoraSpec>().is_err());
        assert!("x:inf".parse::<LoraSpec>().is_err());
    }
}
