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
use super::noise_schedule::NoiseSchedule;
use super::prediction::{divide, scale};
use super::{timesteps, Scheduler, StepOutput};
use crate::rng::NoiseSource;

/// Karras' ρ, which diffusers fixes.
const KARRAS_RHO: f64 = 7.0;

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
        ensure!(
            !(ancestral && config.sigma_spacing == SigmaSpacing::Karras),
            "Euler a has no Karras sigmas in diffusers; use euler"
        );
        let train_sigmas = training_sigmas(config);
        let timesteps = timesteps::euler_timesteps(config, num_steps)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interpolate(&train_sigmas, t as f64))
            .collect();
        let timesteps = match config.sigma_spacing {
            SigmaSpacing::Interpolated => timesteps.iter().map(|&t| t as f64).collect(),
            SigmaSpacing::Karras => {
                sigmas = karras_sigmas(config, &sigmas);
                // numpy takes these logs in float32.
                let log_sigmas: Vec<f64> = train_sigmas.iter().map(|&s| s.ln() as f64).collect();
                sigmas
                    .iter()
                    .map(|&s| sigma_to_timestep(s, &log_sigmas) as f32 as f64)
                    .collect()
            }
        };
        let last = match config.final_sigmas_type {
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

    fn sigma(&self, step_index: usize) -> Result<(f32, f32)> {
        match (self.sigmas.get(step_index), self.sigmas.get(step_index + 1)) {
            (Some(&sigma), Some(&next)) => Ok((sigma, next)),
            _ => candle_core::bail!(
                "step {step_index} is past the last of {} scheduler steps",
                self.timesteps.len()
            ),
        }
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

/// σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) in float32 for every training timestep; zero-SNR schedules get
/// ᾱ_T = 2⁻²⁴ first, as diffusers' Euler schedulers do, so σ_T stays finite.
fn training_sigmas(config: &SchedulerConfig) -> Vec<f32> {
    let schedule = NoiseSchedule::new(config);
    let mut alphas = schedule.alphas_cumprod().to_vec();
    if config.rescale_betas_zero_snr {
        if let Some(last) = alphas.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    alphas.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(t, arange(len), sigmas)`.
fn interpolate(sigmas: &[f32], t: f64) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return sigmas[0] as f64;
    }
    if t >= last as f64 {
        return sigmas[last] as f64;
    }
    let low = t.floor() as usize;
    let (a, b) = (sigmas[low] as f64, sigmas[low + 1] as f64);
    if t == low as f64 {
        return a;
    }
    (b - a) * (t - low as f64) + a
}

/// Karras et al.'s spacing between the interpolated sigmas' ends (or the config's bounds):
/// (σ_max^(1/ρ) + r·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for r = linspace(0, 1, n).
fn karras_sigmas(config: &SchedulerConfig, sigmas: &[f64]) -> Vec<f64> {
    let n = sigmas.len();
    let sigma_min = config.sigma_min.unwrap_or(sigmas[n - 1]);
    let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
    let (min_inv, max_inv) = (
        sigma_min.powf(1.0 / KARRAS_RHO),
        sigma_max.powf(1.0 / KARRAS_RHO),
    );
    (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                if i == n - 1 {
                    1.0
                } else {
                    i as f64 * (1.0 / (n - 1) as f64)
                }
            } else {
                0.0
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(KARRAS_RHO)
        })
        .collect()
}

/// The fractional training timestep of a sigma, interpolating linearly in log-sigma between
/// the two training timesteps around it (diffusers' `_sigma_to_t`).
fn sigma_to_timestep(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last training timestep whose log-sigma is at most `log_sigma`, kept below the end.
    let at_most = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = at_most.saturating_sub(1).min(log_sigmas.len() - 2);
    let (low_log, high_log) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
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
            let fresh = noise.randn(
                model_output.shape(),
                model_output.dtype(),
                model_output.device(),
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_matches_numpy_interp() {
        let sigmas = [1.0f32, 3.0, 7.0];
        assert_eq!(interpolate(&sigmas, 0.0), 1.0);
        assert_eq!(interpolate(&sigmas, 0.5), 2.0);
        assert_eq!(interpolate(&sigmas, 1.25), 4.0);
        assert_eq!(interpolate(&sigmas, 2.0), 7.0);
        assert_eq!(interpolate(&sigmas, 5.0), 7.0);
    }

    #[test]
    fn sigma_to_timestep_inverts_the_training_sigmas() {
        let log_sigmas: Vec<f64> = [0.1f64, 0.5, 2.0, 9.0].iter().map(|s| s.ln()).collect();
        assert_eq!(sigma_to_timestep(0.5, &log_sigmas), 1.0);
        assert_eq!(sigma_to_timestep(9.0, &log_sigmas), 3.0);
        assert_eq!(sigma_to_timestep(0.01, &log_sigmas), 0.0);
        let halfway = (0.5f64 * 2.0).sqrt(); // geometric mean: halfway in log space
        assert!((sigma_to_timestep(halfway, &log_sigmas) - 1.5).abs() < 1e-12);
    }
}
