//! LayerNorm over the last dimension as one CPU pass forward and one backward (candle's fused
//! `layer_norm` has no backward pass).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{
    internal_dtype, read_f32, simd, sum_partials, uses_cpu_kernel, uses_gpu_kernel, ROW_CHUNKS,
};

/// `(xs − mean) / √(var + eps) · weight + bias` over the last dimension (statistics in f32
/// for half-precision inputs).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if uses_gpu_kernel(xs) && !weight.track_op() && !bias.track_op() {
        // candle's kernel accumulates in f32; its parameters must match the input's dtype.
        let dtype = xs.dtype();
        return candle_nn::ops::layer_norm(
            &xs.contiguous()?,
            &weight.to_dtype(dtype)?,
            &bias.to_dtype(dtype)?,
            eps as f32,
        );
    }
    if !uses_cpu_kernel(xs) {
        return layer_norm_composed(xs, weight, bias, eps);
    }
    let dtype = xs.dtype();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    f32(xs)?
        .contiguous()?
        .apply_op3(&f32(weight)?, &f32(bias)?, LayerNormOp { eps: eps as f32 })?
        .to_dtype(dtype)
}

/// The same from candle's primitive ops (reference and GPU path).
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(internal_dtype(dtype))?;
    let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

struct LayerNormOp {
    eps: f32,
}

/// Rows per work item when `rows` rows are split into at most `ROW_CHUNKS` items.
fn rows_per_chunk(rows: usize) -> usize {
    rows.div_ceil(ROW_CHUNKS).max(1)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ldm-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = xs_layout.shape().dims().last().copied().unwrap_or(1);
        let xs = super::contiguous_f32(xs, xs_layout, "layer norm: the input")?;
        let weight = super::channel_values(weight, weight_layout, dim)?;
        let bias = super::channel_values(bias, bias_layout, dim)?;
        let mut ys = vec![0f32; xs.len()];
        if dim > 0 {
            ys.par_chunks_mut(dim)
                .zip(xs.par_chunks(dim))
                .with_min_len(16)
                .for_each(|(ys, xs)| {
                    let (mean, rstd) = simd::moments(xs, self.eps);
                    simd::normalize_affine(xs, ys, mean, rstd, weight, bias);
                });
        }
        Ok((CpuStorage::F32(ys), xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = xs.dim(D::Minus1)?;
        let rows = xs.elem_count() / dim.max(1);
        let chunk_rows = rows_per_chunk(rows);
        let chunks = rows.div_ceil(chunk_rows);
        let weight = weight.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.elem_count()];
        let mut dweight = vec![0f32; chunks * dim];
        let mut dbias = vec![0f32; chunks * dim];
        read_f32(xs, |xs| {
            read_f32(grad, |grad| {
                if dim == 0 {
                    return Ok(());
                }
                dx.par_chunks_mut(chunk_rows * dim)
                    .zip(dweight.par_chunks_mut(dim))
                    .zip(dbias.par_chunks_mut(dim))
                    .enumerate()
                    .for_each(|(chunk, ((dx, dweight), dbias))| {
                        let first = chunk * chunk_rows * dim;
                        for (r, dx) in dx.chunks_mut(dim).enumerate() {
                            let span = first + r * dim..first + (r + 1) * dim;
                            let (xs, dy) = (&xs[span.clone()], &grad[span]);
                            let stats = simd::moments(xs, self.eps);
                            simd::layer_norm_backward(xs, dy, dx, stats, &weight, dweight, dbias);
                        }
                    });
                Ok(())
            })
        })?;
        let device = xs.device();
        let dx = Tensor::from_vec(dx, xs.shape(), device)?;
        let summed = |v: Vec<f32>| sum_partials(v, chunks, dim, device);
        Ok((Some(dx), Some(summed(dweight)?), Some(summed(dbias)?)))
    }
}
