//! What the samplers share: f32 scalar arithmetic as torch does it, and (DDIM, DDPM) turning a
//! model output into x̂₀ (and ε̂), then clipping or thresholding x̂₀.
//!
//! Step coefficients are host-side f32 scalars computed in the order diffusers computes its
//! 0-d float32 tensors; each tensor op then rounds once per element, as torch does. Nothing
//! here reads a tensor back: constants are filled on the tensor's device and thresholding's
//! quantile is found there too.

use candle_core::{DType, Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};

/// `tensor · c`, one rounding per element.
pub(super) fn scale(tensor: &Tensor, c: f32) -> Result<Tensor> {
    tensor.affine(c as f64, 0.0)
}

/// `tensor / c` as a true division (not a product with 1/c), as torch computes it.
pub(super) fn divide(tensor: &Tensor, c: f32) -> Result<Tensor> {
    tensor.broadcast_div(&constant(c, tensor)?)
}

/// `c` as a 0-d tensor of `like`'s dtype, filled on its device (candle's scalar operands are
/// uploaded from the host instead).
fn constant(c: f32, like: &Tensor) -> Result<Tensor> {
    Tensor::full(c, (), like.device())?.to_dtype(like.dtype())
}

/// `tensor` clamped to `[low, high]`.
fn clamp(tensor: &Tensor, low: f32, high: f32) -> Result<Tensor> {
    tensor
        .broadcast_maximum(&constant(low, tensor)?)?
        .broadcast_minimum(&constant(high, tensor)?)
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
            Self::Clip(range) => clamp(&original, -range, range),
            Self::Threshold { ratio, max } => threshold(&original, ratio, max),
        }
    }
}

/// Dynamic thresholding in f32 (diffusers upcasts half precision for it).
fn threshold(original: &Tensor, ratio: f32, max: f32) -> Result<Tensor> {
    let dtype = original.dtype();
    let x = original.to_dtype(DType::F32)?;
    let batch = x.dim(0)?;
    let limits = clamp(&quantile_rows(&x.flatten_from(1)?.abs()?, ratio)?, 1.0, max)?;
    let mut shape = vec![1; x.rank()];
    shape[0] = batch;
    let s = limits.reshape(shape)?;
    x.broadcast_maximum(&s.neg()?)?
        .broadcast_minimum(&s)?
        .broadcast_div(&s)?
        .to_dtype(dtype)
}

/// `torch.quantile(rows, q, dim=1, keepdim=True)` of an f32 `[B, N]` tensor with linear
/// interpolation, on the tensor's device: rank = q·(N−1), the order statistics either side
/// of it, and a lerp between them as torch computes it.
fn quantile_rows(rows: &Tensor, q: f32) -> Result<Tensor> {
    let n = rows.dim(1)?;
    let rank = q * (n - 1) as f32;
    let below = rank as usize;
    let weight = rank - below as f32;
    let low = order_statistic(rows, below)?;
    let high = if rank.ceil() as usize > below {
        next_order_statistic(rows, &low, below)?
    } else {
        low.clone()
    };
    let diff = (&high - &low)?;
    if weight.abs() < 0.5 {
        diff.affine(weight as f64, 0.0)? + low
    } else {
        diff.affine((weight - 1.0) as f64, 0.0)? + high
    }
}

/// Bisection steps of [`order_statistic`]: from a bracket of width W the last one is within
/// W·2⁻⁶⁴, below an ulp of every value ≥ 2⁻²³·W.
const BISECTION_STEPS: usize = 64;

/// The `k`-th smallest value (0-based) of each row `[B, N]` -> `[B, 1]`, without sorting or
/// reading back: a per-row bisection keeps `count(x ≤ lo) ≤ k < count(x ≤ hi)`, then the
/// answer is the smallest value above `lo`, exact once no other value lies in `(lo, hi]`
/// (for thresholding: whenever the quantile is ≥ 1, below which it is clamped anyway).
fn order_statistic(rows: &Tensor, k: usize) -> Result<Tensor> {
    let row_max = rows.max_keepdim(1)?;
    let row_min = rows.min_keepdim(1)?;
    // Strictly below every value: min − (|min| + 1).
    let mut lo = (&row_min - row_min.abs()?.affine(1.0, 1.0)?)?;
    let mut hi = row_max.clone();
    let needed = Tensor::full((k + 1) as f32, lo.shape(), rows.device())?;
    for _ in 0..BISECTION_STEPS {
        let mid = ((&lo + &hi)? * 0.5)?;
        let enough = count_at_most(rows, &mid)?.ge(&needed)?;
        hi = enough.where_cond(&mid, &hi)?;
        lo = enough.where_cond(&lo, &mid)?;
    }
    smallest_above(rows, &lo, &row_max)
}

/// The `(k+1)`-th smallest value of each row, given the `k`-th (`low`).
fn next_order_statistic(rows: &Tensor, low: &Tensor, k: usize) -> Result<Tensor> {
    let needed = Tensor::full((k + 2) as f32, low.shape(), rows.device())?;
    let repeated = count_at_most(rows, low)?.ge(&needed)?;
    repeated.where_cond(low, &smallest_above(rows, low, &rows.max_keepdim(1)?)?)
}

/// How many values of each row are ≤ `limit` (`[B, 1]`), as f32 (exact up to 2²⁴ values).
fn count_at_most(rows: &Tensor, limit: &Tensor) -> Result<Tensor> {
    rows.broadcast_le(limit)?
        .to_dtype(DType::F32)?
        .sum_keepdim(1)
}

/// The smallest value of each row above `limit`, or `row_max` when there is none.
fn smallest_above(rows: &Tensor, limit: &Tensor, row_max: &Tensor) -> Result<Tensor> {
    rows.broadcast_gt(limit)?
        .where_cond(rows, &row_max.broadcast_as(rows.shape())?)?
        .min_keepdim(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `torch.quantile` on the host: sort, then torch's fused-multiply-add lerp.
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

    fn device_quantile(values: &[f32], q: f32) -> f32 {
        let rows = Tensor::from_slice(values, (1, values.len()), &Device::Cpu).unwrap();
        quantile_rows(&rows, q)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn quantile_interpolates_linearly() {
        for (values, q, want) in [
            (vec![3.0, 1.0, 2.0, 4.0], 0.5, 2.5),
            (vec![3.0, 1.0, 2.0, 4.0], 1.0, 4.0),
            (vec![3.0, 1.0, 2.0, 4.0], 0.0, 1.0),
            (vec![5.0], 0.995, 5.0),
            (vec![2.0, 2.0, 2.0, 7.0], 0.5, 2.0),
        ] {
            assert_eq!(quantile(values.clone(), q), want);
            assert_eq!(device_quantile(&values, q), want, "{values:?} q={q}");
        }
        let ramp: Vec<f32> = (0..=100).map(|v| v as f32).collect();
        assert!((device_quantile(&ramp, 0.995) - 99.5).abs() < 1e-4);
    }

    #[test]
    fn device_quantile_matches_sorting_on_latent_sized_rows() {
        // |x̂₀|-like rows (16384 values, ties included) at diffusers' default ratio and others:
        // the order statistics are exact, the lerp may differ from torch's fused one by an ulp.
        let mut generator = crate::rng::TorchGenerator::new(7);
        for (scale, q) in [(1.0f32, 0.995f32), (40.0, 0.995), (3.0, 0.5), (8.0, 0.9)] {
            let mut values: Vec<f32> = generator
                .randn(16384)
                .into_iter()
                .map(|v| (v * scale).abs())
                .collect();
            let tie = values[100];
            values[..64].fill(tie);
            let (want, got) = (quantile(values.clone(), q), device_quantile(&values, q));
            assert!(
                (got - want).abs() <= want.abs() * 2.0 * f32::EPSILON,
                "{got} vs {want}"
            );
        }
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
