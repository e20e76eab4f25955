//! What the samplers share: f32 scalar arithmetic as torch does it, and (DDIM, DDPM) turning a
//! model output into x̂₀ (and ε̂), then clipping or thresholding x̂₀.
//!
//! Step coefficients are host-side f32 scalars computed in the order diffusers computes its
//! 0-d float32 tensors; each tensor op then rounds once per element, as torch does.

use candle_core::{DType, Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};

/// `tensor · c`, one rounding per element.
pub(super) fn scale(tensor: &Tensor, c: f32) -> Result<Tensor> {
    tensor.affine(c as f64, 0.0)
}

/// `tensor / c` as a true division (not a product with 1/c), as torch computes it.
pub(super) fn divide(tensor: &Tensor, c: f32) -> Result<Tensor> {
    let divisor = Tensor::new(c, tensor.device())?.to_dtype(tensor.dtype())?;
    tensor.broadcast_div(&divisor)
}

impl PredictionType {
    /// x̂₀ from the model output at a timestep with cumulative alpha `alpha_prod`.
    pub(super) fn original_sample(
        self,
        model_output: &Tensor,
        sample: &Tensor,
        alpha_prod: f32,
    ) -> Result<Tensor> {
        let (sqrt_alpha, sqrt_beta) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
        match self {
            Self::Epsilon => divide(&(sample - scale(model_output, sqrt_beta)?)?, sqrt_alpha),
            Self::VPrediction => scale(sample, sqrt_alpha)? - scale(model_output, sqrt_beta)?,
            Self::Sample => Ok(model_output.clone()),
        }
    }

    /// ε̂ from the model output (from the unclipped x̂₀, as diffusers' DDIM).
    pub(super) fn epsilon(
        self,
        model_output: &Tensor,
        sample: &Tensor,
        alpha_prod: f32,
    ) -> Result<Tensor> {
        let (sqrt_alpha, sqrt_beta) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
        match self {
            Self::Epsilon => Ok(model_output.clone()),
            Self::VPrediction => scale(model_output, sqrt_alpha)? + scale(sample, sqrt_beta)?,
            Self::Sample => divide(&(sample - scale(model_output, sqrt_alpha)?)?, sqrt_beta),
        }
    }
}

/// How x̂₀ is kept in range before it is used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum OriginalSampleLimit {
    None,
    /// Clamp to [-range, range].
    Clip(f32),
    /// Imagen's dynamic thresholding: per batch row, s = clamp(quantile(|x̂₀|, ratio), 1, max),
    /// then x̂₀ ← clamp(x̂₀, -s, s) / s.
    Threshold {
        ratio: f32,
        max: f32,
    },
}

impl OriginalSampleLimit {
    pub(super) fn from_config(config: &SchedulerConfig) -> Self {
        if config.thresholding {
            Self::Threshold {
                ratio: config.dynamic_thresholding_ratio as f32,
                max: config.sample_max_value as f32,
            }
        } else if config.clip_sample {
            Self::Clip(config.clip_sample_range as f32)
        } else {
            Self::None
        }
    }

    pub(super) fn apply(self, original: Tensor) -> Result<Tensor> {
        match self {
            Self::None => Ok(original),
            Self::Clip(range) => original.clamp(-range, range),
            Self::Threshold { ratio, max } => threshold(&original, ratio, max),
        }
    }
}

/// Dynamic thresholding in f32 (diffusers upcasts half precision for it), with the quantile
/// taken on the host.
fn threshold(original: &Tensor, ratio: f32, max: f32) -> Result<Tensor> {
    let dtype = original.dtype();
    let x = original.to_dtype(DType::F32)?;
    let batch = x.dim(0)?;
    let rows = x.flatten_from(1)?.abs()?.to_vec2::<f32>()?;
    let limits: Vec<f32> = rows
        .into_iter()
        .map(|row| quantile(row, ratio).max(1.0).min(max))
        .collect();
    let mut shape = vec![1; x.rank()];
    shape[0] = batch;
    let s = Tensor::from_vec(limits, shape, x.device())?;
    x.broadcast_maximum(&s.neg()?)?
        .broadcast_minimum(&s)?
        .broadcast_div(&s)?
        .to_dtype(dtype)
}

/// `torch.quantile(values, q)` with linear interpolation, in f32 like torch: rank = q·(n−1),
/// then a fused-multiply-add `lerp` between the neighbouring sorted values.
fn quantile(mut values: Vec<f32>, q: f32) -> f32 {
    values.sort_by(f32::total_cmp);
    let rank = q * (values.len() - 1) as f32;
    let below = rank as usize;
    let weight = rank - below as f32;
    let (low, high) = (values[below], values[rank.ceil() as usize]);
    let diff = high - low;
    if weight.abs() < 0.5 {
        weight.mul_add(diff, low)
    } else {
        (weight - 1.0).mul_add(diff, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantile_interpolates_linearly() {
        assert_eq!(quantile(vec![3.0, 1.0, 2.0, 4.0], 0.5), 2.5);
        assert_eq!(quantile(vec![3.0, 1.0, 2.0, 4.0], 1.0), 4.0);
        assert_eq!(quantile(vec![5.0], 0.995), 5.0);
        assert!((quantile((0..=100).map(|v| v as f32).collect(), 0.995) - 99.5).abs() < 1e-4);
    }

    #[test]
    fn thresholding_limits_each_row_separately() -> Result<()> {
        // Row 0 stays within [-1, 1] (s = 1: plain clipping); row 1 has s = 2 (max).
        let x = Tensor::new(&[[0.5f32, -3.0, 0.25], [4.0, -8.0, 1.0]], &Device::Cpu)?;
        let limit = OriginalSampleLimit::Threshold {
            ratio: 0.5,
            max: 2.0,
        };
        let out = limit.apply(x)?.to_vec2::<f32>()?;
        assert_eq!(out, [[0.5, -1.0, 0.25], [1.0, -1.0, 0.5]]);
        Ok(())
    }

    #[test]
    fn epsilon_v_and_sample_predictions_agree_on_x0_and_eps() -> Result<()> {
        let dev = Device::Cpu;
        let alpha: f32 = 0.3;
        let x0 = Tensor::new(&[0.7f32, -0.2, 1.5], &dev)?;
        let eps = Tensor::new(&[-1.1f32, 0.4, 0.9], &dev)?;
        let xt = (scale(&x0, alpha.sqrt())? + scale(&eps, (1.0 - alpha).sqrt())?)?;
        let v = (scale(&eps, alpha.sqrt())? - scale(&x0, (1.0 - alpha).sqrt())?)?;
        for (kind, output) in [
            (PredictionType::Epsilon, &eps),
            (PredictionType::VPrediction, &v),
            (PredictionType::Sample, &x0),
        ] {
            let got_x0 = kind.original_sample(output, &xt, alpha)?;
            let got_eps = kind.epsilon(output, &xt, alpha)?;
            let diff_x0 = (got_x0 - &x0)?.abs()?.max(0)?.to_scalar::<f32>()?;
            let diff_eps = (got_eps - &eps)?.abs()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                diff_x0 < 1e-6 && diff_eps < 1e-6,
                "{kind:?}: {diff_x0} {diff_eps}"
            );
        }
        Ok(())
    }
}
