//! diffusers' `AutoencoderKL`: the VAE that maps images to the latent space and back.
//!
//! The encoder predicts a diagonal Gaussian posterior (`DiagonalGaussian`), whose mean, log-variance,
//! reparameterised sample and closed-form KL term are all differentiable for training.

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::config::SampleSize;
use crate::models::attention::Attention;
use crate::models::nn::{self, Activation, Conv2d, GroupNorm};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// The norms and resnets of diffusers' VAE all use this epsilon.
const VAE_EPS: f64 = 1e-6;
/// The one encoder and decoder block type diffusers' AutoencoderKL has.
pub const ENCODER_BLOCK: &str = "DownEncoderBlock2D";
pub const DECODER_BLOCK: &str = "UpDecoderBlock2D";

/// `vae/config.json`, with diffusers' field names and defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: Activation,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_sample_size")]
    pub sample_size: SampleSize,
    /// Latents are multiplied by this before diffusion and divided by it before decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling, when present.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// diffusers runs such a VAE in f32 when the pipeline is in f16 (it overflows in f16 at high
    /// resolutions); so does `StableDiffusion` (bf16 has f32's range and needs no upcast).
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec![ENCODER_BLOCK.to_string()]
}
fn default_up_block_types() -> Vec<String> {
    vec![DECODER_BLOCK.to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> Activation {
    Activation::Silu
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> SampleSize {
    SampleSize::Square(32)
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl Default for AutoencoderKLConfig {
    /// diffusers' defaults: what an empty `config.json` means.
    fn default() -> Self {
        Self {
            in_channels: default_image_channels(),
            out_channels: default_image_channels(),
            down_block_types: default_down_block_types(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            layers_per_block: default_layers_per_block(),
            act_fn: default_act_fn(),
            latent_channels: default_latent_channels(),
            norm_num_groups: default_norm_num_groups(),
            sample_size: default_sample_size(),
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = crate::config::read_json(path)?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("unsupported VAE config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Rejects block types this implementation does not have and inconsistent block lists.
    pub fn validate(&self) -> Result<()> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            candle_core::bail!("block_out_channels is empty");
        }
        for (field, types, supported) in [
            ("down_block_types", &self.down_block_types, ENCODER_BLOCK),
            ("up_block_types", &self.up_block_types, DECODER_BLOCK),
        ] {
            if types.len() != levels {
                candle_core::bail!(
                    "{field} has {} entries but block_out_channels has {levels}",
                    types.len()
                );
            }
            if let Some(other) = types.iter().find(|t| *t != supported) {
                candle_core::bail!("{field}: unsupported block type {other:?} (only {supported})");
            }
        }
        Ok(())
    }

    /// How many image pixels one latent pixel covers along each side.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            groups_out: None,
            eps: VAE_EPS,
            output_scale_factor: 1.0,
            act: self.act_fn,
        }
    }

    fn last_block_channels(&self) -> usize {
        *self.block_out_channels.last().expect("validated non-empty")
    }
}

/// The encoder's posterior `N(mean, exp(logvar))`, per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to `[-30, 20]`, as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[B, 2C, H, W]` moments into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let channels = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, channels)?;
        let logvar = moments
            .narrow(1, channels, channels)?
            .clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    pub fn var(&self) -> Result<Tensor> {
        self.logvar.exp()
    }

    /// Reparameterised sample `mean + std · eps` for standard-normal `eps` shaped like `mean`.
    pub fn sample(&self, eps: &Tensor) -> Result<Tensor> {
        &self.mean + (self.std()? * eps)?
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }

    /// `KL(q ‖ N(0, I))` in closed form, summed over `C, H, W`: shape `[B]`.
    /// Computed (and returned) in f32 for half-precision posteriors.
    pub fn kl(&self) -> Result<Tensor> {
        let dtype = nn::internal_dtype(self.mean.dtype());
        let mean = self.mean.to_dtype(dtype)?;
        let logvar = self.logvar.to_dtype(dtype)?;
        let per_element = ((mean.sqr()? + logvar.exp()?)? - 1.0)?.sub(&logvar)?;
        per_element.flatten_from(1)?.sum(1)? * 0.5
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    /// None when loaded for decoding only (txt2img).
    encoder: Option<Encoder>,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        Self::build(vb, cfg, true)
    }

    /// The decoder alone: what txt2img needs (`encode` is then an error).
    pub fn decoder_only(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        Self::build(vb, cfg, false)
    }

    /// Whether `name` (a weight of the file) is one [`Self::decoder_only`] reads.
    pub fn is_decoder_weight(name: &str) -> bool {
        name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
    }

    fn build(vb: VarBuilder, cfg: &AutoencoderKLConfig, with_encoder: bool) -> Result<Self> {
        cfg.validate()?;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = (with_encoder && cfg.use_quant_conv)
            .then(|| nn::conv2d(moments, moments, 1, 1, 0, vb.pp("quant_conv")))
            .transpose()?;
        let latent = cfg.latent_channels;
        let post_quant_conv = cfg
            .use_post_quant_conv
            .then(|| nn::conv2d(latent, latent, 1, 1, 0, vb.pp("post_quant_conv")))
            .transpose()?;
        Ok(Self {
            encoder: with_encoder
                .then(|| Encoder::new(vb.pp("encoder"), cfg))
                .transpose()?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Images `[B, in_channels, H, W]` (in `[-1, 1]`) to the latent posterior at `H/f × W/f`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let Some(encoder) = &self.encoder else {
            candle_core::bail!("this VAE was loaded without its encoder (for txt2img only)");
        };
        let moments = encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents `[B, latent_channels, h, w]` to the raw decoder output (about `[-1, 1]`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}

/// Images to posterior moments `[B, 2 · latent_channels, h, w]`.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    output: OutputHead,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let conv_in = nn::conv2d(cfg.in_channels, channels[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mut in_channels = channels[0];
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out_channels) in channels.iter().enumerate() {
            let downsample = i + 1 < channels.len();
            let block_vb = vb.pp(format!("down_blocks.{i}"));
            down_blocks.push(DownEncoderBlock::new(
                block_vb,
                cfg,
                in_channels,
                out_channels,
                downsample,
            )?);
            in_channels = out_channels;
        }
        let last = cfg.last_block_channels();
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg)?,
            output: OutputHead::new(&vb, cfg, last, 2 * cfg.latent_channels)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut hidden = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            hidden = block.forward(&hidden)?;
        }
        self.output.forward(&self.mid_block.forward(&hidden)?)
    }
}

/// Latents to images.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    output: OutputHead,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let last = cfg.last_block_channels();
        let conv_in = nn::conv2d(cfg.latent_channels, last, 3, 1, 1, vb.pp("conv_in"))?;
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut in_channels = last;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (i, &out_channels) in reversed.iter().enumerate() {
            let upsample = i + 1 < reversed.len();
            let block_vb = vb.pp(format!("up_blocks.{i}"));
            up_blocks.push(UpDecoderBlock::new(
                block_vb,
                cfg,
                in_channels,
                out_channels,
                upsample,
            )?);
            in_channels = out_channels;
        }
        Ok(Self {
            conv_in,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg)?,
            up_blocks,
            output: OutputHead::new(&vb, cfg, cfg.block_out_channels[0], cfg.out_channels)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut hidden = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            hidden = block.forward(&hidden)?;
        }
        self.output.forward(&hidden)
    }
}

/// `conv_norm_out` → SiLU → `conv_out`, closing both the encoder and the decoder.
#[derive(Debug, Clone)]
struct OutputHead {
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl OutputHead {
    fn new(
        vb: &VarBuilder,
        cfg: &AutoencoderKLConfig,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv_norm_out: nn::group_norm(
                cfg.norm_num_groups,
                in_channels,
                VAE_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: nn::conv2d(in_channels, out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // diffusers uses SiLU here whatever `act_fn` says.
        self.conv_out
            .forward(&self.conv_norm_out.forward_then(xs, Activation::Silu)?)
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets, then an optional stride-2 downsample.
#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock {
    fn new(
        vb: VarBuilder,
        cfg: &AutoencoderKLConfig,
        in_channels: usize,
        out_channels: usize,
        downsample: bool,
    ) -> Result<Self> {
        let resnets = resnet_stack(
            vb.pp("resnets"),
            cfg,
            in_channels,
            out_channels,
            cfg.layers_per_block,
        )?;
        // Padding 0: diffusers pads bottom/right only, then convolves unpadded.
        let downsampler = downsample
            .then(|| Downsample2D::new(vb.pp("downsamplers.0"), out_channels, out_channels, 0))
            .transpose()?;
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = forward_resnets(&self.resnets, xs)?;
        match &self.downsampler {
            Some(down) => down.forward(&hidden),
            None => Ok(hidden),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then an optional ×2 upsample.
#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock {
    fn new(
        vb: VarBuilder,
        cfg: &AutoencoderKLConfig,
        in_channels: usize,
        out_channels: usize,
        upsample: bool,
    ) -> Result<Self> {
        let resnets = resnet_stack(
            vb.pp("resnets"),
            cfg,
            in_channels,
            out_channels,
            cfg.layers_per_block + 1,
        )?;
        let upsampler = upsample
            .then(|| Upsample2D::new(vb.pp("upsamplers.0"), out_channels, out_channels))
            .transpose()?;
        Ok(Self { resnets, upsampler })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = forward_resnets(&self.resnets, xs)?;
        match &self.upsampler {
            Some(up) => up.forward(&hidden, None),
            None => Ok(hidden),
        }
    }
}

/// `count` resnets named `0..count`; the first maps `in_channels` to `out_channels`.
fn resnet_stack(
    vb: VarBuilder,
    cfg: &AutoencoderKLConfig,
    in_channels: usize,
    out_channels: usize,
    count: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|i| {
            let block_in = if i == 0 { in_channels } else { out_channels };
            ResnetBlock2D::new(vb.pp(i), &cfg.resnet(block_in, out_channels))
        })
        .collect()
}

fn forward_resnets(resnets: &[ResnetBlock2D], xs: &Tensor) -> Result<Tensor> {
    resnets
        .iter()
        .try_fold(xs.clone(), |hidden, resnet| resnet.forward(&hidden, None))
}

/// diffusers' `UNetMidBlock2D` as the VAE builds it: resnet, (attention), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let channels = cfg.last_block_channels();
        let resnet_cfg = cfg.resnet(channels, channels);
        let attention = cfg
            .mid_block_add_attention
            .then(|| SpatialSelfAttention::new(vb.pp("attentions.0"), cfg, channels))
            .transpose()?;
        Ok(Self {
            resnet_in: ResnetBlock2D::new(vb.pp("resnets.0"), &resnet_cfg)?,
            attention,
            resnet_out: ResnetBlock2D::new(vb.pp("resnets.1"), &resnet_cfg)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self.resnet_in.forward(xs, None)?;
        let hidden = match &self.attention {
            Some(attention) => attention.forward(&hidden)?,
            None => hidden,
        };
        self.resnet_out.forward(&hidden, None)
    }
}

/// Group norm, then self-attention over all `H·W` positions, plus the input (the mid-block
/// `Attention` with `residual_connection=True`, `rescale_output_factor=1`).
#[derive(Debug, Clone)]
struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl SpatialSelfAttention {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig, channels: usize) -> Result<Self> {
        // diffusers sets attention_head_dim = channels here: a single head.
        let (heads, head_dim) = (1, channels);
        Ok(Self {
            group_norm: nn::group_norm(
                cfg.norm_num_groups,
                channels,
                VAE_EPS,
                vb.pp("group_norm"),
            )?,
            attention: Attention::new(vb, channels, None, heads, head_dim, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .flatten_from(2)?
            .transpose(1, 2)?; // [B, H·W, C]
        let attended = self.attention.forward(&tokens, None)?;
        let attended = attended.transpose(1, 2)?.reshape((b, c, h, w))?;
        xs + attended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_an_empty_config_file_and_survives_a_round_trip() {
        let empty: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(AutoencoderKLConfig::default(), empty);
        let config = AutoencoderKLConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec![ENCODER_BLOCK.into(); 2],
            up_block_types: vec![DECODER_BLOCK.into(); 2],
            shift_factor: Some(0.5),
            ..AutoencoderKLConfig::default()
        };
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["act_fn"], "silu");
        assert_eq!(
            serde_json::from_value::<AutoencoderKLConfig>(json).unwrap(),
            config
        );
    }
}
