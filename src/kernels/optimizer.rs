//! The optimizer's elementwise work as single parallel passes: the AdamW update of a variable
//! and its moments, the EMA of the weights, and the squared gradient norms for clipping.
//!
//! From candle's ops the AdamW update is a dozen elementwise passes, each a fresh buffer on
//! one thread (candle's own elementwise pool is kept to the calling thread, see `threads`): in
//! a two-thread training step of the default model that serial stretch was a few percent of
//! the step. Here each element is read once and its new values written once, in parallel
//! chunks. Not graph ops: the optimizer is never differentiated.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::read_f32;

/// The scalars of one update (`torch.optim.AdamW`'s formula):
///
/// ```text
/// m ← β1 · m + (1 − β1) · g
/// v ← β2 · v + (1 − β2) · g²
/// θ ← θ · decay − step_size · m / (√v · inv_bias_correction2_sqrt + eps)
/// ```
#[derive(Debug, Clone, Copy)]
pub struct AdamWUpdate {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 − lr · weight_decay`.
    pub decay: f64,
    /// `lr / (1 − β1^t)`.
    pub step_size: f64,
    /// `1 / √(1 − β2^t)`.
    pub inv_bias_correction2_sqrt: f64,
}

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// The updated `(θ, m, v)` for parameter `theta`, gradient `grad` and moments `exp_avg`,
/// `exp_avg_sq` (all of one shape; θ in its own dtype, the rest in the moments' dtype).
pub fn adamw_update(
    theta: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    update: &AdamWUpdate,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !all_f32_cpu(&[theta, grad, exp_avg, exp_avg_sq]) {
        return adamw_update_composed(theta, grad, exp_avg, exp_avg_sq, update);
    }
    let len = theta.elem_count();
    let (mut new_theta, mut new_m, mut new_v) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
    let [beta1, beta2, eps, decay, step_size, inv_bc2] = [
        update.beta1,
        update.beta2,
        update.eps,
        update.decay,
        update.step_size,
        update.inv_bias_correction2_sqrt,
    ]
    .map(|x| x as f32);
    let (one_minus_beta1, one_minus_beta2) =
        ((1.0 - update.beta1) as f32, (1.0 - update.beta2) as f32);
    read_f32(theta, |theta| {
        read_f32(grad, |grad| {
            read_f32(exp_avg, |m| {
                read_f32(exp_avg_sq, |v| {
                    new_theta
                        .par_chunks_mut(CHUNK)
                        .zip(new_m.par_chunks_mut(CHUNK))
                        .zip(new_v.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(chunk, ((out_theta, out_m), out_v))| {
                            let range = chunk * CHUNK..chunk * CHUNK + out_theta.len();
                            let inputs = theta[range.clone()]
                                .iter()
                                .zip(&grad[range.clone()])
                                .zip(&m[range.clone()])
                                .zip(&v[range]);
                            let outputs = out_theta.iter_mut().zip(out_m).zip(out_v);
                            for ((((&theta, &g), &m), &v), ((out_theta, out_m), out_v)) in
                                inputs.zip(outputs)
                            {
                                // The composed path's operations in its order (candle's
                                // `x * c` and `x + c` are affine maps `x · mul + add`).
                                let m = m * beta1 + g * one_minus_beta1;
                                let v = v * beta2 + g * g * one_minus_beta2;
                                let denom = v.sqrt() * inv_bc2 + eps;
                                *out_theta = theta * decay - (m / denom) * step_size;
                                *out_m = m;
                                *out_v = v;
                            }
                        });
                    Ok(())
                })
            })
        })
    })?;
    let make = |values: Vec<f32>| Tensor::from_vec(values, theta.shape(), theta.device());
    Ok((make(new_theta)?, make(new_m)?, make(new_v)?))
}

/// The same update from candle's ops (the reference, and the path on GPUs and for half
/// precision parameters, whose moments are f32).
pub fn adamw_update_composed(
    theta: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    update: &AdamWUpdate,
) -> Result<(Tensor, Tensor, Tensor)> {
    let exp_avg = ((exp_avg * update.beta1)? + (grad * (1.0 - update.beta1))?)?;
    let exp_avg_sq = ((exp_avg_sq * update.beta2)? + (grad.sqr()? * (1.0 - update.beta2))?)?;
    let denom = ((exp_avg_sq.sqrt()? * update.inv_bias_correction2_sqrt)? + update.eps)?;
    let theta_moments = theta.to_dtype(grad.dtype())?;
    let decayed = (&theta_moments * update.decay)?;
    let updated = (decayed - ((&exp_avg / denom)? * update.step_size)?)?;
    Ok((updated.to_dtype(theta.dtype())?, exp_avg, exp_avg_sq))
}

/// `shadow · decay + current · (1 − decay)`, the EMA update (`current` in the shadow's dtype).
pub fn ema_update(shadow: &Tensor, current: &Tensor, decay: f64) -> Result<Tensor> {
    if !all_f32_cpu(&[shadow, current]) {
        return ema_update_composed(shadow, current, decay);
    }
    let (d, one_minus_d) = (decay as f32, (1.0 - decay) as f32);
    let mut out = vec![0f32; shadow.elem_count()];
    read_f32(shadow, |shadow| {
        read_f32(current, |current| {
            out.par_chunks_mut(CHUNK)
                .zip(shadow.par_chunks(CHUNK).zip(current.par_chunks(CHUNK)))
                .for_each(|(out, (shadow, current))| {
                    for ((o, &s), &c) in out.iter_mut().zip(shadow).zip(current) {
                        // The composed path's affine maps and add, in its order.
                        *o = s * d + c * one_minus_d;
                    }
                });
            Ok(())
        })
    })?;
    Tensor::from_vec(out, shadow.shape(), shadow.device())
}

/// The same from candle's ops (reference, GPU and half-precision path).
pub fn ema_update_composed(shadow: &Tensor, current: &Tensor, decay: f64) -> Result<Tensor> {
    (shadow * decay)? + (current * (1.0 - decay))?
}

/// `Σ x²` over all of `xs` in f32, as a 0-dimensional tensor on `xs`'s device.
pub fn sum_squares(xs: &Tensor) -> Result<Tensor> {
    if !all_f32_cpu(&[xs]) {
        return sum_squares_composed(xs);
    }
    // Fixed chunks summed in order: the result does not depend on the thread count.
    let partials: Vec<f32> = read_f32(xs, |xs| {
        Ok(xs
            .par_chunks(CHUNK)
            .map(|chunk| super::simd::dot(chunk, chunk))
            .collect())
    })?;
    Tensor::new(partials.iter().sum::<f32>(), xs.device())
}

/// The same from candle's ops.
pub fn sum_squares_composed(xs: &Tensor) -> Result<Tensor> {
    xs.to_dtype(DType::F32)?.sqr()?.sum_all()
}

fn all_f32_cpu(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three updates of a parameter that is not a multiple of the chunk size: the kernel
    /// performs the composed path's f32 operations in the same order, so the results agree
    /// to the last bit.
    #[test]
    fn fused_update_matches_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (3, CHUNK / 2 + 7);
        let mut theta = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let mut m = theta.zeros_like()?;
        let mut v = theta.zeros_like()?;
        let (mut theta_ref, mut m_ref, mut v_ref) = (theta.clone(), m.clone(), v.clone());
        for t in 1..=3 {
            let grad = Tensor::randn(0f32, 0.1, shape, &dev)?;
            let update = AdamWUpdate {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                decay: 1.0 - 1e-3 * 1e-2,
                step_size: 1e-3 / (1.0 - 0.9f64.powi(t)),
                inv_bias_correction2_sqrt: 1.0 / (1.0 - 0.999f64.powi(t)).sqrt(),
            };
            (theta, m, v) = adamw_update(&theta, &grad, &m, &v, &update)?;
            (theta_ref, m_ref, v_ref) =
                adamw_update_composed(&theta_ref, &grad, &m_ref, &v_ref, &update)?;
        }
        for (got, want) in [(&theta, &theta_ref), (&m, &m_ref), (&v, &v_ref)] {
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        Ok(())
    }

    #[test]
    fn ema_and_squared_norm_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (5, CHUNK / 3 + 11);
        let shadow = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let current = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let fused = ema_update(&shadow, &current, 0.9)?;
        let composed = ema_update_composed(&shadow, &current, 0.9)?;
        let diff = (fused - composed)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let fused = sum_squares(&current)?.to_scalar::<f32>()?;
        let composed = sum_squares_composed(&current)?.to_scalar::<f32>()?;
        assert!(
            (fused - composed).abs() <= 1e-5 * composed,
            "{fused} vs {composed}"
        );
        Ok(())
    }
}
