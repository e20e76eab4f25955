//! Where a pipeline's component weights are read from: the component files of a diffusers
//! folder, or the renamed tensors of a single-file checkpoint; LoRAs merged in either way.

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::lora::{merge_into, Component, LoraFile, LoraSpec};
use crate::model_source::{var_builder_where, PipelineFolder};
use crate::models::unet::{PerBlock, UNet2DConditionConfig};
use crate::models::vae::AutoencoderKLConfig;
use crate::single_file::{self, Checkpoint};

/// A component to read, with the config that numbers its original-layout tensors.
#[derive(Clone, Copy)]
pub(super) enum Part<'a> {
    Unet(&'a UNet2DConditionConfig),
    Vae(&'a AutoencoderKLConfig),
    /// `text_encoder` or `text_encoder_2`.
    TextEncoder(&'a str),
}

impl Part<'_> {
    /// The component's folder in a diffusers pipeline.
    pub fn folder_name(self) -> &'static str {
        match self {
            Self::Unet(_) => "unet",
            Self::Vae(_) => "vae",
            Self::TextEncoder("text_encoder") => "text_encoder",
            Self::TextEncoder(_) => "text_encoder_2",
        }
    }

    /// The prefix of the component's tensors in a single-file checkpoint.
    fn original_prefix(self) -> &'static str {
        match self {
            Self::Unet(_) => single_file::UNET_PREFIX,
            Self::Vae(_) => single_file::VAE_PREFIX,
            Self::TextEncoder(_) => "cond_stage_model.",
        }
    }

    /// What LoRAs call the component (the first text encoder only).
    fn lora_component(self) -> Option<Component> {
        match self {
            Self::Unet(_) => Some(Component::Unet),
            Self::TextEncoder("text_encoder") => Some(Component::TextEncoder),
            _ => None,
        }
    }
}

/// The weights of a pipeline's components.
pub(super) enum Weights<'a> {
    Folder {
        folder: &'a PipelineFolder,
        /// Prefer the fp16 weight files.
        half: bool,
    },
    Checkpoint {
        checkpoint: Checkpoint,
        extract_ema: bool,
    },
}

impl<'a> Weights<'a> {
    pub fn open(folder: &'a PipelineFolder, half: bool) -> anyhow::Result<Self> {
        Ok(match &folder.single_file {
            None => Self::Folder { folder, half },
            Some(file) => Self::Checkpoint {
                checkpoint: Checkpoint::open(&file.checkpoint)?,
                extract_ema: file.extract_ema,
            },
        })
    }

    /// The single-file checkpoint, if the weights are one.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        match self {
            Self::Folder { .. } => None,
            Self::Checkpoint { checkpoint, .. } => Some(checkpoint),
        }
    }

    /// `part`'s tensors that `keep` selects (every one when a LoRA updates the part), with the
    /// LoRAs' updates for it merged in.
    pub fn var_builder(
        &self,
        part: Part,
        loras: &[(LoraFile, LoraSpec)],
        keep: impl Fn(&str) -> bool + Sync,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<VarBuilder<'static>> {
        let lora = part.lora_component().filter(|&c| {
            loras
                .iter()
                .any(|(file, _)| file.adapters.iter().any(|a| a.component == c))
        });
        match self {
            Self::Folder { folder, half } => {
                let path = folder.weights(part.folder_name(), *half)?;
                match lora {
                    None => var_builder_where(&path, dtype, device, keep),
                    Some(component) => {
                        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
                            .with_context(|| {
                                format!("cannot read weights file {}", path.display())
                            })?;
                        merge_into(&mut tensors, component, loras)?;
                        Ok(VarBuilder::from_tensors(tensors, dtype, device))
                    }
                }
            }
            Self::Checkpoint {
                checkpoint,
                extract_ema,
            } => {
                let renamed = match part {
                    Part::Unet(config) => {
                        checkpoint.unet(layers_per_block(config)?, *extract_ema)?
                    }
                    Part::Vae(config) => checkpoint.vae(config.up_block_types.len()),
                    Part::TextEncoder(_) => checkpoint.text_encoder(),
                };
                let mut tensors = match lora {
                    None => checkpoint.load(&renamed, keep)?,
                    Some(_) => checkpoint.load(&renamed, |_| true)?,
                };
                if let Some(component) = lora {
                    merge_into(&mut tensors, component, loras)?;
                }
                Ok(single_file::var_builder(tensors, dtype, device))
            }
        }
    }

    /// Where `part` is read from, for error messages.
    pub fn describe(&self, part: Part) -> String {
        match self {
            Self::Folder { folder, .. } => {
                folder.root.join(part.folder_name()).display().to_string()
            }
            Self::Checkpoint { .. } => format!(
                "{} from the checkpoint's {}* tensors",
                part.folder_name(),
                part.original_prefix()
            ),
        }
    }
}

/// The original layout numbers its blocks by one `layers_per_block` for all of them.
fn layers_per_block(config: &UNet2DConditionConfig) -> anyhow::Result<usize> {
    match &config.layers_per_block {
        PerBlock::Shared(layers) => Ok(*layers),
        PerBlock::Each(_) => anyhow::bail!(
            "a single-file checkpoint needs one layers_per_block for every U-Net block, the \
             config lists one per block"
        ),
    }
}
