//! Convolutional building blocks shared by the VAE and the U-Net: diffusers' `ResnetBlock2D`,
//! `Downsample2D` and `Upsample2D` (the variants Stable Diffusion uses).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::models::nn::{self, Activation, Conv2d, GroupNorm, Linear};

/// The arguments of diffusers' `ResnetBlock2D` that Stable Diffusion varies.
#[derive(Debug, Clone, PartialEq)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for blocks without one (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    /// Groups of the second norm; `None` means `groups`.
    pub groups_out: Option<usize>,
    pub eps: f64,
    /// The residual sum is divided by this.
    pub output_scale_factor: f64,
    pub act: Activation,
}

impl ResnetBlock2DConfig {
    /// diffusers' defaults (eps 1e-6, 32 groups, scale 1, SiLU) for `in_channels -> out_channels`.
    pub fn new(in_channels: usize, out_channels: usize, temb_channels: Option<usize>) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels,
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            output_scale_factor: 1.0,
            act: Activation::Silu,
        }
    }
}

/// norm → act → conv, (+ projected time embedding), norm → act → conv, plus a shortcut.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1×1 projection of the input when the channel count changes.
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let groups_out = cfg.groups_out.unwrap_or(cfg.groups);
        let time_emb_proj = cfg
            .temb_channels
            .map(|temb| nn::linear(temb, cout, true, vb.pp("time_emb_proj")))
            .transpose()?;
        let conv_shortcut = (cin != cout)
            .then(|| nn::conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut")))
            .transpose()?;
        Ok(Self {
            norm1: nn::group_norm(cfg.groups, cin, cfg.eps, vb.pp("norm1"))?,
            conv1: nn::conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: nn::group_norm(groups_out, cout, cfg.eps, vb.pp("norm2"))?,
            conv2: nn::conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            act: cfg.act,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `xs`: `[B, in_channels, H, W]`; `temb`: `[B, temb_channels]` when the block has a
    /// time projection (ignored otherwise). Returns `[B, out_channels, H, W]`.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.norm1.forward_then(xs, self.act)?;
        let mut hidden = self.conv1.forward(&hidden)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let temb = proj.forward(&self.act.apply(temb)?)?;
            hidden = hidden.broadcast_add(&temb.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        }
        let hidden = self.norm2.forward_then(&hidden, self.act)?;
        let hidden = self.conv2.forward(&hidden)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + hidden)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Halves the spatial size with a strided 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// diffusers' `padding == 0`: pad right and bottom by one instead of padding the conv.
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(channels, out_channels, 3, 2, padding, vb.pp("conv"))?,
            pad_bottom_right: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let padded = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(channels, out_channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Doubles `H` and `W`, or resizes to `output_size = (H', W')` (the U-Net passes the skip
    /// connection's size when the down path met odd sizes).
    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (out_h, out_w) = output_size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(xs, out_h, out_w)?)
    }
}

/// Nearest-neighbour resize of `[B, C, H, W]` (PyTorch's `mode="nearest"`).
///
/// Integer factors repeat each pixel with a broadcast, whose backward pass sums correctly;
/// candle's `upsample_nearest2d` backward overwrites rather than accumulates its input's
/// gradient and rejects non-uniform factors. Other sizes fall back to it (forward only).
pub fn upsample_nearest(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if !out_h.is_multiple_of(h) || !out_w.is_multiple_of(w) {
        return xs.upsample_nearest2d(out_h, out_w);
    }
    let (fh, fw) = (out_h / h, out_w / w);
    xs.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, fh, w, fw))?
        .reshape((b, c, out_h, out_w))
}
