//! DPM-Solver++ (Lu et al. 2022), multistep, as diffusers' `DPMSolverMultistepScheduler`:
//! orders 1 and 2, midpoint or Heun correction, ODE ("dpmsolver++", A1111's "DPM++ 2M") or SDE
//! ("sde-dpmsolver++", "DPM++ 2M SDE").
//!
//! Each step turns the model output into x̂₀ and moves along log-SNR λ = ln(α/σ) from the
//! current sigma to the next, using the previous step's x̂₀ for the second-order term. Step
//! coefficients are f32 scalars computed in diffusers' order of operations.

use candle_core::{Result, Tensor};

use super::config::{
    BetaSchedule, DpmSolverOptions, FinalSigma, PredictionType, SchedulerConfig, SigmaSpacing,
};
use super::prediction::{divide, scale, OriginalSampleLimit};
use super::sigmas::{karras_sigmas, log_sigmas, sigma_to_timestep, training_sigmas};
use super::{timesteps, Scheduler, StepOutput};
use crate::rng::NoiseSource;

/// Below this many steps the last two steps drop to lower orders (with `lower_order_final`).
const LOWER_ORDER_FINAL_BELOW: usize = 15;

pub struct DpmSolver {
    timesteps: Vec<f64>,
    /// One per timestep, then the final sigma.
    sigmas: Vec<f32>,
    options: DpmSolverOptions,
    prediction: PredictionType,
    limit: OriginalSampleLimit,
    /// x̂₀ of the previous step, for the second-order update.
    previous_original: Option<Tensor>,
    /// How many steps have run, capped at the order (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

/// (α_t, σ_t) of the variance-preserving process at noise level `sigma`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln α − ln σ.
fn log_snr((alpha, sigma): (f32, f32)) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolver {
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> anyhow::Result<Self> {
        let options = config.sigma_sampler.dpm_solver()?;
        let final_sigma = config.sigma_sampler.final_sigma()?;
        let train_sigmas = training_sigmas(config);
        let mut timesteps = timesteps::dpm_solver_timesteps(config, num_steps)?;
        let mut sigmas: Vec<f64> = match config.sigma_sampler.sigma_spacing()? {
            SigmaSpacing::Interpolated => {
                timesteps.iter().map(|&t| train_sigmas[t] as f64).collect()
            }
            SigmaSpacing::Karras => {
                let (min, max) = (train_sigmas[0], train_sigmas[train_sigmas.len() - 1]);
                let sigmas = karras_sigmas(config, min as f64, max as f64, num_steps);
                let log_sigmas = log_sigmas(&train_sigmas)?;
                // Rounded, except on the cosine schedule where diffusers truncates instead.
                let cosine = config.beta_schedule == BetaSchedule::SquaredcosCapV2;
                timesteps = sigmas
                    .iter()
                    .map(|&s| {
                        let t = sigma_to_timestep(s, &log_sigmas);
                        (if cosine { t } else { t.round_ties_even() }) as usize
                    })
                    .collect();
                sigmas
            }
        };
        sigmas.push(match final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => train_sigmas[0] as f64,
        });
        let limit = if config.thresholding {
            OriginalSampleLimit::from_config(config)
        } else {
            OriginalSampleLimit::None
        };
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            options,
            prediction: config.prediction_type,
            limit,
            previous_original: None,
            lower_order_nums: 0,
        })
    }

    /// x̂₀ from the model output (diffusers' `convert_model_output` for the "++" solvers).
    fn original_sample(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let original = match self.prediction {
            PredictionType::Epsilon => divide(&(sample - scale(model_output, sigma_t)?)?, alpha_t)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (scale(sample, alpha_t)? - scale(model_output, sigma_t)?)?
            }
        };
        self.limit.apply(original)
    }

    /// The order this step runs at: lower at the start (no history yet) and, for short runs, at
    /// the end.
    fn order_at(&self, step_index: usize) -> usize {
        let n = self.timesteps.len();
        let short = self.options.lower_order_final && n < LOWER_ORDER_FINAL_BELOW;
        // A last sigma of 0 is final_sigmas_type "zero" (σ_min is positive).
        let last = step_index + 1 == n
            && (self.options.euler_at_final || short || self.sigmas.last() == Some(&0.0));
        if self.options.order == 1 || self.lower_order_nums < 1 || last {
            1
        } else {
            2
        }
    }
}

impl Scheduler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        timesteps::check_step(step_index, self.timesteps.len())?;
        let order = self.order_at(step_index);
        let (sigma_s0, sigma_next) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
        let original = self.original_sample(model_output, sample, sigma_s0)?;
        let previous = self.previous_original.replace(original.clone());
        let fresh = if self.options.stochastic {
            Some(noise.randn_like(model_output)?)
        } else {
            None
        };

        let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
        let s0 = alpha_sigma(sigma_s0);
        let h = log_snr((alpha_t, sigma_t)) - log_snr(s0);
        // D1 = (x̂₀ − x̂₀_prev) / r0 with r0 = h_prev / h: the second-order term.
        let correction = match (order, &previous) {
            (2, Some(previous)) => {
                let s1 = alpha_sigma(self.sigmas[step_index - 1]);
                let r0 = (log_snr(s0) - log_snr(s1)) / h;
                Some(scale(&(&original - previous)?, 1.0 / r0)?)
            }
            _ => None,
        };
        let prev_sample = if self.options.stochastic {
            let decay = (-h).exp();
            let kept = 1.0 - (-2.0 * h).exp();
            let mut x =
                (scale(sample, sigma_t / s0.1 * decay)? + scale(&original, alpha_t * kept)?)?;
            if let Some(d1) = &correction {
                let weight = if self.options.heun {
                    alpha_t * (kept / (-2.0 * h) + 1.0)
                } else {
                    0.5 * (alpha_t * kept)
                };
                x = (x + scale(d1, weight)?)?;
            }
            let fresh = fresh.expect("drawn above for the stochastic solver");
            (x + scale(&fresh, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?)?
        } else {
            let step = alpha_t * ((-h).exp() - 1.0);
            let mut x = (scale(sample, sigma_t / s0.1)? - scale(&original, step)?)?;
            if let Some(d1) = &correction {
                x = if self.options.heun {
                    (x + scale(d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?)?
                } else {
                    (x - scale(d1, 0.5 * step)?)?
                };
            }
            x
        };
        if self.lower_order_nums < self.options.order {
            self.lower_order_nums += 1;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(original),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        timesteps::check_step(step_index, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        scale(original, alpha_t)? + scale(noise, sigma_t)?
    }
}
