//! Layers shared by the CLIP text encoder, the VAE and the U-Net.
//!
//! Every layer has a backward pass: the norms, attention and GEGLU run on ldm's fused
//! `kernels` (candle-nn's fused LayerNorm and softmax have no gradients).

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;
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

pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let linear = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
    Ok(Linear::new(linear.weight().clone(), linear.bias().cloned()))
}

/// `xs · weightᵀ + bias` over the last dimension, as one op (`kernels::linear`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight`: `[out, in]`, `bias`: `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::linear(xs, &self.weight, self.bias.as_ref())
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
