//! GEGLU, the gated activation of the U-Net's feed-forward layers: `value · gelu(gate)` where
//! value and gate are the two halves of the last dimension, in one CPU pass each way.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use super::{contiguous_f32, simd, uses_cpu_kernel};

/// `xs[..., :n] · gelu(xs[..., n:])` for `xs: [..., 2n]` (exact erf GELU, as diffusers).
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    if xs.dim(D::Minus1)? % 2 != 0 {
        bail!("geglu: the last dimension of {:?} is odd", xs.dims());
    }
    if !uses_cpu_kernel(xs) {
        return geglu_composed(xs);
    }
    let dtype = xs.dtype();
    xs.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(Geglu)?
        .to_dtype(dtype)
}

/// The same from candle's primitive ops (reference and GPU path).
pub fn geglu_composed(xs: &Tensor) -> Result<Tensor> {
    let halves = xs.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// The input as rows of `[value | gate]` and the half width.
fn halves<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
    let width = layout.shape().dims().last().copied().unwrap_or(0);
    Ok((
        contiguous_f32(storage, layout, "geglu: the input")?,
        width / 2,
    ))
}

/// Row chunks of at least ~16k values per task.
fn min_rows(half: usize) -> usize {
    (16 * 1024 / half.max(1)).max(1)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "ldm-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xs, half) = halves(storage, layout)?;
        let mut dims = layout.shape().dims().to_vec();
        *dims.last_mut().expect("geglu input has dims") = half;
        let mut ys = vec![0f32; xs.len() / 2];
        if half > 0 {
            ys.par_chunks_mut(half)
                .zip(xs.par_chunks(2 * half))
                .with_min_len(min_rows(half))
                .for_each(|(ys, xs)| {
                    let (value, gate) = xs.split_at(half);
                    simd::geglu_row(value, gate, ys);
                });
        }
        Ok((CpuStorage::F32(ys), Shape::from(dims)))
    }

    fn bwd(&self, xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            xs.apply_op2_no_bwd(&grad.contiguous()?, &GegluBackward)?,
        ))
    }
}

/// d value = dy · gelu(gate), d gate = dy · value · gelu'(gate).
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "ldm-geglu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, half) = halves(xs, xs_layout)?;
        let grad = contiguous_f32(grad, grad_layout, "geglu backward: the gradient")?;
        let mut dx = vec![0f32; xs.len()];
        if half > 0 {
            dx.par_chunks_mut(2 * half)
                .zip(xs.par_chunks(2 * half).zip(grad.par_chunks(half)))
                .with_min_len(min_rows(half))
                .for_each(|(dx, (xs, dy))| {
                    let (value, gate) = xs.split_at(half);
                    let (dvalue, dgate) = dx.split_at_mut(half);
                    simd::geglu_row_backward(value, gate, dy, dvalue, dgate);
                });
        }
        Ok((CpuStorage::F32(dx), xs_layout.shape().clone()))
    }
}
