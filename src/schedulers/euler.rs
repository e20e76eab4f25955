//! Euler samplers (Karras et al. 2022, Algorithm 2 with no churn), as diffusers'
//! `EulerDiscreteScheduler` and, with fresh noise at every step, `EulerAncestralDiscreteScheduler`
//! ("Euler a").
//!
//! They walk the noise levels σ = sqrt((1 − ᾱ)/ᾱ) of the training schedule in the
//! variance-exploding parameterisation x = x₀ + σ·ε: the initial noise is scaled by the largest
//! σ, the U-Net sees x / sqrt(σ² + 1), and each step follows the ODE's derivative (x − x̂₀)/σ.
//! Sigmas are computed as diffusers does (float32 schedule, float64 interpolation, stored as
//! float32); step coefficients are f32 scalars in diffusers' order of operations.

use anyhow::ensure;
use candle_core::{Result, Tensor};

use super::config::{FinalSigma, PredictionType, SchedulerConfig, SigmaSpacing};
use super::prediction::{divide, scale};
use super::sigmas::{interpolate, karras_sigmas, log_sigmas, sigma_to_timestep, training_sigmas};
use super::{timesteps, Scheduler, StepOutput};
use crate::rng::NoiseSource;

pub struct Euler {
    timesteps: Vec<f64>,
    /// One per timestep, then the final sigma (0 or σ_min).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    /// Euler a: step to σ_down, then add fresh noise of σ_up.
    ancestral: bool,
}

impl Euler {
    pub fn new(
        config: &SchedulerConfig,
        num_steps: usize,
        ancestral: bool,
    ) -> anyhow::Result<Self> {
        ensure!(
            !(ancestral && config.prediction_type == PredictionType::Sample),
            "Euler a does not support prediction_type \"sample\" (neither does diffusers)"
        );
        let spacing = config.sigma_sampler.sigma_spacing()?;
        ensure!(
            !(ancestral && spacing == SigmaSpacing::Karras),
            "Euler a has no Karras sigmas in diffusers; use euler"
        );
        let train_sigmas = training_sigmas(config);
        let timesteps = timesteps::euler_timesteps(config, num_steps)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interpolate(&train_sigmas, t as f64))
            .collect();
        let timesteps = match spacing {
            SigmaSpacing::Interpolated => timesteps.iter().map(|&t| t as f64).collect(),
            SigmaSpacing::Karras => {
                let (first, last) = (sigmas[0], sigmas[sigmas.len() - 1]);
                sigmas = karras_sigmas(config, last, first, sigmas.len());
                let log_sigmas = log_sigmas(&train_sigmas)?;
                sigmas
                    .iter()
                    .map(|&s| sigma_to_timestep(s, &log_sigmas) as f32 as f64)
                    .collect()
            }
        };
        let last = match config.sigma_sampler.final_sigma()? {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin if !ancestral => train_sigmas[0] as f64,
            FinalSigma::SigmaMin => 0.0,
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = match config.timestep_spacing_or(super::TimestepSpacing::Linspace) {
            super::TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
            _ => max_sigma,
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: config.prediction_type,
            ancestral,
        })
    }

    /// The sigma of a step and of the one after it.
    fn sigma(&self, step_index: usize) -> Result<(f32, f32)> {
        timesteps::check_step(step_index, self.timesteps.len())?;
        Ok((self.sigmas[step_index], self.sigmas[step_index + 1]))
    }

    /// x̂₀ from the model output at noise level `sigma`.
    fn original_sample(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => sample - scale(model_output, sigma)?,
            PredictionType::VPrediction => {
                let variance = sigma * sigma + 1.0;
                let output_scale = -sigma / variance.sqrt();
                scale(model_output, output_scale)? + divide(sample, variance)?
            }
            PredictionType::Sample => Ok(model_output.clone()),
        }
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma(step_index)?;
        divide(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let (sigma, next) = self.sigma(step_index)?;
        let original = self.original_sample(model_output, sample, sigma)?;
        let derivative = divide(&(sample - &original)?, sigma)?;
        let (target, noise_scale) = if self.ancestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            ((next * next - up * up).sqrt(), Some(up))
        } else {
            (next, None)
        };
        let mut prev_sample = (sample + scale(&derivative, target - sigma)?)?;
        if let Some(up) = noise_scale {
            let fresh = noise.randn_like(model_output)?;
            prev_sample = (prev_sample + scale(&fresh, up)?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(original),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma(step_index)?;
        original + scale(noise, sigma)?
    }
}
