//! txt2img, img2img and inpainting: one entry point, `StableDiffusion::generate`, that prepares
//! initial latents and conditioning for the mode at hand and runs the shared denoising loop.
//!
//! Noise is drawn exactly where diffusers draws it, image by image from each image's own
//! generator: the VAE posterior sample of the source image, then the initial noise, then the
//! masked image's posterior sample (inpainting), then whatever the sampler draws per step.

use std::ops::ControlFlow;

use anyhow::{bail, ensure};
use candle_core::{DType, Tensor};
use image::RgbImage;

use super::{DenoiseSpec, InpaintGuide, Mode, PipelineKind, StableDiffusion};
use crate::conditioning::{PromptEmbeddings, PromptOptions};
use crate::infotext::GenerationInfo;
use crate::models::unet::AddedConditioning;
use crate::rng::{BatchNoise, NoiseSource};
use crate::schedulers::{self, SamplerKind, Scheduler};

/// Settings shared by every image of one batched run.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` φ in [0, 1] (0: plain classifier-free guidance).
    pub guidance_rescale: f64,
    pub eta: f64,
    pub width: usize,
    pub height: usize,
    /// How much of the source image to repaint (img2img/inpaint): 1 starts from pure noise.
    pub strength: f64,
    /// SDXL's size and crop conditioning (ignored by other models).
    pub micro: MicroConditioning,
}

/// SDXL's micro-conditioning (diffusers' `original_size`, `crops_coords_top_left`,
/// `target_size`): sizes `(width, height)`, the crop corner `(top, left)` as diffusers orders
/// it, in pixels; the sizes default to the image's size, the crop to none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MicroConditioning {
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
}

impl MicroConditioning {
    /// diffusers' `add_time_ids` for an image of `width` x `height`: original size, crop
    /// top-left and target size, each height (or top) first.
    pub fn time_ids(&self, width: usize, height: usize) -> [f32; 6] {
        let (original_w, original_h) = self.original_size.unwrap_or((width, height));
        let (top, left) = self.crops_coords_top_left;
        let (target_w, target_h) = self.target_size.unwrap_or((width, height));
        [original_h, original_w, top, left, target_h, target_w].map(|v| v as f32)
    }
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct ImageJob {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub source: Option<SourceImage>,
}

/// The image to start from (img2img), with the region to repaint (inpaint).
#[derive(Debug, Clone)]
pub struct SourceImage {
    /// `[3, H, W]` in [-1, 1], at the run's width and height.
    pub pixels: Tensor,
    /// `[1, H, W]`, 1 where the image is repainted, 0 where it is kept.
    pub mask: Option<Tensor>,
}

/// A finished run: final latents `[B, C, h, w]`, the images, and their records.
pub struct Generated {
    pub latents: Tensor,
    pub images: Vec<RgbImage>,
    pub infos: Vec<GenerationInfo>,
}

/// What the denoising starts from, per mode.
struct Start {
    latents: Tensor,
    start_step: usize,
    guide: Option<InpaintGuide>,
}

impl StableDiffusion {
    /// Checks a run's settings against this model.
    pub fn validate_sampling(&self, sampling: &Sampling) -> anyhow::Result<()> {
        let factor = self.vae_scale_factor();
        for (what, size) in [("width", sampling.width), ("height", sampling.height)] {
            ensure!(
                size > 0 && size % factor == 0,
                "{what} {size} must be a positive multiple of {factor} (the VAE's downscaling factor)"
            );
        }
        ensure!(sampling.steps > 0, "the number of steps must be at least 1");
        ensure!(
            sampling.guidance_scale.is_finite() && sampling.guidance_scale >= 0.0,
            "the guidance scale must be a non-negative number"
        );
        ensure!(
            (0.0..=1.0).contains(&sampling.guidance_rescale),
            "the guidance rescale must be between 0 and 1, got {}",
            sampling.guidance_rescale
        );
        ensure!(
            (0.0..=1.0).contains(&sampling.strength),
            "strength must be between 0 and 1, got {}",
            sampling.strength
        );
        Ok(())
    }

    /// Checks a run against this model before any work is done.
    pub fn validate(&self, sampling: &Sampling, jobs: &[ImageJob]) -> anyhow::Result<()> {
        self.validate_sampling(sampling)?;
        ensure!(!jobs.is_empty(), "at least one image must be requested");
        let mode = jobs[0].mode();
        ensure!(
            jobs.iter().all(|j| j.mode() == mode),
            "a batch cannot mix txt2img, img2img and inpainting images"
        );
        let in_channels = self.unet_config().in_channels;
        let latent_channels = self.vae_config().latent_channels;
        if mode != Mode::Inpaint && in_channels != latent_channels {
            bail!("this model's U-Net takes {in_channels} input channels: it is an inpainting model, use `ldm inpaint`");
        }
        if mode == Mode::Inpaint
            && ![latent_channels, 2 * latent_channels + 1].contains(&in_channels)
        {
            bail!("a U-Net with {in_channels} input channels can neither inpaint by blending nor with mask channels");
        }
        for job in jobs {
            if let Some(source) = &job.source {
                let dims = source.pixels.dims();
                ensure!(
                    dims == [3, sampling.height, sampling.width],
                    "source image is {dims:?}, expected [3, {}, {}]",
                    sampling.height,
                    sampling.width
                );
                if let Some(mask) = &source.mask {
                    ensure!(
                        mask.dims() == [1, sampling.height, sampling.width],
                        "mask is {:?}, expected [1, {}, {}]",
                        mask.dims(),
                        sampling.height,
                        sampling.width
                    );
                }
            }
        }
        Ok(())
    }

    /// Makes one image per job, all in one batch, with the default prompt options.
    pub fn generate(
        &self,
        sampling: &Sampling,
        jobs: &[ImageJob],
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Generated> {
        self.generate_with(sampling, &PromptOptions::default(), jobs, on_step)
    }

    /// Makes one image per job, all in one batch, reading the prompts with `prompts`.
    pub fn generate_with(
        &self,
        sampling: &Sampling,
        prompts: &PromptOptions,
        jobs: &[ImageJob],
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Generated> {
        self.generate_until(sampling, prompts, jobs, &mut |done, total| {
            on_step(done, total);
            ControlFlow::Continue(())
        })
    }

    /// [`Self::generate_with`] that `on_step` can stop early: the latents reached by then are
    /// decoded (as A1111 does when a job is interrupted).
    pub fn generate_until(
        &self,
        sampling: &Sampling,
        prompts: &PromptOptions,
        jobs: &[ImageJob],
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> anyhow::Result<Generated> {
        self.validate(sampling, jobs)?;
        let mut scheduler = schedulers::build(
            sampling.sampler,
            &self.scheduler_config,
            sampling.steps,
            sampling.eta,
        )?;
        let (text_embeddings, added) = self.conditioning(sampling, prompts, jobs)?;
        let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
        let mut noise = BatchNoise::from_seeds(&seeds);
        let start = self.start(sampling, jobs, scheduler.as_ref(), &mut noise)?;
        let spec = DenoiseSpec {
            text_embeddings: &text_embeddings,
            added: added.as_ref(),
            guidance_scale: sampling.guidance_scale,
            guidance_rescale: sampling.guidance_rescale,
            start_step: start.start_step,
            inpaint: start.guide.as_ref(),
        };
        let latents = self.denoise(
            start.latents,
            scheduler.as_mut(),
            &spec,
            &mut noise,
            on_step,
        )?;
        let images = crate::image_io::decoded_to_images(&self.decode_latents(&latents)?)?;
        let infos = jobs
            .iter()
            .map(|job| self.generation_info(sampling, prompts, job))
            .collect();
        Ok(Generated {
            latents,
            images,
            infos,
        })
    }

    /// `[negatives; positives]` when guidance applies (as diffusers: scale > 1), else positives;
    /// for SDXL also the pooled embeddings and time ids, in the same row order.
    fn conditioning(
        &self,
        sampling: &Sampling,
        options: &PromptOptions,
        jobs: &[ImageJob],
    ) -> anyhow::Result<(Tensor, Option<AddedConditioning>)> {
        let guided = sampling.guidance_scale > 1.0;
        let positives = jobs.iter().map(|j| j.prompt.as_str());
        let prompts: Vec<&str> = if guided {
            let negatives = jobs.iter().map(|j| j.negative_prompt.as_str());
            negatives.chain(positives).collect()
        } else {
            positives.collect()
        };
        let embeddings = self.encode_prompts_with(&prompts, options)?;
        match self.kind {
            PipelineKind::StableDiffusion => Ok((embeddings.hidden, None)),
            PipelineKind::StableDiffusionXl {
                force_zeros_for_empty_prompt,
            } => {
                // diffusers conditions on zeros when no negative prompt is given.
                let zero_negatives = guided && force_zeros_for_empty_prompt;
                let zeroed: Vec<bool> = (0..prompts.len())
                    .map(|i| zero_negatives && i < jobs.len() && prompts[i].is_empty())
                    .collect();
                self.sdxl_conditioning(embeddings, &zeroed, sampling)
            }
        }
    }

    /// SDXL's hidden states and added conditioning (pooled embeddings, time ids), with the
    /// rows marked in `zeroed` set to zeros.
    fn sdxl_conditioning(
        &self,
        embeddings: PromptEmbeddings,
        zeroed: &[bool],
        sampling: &Sampling,
    ) -> anyhow::Result<(Tensor, Option<AddedConditioning>)> {
        let Some(mut pooled) = embeddings.pooled else {
            bail!("SDXL conditioning without pooled text embeddings");
        };
        let mut hidden = embeddings.hidden;
        if zeroed.contains(&true) {
            let keep: Vec<f32> = zeroed.iter().map(|&z| if z { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::new(keep.as_slice(), &self.device)?.to_dtype(hidden.dtype())?;
            hidden = hidden.broadcast_mul(&keep.reshape(((), 1, 1))?)?;
            pooled = pooled.broadcast_mul(&keep.reshape(((), 1))?)?;
        }
        let time_ids = sampling.micro.time_ids(sampling.width, sampling.height);
        let time_ids = Tensor::new(&time_ids, &self.device)?
            .to_dtype(self.dtype)?
            .unsqueeze(0)?
            .repeat((zeroed.len(), 1))?;
        let added = AddedConditioning {
            text_embeds: pooled.to_dtype(self.dtype)?,
            time_ids,
        };
        Ok((hidden, Some(added)))
    }

    /// Initial latents, first step and inpainting guide for the run's mode.
    fn start(
        &self,
        sampling: &Sampling,
        jobs: &[ImageJob],
        scheduler: &dyn Scheduler,
        noise: &mut BatchNoise,
    ) -> anyhow::Result<Start> {
        let sources: Vec<&SourceImage> = jobs.iter().filter_map(|j| j.source.as_ref()).collect();
        let num_steps = scheduler.timesteps().len();
        let start_step = if sources.is_empty() {
            0
        } else {
            // diffusers' get_timesteps: skip the first (1 - strength) of the schedule.
            let init_steps = ((num_steps as f64 * sampling.strength) as usize).min(num_steps);
            num_steps - init_steps
        };
        let shape = self.latent_shape(sampling, jobs.len());
        if sources.is_empty() {
            let latents = (self.draw(noise, shape)? * scheduler.init_noise_sigma())?;
            return Ok(Start {
                latents,
                start_step,
                guide: None,
            });
        }
        let pixels = Tensor::stack(&sources.iter().map(|s| &s.pixels).collect::<Vec<_>>(), 0)?;
        let masks = sources
            .iter()
            .map(|s| s.mask.as_ref())
            .collect::<Option<Vec<_>>>();
        let full_strength = sampling.strength == 1.0;
        let blends =
            masks.is_some() && self.unet_config().in_channels == self.vae_config().latent_channels;
        // diffusers encodes the source unless it starts from pure noise with mask channels.
        let image_latents = if !full_strength || blends || masks.is_none() {
            Some(self.encode_image(&pixels, noise)?)
        } else {
            None
        };
        let initial_noise = self.draw(noise, shape)?;
        let latents = match &image_latents {
            Some(image_latents) if !(full_strength && masks.is_some()) => {
                if start_step == num_steps {
                    // Strength 0: nothing is repainted.
                    image_latents.clone()
                } else {
                    scheduler.add_noise(image_latents, &initial_noise, start_step)?
                }
            }
            _ => (&initial_noise * scheduler.init_noise_sigma())?,
        };
        let guide = match masks {
            None => None,
            Some(masks) => {
                let mask = Tensor::stack(&masks, 0)?.to_dtype(self.dtype)?;
                let keep = mask.lt(0.5)?.to_dtype(pixels.dtype())?;
                let masked_pixels = pixels.broadcast_mul(&keep)?;
                let masked_image_latents = self.encode_image(&masked_pixels, noise)?;
                let latent_mask = self.latent_mask(&mask)?;
                Some(if blends {
                    InpaintGuide::Blend {
                        mask: latent_mask,
                        image_latents: image_latents.expect("encoded above for blending"),
                        noise: initial_noise,
                    }
                } else {
                    InpaintGuide::Channels {
                        mask: latent_mask,
                        masked_image_latents,
                    }
                })
            }
        };
        Ok(Start {
            latents,
            start_step,
            guide,
        })
    }

    fn latent_shape(&self, sampling: &Sampling, batch: usize) -> (usize, usize, usize, usize) {
        let factor = self.vae_scale_factor();
        (
            batch,
            self.vae_config().latent_channels,
            sampling.height / factor,
            sampling.width / factor,
        )
    }

    /// Standard-normal noise drawn in f32 on the CPU, then moved and cast.
    fn draw(
        &self,
        noise: &mut dyn NoiseSource,
        shape: (usize, usize, usize, usize),
    ) -> anyhow::Result<Tensor> {
        Ok(noise
            .randn(&shape.into(), DType::F32, &self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Scaled latents of `[B, 3, H, W]` pixels, sampled from the VAE posterior (diffusers'
    /// default `sample_mode="sample"`), each image with its own generator.
    fn encode_image(&self, pixels: &Tensor, noise: &mut dyn NoiseSource) -> anyhow::Result<Tensor> {
        let vae_dtype = self.vae_dtype;
        let posterior = self
            .vae
            .encode(&pixels.to_device(&self.device)?.to_dtype(vae_dtype)?)?;
        let eps = noise
            .randn(posterior.mean.shape(), DType::F32, &self.device)?
            .to_dtype(vae_dtype)?;
        let latents = (posterior.sample(&eps)? * self.vae_config().scaling_factor)?;
        Ok(latents.to_dtype(self.dtype)?)
    }

    /// The pixel mask at latent resolution, nearest-neighbour like torch's `interpolate`.
    fn latent_mask(&self, mask: &Tensor) -> anyhow::Result<Tensor> {
        let (_, _, height, width) = mask.dims4()?;
        let factor = self.vae_scale_factor();
        Ok(mask
            .to_device(&self.device)?
            .upsample_nearest2d(height / factor, width / factor)?)
    }

    fn generation_info(
        &self,
        sampling: &Sampling,
        prompts: &PromptOptions,
        job: &ImageJob,
    ) -> GenerationInfo {
        GenerationInfo {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            steps: sampling.steps,
            sampler: sampling.sampler.display_name().to_string(),
            schedule_type: (sampling.sampler.uses_sigmas()
                && self.scheduler_config.sigma_sampler.use_karras_sigmas)
                .then(|| "Karras".to_string()),
            cfg_scale: sampling.guidance_scale,
            guidance_rescale: (sampling.guidance_scale > 1.0).then_some(sampling.guidance_rescale),
            seed: job.seed,
            width: sampling.width,
            height: sampling.height,
            model: self.model_name.clone(),
            eta: (sampling.sampler == SamplerKind::Ddim).then_some(sampling.eta),
            denoising_strength: job.source.as_ref().map(|_| sampling.strength),
            clip_skip: (prompts.clip_skip > 1).then_some(prompts.clip_skip),
            quantization: self.quantization.map(|q| q.name().to_string()),
        }
    }
}
