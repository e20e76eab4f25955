//! The one denoising loop that every generation mode runs.

use candle_core::Tensor;

use super::StableDiffusion;
use crate::rng::NoiseSource;
use crate::schedulers::Scheduler;

/// What a denoising run needs besides the initial latents.
pub struct DenoiseSpec<'a> {
    /// Text conditioning: `[2B, L, D]` (unconditional rows first) with guidance, else `[B, L, D]`.
    pub text_embeddings: &'a Tensor,
    pub guidance_scale: f64,
    /// The first scheduler step to run (img2img starts part-way).
    pub start_step: usize,
}

impl StableDiffusion {
    /// Runs `scheduler` from `spec.start_step` to the end, starting from `latents`, with
    /// classifier-free guidance when the embeddings carry an unconditional half.
    /// `on_step(done, total)` reports progress.
    pub fn denoise(
        &self,
        mut latents: Tensor,
        scheduler: &mut dyn Scheduler,
        spec: &DenoiseSpec,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Tensor> {
        let batch = latents.dim(0)?;
        let guided = spec.text_embeddings.dim(0)? == 2 * batch;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len().saturating_sub(spec.start_step);
        for (done, step_index) in (spec.start_step..timesteps.len()).enumerate() {
            let model_input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_input = scheduler.scale_model_input(&model_input, step_index)?;
            let t = Tensor::full(
                timesteps[step_index] as f32,
                model_input.dim(0)?,
                &self.device,
            )?;
            let noise_pred = self
                .unet
                .forward(&model_input, &t, spec.text_embeddings)?;
            let noise_pred = if guided {
                let halves = noise_pred.chunk(2, 0)?;
                let (uncond, cond) = (&halves[0], &halves[1]);
                (uncond + ((cond - uncond)? * spec.guidance_scale)?)?
            } else {
                noise_pred
            };
            latents = scheduler
                .step(&noise_pred, step_index, &latents, noise)?
                .prev_sample;
            on_step(done + 1, total);
        }
        Ok(latents)
    }
}
