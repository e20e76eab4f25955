//! Samplers: diffusers' schedulers, driven by `scheduler/scheduler_config.json`.
//!
//! Every sampler implements [`Scheduler`], the interface the denoising loop walks: a list of
//! timesteps, input scaling, one step per timestep, and re-noising for img2img. [`build`] picks
//! the sampler the user asked for, whatever `_class_name` the config names, as diffusers'
//! `from_config` does. The noise schedule itself ([`NoiseSchedule`]) is public for training.

mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod noise_schedule;
mod prediction;
mod sigmas;
mod timesteps;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use clap::ValueEnum;

pub use config::{
    BetaSchedule, DpmSolverOptions, FinalSigma, PredictionType, SchedulerConfig,
    SigmaSamplerSettings, SigmaSpacing, TimestepSpacing, VarianceType,
};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolver;
pub use euler::Euler;
pub use noise_schedule::NoiseSchedule;

use crate::rng::NoiseSource;

/// A sampler in diffusers' scheduler protocol, indexed by step rather than by timestep value
/// (so samplers with float or repeated timesteps fit).
pub trait Scheduler {
    /// The timesteps the pipeline walks, as diffusers' `scheduler.timesteps` (f64 so float
    /// timesteps fit).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: 1 for the samplers that work on x_t itself (DDIM, DDPM, DPM-Solver).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// diffusers' `scale_model_input`: identity unless the sampler works on σ-scaled samples.
    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    /// One denoising step from `timesteps()[step_index]`; draws noise from `noise` only when
    /// diffusers draws it (DDPM for t > 0, DDIM only when eta > 0), with the whole batch's
    /// shape, in the same order as diffusers.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<StepOutput>;

    /// Noise `original` to timestep `timesteps()[step_index]` (img2img/inpaint), as diffusers'
    /// `add_noise`.
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor>;
}

/// The result of one [`Scheduler::step`].
pub struct StepOutput {
    /// x_{t-1}, the next sample of the loop.
    pub prev_sample: Tensor,
    /// x̂₀, the clean sample predicted at this step, where the sampler computes one.
    pub pred_original_sample: Option<Tensor>,
}

/// The samplers a user can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum SamplerKind {
    Ddim,
    Ddpm,
    /// Euler's method on the probability-flow ODE (diffusers' `EulerDiscreteScheduler`).
    Euler,
    /// Euler with fresh noise at every step (`EulerAncestralDiscreteScheduler`).
    #[value(name = "euler_a", aliases = ["euler-a", "euler-ancestral"])]
    EulerA,
    /// DPM-Solver++ 2M (`DPMSolverMultistepScheduler`), with the config's solver settings.
    #[value(name = "dpmpp_2m", aliases = ["dpm++2m", "dpmpp-2m", "dpm-solver"])]
    DpmPp2m,
    /// DPM-Solver++ 2M SDE: the same with `algorithm_type` "sde-dpmsolver++".
    #[value(name = "dpmpp_2m_sde", aliases = ["dpm++2m-sde", "dpmpp-2m-sde"])]
    DpmPp2mSde,
}

impl SamplerKind {
    /// The name A1111 infotext uses ("DDIM", ...).
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Ddpm => "DDPM",
            Self::Euler => "Euler",
            Self::EulerA => "Euler a",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mSde => "DPM++ 2M SDE",
        }
    }

    /// Whether the sampler steps along sigmas, where the config's Karras spacing applies.
    pub fn uses_sigmas(self) -> bool {
        !matches!(self, Self::Ddim | Self::Ddpm)
    }
}

/// The command-line spelling ("ddim", ...).
impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.to_possible_value().expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

/// Parses the command-line spelling, ignoring case.
impl FromStr for SamplerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <Self as ValueEnum>::from_str(s.trim(), true).map_err(|_| {
            let names: Vec<String> = Self::value_variants()
                .iter()
                .map(|k| k.to_string())
                .collect();
            format!(
                "unknown sampler \"{s}\" (choose one of: {})",
                names.join(", ")
            )
        })
    }
}

/// The `kind` sampler for `num_inference_steps` steps under `config`; `eta` is DDIM's noise
/// weight (ignored by the others).
pub fn build(
    kind: SamplerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    eta: f64,
) -> anyhow::Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SamplerKind::Ddim => Box::new(Ddim::new(config, num_inference_steps, eta)?),
        SamplerKind::Ddpm => Box::new(Ddpm::new(config, num_inference_steps)?),
        SamplerKind::Euler => Box::new(Euler::new(config, num_inference_steps, false)?),
        SamplerKind::EulerA => Box::new(Euler::new(config, num_inference_steps, true)?),
        SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde => {
            let stochastic = kind == SamplerKind::DpmPp2mSde;
            let mut config = config.clone();
            config.sigma_sampler.algorithm_type = match stochastic {
                true => "sde-dpmsolver++",
                false => "dpmsolver++",
            }
            .into();
            Box::new(DpmSolver::new(&config, num_inference_steps)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_round_trip() {
        for kind in SamplerKind::value_variants() {
            assert_eq!(kind.to_string().parse::<SamplerKind>(), Ok(*kind));
        }
        assert_eq!(SamplerKind::Ddim.to_string(), "ddim");
        assert_eq!("DDPM".parse::<SamplerKind>(), Ok(SamplerKind::Ddpm));
        let error = "euler_x".parse::<SamplerKind>().unwrap_err();
        assert!(
            error.contains("ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_sde"),
            "{error}"
        );
        assert_eq!("Euler-A".parse::<SamplerKind>(), Ok(SamplerKind::EulerA));
    }
}
