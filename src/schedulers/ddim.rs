//! DDIM (Song et al. 2020), as diffusers' `DDIMScheduler`.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};
use super::prediction::{scale, OriginalSampleLimit};
use super::timesteps::DiscreteSteps;
use super::{Scheduler, StepOutput};
use crate::rng::NoiseSource;

pub struct Ddim {
    steps: DiscreteSteps,
    /// `num_train_timesteps // num_inference_steps`: DDIM steps from t to t − this, for every
    /// spacing (diffusers does not look the previous timestep up in the list).
    step_ratio: usize,
    /// ᾱ before the first training timestep: 1 with `set_alpha_to_one`, else ᾱ₀.
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    limit: OriginalSampleLimit,
    /// 0: deterministic DDIM; 1: DDPM-like noise.
    eta: f64,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, num_steps: usize, eta: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(eta >= 0.0, "DDIM eta must be a number >= 0, got {eta}");
        let steps = DiscreteSteps::new(config, num_steps)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            steps.schedule.alphas_cumprod()[0]
        };
        Ok(Self {
            steps,
            step_ratio: config.num_train_timesteps / num_steps,
            final_alpha_cumprod,
            prediction: config.prediction_type,
            limit: OriginalSampleLimit::from_config(config),
            eta,
        })
    }

    /// ᾱ of a timestep that may lie before the first one.
    fn alpha_before(&self, timestep: usize) -> Result<f32> {
        match timestep.checked_sub(self.step_ratio) {
            Some(prev) => self.steps.schedule.alpha_cumprod(prev),
            None => Ok(self.final_alpha_cumprod),
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.steps.as_f64
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let t = self.steps.at(step_index)?;
        let alpha_t = self.steps.schedule.alpha_cumprod(t)?;
        let alpha_prev = self.alpha_before(t)?;

        let original = self
            .prediction
            .original_sample(model_output, sample, alpha_t)?;
        let epsilon = self.prediction.epsilon(model_output, sample, alpha_t)?;
        let original = self.limit.apply(original)?;

        // σ_t = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)), all in f32 like diffusers.
        let variance = ((1.0 - alpha_prev) / (1.0 - alpha_t)) * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = scale(&epsilon, (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let mut prev_sample = (scale(&original, alpha_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let variance_noise = noise.randn_like(model_output)?;
            prev_sample = (prev_sample + scale(&variance_noise, std_dev)?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(original),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.add_noise(original, noise, step_index)
    }
}
