//! Generation modes built on one Stable Diffusion model and ONE denoising loop (`denoise`).
//!
//! `StableDiffusion` holds the loaded components of an SD 1.x/2.x or SDXL pipeline; txt2img,
//! img2img and inpainting (`generate`) prepare initial latents and conditioning, then all call
//! `denoise`. `batch` runs the jobs of a prompt file through the same entry point.

pub mod batch;
mod denoise;
mod generate;
mod mode;

pub use batch::BatchSummary;
pub use denoise::{DenoiseSpec, InpaintGuide};
pub use generate::{Generated, ImageJob, MicroConditioning, Sampling, SourceImage};
pub use mode::Mode;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::conditioning::{
    EncoderStyle, PromptEmbeddings, PromptEncoder, PromptOptions, TextEncoder,
};
use crate::lora::{merge_into, Component, LoraFile, LoraSpec};
use crate::model_source::{var_builder, var_builder_where, PipelineFolder};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::PromptTokenizer;

/// What kind of pipeline a folder holds (from its `model_index.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// Stable Diffusion 1.x/2.x (and SD-Turbo): one text encoder.
    StableDiffusion,
    /// SDXL (and SDXL-Turbo): two text encoders, pooled embeddings and micro-conditioning.
    StableDiffusionXl {
        /// An empty negative prompt conditions on zeros (diffusers' `force_zeros_for_empty_prompt`).
        force_zeros_for_empty_prompt: bool,
    },
}

/// A loaded Stable Diffusion pipeline: tokenizers, text encoders, U-Net, VAE and the scheduler
/// config, all read from the pipeline's own files.
pub struct StableDiffusion {
    /// One for SD 1.x/2.x, two for SDXL (their embeddings joined in this order).
    pub text_encoders: Vec<TextEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub kind: PipelineKind,
    pub model_name: String,
    pub device: Device,
    pub dtype: DType,
    /// The VAE's precision: f32 when the model runs in f16 and the VAE config asks for
    /// `force_upcast` (SDXL's VAE overflows in f16), as diffusers decodes.
    vae_dtype: DType,
}

/// Which parts of the VAE a run needs: txt2img only decodes, so it need not read the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeParts {
    EncoderAndDecoder,
    DecoderOnly,
}

impl StableDiffusion {
    pub fn load(folder: &PipelineFolder, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with_loras(folder, device, dtype, &[], VaeParts::EncoderAndDecoder)
    }

    /// Loads the pipeline with `loras` merged into its U-Net and (first) text encoder weights,
    /// and the parts of the VAE that the run needs.
    pub fn load_with_loras(
        folder: &PipelineFolder,
        device: &Device,
        dtype: DType,
        loras: &[LoraSpec],
        vae_parts: VaeParts,
    ) -> anyhow::Result<Self> {
        let loras = loras
            .iter()
            .map(|spec| Ok((LoraFile::read(&spec.path)?, spec.clone())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let half = dtype != DType::F32;
        let index = folder.model_index()?;
        let kind = if index.is_sdxl() {
            PipelineKind::StableDiffusionXl {
                force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            }
        } else {
            PipelineKind::StableDiffusion
        };
        let mut scheduler_config =
            SchedulerConfig::from_file(&folder.root.join("scheduler/scheduler_config.json"))?;
        if kind == PipelineKind::StableDiffusion {
            // diffusers' Stable Diffusion pipelines patch outdated scheduler configs on load
            // (its SDXL pipelines do not).
            scheduler_config.steps_offset = 1;
            scheduler_config.clip_sample = false;
        }

        let text_encoders = index
            .text_encoders()
            .iter()
            .map(|(encoder, tokenizer)| {
                let component = match *encoder {
                    "text_encoder" => Some(Component::TextEncoder),
                    _ => None,
                };
                load_text_encoder(folder, encoder, tokenizer, component, &loras, dtype, device)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        let unet_config = UNet2DConditionConfig::from_file(&folder.config("unet"))?;
        let vb = lora_weights(
            &folder.weights("unet", half)?,
            Some(Component::Unet),
            &loras,
            dtype,
            device,
        )?;
        let unet = UNet2DConditionModel::new(vb, &unet_config)
            .with_context(|| component_error(folder, "unet"))?;
        anyhow::ensure!(
            unet_config.has_text_time() == (text_encoders.len() == 2),
            "{}: the U-Net {} SDXL's added text/time conditioning but the pipeline is {}",
            folder.root.display(),
            if unet_config.has_text_time() {
                "takes"
            } else {
                "lacks"
            },
            index.class_name
        );

        let vae_config = AutoencoderKLConfig::from_file(&folder.config("vae"))?;
        let vae_dtype = if dtype == DType::F16 && vae_config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae_weights = folder.weights("vae", half)?;
        let vae = match vae_parts {
            VaeParts::EncoderAndDecoder => {
                AutoencoderKL::new(var_builder(&vae_weights, vae_dtype, device)?, &vae_config)
            }
            VaeParts::DecoderOnly => {
                let keep = AutoencoderKL::is_decoder_weight;
                let vb = var_builder_where(&vae_weights, vae_dtype, device, keep)?;
                AutoencoderKL::decoder_only(vb, &vae_config)
            }
        }
        .with_context(|| component_error(folder, "vae"))?;

        Ok(Self {
            text_encoders,
            unet,
            vae,
            scheduler_config,
            kind,
            model_name: folder.name.clone(),
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// The U-Net's config.
    pub fn unet_config(&self) -> &UNet2DConditionConfig {
        self.unet.config()
    }

    /// The VAE's config.
    pub fn vae_config(&self) -> &AutoencoderKLConfig {
        self.vae.config()
    }

    /// How many pixels one latent cell covers along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config().vae_scale_factor()
    }

    /// The image size the U-Net was trained at, `(width, height)`: diffusers' default.
    pub fn default_size(&self) -> (usize, usize) {
        // SD configs always carry sample_size; 64 latents is diffusers' SD default otherwise.
        let (height, width) = self
            .unet_config()
            .sample_size
            .map_or((64, 64), |size| size.height_width());
        let factor = self.vae_scale_factor();
        (width * factor, height * factor)
    }

    /// Prompt embeddings `[B, 77·k, D]` for a batch of prompts, with the default options
    /// (A1111 syntax, no clip skip).
    pub fn encode_prompts(&self, prompts: &[&str]) -> anyhow::Result<Tensor> {
        Ok(self
            .encode_prompts_with(prompts, &PromptOptions::default())?
            .hidden)
    }

    /// Fails when `prompt` cannot be encoded with `options` (see [`PromptEncoder::check`]).
    pub fn check_prompt(&self, prompt: &str, options: &PromptOptions) -> anyhow::Result<()> {
        self.prompt_encoder().check(prompt, options)
    }

    /// The tokenizers and text encoders, read as this pipeline reads them.
    pub fn prompt_encoder(&self) -> PromptEncoder<'_> {
        PromptEncoder {
            encoders: &self.text_encoders,
            style: match self.kind {
                PipelineKind::StableDiffusion => EncoderStyle::Final,
                PipelineKind::StableDiffusionXl { .. } => EncoderStyle::Penultimate,
            },
            device: &self.device,
        }
    }

    /// Prompt embeddings `[B, 77·k, D]` (and SDXL's pooled ones): every prompt chunked,
    /// weighted and padded to the longest as A1111 does (see [`crate::conditioning`]).
    pub fn encode_prompts_with(
        &self,
        prompts: &[&str],
        options: &PromptOptions,
    ) -> anyhow::Result<PromptEmbeddings> {
        self.prompt_encoder().encode(prompts, options)
    }

    /// Latents to the VAE decoder's `[-1, 1]` image space, undoing the latent scaling.
    pub fn decode_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        let config = self.vae_config();
        let mut latents = (latents.to_dtype(self.vae_dtype)? / config.scaling_factor)?;
        if let Some(shift) = config.shift_factor {
            latents = (latents + shift)?;
        }
        Ok(self.vae.decode(&latents)?)
    }
}

/// A text encoder and its tokenizer, with the LoRAs' updates for `component` merged in.
fn load_text_encoder(
    folder: &PipelineFolder,
    encoder: &str,
    tokenizer: &str,
    component: Option<Component>,
    loras: &[(LoraFile, LoraSpec)],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<TextEncoder> {
    let half = dtype != DType::F32;
    let tokenizer = PromptTokenizer::from_dir(&folder.root.join(tokenizer))?;
    let config = ClipTextConfig::from_file(&folder.config(encoder))?;
    let vb = lora_weights(
        &folder.weights(encoder, half)?,
        component,
        loras,
        dtype,
        device,
    )?;
    let model =
        ClipTextModel::new(vb, &config).with_context(|| component_error(folder, encoder))?;
    Ok(TextEncoder { tokenizer, model })
}

/// A component's weights with the LoRAs' updates for it merged in (read as they are when no
/// LoRA touches it).
fn lora_weights(
    path: &Path,
    component: Option<Component>,
    loras: &[(LoraFile, LoraSpec)],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<VarBuilder<'static>> {
    let touched = |component| {
        loras
            .iter()
            .any(|(file, _)| file.adapters.iter().any(|a| a.component == component))
    };
    let Some(component) = component.filter(|&c| touched(c)) else {
        return var_builder(path, dtype, device);
    };
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read weights file {}", path.display()))?;
    merge_into(&mut tensors, component, loras)?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

fn component_error(folder: &PipelineFolder, component: &str) -> String {
    format!(
        "cannot build the {component} from {}",
        folder.root.join(component).display()
    )
}
