//! The pointwise activations that diffusers and transformers configs name, as one CPU pass
//! each way.
//!
//! From candle's ops QuickGELU (`x · σ(1.702 x)`, CLIP's MLP) is three graph nodes over the
//! MLP's widest activations, each a single-threaded pass forward and a zero-filled gradient
//! buffer plus an add backward; here it is one node whose forward and backward are parallel,
//! vectorised passes.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, read_f32, simd, uses_cpu_kernel};

/// The activations that diffusers and transformers configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · σ(1.702 x)`, as in OpenAI's CLIP.
    QuickGelu,
    /// `x Φ(x)` with the exact (erf) form.
    Gelu,
    /// `x · σ(x)`.
    #[serde(alias = "swish")]
    Silu,
}

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

impl Activation {
    /// The activation of every element of `xs` (half precision computed in f32).
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        if !uses_cpu_kernel(xs) {
            return self.apply_composed(xs);
        }
        let dtype = xs.dtype();
        xs.to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1(ActivationOp(self))?
            .to_dtype(dtype)
    }

    /// The same from candle's ops (reference and GPU path).
    pub fn apply_composed(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
            Activation::Silu => xs.silu(),
        }
    }
}

struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "ldm-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, "activation: the input")?;
        let mut ys = vec![0f32; xs.len()];
        ys.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(ys, xs)| simd::activation(self.0, xs, ys));
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, _ys: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = read_f32(xs, |xs| {
            read_f32(grad, |grad| {
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
                    .for_each(|(dx, (xs, dy))| simd::activation_backward(self.0, xs, dy, dx));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, xs.shape(), xs.device())?))
    }
}
