//! The models a server can switch between: the one it starts with (`--model`, a folder or a
//! single-file checkpoint, else the default model) and every diffusers pipeline folder found in `--models-dir`.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};

use crate::lora::LoraSpec;
use crate::model_source::{ModelOptions, PipelineFolder};
use crate::models::nn::Quantization;
use crate::pipelines::{StableDiffusion, VaeParts};

/// Every model a server may load, and how to load one.
pub struct Catalog {
    folders: Vec<PipelineFolder>,
    device: Device,
    dtype: DType,
    quantization: Option<Quantization>,
    /// Merged into every model loaded (`--lora`).
    loras: Vec<LoraSpec>,
}

impl Catalog {
    /// `model` (as `--model` takes it; `None` is the default model) first, then the pipeline
    /// folders directly inside `models_dir`, by name; each loads with `loras` merged in.
    pub fn new(
        model: Option<&str>,
        options: &ModelOptions,
        models_dir: Option<&Path>,
        device: Device,
        dtype: DType,
        quantization: Option<Quantization>,
        loras: Vec<LoraSpec>,
    ) -> anyhow::Result<Self> {
        let half = dtype != DType::F32;
        let mut folders = vec![PipelineFolder::resolve(model, half, options)?];
        if let Some(dir) = models_dir {
            let mut found = Vec::new();
            let entries = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list --models-dir {}", dir.display()))?;
            for entry in entries {
                let path = entry
                    .with_context(|| format!("cannot list --models-dir {}", dir.display()))?
                    .path();
                if path.join("model_index.json").is_file() {
                    let name = path
                        .to_str()
                        .with_context(|| format!("{} is not a UTF-8 path", path.display()))?;
                    found.push(PipelineFolder::resolve(
                        Some(name),
                        half,
                        &Default::default(),
                    )?);
                }
            }
            found.sort_by(|a, b| a.name.cmp(&b.name));
            for folder in found {
                if folders.iter().all(|known| known.name != folder.name) {
                    folders.push(folder);
                }
            }
        }
        Ok(Self {
            folders,
            device,
            dtype,
            quantization,
            loras,
        })
    }

    /// The model the server starts with.
    pub fn initial(&self) -> &PipelineFolder {
        &self.folders[0]
    }

    pub fn folders(&self) -> &[PipelineFolder] {
        &self.folders
    }

    pub fn find(&self, name: &str) -> Option<&PipelineFolder> {
        self.folders.iter().find(|folder| folder.name == name)
    }

    /// The names, for error messages.
    pub fn names(&self) -> String {
        self.folders
            .iter()
            .map(|folder| folder.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn load(&self, folder: &PipelineFolder) -> anyhow::Result<StableDiffusion> {
        StableDiffusion::load_with_loras(
            folder,
            &self.device,
            self.dtype,
            self.quantization,
            &self.loras,
            VaeParts::EncoderAndDecoder,
        )
        .with_context(|| format!("cannot load model {}", folder.location().display()))
    }
}
