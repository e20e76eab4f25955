//! Generation modes built on one Stable Diffusion model and ONE denoising loop (`denoise`).
//!
//! `StableDiffusion` holds the loaded components; txt2img, img2img and inpainting
//! (`generate`) prepare initial latents and conditioning, then all call `denoise`. `batch` runs
//! the jobs of a prompt file through the same entry point.

pub mod batch;
mod denoise;
mod generate;
mod mode;

pub use batch::BatchSummary;
pub use denoise::{DenoiseSpec, InpaintGuide};
pub use generate::{Generated, ImageJob, Sampling, SourceImage};
pub use mode::Mode;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::conditioning::{PromptEncoder, PromptOptions};
use crate::lora::{merge_into, Component, LoraFile, LoraSpec};
use crate::model_source::{var_builder, PipelineFolder};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::PromptTokenizer;

/// A loaded Stable Diffusion pipeline: tokenizer, text encoder, U-Net, VAE and the scheduler
/// config, all read from the pipeline's own files.
pub struct StableDiffusion {
    pub tokenizer: PromptTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNet2DConditionConfig,
    pub vae: AutoencoderKL,
    pub vae_config: AutoencoderKLConfig,
    pub scheduler_config: SchedulerConfig,
    pub model_name: String,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    pub fn load(folder: &PipelineFolder, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with_loras(folder, device, dtype, &[])
    }

    /// Loads the pipeline with `loras` merged into its U-Net and text encoder weights.
    pub fn load_with_loras(
        folder: &PipelineFolder,
        device: &Device,
        dtype: DType,
        loras: &[LoraSpec],
    ) -> anyhow::Result<Self> {
        let loras = loras
            .iter()
            .map(|spec| Ok((LoraFile::read(&spec.path)?, spec.clone())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let half = dtype != DType::F32;
        let tokenizer = PromptTokenizer::from_dir(&folder.root.join("tokenizer"))?;
        let mut scheduler_config =
            SchedulerConfig::from_file(&folder.root.join("scheduler/scheduler_config.json"))?;
        // diffusers' Stable Diffusion pipelines patch outdated scheduler configs on load.
        scheduler_config.steps_offset = 1;
        scheduler_config.clip_sample = false;

        let clip_config = ClipTextConfig::from_file(&folder.config("text_encoder"))?;
        let vb = lora_weights(
            &folder.weights("text_encoder", half)?,
            Component::TextEncoder,
            &loras,
            dtype,
            device,
        )?;
        let text_encoder = ClipTextModel::new(vb, &clip_config)
            .with_context(|| component_error(folder, "text_encoder"))?;

        let unet_config = UNet2DConditionConfig::from_file(&folder.config("unet"))?;
        let vb = lora_weights(
            &folder.weights("unet", half)?,
            Component::Unet,
            &loras,
            dtype,
            device,
        )?;
        let unet = UNet2DConditionModel::new(vb, &unet_config)
            .with_context(|| component_error(folder, "unet"))?;

        let vae_config = AutoencoderKLConfig::from_file(&folder.config("vae"))?;
        let vb = var_builder(&folder.weights("vae", half)?, dtype, device)?;
        let vae =
            AutoencoderKL::new(vb, &vae_config).with_context(|| component_error(folder, "vae"))?;

        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            vae,
            vae_config,
            scheduler_config,
            model_name: folder.name.clone(),
            device: device.clone(),
            dtype,
        })
    }

    /// How many pixels one latent cell covers along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.vae_scale_factor()
    }

    /// The image size the U-Net was trained at, `(width, height)`: diffusers' default.
    pub fn default_size(&self) -> (usize, usize) {
        // SD configs always carry sample_size; 64 latents is diffusers' SD default otherwise.
        let (height, width) = self
            .unet_config
            .sample_size
            .map_or((64, 64), |size| size.height_width());
        let factor = self.vae_scale_factor();
        (width * factor, height * factor)
    }

    /// Prompt embeddings `[B, 77·k, D]` for a batch of prompts, with the default options
    /// (A1111 syntax, no clip skip).
    pub fn encode_prompts(&self, prompts: &[&str]) -> anyhow::Result<Tensor> {
        self.encode_prompts_with(prompts, &PromptOptions::default())
    }

    /// Fails when `prompt` cannot be encoded with `options` (see [`PromptEncoder::check`]).
    pub fn check_prompt(&self, prompt: &str, options: &PromptOptions) -> anyhow::Result<()> {
        self.prompt_encoder().check(prompt, options)
    }

    fn prompt_encoder(&self) -> PromptEncoder<'_> {
        PromptEncoder {
            tokenizer: &self.tokenizer,
            text_encoder: &self.text_encoder,
            device: &self.device,
        }
    }

    /// Prompt embeddings `[B, 77·k, D]`: every prompt chunked, weighted and padded to the
    /// longest as A1111 does (see [`crate::conditioning`]).
    pub fn encode_prompts_with(
        &self,
        prompts: &[&str],
        options: &PromptOptions,
    ) -> anyhow::Result<Tensor> {
        self.prompt_encoder().encode(prompts, options)
    }

    /// Latents to the VAE decoder's `[-1, 1]` image space, undoing the latent scaling.
    pub fn decode_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        let mut latents = (latents / self.vae_config.scaling_factor)?;
        if let Some(shift) = self.vae_config.shift_factor {
            latents = (latents + shift)?;
        }
        Ok(self.vae.decode(&latents)?)
    }
}

/// A component's weights with the LoRAs' updates for it merged in (read as they are when no
/// LoRA touches it).
fn lora_weights(
    path: &Path,
    component: Component,
    loras: &[(LoraFile, LoraSpec)],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<VarBuilder<'static>> {
    let touched = loras
        .iter()
        .any(|(file, _)| file.adapters.iter().any(|a| a.component == component));
    if !touched {
        return var_builder(path, dtype, device);
    }
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
