//! Adding a per-channel bias over the last dimension, with a fast backward pass.
//!
//! candle's `broadcast_add` backward sums the gradient over the broadcast leading dimensions
//! with a strided reduction, which dominated the bias gradients of every linear layer in
//! training; here the column sums are one parallel pass over row chunks.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, read_f32, sum_partials, uses_cpu_kernel, ROW_CHUNKS};

/// `xs + bias` for `xs: [..., channels]` and `bias: [channels]`.
pub fn add_bias(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !uses_cpu_kernel(xs) {
        return add_bias_composed(xs, bias);
    }
    let dtype = xs.dtype();
    xs.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2(&bias.to_dtype(DType::F32)?, AddBias)?
        .to_dtype(dtype)
}

/// The same with candle's broadcast add (reference and GPU path).
pub fn add_bias_composed(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    xs.broadcast_add(bias)
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "ldm-add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let channels = xs_layout.dims().last().copied().unwrap_or(1);
        let xs = contiguous_f32(xs, xs_layout, "add_bias: the input")?;
        let bias = super::channel_values(bias, bias_layout, channels)?;
        let mut ys = xs.to_vec();
        if channels > 0 {
            ys.par_chunks_mut(channels)
                .with_min_len(64)
                .for_each(|row| {
                    for (y, &b) in row.iter_mut().zip(bias) {
                        *y += b;
                    }
                });
        }
        Ok((CpuStorage::F32(ys), xs_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let channels = bias.elem_count();
        let rows = grad.elem_count() / channels.max(1);
        let chunk_rows = rows.div_ceil(ROW_CHUNKS).max(1);
        let chunks = rows.div_ceil(chunk_rows).max(1);
        let mut partial = vec![0f32; chunks * channels];
        read_f32(grad, |grad| {
            if channels > 0 {
                partial
                    .par_chunks_mut(channels)
                    .zip(grad.par_chunks(chunk_rows * channels))
                    .for_each(|(sums, rows)| {
                        for row in rows.chunks_exact(channels) {
                            for (s, &g) in sums.iter_mut().zip(row) {
                                *s += g;
                            }
                        }
                    });
            }
            Ok(())
        })?;
        let dbias = sum_partials(partial, chunks, channels, grad.device())?;
        Ok((Some(grad.clone()), Some(dbias)))
    }
}
