//! Softmax over the last dimension with a backward pass (candle's fused `softmax_last_dim`
//! has none).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{contiguous_f32, internal_dtype, simd, uses_cpu_kernel, uses_gpu_kernel};

/// Softmax over the last dimension, computed in f32 for half-precision inputs.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if uses_gpu_kernel(xs) {
        // candle's kernel accumulates half precision in f32.
        return candle_nn::ops::softmax_last_dim(&xs.contiguous()?);
    }
    if !uses_cpu_kernel(xs) {
        return softmax_last_dim_composed(xs);
    }
    let dtype = xs.dtype();
    xs.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(Softmax)?
        .to_dtype(dtype)
}

/// The same from candle's primitive ops (reference and GPU path).
pub fn softmax_last_dim_composed(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    candle_nn::ops::softmax(&xs.to_dtype(internal_dtype(dtype))?, D::Minus1)?.to_dtype(dtype)
}

fn contiguous_rows<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
    let dim = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    Ok((contiguous_f32(storage, layout, "softmax: the input")?, dim))
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ldm-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xs, dim) = contiguous_rows(storage, layout)?;
        let mut ys = xs.to_vec();
        ys.par_chunks_mut(dim).with_min_len(16).for_each(|row| {
            simd::softmax_in_place(row);
        });
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }

    fn bwd(&self, _xs: &Tensor, ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            ys.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// `dx = y ∘ (dy − Σ dy ∘ y)` per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "ldm-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        ys_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ys, dim) = contiguous_rows(ys, ys_layout)?;
        let (grad, _) = contiguous_rows(grad, grad_layout)?;
        let mut dx = vec![0f32; ys.len()];
        dx.par_chunks_mut(dim)
            .zip(ys.par_chunks(dim).zip(grad.par_chunks(dim)))
            .with_min_len(16)
            .for_each(|(dx, (y, g))| {
                let inner = simd::dot(y, g);
                for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *d = y * (g - inner);
                }
            });
        Ok((CpuStorage::F32(dx), ys_layout.shape().clone()))
    }
}
