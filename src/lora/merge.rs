//! Merging LoRA updates into a component's weights: `W += weight × alpha / rank × up · down`,
//! in f32, as diffusers' `fuse_lora` does, one LoRA after the other.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Tensor};

use super::file::{listing, Adapter, Component, LoraFile, ModuleName};
use super::LoraSpec;

/// The text encoder's weights are named with or without `text_model.`; LoRAs name them with.
const TEXT_MODEL: &str = "text_model.";

/// Maps each LoRA module name to the weight tensor it updates.
struct WeightIndex {
    dotted: HashMap<String, String>,
    underscored: HashMap<String, String>,
}

impl WeightIndex {
    fn new(weights: &HashMap<String, Tensor>) -> Self {
        let mut dotted = HashMap::new();
        let mut underscored = HashMap::new();
        for key in weights.keys() {
            if let Some(module) = key.strip_suffix(".weight") {
                let module = module.strip_prefix(TEXT_MODEL).unwrap_or(module);
                dotted.insert(module.to_string(), key.clone());
                underscored.insert(module.replace('.', "_"), key.clone());
            }
        }
        Self {
            dotted,
            underscored,
        }
    }

    fn find(&self, module: &ModuleName) -> Option<&String> {
        match module {
            ModuleName::Dotted(name) => self
                .dotted
                .get(name.strip_prefix(TEXT_MODEL).unwrap_or(name)),
            ModuleName::Underscored(name) => self
                .underscored
                .get(name.strip_prefix("text_model_").unwrap_or(name)),
        }
    }
}

/// `up · down` shaped like `weight`.
fn delta(adapter: &Adapter, weight: &Tensor) -> anyhow::Result<Tensor> {
    let rank = adapter.rank()?;
    let up = adapter.up.to_dtype(DType::F32)?;
    let down = adapter.down.to_dtype(DType::F32)?;
    let out = up.dim(0)?;
    ensure!(
        up.elem_count() == out * rank,
        "up matrix {:?} does not fit down matrix {:?}",
        up.dims(),
        down.dims()
    );
    let product = up
        .reshape((out, rank))?
        .matmul(&down.reshape((rank, down.elem_count() / rank))?)?;
    ensure!(
        product.elem_count() == weight.elem_count() && out == weight.dim(0)?,
        "its update is {:?} but the model's weight is {:?} (a LoRA for another model?)",
        product.dims(),
        weight.dims()
    );
    Ok(product.reshape(weight.shape())?)
}

/// Merges every `component` module of `loras` (file, weight) into `weights`, which are named
/// as the component's own weights file names them. A module that matches no weight is an
/// error naming it.
pub fn merge_into(
    weights: &mut HashMap<String, Tensor>,
    component: Component,
    loras: &[(LoraFile, LoraSpec)],
) -> anyhow::Result<()> {
    let index = WeightIndex::new(weights);
    for (file, spec) in loras {
        let adapters: Vec<&Adapter> = file
            .adapters
            .iter()
            .filter(|a| a.component == component)
            .collect();
        let unmatched: Vec<String> = adapters
            .iter()
            .filter(|a| index.find(&a.module).is_none())
            .map(|a| a.key.clone())
            .collect();
        if !unmatched.is_empty() {
            bail!(
                "{}: {} LoRA module(s) match no weight of the {component}: {}",
                file.path.display(),
                unmatched.len(),
                listing(&unmatched)
            );
        }
        for adapter in adapters {
            let key = index.find(&adapter.module).expect("checked above");
            let weight = weights[key].to_dtype(DType::F32)?;
            let scale = spec.weight * adapter.alpha / adapter.rank()? as f64;
            let update = delta(adapter, &weight).with_context(|| {
                format!(
                    "{}: LoRA module {} cannot update {key}",
                    file.path.display(),
                    adapter.key
                )
            })?;
            let merged = (weight + (update * scale)?)?;
            weights.insert(key.clone(), merged);
        }
    }
    Ok(())
}
