//! diffusers' `Transformer2DModel` on image-shaped inputs: the U-Net's spatial transformer that
//! lets every latent pixel attend to the others and to the text encoder's hidden states.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::nn::{conv2d, group_norm, linear, Conv2d, GroupNorm, LayerNorm, Linear};

/// diffusers' fixed GroupNorm epsilon in `Transformer2DModel`.
const GROUP_NORM_EPS: f64 = 1e-6;
/// diffusers' default LayerNorm epsilon in `BasicTransformerBlock`.
const LAYER_NORM_EPS: f64 = 1e-5;
/// Hidden width of the feed-forward network, relative to the model width.
const FEED_FORWARD_MULT: usize = 4;

/// The architecture of one `Transformer2DModel`, as the U-Net blocks build it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transformer2DConfig {
    pub in_channels: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    /// Number of stacked `BasicTransformerBlock`s.
    pub num_layers: usize,
    pub norm_num_groups: usize,
    pub cross_attention_dim: usize,
    /// Linear `proj_in`/`proj_out` (SD 2.x) instead of 1x1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
    /// The first attention also attends to the context instead of to the image itself.
    pub only_cross_attention: bool,
}

/// GELU-gated linear unit: `proj` yields value and gate halves, output `value * gelu(gate)`.
#[derive(Debug, Clone)]
struct GeGlu {
    proj: Linear,
}

impl Module for GeGlu {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::kernels::geglu(&self.proj.forward(xs)?)
    }
}

/// diffusers' `FeedForward` with a GEGLU activation: `net.0` (GEGLU), `net.2` (output linear).
#[derive(Debug, Clone)]
struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner_dim = dim * FEED_FORWARD_MULT;
        let proj = linear(dim, 2 * inner_dim, true, vb.pp("net.0.proj"))?;
        Ok(Self {
            geglu: GeGlu { proj },
            out: linear(inner_dim, dim, true, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.geglu.forward(xs)?)
    }
}

/// Pre-norm transformer layer: self-attention, cross-attention, feed-forward, each residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, cfg: &Transformer2DConfig) -> Result<Self> {
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.attention_head_dim;
        let attn1_context = cfg.only_cross_attention.then_some(cfg.cross_attention_dim);
        Ok(Self {
            norm1: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_context, heads, head_dim, false)?,
            norm2: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cfg.cross_attention_dim),
                heads,
                head_dim,
                false,
            )?,
            norm3: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    /// `xs`: `[batch, tokens, dim]`, `context`: `[batch, context_len, cross_attention_dim]`.
    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let attn1_context = self.only_cross_attention.then_some(context);
        let xs = (self
            .attn1
            .forward(&self.norm1.forward(xs)?, attn1_context)?
            + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + &xs
    }
}

/// The projection into and out of the transformer width.
#[derive(Debug, Clone)]
enum Projection {
    /// 1x1 convolution, applied to the image layout `[batch, channels, height, width]`.
    Conv(Conv2d),
    /// Linear layer, applied to the token layout `[batch, height * width, channels]`.
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Self::Linear(linear(in_dim, out_dim, true, vb)?)
        } else {
            Self::Conv(conv2d(in_dim, out_dim, 1, 1, 0, vb)?)
        })
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let channels = cfg.in_channels;
        let inner_dim = cfg.num_attention_heads * cfg.attention_head_dim;
        let linear = cfg.use_linear_projection;
        let blocks_vb = vb.pp("transformer_blocks");
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| BasicTransformerBlock::new(blocks_vb.pp(i), inner_dim, cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(cfg.norm_num_groups, channels, GROUP_NORM_EPS, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), channels, inner_dim, linear)?,
            transformer_blocks,
            proj_out: Projection::new(vb.pp("proj_out"), inner_dim, channels, linear)?,
        })
    }

    /// `xs`: `[batch, channels, height, width]`, `context`: `[batch, context_len, cross_dim]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => image_to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&image_to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&tokens_to_image(&tokens, height, width)?)?,
            Projection::Linear(linear) => {
                tokens_to_image(&linear.forward(&tokens)?, height, width)?
            }
        };
        out + xs
    }
}

/// `[batch, channels, height, width]` -> `[batch, height * width, channels]`.
fn image_to_tokens(xs: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = xs.dims4()?;
    xs.permute((0, 2, 3, 1))?
        .reshape((batch, height * width, channels))
}

/// `[batch, height * width, channels]` -> `[batch, channels, height, width]`.
fn tokens_to_image(xs: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (batch, _, channels) = xs.dims3()?;
    xs.reshape((batch, height, width, channels))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}
