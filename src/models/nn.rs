//! Layers shared by the CLIP text encoder, the VAE and the U-Net.
//!
//! Every layer has a backward pass: the norms, attention and GEGLU run on ldm's fused
//! `kernels` (candle-nn's fused LayerNorm and softmax have no gradients).

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;
pub use crate::kernels::internal_dtype;
pub use candle_nn::Linear;

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
    let cfg = candle_nn::Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    let conv = candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)?;
    Ok(Conv2d {
        weight: conv.weight().clone(),
        bias: conv.bias().cloned(),
        stride,
        padding,
    })
}

/// A 2-D convolution that is fast both ways on the CPU.
///
/// Inference uses candle's fused im2col convolution. When gradients are tracked on the CPU,
/// candle's backward pass would run its naive `conv_transpose2d` (seconds per step even for
/// small models), so training builds the convolution from shifted views and one matrix product,
/// whose backward pass is matrix products too.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn forward_unfolded(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, in_channels, height, width) = xs.dims4()?;
        let (out_channels, _, kernel_h, kernel_w) = self.weight.dims4()?;
        let p = self.padding;
        let padded = xs.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let (out_h, out_w) = (height + 2 * p + 1 - kernel_h, width + 2 * p + 1 - kernel_w);
        let mut patches = Vec::with_capacity(kernel_h * kernel_w);
        for dy in 0..kernel_h {
            for dx in 0..kernel_w {
                patches.push(padded.narrow(2, dy, out_h)?.narrow(3, dx, out_w)?);
            }
        }
        // [B, kh*kw*Cin, H*W] columns against [Cout, kh*kw*Cin] weights (same ordering).
        let columns = Tensor::cat(&patches, 1)?.reshape((
            batch,
            kernel_h * kernel_w * in_channels,
            out_h * out_w,
        ))?;
        let weight = self
            .weight
            .permute((0, 2, 3, 1))?
            .reshape((out_channels, kernel_h * kernel_w * in_channels))?;
        let ys = weight
            .broadcast_matmul(&columns)?
            .reshape((batch, out_channels, out_h, out_w))?;
        if self.stride == 1 {
            return Ok(ys);
        }
        // A strided convolution is the stride-1 one sampled every `stride` pixels.
        let rows = Tensor::arange_step(0u32, out_h as u32, self.stride as u32, xs.device())?;
        let cols = Tensor::arange_step(0u32, out_w as u32, self.stride as u32, xs.device())?;
        ys.index_select(&rows, 2)?.index_select(&cols, 3)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let training = xs.track_op() || self.weight.track_op();
        let ys = if training && xs.device().is_cpu() {
            self.forward_unfolded(xs)?
        } else {
            xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(bias) => ys.broadcast_add(&bias.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        }
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

/// Multi-head scaled dot-product attention on projected tokens: `q` `[batch, q_len,
/// heads·head_dim]`, `k`/`v` `[batch, kv_len, heads·head_dim]`, returns `[batch, q_len,
/// heads·head_dim]`. `causal`: query `i` sees keys `0..=i` only.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<Tensor> {
    let split = |xs: &Tensor| -> Result<Tensor> {
        let (batch, len, dim) = xs.dims3()?;
        xs.reshape((batch, len, heads, dim / heads))
    };
    let attended = kernels::attention(&split(q)?, &split(k)?, &split(v)?, causal)?;
    attended.flatten_from(2)
}

/// The activations that diffusers and transformers configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The unfolded (training) convolution equals candle's, forward and backward.
    #[test]
    fn unfolded_convolution_matches_candle_both_ways() {
        let device = Device::Cpu;
        // Strided sizes where candle's own backward works (it needs (size + 2p - k) % stride == 0).
        for (kernel, stride, padding, h, w) in [
            (3, 1, 1, 7, 8),
            (1, 1, 0, 5, 6),
            (3, 2, 1, 9, 11),
            (3, 2, 0, 9, 11),
        ] {
            let xs = Var::randn(0f64, 1., (2, 3, h, w), &device).unwrap();
            let weight = Var::randn(0f64, 1., (4, 3, kernel, kernel), &device).unwrap();
            let bias = Tensor::randn(0f64, 1., 4, &device).unwrap();
            let conv = Conv2d {
                weight: weight.as_tensor().clone(),
                bias: Some(bias.clone()),
                stride,
                padding,
            };
            let ours = conv.forward(xs.as_tensor()).unwrap();
            let reference = xs
                .conv2d(&weight, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                diff(&ours, &reference) < 1e-10,
                "forward k{kernel} s{stride} p{padding}"
            );
            let target = Tensor::randn(0f64, 1., ours.dims(), &device).unwrap();
            let grads_ours = (ours * &target)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads_ref = (reference * &target)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for var in [&xs, &weight] {
                let (a, b) = (grads_ours.get(var).unwrap(), grads_ref.get(var).unwrap());
                assert!(diff(a, b) < 1e-9, "gradient k{kernel} s{stride} p{padding}");
            }
        }
    }
}
