//! Stable Diffusion's training objective: the loss of one batch, and the per-step random
//! choices (timesteps, caption dropout, caption alternatives) that are not noise.

use candle_core::{DType, Tensor};

use super::super::SplitMix64;
use super::PredictionTarget;
use crate::models::unet::UNet2DConditionModel;
use crate::schedulers::NoiseSchedule;

/// The training loss for one batch: `latents` are scaled x₀, `noise` ε, `timesteps[i]` the
/// timestep of row i, `conditioning` the text encoder's hidden states. Returns the mean squared
/// error in f32, a scalar.
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    conditioning: &Tensor,
    schedule: &NoiseSchedule,
    prediction: PredictionTarget,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
) -> candle_core::Result<Tensor> {
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let target = match prediction {
        PredictionTarget::Epsilon => noise.clone(),
        PredictionTarget::VPrediction => schedule.velocity(latents, noise, timesteps)?,
    };
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, timesteps.len(), latents.device())?;
    let predicted = unet.forward(&noisy, &t, conditioning)?;
    (predicted.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()
}

/// The per-step random choices that are not noise, one per batch row. A stream of its own per
/// step, so a resumed run makes the same choices.
#[derive(Debug, Clone, PartialEq)]
pub struct StepChoices {
    /// Uniform over the training timesteps.
    pub timesteps: Vec<usize>,
    /// Whether the caption is replaced by the empty prompt.
    pub dropped: Vec<bool>,
    /// Uniform in [0, 1): which of an image's alternative captions is used.
    pub caption_picks: Vec<f64>,
}

pub fn step_choices(
    seed: u64,
    step: usize,
    batch: usize,
    num_timesteps: usize,
    uncond_prob: f64,
) -> StepChoices {
    let mut rng = SplitMix64::for_stream(seed, &format!("unet step {step}"));
    let timesteps = (0..batch).map(|_| rng.below(num_timesteps)).collect();
    let dropped = (0..batch).map(|_| rng.next_f64() < uncond_prob).collect();
    let caption_picks = (0..batch).map(|_| rng.next_f64()).collect();
    StepChoices {
        timesteps,
        dropped,
        caption_picks,
    }
}

/// The caption of one batch row: the empty prompt when dropped, else the alternative `pick`
/// (uniform in [0, 1)) selects.
pub(super) fn pick_caption(alternatives: &[String], dropped: bool, pick: f64) -> &str {
    if dropped {
        return "";
    }
    let index = ((pick * alternatives.len() as f64) as usize).min(alternatives.len() - 1);
    &alternatives[index]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_choices_are_uniform_and_reproducible() {
        let choices = step_choices(7, 3, 20_000, 1000, 0.1);
        assert_eq!(choices, step_choices(7, 3, 20_000, 1000, 0.1));
        let StepChoices {
            timesteps,
            dropped,
            caption_picks,
        } = choices;
        assert_ne!(timesteps, step_choices(7, 4, 20_000, 1000, 0.1).timesteps);
        assert!(timesteps.iter().all(|&t| t < 1000));
        let mean = timesteps.iter().sum::<usize>() as f64 / timesteps.len() as f64;
        assert!((mean - 499.5).abs() < 10.0, "mean timestep {mean}");
        let rate = dropped.iter().filter(|&&d| d).count() as f64 / dropped.len() as f64;
        assert!((rate - 0.1).abs() < 0.01, "drop rate {rate}");
        assert!(caption_picks.iter().all(|p| (0.0..1.0).contains(p)));
        let mean = caption_picks.iter().sum::<f64>() / caption_picks.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean caption pick {mean}");
    }

    #[test]
    fn pick_caption_covers_every_alternative() {
        let alternatives = ["a cat".to_string(), "a cat, noto style".to_string()];
        assert_eq!(pick_caption(&alternatives, false, 0.0), "a cat");
        assert_eq!(pick_caption(&alternatives, false, 0.49), "a cat");
        assert_eq!(pick_caption(&alternatives, false, 0.5), "a cat, noto style");
        assert_eq!(
            pick_caption(&alternatives, false, 0.999),
            "a cat, noto style"
        );
        assert_eq!(pick_caption(&alternatives, true, 0.7), "");
    }
}
