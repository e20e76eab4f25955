//! Text to image: seeded noise, prompt conditioning, the shared denoising loop, VAE decode.

use anyhow::{bail, ensure};
use candle_core::{DType, Tensor};
use image::RgbImage;

use super::{DenoiseSpec, StableDiffusion};
use crate::infotext::GenerationInfo;
use crate::rng::{BatchNoise, NoiseSource};
use crate::schedulers::{self, SamplerKind};

/// One txt2img call: `seeds.len()` images of one prompt, image i drawn from `seeds[i]`.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance_scale: f64,
    pub eta: f64,
    pub width: usize,
    pub height: usize,
    pub seeds: Vec<u64>,
}

/// The result of a run: final latents `[B, C, h, w]`, the images, and their records.
pub struct Generated {
    pub latents: Tensor,
    pub images: Vec<RgbImage>,
    pub infos: Vec<GenerationInfo>,
}

impl StableDiffusion {
    /// Checks a request against this model before any work is done.
    pub fn validate(&self, request: &GenerateRequest) -> anyhow::Result<()> {
        let factor = self.vae_scale_factor();
        for (what, size) in [("width", request.width), ("height", request.height)] {
            ensure!(
                size > 0 && size % factor == 0,
                "{what} {size} must be a positive multiple of {factor} (the VAE's downscaling factor)"
            );
        }
        ensure!(request.steps > 0, "the number of steps must be at least 1");
        ensure!(!request.seeds.is_empty(), "at least one image must be requested");
        ensure!(
            request.guidance_scale.is_finite() && request.guidance_scale >= 0.0,
            "guidance scale must be a non-negative number"
        );
        Ok(())
    }

    pub fn txt2img(
        &self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Generated> {
        self.validate(request)?;
        let mut scheduler = schedulers::build(
            request.sampler,
            &self.scheduler_config,
            request.steps,
            request.eta,
        )?;
        let batch = request.seeds.len();
        let text_embeddings = self.conditioning(request, batch)?;
        let mut noise = BatchNoise::from_seeds(&request.seeds);
        let latents = self.initial_latents(request, &mut noise)?;
        let latents = (latents * scheduler.init_noise_sigma())?;
        let spec = DenoiseSpec {
            text_embeddings: &text_embeddings,
            guidance_scale: request.guidance_scale,
            start_step: 0,
        };
        let latents = self.denoise(latents, scheduler.as_mut(), &spec, &mut noise, on_step)?;
        let images = crate::image_io::decoded_to_images(&self.decode_latents(&latents)?)?;
        let infos = request
            .seeds
            .iter()
            .map(|&seed| self.generation_info(request, seed))
            .collect();
        Ok(Generated {
            latents,
            images,
            infos,
        })
    }

    /// `[negatives; positives]` when guidance applies (as diffusers: scale > 1), else positives.
    fn conditioning(&self, request: &GenerateRequest, batch: usize) -> anyhow::Result<Tensor> {
        let positive = vec![request.prompt.as_str(); batch];
        if request.guidance_scale > 1.0 {
            let negative = vec![request.negative_prompt.as_str(); batch];
            let both: Vec<&str> = negative.into_iter().chain(positive).collect();
            self.encode_prompts(&both)
        } else {
            self.encode_prompts(&positive)
        }
    }

    /// Standard-normal latents `[B, C, H/f, W/f]`, drawn in f32 on the CPU from the seeds.
    fn initial_latents(
        &self,
        request: &GenerateRequest,
        noise: &mut dyn NoiseSource,
    ) -> anyhow::Result<Tensor> {
        let factor = self.vae_scale_factor();
        let channels = self.unet_config.out_channels;
        if channels != self.vae_config.latent_channels {
            bail!(
                "the U-Net predicts {channels} channels but the VAE has {} latent channels",
                self.vae_config.latent_channels
            );
        }
        let shape = (
            request.seeds.len(),
            channels,
            request.height / factor,
            request.width / factor,
        );
        Ok(noise.randn(&shape.into(), DType::F32, &self.device)?.to_dtype(self.dtype)?)
    }

    fn generation_info(&self, request: &GenerateRequest, seed: u64) -> GenerationInfo {
        GenerationInfo {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            steps: request.steps,
            sampler: request.sampler.display_name().to_string(),
            cfg_scale: request.guidance_scale,
            seed,
            width: request.width,
            height: request.height,
            model: self.model_name.clone(),
            eta: (request.sampler == SamplerKind::Ddim).then_some(request.eta),
            denoising_strength: None,
        }
    }
}
