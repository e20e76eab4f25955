//! The inference timesteps of diffusers' `set_timesteps`, in the order they are walked, and the
//! walk DDIM and DDPM share.

use anyhow::{bail, ensure};
use candle_core::{Result, Tensor};

use super::config::{SchedulerConfig, TimestepSpacing};
use super::noise_schedule::NoiseSchedule;

/// `num_steps` descending training timesteps picked by `config.timestep_spacing` (DDIM's and
/// DDPM's default: leading), with numpy's float arithmetic and round-half-to-even.
pub(super) fn inference_timesteps(
    config: &SchedulerConfig,
    num_steps: usize,
) -> anyhow::Result<Vec<usize>> {
    checked_timesteps(
        config,
        config.timestep_spacing_or(TimestepSpacing::Leading),
        num_steps,
    )
}

/// Euler's timesteps: float32 values, as its `set_timesteps` leaves them (default spacing:
/// linspace, which is not rounded there).
pub(super) fn euler_timesteps(
    config: &SchedulerConfig,
    num_steps: usize,
) -> anyhow::Result<Vec<f32>> {
    Ok(
        match config.timestep_spacing_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace => {
                checked_timesteps(config, TimestepSpacing::Linspace, num_steps)?;
                let last = (config.num_train_timesteps - 1) as f64;
                let step = if num_steps > 1 {
                    last / (num_steps - 1) as f64
                } else {
                    0.0
                };
                (0..num_steps)
                    .rev()
                    .map(|i| match i {
                        _ if i == num_steps - 1 && num_steps > 1 => last as f32,
                        _ => (i as f64 * step) as f32,
                    })
                    .collect()
            }
            spacing => checked_timesteps(config, spacing, num_steps)?
                .into_iter()
                .map(|t| t as f32)
                .collect(),
        },
    )
}

/// DPM-Solver's timesteps: n + 1 points spread over the training range, the last (0) dropped
/// (default spacing: linspace, rounded).
pub(super) fn dpm_solver_timesteps(
    config: &SchedulerConfig,
    num_steps: usize,
) -> anyhow::Result<Vec<usize>> {
    let train = config.num_train_timesteps;
    ensure!(
        (1..=train).contains(&num_steps),
        "{num_steps} inference steps requested: DPM-Solver takes 1 to {train} (num_train_timesteps)"
    );
    let timesteps = match config.timestep_spacing_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => linspace(train, num_steps + 1)[..num_steps].to_vec(),
        TimestepSpacing::Leading => {
            let ratio = train / (num_steps + 1);
            (1..=num_steps)
                .rev()
                .map(|i| i * ratio + config.steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train, num_steps),
    };
    if let Some(t) = timesteps.iter().find(|&&t| t >= train) {
        bail!(
            "timestep {t} is past the last training timestep {}",
            train - 1
        );
    }
    Ok(timesteps)
}

fn checked_timesteps(
    config: &SchedulerConfig,
    spacing: TimestepSpacing,
    num_steps: usize,
) -> anyhow::Result<Vec<usize>> {
    let train = config.num_train_timesteps;
    ensure!(
        num_steps >= 1,
        "the number of inference steps must be at least 1"
    );
    ensure!(
        num_steps <= train,
        "{num_steps} inference steps requested, but the scheduler was trained with only \
         {train} timesteps (num_train_timesteps)"
    );
    let timesteps = match spacing {
        TimestepSpacing::Linspace => linspace(train, num_steps),
        TimestepSpacing::Leading => leading(train, num_steps, config.steps_offset),
        TimestepSpacing::Trailing => trailing(train, num_steps),
    };
    if let Some(t) = timesteps.iter().find(|&&t| t >= train) {
        bail!(
            "timestep {t} is past the last training timestep {}: steps_offset {} is too large \
             for {num_steps} \"leading\" steps",
            train - 1,
            config.steps_offset
        );
    }
    Ok(timesteps)
}

/// `np.linspace(0, train - 1, n).round()[::-1]`.
fn linspace(train: usize, n: usize) -> Vec<usize> {
    let last = (train - 1) as f64;
    let step = if n > 1 { last / (n - 1) as f64 } else { 0.0 };
    (0..n)
        .rev()
        .map(|i| {
            let value = if i == n - 1 && n > 1 {
                last
            } else {
                i as f64 * step
            };
            value.round_ties_even() as usize
        })
        .collect()
}

/// `arange(0, n) * (train // n)` reversed, plus `steps_offset`.
fn leading(train: usize, n: usize, offset: usize) -> Vec<usize> {
    let ratio = train / n;
    (0..n).rev().map(|i| i * ratio + offset).collect()
}

/// `round(np.arange(train, 0, -train / n)) - 1`, evaluated as numpy fills a float arange
/// (`start + i·delta`, with delta re-derived from the first two values). numpy's length
/// rounding sometimes yields an extra, near-zero value (a timestep of -1, e.g. for 61 of 1000);
/// only the first `n` values are kept.
fn trailing(train: usize, n: usize) -> Vec<usize> {
    let start = train as f64;
    let second = start - train as f64 / n as f64;
    let delta = second - start;
    (0..n)
        .map(|i| {
            let value = match i {
                0 => start,
                1 => second,
                _ => start + i as f64 * delta,
            };
            value.round_ties_even() as usize - 1
        })
        .collect()
}

/// An error naming the step when `step_index` is past the last of `steps`.
pub(super) fn check_step(step_index: usize, steps: usize) -> Result<()> {
    if step_index >= steps {
        candle_core::bail!("step {step_index} is past the last of {steps} scheduler steps");
    }
    Ok(())
}

/// The walk of the samplers that step between training timesteps (DDIM, DDPM): the config's
/// noise schedule and its [`inference_timesteps`].
pub(super) struct DiscreteSteps {
    pub schedule: NoiseSchedule,
    pub timesteps: Vec<usize>,
    /// The same timesteps as `Scheduler::timesteps` gives them.
    pub as_f64: Vec<f64>,
}

impl DiscreteSteps {
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> anyhow::Result<Self> {
        let timesteps = inference_timesteps(config, num_steps)?;
        Ok(Self {
            schedule: NoiseSchedule::new(config),
            as_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
        })
    }

    /// The timestep of step `step_index`, or an error naming the step.
    pub fn at(&self, step_index: usize) -> Result<usize> {
        check_step(step_index, self.timesteps.len())?;
        Ok(self.timesteps[step_index])
    }

    /// `original` noised to the timestep of step `step_index`, every batch row alike
    /// (diffusers' `add_noise`).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let t = self.at(step_index)?;
        self.schedule
            .add_noise(original, noise, &vec![t; original.dim(0)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spaced(spacing: TimestepSpacing, train: usize, steps: usize, offset: usize) -> Vec<usize> {
        let config = SchedulerConfig {
            num_train_timesteps: train,
            timestep_spacing: Some(spacing),
            steps_offset: offset,
            ..Default::default()
        };
        inference_timesteps(&config, steps).unwrap()
    }

    #[test]
    fn known_schedules() {
        use TimestepSpacing::*;
        assert_eq!(spaced(Leading, 1000, 10, 1)[..3], [901, 801, 701]);
        assert_eq!(spaced(Leading, 1000, 10, 1)[9], 1);
        assert_eq!(spaced(Trailing, 1000, 4, 0), [999, 749, 499, 249]);
        assert_eq!(spaced(Linspace, 1000, 4, 0), [999, 666, 333, 0]);
        // 999/6 = 166.5: numpy rounds the halves to even.
        assert_eq!(
            spaced(Linspace, 1000, 7, 0),
            [999, 832, 666, 500, 333, 166, 0]
        );
        assert_eq!(spaced(Linspace, 1000, 1, 0), [0]);
    }

    #[test]
    fn trailing_gives_exactly_n_steps() {
        for n in 1..=1000 {
            let timesteps = spaced(TimestepSpacing::Trailing, 1000, n, 0);
            assert_eq!(timesteps.len(), n);
            assert_eq!(timesteps[0], 999);
            assert!(timesteps.windows(2).all(|w| w[0] > w[1]), "n = {n}");
        }
    }

    #[test]
    fn invalid_step_counts_are_errors() {
        let config = SchedulerConfig::default();
        assert!(inference_timesteps(&config, 0).is_err());
        assert!(inference_timesteps(&config, 1001).is_err());
        let offset = SchedulerConfig {
            steps_offset: 1,
            ..config
        };
        let error = inference_timesteps(&offset, 1000).unwrap_err().to_string();
        assert!(error.contains("steps_offset"), "{error}");
    }
}
