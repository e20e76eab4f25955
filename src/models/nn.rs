//! Layers shared by the CLIP text encoder, the VAE and the U-Net.
//!
//! All of them are built from candle primitives that have backward passes. candle-nn's
//! `LayerNorm` and `softmax_last_dim` use fused kernels without gradients, so we use our own.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

pub use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear};

/// Layer normalisation over the last dimension, computed in f32 for half-precision inputs.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(internal_dtype(dtype))?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// f32 for reductions over half-precision tensors, otherwise the tensor's own dtype.
pub fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb)
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// Differentiable softmax over the last dimension, in f32 for half-precision inputs.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    candle_nn::ops::softmax(&xs.to_dtype(internal_dtype(dtype))?, D::Minus1)?.to_dtype(dtype)
}

/// Multi-head scaled dot-product attention.
///
/// `q`: `[batch, heads, q_len, head_dim]`, `k`/`v`: `[batch, heads, kv_len, head_dim]`;
/// `mask` (added to the scores) broadcasts to `[batch, heads, q_len, kv_len]`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // f16 scores overflow on SD 2.x (diffusers' `upcast_attention`): take them in f32.
    let score_dtype = if dtype == DType::F16 { DType::F32 } else { dtype };
    let q = q.to_dtype(score_dtype)?.contiguous()?;
    let k = k.to_dtype(score_dtype)?.t()?.contiguous()?;
    let scores = (q.matmul(&k)? * scale)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(&mask.to_dtype(score_dtype)?)?,
        None => scores,
    };
    softmax_last_dim(&scores)?
        .to_dtype(dtype)?
        .matmul(&v.contiguous()?)
}

/// `[batch, len, heads * head_dim]` -> `[batch, heads, len, head_dim]`.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, len, dim) = xs.dims3()?;
    xs.reshape((batch, len, heads, dim / heads))?
        .transpose(1, 2)
}

/// `[batch, heads, len, head_dim]` -> `[batch, len, heads * head_dim]`.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (batch, heads, len, head_dim) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((batch, len, heads * head_dim))
}

/// The activations that diffusers and transformers configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // x * sigmoid(1.702 x), as in OpenAI's CLIP.
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
            Activation::Silu => xs.silu(),
        }
    }
}
