//! The one denoising loop that every generation mode runs.

use std::ops::ControlFlow;

use candle_core::Tensor;
use rayon::prelude::*;

use super::StableDiffusion;
use crate::models::unet::AddedConditioning;
use crate::rng::NoiseSource;
use crate::schedulers::Scheduler;

/// What a denoising run needs besides the initial latents.
pub struct DenoiseSpec<'a> {
    /// Text conditioning: `[2B, L, D]` (unconditional rows first) with guidance, else `[B, L, D]`.
    pub text_embeddings: &'a Tensor,
    /// SDXL's pooled embeddings and time ids, in the rows of `text_embeddings`.
    pub added: Option<&'a AddedConditioning>,
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` φ: 0 is plain guidance.
    pub guidance_rescale: f64,
    /// The first scheduler step to run (img2img and inpainting start part-way).
    pub start_step: usize,
    pub inpaint: Option<&'a InpaintGuide>,
}

/// How inpainting steers the loop, chosen by the U-Net's input channels.
pub enum InpaintGuide {
    /// An inpainting U-Net (latents + mask + masked-image latents as input channels).
    Channels {
        mask: Tensor,
        masked_image_latents: Tensor,
    },
    /// An ordinary U-Net: after every step the kept region is replaced by the source image's
    /// latents re-noised to the next timestep.
    Blend {
        mask: Tensor,
        image_latents: Tensor,
        noise: Tensor,
    },
}

impl StableDiffusion {
    /// Runs `scheduler` from `spec.start_step` to the end, starting from `latents`, with
    /// classifier-free guidance when the embeddings carry an unconditional half.
    /// `on_step(done, total)` reports progress; when it breaks, the loop stops there and the
    /// latents reached so far are returned (a server's interrupt).
    /// The weights are constant through the loop, so it keeps their Winograd kernel
    /// transforms from step to step (`kernels::keeping_transformed_kernels`).
    pub fn denoise(
        &self,
        latents: Tensor,
        scheduler: &mut dyn Scheduler,
        spec: &DenoiseSpec,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> anyhow::Result<Tensor> {
        crate::kernels::keeping_transformed_kernels(|| {
            self.denoise_steps(latents, scheduler, spec, noise, on_step)
        })
    }

    fn denoise_steps(
        &self,
        mut latents: Tensor,
        scheduler: &mut dyn Scheduler,
        spec: &DenoiseSpec,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> anyhow::Result<Tensor> {
        let guided = spec.text_embeddings.dim(0)? == 2 * latents.dim(0)?;
        let duplicate = |t: &Tensor| -> candle_core::Result<Tensor> {
            if guided {
                Tensor::cat(&[t, t], 0)
            } else {
                Ok(t.clone())
            }
        };
        let extra_channels = match spec.inpaint {
            Some(InpaintGuide::Channels {
                mask,
                masked_image_latents,
            }) => Some(Tensor::cat(
                &[duplicate(mask)?, duplicate(masked_image_latents)?],
                1,
            )?),
            _ => None,
        };
        let num_steps = scheduler.timesteps().len();
        let total = num_steps.saturating_sub(spec.start_step);
        for (done, step_index) in (spec.start_step..num_steps).enumerate() {
            let model_input = scheduler.scale_model_input(&duplicate(&latents)?, step_index)?;
            let model_input = match &extra_channels {
                Some(extra) => Tensor::cat(&[&model_input, extra], 1)?,
                None => model_input,
            };
            let timestep = scheduler.timesteps()[step_index] as f32;
            let timesteps = Tensor::full(timestep, model_input.dim(0)?, &self.device)?;
            let noise_pred =
                self.predict_noise(&model_input, &timesteps, spec.text_embeddings, spec.added)?;
            let noise_pred = if guided {
                let halves = noise_pred.chunk(2, 0)?;
                let (uncond, cond) = (&halves[0], &halves[1]);
                let guided = (uncond + ((cond - uncond)? * spec.guidance_scale)?)?;
                rescale_guidance(&guided, cond, spec.guidance_rescale)?
            } else {
                noise_pred
            };
            latents = scheduler
                .step(&noise_pred, step_index, &latents, noise)?
                .prev_sample;
            if let Some(InpaintGuide::Blend {
                mask,
                image_latents,
                noise: initial_noise,
            }) = spec.inpaint
            {
                let known = if step_index + 1 < num_steps {
                    scheduler.add_noise(image_latents, initial_noise, step_index + 1)?
                } else {
                    image_latents.clone()
                };
                latents = ((1.0 - mask)?.broadcast_mul(&known)? + mask.broadcast_mul(&latents)?)?;
            }
            if on_step(done + 1, total).is_break() {
                break;
            }
        }
        Ok(latents)
    }

    /// The U-Net's prediction for every row. On the CPU with several threads every row is its
    /// own forward pass, the rows side by side on the thread pool: the ops of one small image
    /// keep two threads busy only part of the time (the default model, 100 DDIM steps at two
    /// threads: 2.0 -> 1.3-1.5 s; SD 1.5 at 256²: 12% less). A row then comes out bit for bit
    /// the same whatever else is in its batch. With one thread the batch stays whole (fewer,
    /// larger ops: 35% faster for the default model); its rows agree to rounding.
    fn predict_noise(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        text_embeddings: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> candle_core::Result<Tensor> {
        let rows = sample.dim(0)?;
        if !self.device.is_cpu() || rows == 1 || rayon::current_num_threads() == 1 {
            return self
                .unet
                .forward_with(sample, timesteps, text_embeddings, added);
        }
        let one_row = |row: usize| -> candle_core::Result<Tensor> {
            let pick = |t: &Tensor| t.narrow(0, row, 1);
            let added = added
                .map(|a| -> candle_core::Result<_> {
                    Ok(AddedConditioning {
                        text_embeds: pick(&a.text_embeds)?,
                        time_ids: pick(&a.time_ids)?,
                    })
                })
                .transpose()?;
            self.unet.forward_with(
                &pick(sample)?,
                &pick(timesteps)?,
                &pick(text_embeddings)?,
                added.as_ref(),
            )
        };
        let predictions = (0..rows)
            .into_par_iter()
            .map(one_row)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&predictions, 0)
    }
}

/// Guidance rescale (Lin et al. 2023, section 3.4; diffusers' `rescale_noise_cfg`): scales each
/// image's guided prediction to the standard deviation of its text-conditioned one, mixed in by
/// `phi`. Large guidance scales otherwise over-expose, most of all on zero-terminal-SNR models.
fn rescale_guidance(guided: &Tensor, cond: &Tensor, phi: f64) -> candle_core::Result<Tensor> {
    if phi == 0.0 {
        return Ok(guided.clone());
    }
    let ratio = (per_image_std(cond)? / per_image_std(guided)?)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    (rescaled * phi)? + (guided * (1.0 - phi))?
}

/// The unbiased standard deviation of each image (torch's `std` over all but dim 0), shaped
/// `[B, 1, 1, 1]` to broadcast against it.
fn per_image_std(x: &Tensor) -> candle_core::Result<Tensor> {
    let batch = x.dim(0)?;
    let flat = x.flatten_from(1)?;
    let count = flat.dim(1)?;
    let centered = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
    let variance = (centered.sqr()?.sum_keepdim(1)? / (count.max(2) - 1) as f64)?;
    let mut shape = vec![batch];
    shape.resize(x.rank(), 1);
    variance.sqrt()?.reshape(shape)
}
