//! DDPM ancestral sampling (Ho et al. 2020), as diffusers' `DDPMScheduler`.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, VarianceType};
use super::prediction::{scale, OriginalSampleLimit};
use super::timesteps::DiscreteSteps;
use super::{Scheduler, StepOutput};
use crate::rng::NoiseSource;

pub struct Ddpm {
    steps: DiscreteSteps,
    prediction: PredictionType,
    limit: OriginalSampleLimit,
    variance_type: VarianceType,
}

impl Ddpm {
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> anyhow::Result<Self> {
        // diffusers takes the square root of log(β) < 0 here and samples NaNs.
        anyhow::ensure!(
            config.variance_type != VarianceType::FixedLargeLog,
            "scheduler config field \"variance_type\": \"fixed_large_log\" is not supported \
             by DDPM sampling (diffusers produces NaN with it)"
        );
        Ok(Self {
            steps: DiscreteSteps::new(config, num_steps)?,
            prediction: config.prediction_type,
            limit: OriginalSampleLimit::from_config(config),
            variance_type: config.variance_type,
        })
    }

    /// The model output proper and, for learned variances, its predicted-variance half.
    fn split_variance(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let channels = sample.dim(1)?;
        let learned = matches!(
            self.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange
        );
        if learned && model_output.dim(1)? == 2 * channels {
            Ok((
                model_output.narrow(1, 0, channels)?,
                Some(model_output.narrow(1, channels, channels)?),
            ))
        } else {
            Ok((model_output.clone(), None))
        }
    }

    /// The noise term σ·z added to the posterior mean.
    fn noise_term(
        &self,
        noise: &Tensor,
        predicted_variance: Option<&Tensor>,
        alpha_prev: f32,
        alpha_t: f32,
        current_beta: f32,
    ) -> Result<Tensor> {
        // The posterior variance β̃_t, clamped because its log is taken.
        let small = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
        let learned = || match predicted_variance {
            Some(v) => Ok(v),
            None => Err(candle_core::Error::Msg(format!(
                "variance_type {:?} needs a model output with twice the sample's channels",
                self.variance_type
            ))),
        };
        match self.variance_type {
            VarianceType::FixedSmall => scale(noise, small.sqrt()),
            VarianceType::FixedSmallLog => scale(noise, (0.5 * small.ln()).exp()),
            VarianceType::FixedLarge => scale(noise, current_beta.sqrt()),
            VarianceType::Learned => learned()?.sqrt()? * noise,
            VarianceType::LearnedRange => {
                // log σ² interpolated between log β̃_t and log β_t.
                let frac = (learned()?.affine(1.0, 1.0)? * 0.5)?;
                let log_variance = (scale(&frac, current_beta.ln())?
                    + scale(&frac.affine(-1.0, 1.0)?, small.ln())?)?;
                (log_variance * 0.5)?.exp()? * noise
            }
            VarianceType::FixedLargeLog => unreachable!("rejected in Ddpm::new"),
        }
    }
}

impl Scheduler for Ddpm {
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
        let (model_output, predicted_variance) = self.split_variance(model_output, sample)?;
        let alpha_t = self.steps.schedule.alpha_cumprod(t)?;
        // The previous timestep is the next one in the list; after the last, ᾱ = 1.
        let alpha_prev = match self.steps.timesteps.get(step_index + 1) {
            Some(&prev) => self.steps.schedule.alpha_cumprod(prev)?,
            None => 1.0,
        };
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let (beta_prod_t, beta_prod_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);

        let original = self
            .prediction
            .original_sample(&model_output, sample, alpha_t)?;
        let original = self.limit.apply(original)?;

        // Posterior mean μ̃_t(x_t, x̂₀), formula (7) of the DDPM paper.
        let original_coeff = (alpha_prev.sqrt() * current_beta) / beta_prod_t;
        let sample_coeff = current_alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev_sample = (scale(&original, original_coeff)? + scale(sample, sample_coeff)?)?;
        if t > 0 {
            let variance_noise = noise.randn_like(&model_output)?;
            let noise_term = self.noise_term(
                &variance_noise,
                predicted_variance.as_ref(),
                alpha_prev,
                alpha_t,
                current_beta,
            )?;
            prev_sample = (prev_sample + noise_term)?;
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
