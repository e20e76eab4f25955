//! Layers shared by the CLIP text encoder, the VAE and the U-Net.
//!
//! Every layer has a backward pass: the norms, attention and GEGLU run on ldm's fused
//! `kernels` (candle-nn's fused LayerNorm and softmax have no gradients).

use std::cell::Cell;
use std::sync::Arc;

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;
use crate::kernels::q8_0::{linear_q8, Q8Matrix};
pub use crate::kernels::{internal_dtype, Activation};

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
        kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// Group normalisation over `[batch, channels, ...]`, statistics in f32 for half precision.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// The normalisation followed by `act`; fused into one pass when `act` is SiLU.
    pub fn forward_then(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu {
            kernels::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, true)
        } else {
            act.apply(&self.forward(xs)?)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, false)
    }
}

/// How linear layers built inside [`with_quantization`] store their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    /// ggml's q8_0: 8-bit values in blocks of 32 sharing an f16 scale (CPU only).
    #[value(name = "q8_0")]
    Q8_0,
}

impl Quantization {
    /// The name the command line and the PNG record use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
        }
    }
}

thread_local! {
    static QUANTIZATION: Cell<Option<Quantization>> = const { Cell::new(None) };
}

/// Builds a model whose linear layers store their weights as `quantization` says (where a
/// layer's rows are whole blocks; the others keep their dtype). Inference only.
pub fn with_quantization<R>(quantization: Option<Quantization>, build: impl FnOnce() -> R) -> R {
    let outer = QUANTIZATION.replace(quantization);
    let built = build();
    QUANTIZATION.set(outer);
    built
}

pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let linear = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
    Linear::new(linear.weight().clone(), linear.bias().cloned())
}

/// `xs · weightᵀ + bias` over the last dimension, as one op (`kernels::linear`), or with an
/// 8-bit weight (`kernels::q8_0`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    Q8_0(Arc<Q8Matrix>),
}

impl Linear {
    /// `weight`: `[out, in]`, `bias`: `[out]`; quantized inside [`with_quantization`].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (_, in_dim) = weight.dims2()?;
        let weight = match QUANTIZATION.get() {
            Some(Quantization::Q8_0) if Q8Matrix::fits(in_dim) => {
                if !weight.device().is_cpu() {
                    bail!("q8_0 weights run on the CPU only");
                }
                LinearWeight::Q8_0(Arc::new(Q8Matrix::quantize(&weight)?))
            }
            _ => LinearWeight::Dense(weight),
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(weight) => kernels::linear(xs, weight, self.bias.as_ref()),
            LinearWeight::Q8_0(weight) => linear_q8(xs, weight, self.bias.as_ref()),
        }
    }
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    let conv = candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)?;
    let bias = match conv.bias() {
        Some(bias) => bias.clone(),
        None => bail!("conv2d: a bias is required"),
    };
    Ok(Conv2d {
        weight: conv.weight().clone(),
        bias,
        stride,
        padding,
    })
}

/// A 2-D convolution with bias on ldm's convolution kernel (forward and backward).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::conv2d(xs, &self.weight, &self.bias, self.stride, self.padding)
    }
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        bail!("GroupNorm: {groups} groups do not divide {channels} channels");
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
        groups,
        eps,
    })
}
