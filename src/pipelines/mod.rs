//! Generation modes built on one Stable Diffusion model and ONE denoising loop (`denoise`).
//!
//! `StableDiffusion` holds the loaded components of an SD 1.x/2.x or SDXL pipeline; txt2img,
//! img2img and inpainting (`generate`) prepare initial latents and conditioning, then all call
//! `denoise`. `batch` runs the jobs of a prompt file through the same entry point.

pub mod batch;
mod denoise;
mod generate;
mod mode;
mod weights;

pub use batch::BatchSummary;
pub use denoise::{DenoiseSpec, InpaintGuide};
pub use generate::{Generated, ImageJob, MicroConditioning, Sampling, SourceImage};
pub use mode::Mode;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::conditioning::{
    EncoderStyle, PromptEmbeddings, PromptEncoder, PromptOptions, TextEncoder,
};
use crate::lora::{LoraFile, LoraSpec};
use crate::mapped_memory::{collecting_mappings, MappedPages};
use crate::model_source::{PipelineFolder, Recommended};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::nn::{with_quantization, Quantization};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::SchedulerConfig;
use crate::single_file::Checkpoint;
use crate::tokenizer::PromptTokenizer;
use weights::{Part, Weights};

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
    /// How the U-Net's and text encoders' linear weights are stored (`--quantize`).
    pub quantization: Option<Quantization>,
    /// The VAE's precision: f32 when the model runs in f16 and the VAE config asks for
    /// `force_upcast` (SDXL's VAE overflows in f16), as diffusers decodes.
    vae_dtype: DType,
    /// The model's own recommended settings (`model_index.json`).
    recommended: Recommended,
    /// The mapped files of the U-Net (a single-file checkpoint's one file, which holds the
    /// text encoders and the VAE too) and those of the text encoders.
    unet_files: Vec<MappedPages>,
    text_files: Vec<MappedPages>,
    /// Set by [`Self::release_unet_and_text_before_next_decode`].
    release_unet_and_text: AtomicBool,
}

/// The guidance scale of a model that recommends none (diffusers' pipelines' default).
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;

/// Which parts of the VAE a run needs: txt2img only decodes, so it need not read the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeParts {
    EncoderAndDecoder,
    DecoderOnly,
}

impl StableDiffusion {
    pub fn load(folder: &PipelineFolder, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with_loras(
            folder,
            device,
            dtype,
            None,
            &[],
            VaeParts::EncoderAndDecoder,
        )
    }

    /// Loads the pipeline with `loras` merged into its U-Net and (first) text encoder weights,
    /// those two with linear weights stored as `quantization` says (the VAE as it is), and the
    /// parts of the VAE that the run needs.
    pub fn load_with_loras(
        folder: &PipelineFolder,
        device: &Device,
        dtype: DType,
        quantization: Option<Quantization>,
        loras: &[LoraSpec],
        vae_parts: VaeParts,
    ) -> anyhow::Result<Self> {
        let loras = loras
            .iter()
            .map(|spec| Ok((LoraFile::read(&spec.path)?, spec.clone())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // A single-file checkpoint is mapped here, VAE included (its pages read back as the
        // decoder runs); a folder's component files as each component loads.
        let (weights, checkpoint_files) =
            collecting_mappings(|| Weights::open(folder, dtype != DType::F32));
        let weights = weights?;
        let index = folder.model_index()?;
        let kind = if index.is_sdxl() {
            PipelineKind::StableDiffusionXl {
                force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            }
        } else {
            PipelineKind::StableDiffusion
        };
        if let Some(checkpoint) = weights.checkpoint() {
            anyhow::ensure!(
                kind == PipelineKind::StableDiffusion,
                "{} is an {} checkpoint but the config folder {} holds an SDXL pipeline",
                checkpoint.path().display(),
                checkpoint.architecture(),
                folder.root.display()
            );
        }
        let scheduler_config = scheduler_config(folder, kind)?;

        let (text_encoders, text_files) = collecting_mappings(|| {
            index
                .text_encoders()
                .iter()
                .map(|(encoder, tokenizer)| {
                    with_quantization(quantization, || {
                        load_text_encoder(
                            folder, &weights, encoder, tokenizer, &loras, dtype, device,
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()
        });
        let text_encoders = text_encoders?;

        let unet_config = component_config(
            folder,
            &weights,
            "unet",
            UNet2DConditionConfig::from_file,
            Checkpoint::infer_unet_config,
        )?;
        if let Some(checkpoint) = weights.checkpoint() {
            let channels = checkpoint.architecture().unet_in_channels;
            anyhow::ensure!(
                unet_config.in_channels == channels,
                "{} is an {} checkpoint (U-Net with {channels} input channels) but {} says {}: \
                 pass the config folder of the same kind of model",
                checkpoint.path().display(),
                checkpoint.architecture(),
                folder.config("unet").display(),
                unet_config.in_channels
            );
        }
        let part = Part::Unet(&unet_config);
        let (vb, unet_files) =
            collecting_mappings(|| weights.var_builder(part, &loras, |_| true, dtype, device));
        let unet_files: Vec<MappedPages> = checkpoint_files.into_iter().chain(unet_files).collect();
        let vb = vb?;
        let unet = with_quantization(quantization, || UNet2DConditionModel::new(vb, &unet_config))
            .with_context(|| component_error(&weights, part))?;
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

        let vae_config = component_config(
            folder,
            &weights,
            "vae",
            AutoencoderKLConfig::from_file,
            Checkpoint::infer_vae_config,
        )?;
        let vae_dtype = if dtype == DType::F16 && vae_config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let part = Part::Vae(&vae_config);
        let vae = match vae_parts {
            VaeParts::EncoderAndDecoder => {
                let vb = weights.var_builder(part, &loras, |_| true, vae_dtype, device)?;
                AutoencoderKL::new(vb, &vae_config)
            }
            VaeParts::DecoderOnly => {
                let keep = AutoencoderKL::is_decoder_weight;
                let vb = weights.var_builder(part, &loras, keep, vae_dtype, device)?;
                AutoencoderKL::decoder_only(vb, &vae_config)
            }
        }
        .with_context(|| component_error(&weights, part))?;

        Ok(Self {
            text_encoders,
            unet,
            vae,
            scheduler_config,
            kind,
            model_name: folder.name.clone(),
            device: device.clone(),
            dtype,
            quantization,
            vae_dtype,
            recommended: index.recommended,
            unet_files,
            text_files,
            release_unet_and_text: AtomicBool::new(false),
        })
    }

    /// Lets the next decode first take the U-Net's and text encoders' weights out of resident
    /// memory (their files' pages; they read back from the file if used again): for the last
    /// batch of a run, so that the weights and the VAE decoder's activations never peak
    /// together (SD 1.5 at 512²: 3.8 GB of mapped weights beside 1.7 GB of activations).
    /// The text encoders' pages go already once that batch's prompts are encoded.
    pub fn release_unet_and_text_before_next_decode(&self) {
        self.release_unet_and_text.store(true, Ordering::Relaxed);
    }

    /// The guidance scale of a run that gives none: the model's recommendation, else
    /// diffusers' (and SD's) 7.5.
    pub fn default_guidance_scale(&self) -> f64 {
        self.recommended
            .guidance_scale
            .unwrap_or(DEFAULT_GUIDANCE_SCALE)
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
        let embeddings = self.prompt_encoder().encode(prompts, options)?;
        if self.release_unet_and_text.load(Ordering::Relaxed) {
            // The last batch needs the text encoders no more: their pages need not sit beside
            // the U-Net's through denoising (SD 1.5's CLIP: 0.5 GB).
            drop_resident(&self.text_files);
        }
        Ok(embeddings)
    }

    /// Latents to the VAE decoder's `[-1, 1]` image space, undoing the latent scaling.
    pub fn decode_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        // The buffers the U-Net's kernels kept are sized for it (up to hundreds of MB), not
        // for the decoder: let them go rather than hold them through its peak.
        crate::kernels::release_kept_buffers();
        if self.release_unet_and_text.swap(false, Ordering::Relaxed) {
            drop_resident(&self.unet_files);
            drop_resident(&self.text_files);
        }
        let config = self.vae_config();
        let mut latents = (latents.to_dtype(self.vae_dtype)? / config.scaling_factor)?;
        if let Some(shift) = config.shift_factor {
            latents = (latents + shift)?;
        }
        Ok(self.vae.decode(&latents)?)
    }
}

/// The scheduler config: the folder's (Stable Diffusion's defaults for a single-file
/// checkpoint whose config folder has none), with `--prediction-type` applied.
fn scheduler_config(
    folder: &PipelineFolder,
    kind: PipelineKind,
) -> anyhow::Result<SchedulerConfig> {
    let path = folder.root.join("scheduler/scheduler_config.json");
    let mut config = if folder.single_file.is_some() && !path.exists() {
        SchedulerConfig::stable_diffusion()
    } else {
        SchedulerConfig::from_file(&path)?
    };
    if kind == PipelineKind::StableDiffusion {
        // diffusers' Stable Diffusion pipelines patch outdated scheduler configs on load
        // (its SDXL pipelines do not).
        config.steps_offset = 1;
        config.clip_sample = false;
    }
    if let Some(prediction_type) = folder.prediction_type {
        config.prediction_type = prediction_type;
    }
    Ok(config)
}

/// A text encoder and its tokenizer, with the LoRAs' updates for it merged in.
fn load_text_encoder(
    folder: &PipelineFolder,
    weights: &Weights,
    encoder: &str,
    tokenizer: &str,
    loras: &[(LoraFile, LoraSpec)],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<TextEncoder> {
    let tokenizer = PromptTokenizer::from_dir(&folder.root.join(tokenizer))?;
    let config = component_config(
        folder,
        weights,
        encoder,
        ClipTextConfig::from_file,
        Checkpoint::infer_text_encoder_config,
    )?;
    let part = Part::TextEncoder(encoder);
    let vb = weights.var_builder(part, loras, |_| true, dtype, device)?;
    let model = ClipTextModel::new(vb, &config).with_context(|| component_error(weights, part))?;
    Ok(TextEncoder { tokenizer, model })
}

/// A component's `config.json`, or for a single-file checkpoint whose config folder has none,
/// the config inferred from the checkpoint's tensors.
fn component_config<T>(
    folder: &PipelineFolder,
    weights: &Weights,
    component: &str,
    read: fn(&Path) -> anyhow::Result<T>,
    infer: fn(&Checkpoint) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let path = folder.config(component);
    match weights.checkpoint() {
        Some(checkpoint) if !path.exists() => infer(checkpoint).with_context(|| {
            format!(
                "cannot infer the {component} config of {} ({} does not exist)",
                checkpoint.path().display(),
                path.display()
            )
        }),
        _ => read(&path),
    }
}

fn component_error(weights: &Weights, part: Part) -> String {
    format!("cannot build the {}", weights.describe(part))
}

/// Takes the U-Net's or text encoders' mapped `files` out of resident memory (see
/// [`MappedPages::drop_resident`]).
fn drop_resident(files: &[MappedPages]) {
    for file in files {
        // SAFETY: inference never writes a weight in place: the U-Net's and text encoders'
        // tensors are plain tensors (no `Var`s), and a LoRA merge or quantization replaces a
        // buffer rather than writing into it.
        unsafe { file.drop_resident() };
    }
}
