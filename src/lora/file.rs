//! LoRA files: the kohya-ss / A1111 layout (`lora_unet_<module>.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`; `lora_te_...` for the text encoder) and the diffusers / PEFT
//! layout (`unet.<module>.lora_A.weight`, `.lora_B.weight`; `text_encoder.<module>...`, with
//! `lora_alpha` in the `lora_adapter_metadata` header or per-module `.alpha` tensors).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The network a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unet => "U-Net",
            Self::TextEncoder => "text encoder",
        })
    }
}

/// How a file names the weight a LoRA module changes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ModuleName {
    /// diffusers' module path, `down_blocks.1.attentions.0.proj_in`.
    Dotted(String),
    /// kohya's: the same path with `_` for `.`, `down_blocks_1_attentions_0_proj_in`.
    Underscored(String),
}

/// One low-rank update `up · down` of one weight.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub component: Component,
    pub module: ModuleName,
    /// The file's own name for the module (for messages).
    pub key: String,
    /// `[rank, in, (kh, kw)]`.
    pub down: Tensor,
    /// `[out, rank, (1, 1)]`.
    pub up: Tensor,
    pub alpha: f64,
}

impl Adapter {
    pub fn rank(&self) -> anyhow::Result<usize> {
        Ok(self.down.dim(0)?)
    }
}

/// A parsed LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub adapters: Vec<Adapter>,
}

/// The down, up and alpha tensors found for one module.
#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

const SUFFIXES: [(&str, Part); 5] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// The component, module, part and module key (the key without its part) that `key` names.
fn classify(key: &str) -> Option<(Component, ModuleName, Part, &str)> {
    let (stem, part) = SUFFIXES
        .iter()
        .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|stem| (stem, *part)))?;
    let (component, module) = if let Some(name) = stem.strip_prefix("lora_unet_") {
        (Component::Unet, ModuleName::Underscored(name.to_string()))
    } else if let Some(name) = stem.strip_prefix("lora_te_") {
        (
            Component::TextEncoder,
            ModuleName::Underscored(name.to_string()),
        )
    } else if let Some(name) = stem.strip_prefix("unet.") {
        (Component::Unet, ModuleName::Dotted(name.to_string()))
    } else if let Some(name) = stem.strip_prefix("text_encoder.") {
        (Component::TextEncoder, ModuleName::Dotted(name.to_string()))
    } else {
        return None;
    };
    Some((component, module, part, stem))
}

/// `lora_alpha` per component from diffusers' `lora_adapter_metadata` header, if any.
fn metadata_alphas(path: &Path, bytes: &[u8]) -> anyhow::Result<BTreeMap<Component, f64>> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let Some(raw) = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
    else {
        return Ok(BTreeMap::new());
    };
    let json: Value = serde_json::from_str(raw)
        .with_context(|| format!("{}: unreadable lora_adapter_metadata", path.display()))?;
    let mut alphas = BTreeMap::new();
    for (component, prefix) in [
        (Component::Unet, "unet"),
        (Component::TextEncoder, "text_encoder"),
    ] {
        for pattern in ["alpha_pattern", "rank_pattern"] {
            let value = &json[format!("{prefix}.{pattern}")];
            if value.as_object().is_some_and(|m| !m.is_empty()) {
                bail!(
                    "{}: per-module {pattern} in the LoRA metadata is not supported",
                    path.display()
                );
            }
        }
        if let Some(alpha) = json[format!("{prefix}.lora_alpha")].as_f64() {
            alphas.insert(component, alpha);
        }
    }
    Ok(alphas)
}

impl LoraFile {
    /// Reads and checks a LoRA file: every key must belong to a module with both a down and an
    /// up matrix.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read LoRA {}", path.display()))?;
        let alphas = metadata_alphas(path, &bytes)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("cannot read the tensors of {}", path.display()))?;
        let mut modules: BTreeMap<(Component, ModuleName), (String, Parts)> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, tensor) in tensors {
            let Some((component, module, part, stem)) = classify(&key) else {
                unknown.push(key);
                continue;
            };
            let entry = modules
                .entry((component, module))
                .or_insert_with(|| (stem.to_string(), Parts::default()));
            let slot = match part {
                Part::Down => &mut entry.1.down,
                Part::Up => &mut entry.1.up,
                Part::Alpha => &mut entry.1.alpha,
            };
            *slot = Some(tensor);
        }
        if !unknown.is_empty() {
            unknown.sort();
            bail!(
                "{}: {} key(s) are neither kohya (lora_unet_/lora_te_ with lora_down/lora_up/alpha) \
                 nor diffusers/PEFT (unet./text_encoder. with lora_A/lora_B): {}",
                path.display(),
                unknown.len(),
                listing(&unknown)
            );
        }
        if modules.is_empty() {
            bail!("{} holds no LoRA weights", path.display());
        }
        let mut adapters = Vec::with_capacity(modules.len());
        for ((component, module), (key, parts)) in modules {
            let (Some(down), Some(up)) = (parts.down, parts.up) else {
                bail!(
                    "{}: LoRA module {key} lacks its down or up matrix",
                    path.display()
                );
            };
            let rank = down.dim(0)?;
            let alpha = match parts.alpha {
                Some(alpha) => {
                    let values = alpha
                        .to_dtype(DType::F64)?
                        .flatten_all()?
                        .to_vec1::<f64>()?;
                    match values.as_slice() {
                        [alpha] => *alpha,
                        _ => bail!("{}: {key}.alpha is not one number", path.display()),
                    }
                }
                None => alphas.get(&component).copied().unwrap_or(rank as f64),
            };
            adapters.push(Adapter {
                component,
                module,
                key,
                down,
                up,
                alpha,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            adapters,
        })
    }
}

/// The first few names and how many more there are.
pub(super) fn listing(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}
