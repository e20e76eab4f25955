//! diffusers' `UNet2DConditionModel`: the noise-predicting U-Net of Stable Diffusion 1.x/2.x,
//! conditioned on the timestep (sinusoids + MLP, added in every resnet) and on the text encoder's
//! hidden states (cross-attention in the spatial transformers).
//!
//! One code path serves inference and training: every op is differentiable and the timesteps are
//! a tensor with one entry per batch row.

use std::fmt::Debug;
use std::path::Path;

use anyhow::Context;
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::nn::{conv2d, group_norm, Activation, Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use super::transformer::{Transformer2DConfig, Transformer2DModel};
use crate::config::SampleSize;

/// A config value given once for all down blocks or as a list with one entry per down block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    Shared(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `blocks` down blocks, in down-block order.
    fn expand(&self, field: &str, blocks: usize) -> Result<Vec<T>> {
        match self {
            Self::Shared(value) => Ok(vec![value.clone(); blocks]),
            Self::Each(values) if values.len() == blocks => Ok(values.clone()),
            Self::Each(values) => bail!(
                "UNet config: {field} has {} entries but there are {blocks} down blocks",
                values.len()
            ),
        }
    }
}

/// `unet/config.json`, with diffusers' field names and defaults.
///
/// Fields describing features ldm does not implement (class/addition embeddings, fourier time
/// embedding, dual cross-attention, ...) are read so that a config using them is rejected with
/// a clear error instead of silently building a different network. `time_cond_proj_dim` (LCM)
/// is accepted: like diffusers without a `timestep_cond`, its projection is simply unused.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: Activation,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Despite its name, the number of attention heads when `num_attention_heads` is unset
    /// (a historical diffusers naming mistake that every SD config relies on).
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    /// diffusers then takes the attention scores `QKᵀ` in f32 (SD 2.1 needs it in f16). Not
    /// passed on: ldm's attention always does (the CPU kernel computes in f32, the composed GPU
    /// path upcasts f16 scores).
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<Activation>,
    pub timestep_post_act: Option<Activation>,
    pub time_cond_proj_dim: Option<usize>,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub addition_embed_type: Option<String>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_type: String,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|name| name.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.,
            down_block_types: strings(&[
                CROSS_ATTN_DOWN_BLOCK,
                CROSS_ATTN_DOWN_BLOCK,
                CROSS_ATTN_DOWN_BLOCK,
                DOWN_BLOCK,
            ]),
            mid_block_type: Some(CROSS_ATTN_MID_BLOCK.to_string()),
            up_block_types: strings(&[
                UP_BLOCK,
                CROSS_ATTN_UP_BLOCK,
                CROSS_ATTN_UP_BLOCK,
                CROSS_ATTN_UP_BLOCK,
            ]),
            only_cross_attention: PerBlock::Shared(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::Shared(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.,
            act_fn: Activation::Silu,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::Shared(1280),
            transformer_layers_per_block: PerBlock::Shared(1),
            attention_head_dim: PerBlock::Shared(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            class_embed_type: None,
            num_class_embeds: None,
            addition_embed_type: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_type: "default".to_string(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

const CROSS_ATTN_DOWN_BLOCK: &str = "CrossAttnDownBlock2D";
const DOWN_BLOCK: &str = "DownBlock2D";
const CROSS_ATTN_MID_BLOCK: &str = "UNetMidBlock2DCrossAttn";
const MID_BLOCK: &str = "UNetMidBlock2D";
const CROSS_ATTN_UP_BLOCK: &str = "CrossAttnUpBlock2D";
const UP_BLOCK: &str = "UpBlock2D";

/// The settings of one down block and of its mirror-image up block.
#[derive(Debug, Clone)]
struct BlockSettings {
    channels: usize,
    layers: usize,
    transformer_layers: usize,
    heads: usize,
    cross_attention_dim: usize,
    only_cross_attention: bool,
}

/// The config's per-block lists expanded and its block type names checked.
#[derive(Debug, Clone)]
struct Layout {
    /// In down-block order; up block `i` mirrors `blocks[len - 1 - i]`.
    blocks: Vec<BlockSettings>,
    down_cross_attention: Vec<bool>,
    up_cross_attention: Vec<bool>,
    /// `None` without a mid block, else whether it has cross-attention.
    mid_cross_attention: Option<bool>,
}

impl UNet2DConditionConfig {
    /// Reads `unet/config.json` and checks that ldm supports the architecture it describes.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let config: Self = crate::config::read_json(path)?;
        config
            .validate()
            .with_context(|| format!("in U-Net config {}", path.display()))?;
        Ok(config)
    }

    /// Errors if the config is inconsistent or asks for a feature ldm does not implement.
    pub fn validate(&self) -> Result<()> {
        self.layout().map(|_| ())
    }

    fn layout(&self) -> Result<Layout> {
        self.reject_unsupported()?;
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("UNet config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "UNet config: {} down_block_types and {} up_block_types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let heads = heads.expand("num_attention_heads", n)?;
        if heads.contains(&0) {
            bail!("UNet config: zero attention heads in {heads:?}");
        }
        let layers = self.layers_per_block.expand("layers_per_block", n)?;
        let transformer_layers = self
            .transformer_layers_per_block
            .expand("transformer_layers_per_block", n)?;
        let cross_dims = self.cross_attention_dim.expand("cross_attention_dim", n)?;
        let only_cross = self
            .only_cross_attention
            .expand("only_cross_attention", n)?;
        let blocks = (0..n)
            .map(|i| BlockSettings {
                channels: self.block_out_channels[i],
                layers: layers[i],
                transformer_layers: transformer_layers[i],
                heads: heads[i],
                cross_attention_dim: cross_dims[i],
                only_cross_attention: only_cross[i],
            })
            .collect();
        let kinds = |types: &[String], cross: &str, plain: &str| {
            types
                .iter()
                .map(|name| block_has_cross_attention(name, cross, plain))
                .collect::<Result<Vec<_>>>()
        };
        let mid_cross_attention = self
            .mid_block_type
            .as_deref()
            .map(|name| block_has_cross_attention(name, CROSS_ATTN_MID_BLOCK, MID_BLOCK))
            .transpose()?;
        Ok(Layout {
            blocks,
            down_cross_attention: kinds(&self.down_block_types, CROSS_ATTN_DOWN_BLOCK, DOWN_BLOCK)?,
            up_cross_attention: kinds(&self.up_block_types, CROSS_ATTN_UP_BLOCK, UP_BLOCK)?,
            mid_cross_attention,
        })
    }

    fn reject_unsupported(&self) -> Result<()> {
        reject_if_set("class_embed_type", &self.class_embed_type)?;
        reject_if_set("num_class_embeds", &self.num_class_embeds)?;
        reject_if_set("addition_embed_type", &self.addition_embed_type)?;
        reject_if_set("encoder_hid_dim", &self.encoder_hid_dim)?;
        reject_if_set("encoder_hid_dim_type", &self.encoder_hid_dim_type)?;
        require(
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            "default",
        )?;
        require(
            "time_embedding_type",
            &self.time_embedding_type,
            "positional",
        )?;
        require("attention_type", &self.attention_type, "default")?;
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", true));
        }
        Ok(())
    }
}

fn unsupported(field: &str, value: impl Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "unsupported UNet2DConditionModel config: {field} = {value:?} \
         (ldm implements the Stable Diffusion 1.x/2.x U-Net, without added conditioning)"
    ))
}

fn reject_if_set<T: Debug>(field: &str, value: &Option<T>) -> Result<()> {
    match value {
        Some(value) => Err(unsupported(field, value)),
        None => Ok(()),
    }
}

fn require(field: &str, value: &str, supported: &str) -> Result<()> {
    if value == supported {
        Ok(())
    } else {
        Err(unsupported(field, value))
    }
}

/// Whether the block named `name` is the `cross` or the `plain` variant; other names are errors.
fn block_has_cross_attention(name: &str, cross: &str, plain: &str) -> Result<bool> {
    if name == cross {
        Ok(true)
    } else if name == plain {
        Ok(false)
    } else {
        bail!("unsupported U-Net block type {name:?} (supported: {cross}, {plain})")
    }
}

/// What every block of one U-Net shares.
#[derive(Debug, Clone)]
struct BlockContext {
    temb_channels: usize,
    groups: usize,
    eps: f64,
    act: Activation,
    use_linear_projection: bool,
    downsample_padding: usize,
}

impl BlockContext {
    fn resnet(
        &self,
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
    ) -> Result<ResnetBlock2D> {
        let cfg = ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            groups_out: None,
            eps: self.eps,
            output_scale_factor,
            act: self.act,
        };
        ResnetBlock2D::new(vb, &cfg)
    }

    fn transformer(
        &self,
        vb: VarBuilder,
        block: &BlockSettings,
        only_cross_attention: bool,
    ) -> Result<Transformer2DModel> {
        let cfg = Transformer2DConfig {
            in_channels: block.channels,
            num_attention_heads: block.heads,
            attention_head_dim: block.channels / block.heads,
            num_layers: block.transformer_layers,
            norm_num_groups: self.groups,
            cross_attention_dim: block.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention,
        };
        Transformer2DModel::new(vb, &cfg)
    }

    /// `count` spatial transformers (`attentions.{i}`), or none for a block without attention.
    fn transformers(
        &self,
        vb: VarBuilder,
        block: &BlockSettings,
        count: usize,
        only_cross_attention: bool,
    ) -> Result<Vec<Transformer2DModel>> {
        (0..count)
            .map(|i| self.transformer(vb.pp("attentions").pp(i), block, only_cross_attention))
            .collect()
    }
}

/// `CrossAttnDownBlock2D` (resnet + transformer pairs) or `DownBlock2D` (resnets only),
/// with an optional strided-conv downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        in_channels: usize,
        block: &BlockSettings,
        cross_attention: bool,
        add_downsample: bool,
    ) -> Result<Self> {
        let out = block.channels;
        let resnets = (0..block.layers)
            .map(|i| {
                let in_channels = if i == 0 { in_channels } else { out };
                ctx.resnet(vb.pp("resnets").pp(i), in_channels, out, 1.)
            })
            .collect::<Result<_>>()?;
        let attention_count = if cross_attention { block.layers } else { 0 };
        let attentions = ctx.transformers(
            vb.clone(),
            block,
            attention_count,
            block.only_cross_attention,
        )?;
        let downsampler = add_downsample
            .then(|| Downsample2D::new(vb.pp("downsamplers.0"), out, out, ctx.downsample_padding))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Pushes each layer's output onto `skips` for the up path.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attention) = self.attentions.get(i) {
                xs = attention.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn` (resnet, then transformer + resnet) or `UNetMidBlock2D` as
/// `UNet2DConditionModel` builds it (a single resnet).
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        block: &BlockSettings,
        cross_attention: bool,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let channels = block.channels;
        let resnet_count = if cross_attention { 2 } else { 1 };
        let resnets = (0..resnet_count)
            .map(|i| {
                ctx.resnet(
                    vb.pp("resnets").pp(i),
                    channels,
                    channels,
                    output_scale_factor,
                )
            })
            .collect::<Result<_>>()?;
        let attentions = ctx.transformers(vb, block, resnet_count - 1, false)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = attention.forward(&xs, context)?;
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`: each resnet first concatenates a skip connection.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev_channels`: channels coming from below; `skip_channels`: those of the down block
    /// one level further out, whose downsampler output feeds this block's last resnet.
    fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        block: &BlockSettings,
        prev_channels: usize,
        skip_channels: usize,
        cross_attention: bool,
        add_upsample: bool,
    ) -> Result<Self> {
        let out = block.channels;
        let layers = block.layers + 1;
        let resnets = (0..layers)
            .map(|i| {
                let in_channels = if i == 0 { prev_channels } else { out };
                let skip = if i == layers - 1 { skip_channels } else { out };
                ctx.resnet(vb.pp("resnets").pp(i), in_channels + skip, out, 1.)
            })
            .collect::<Result<_>>()?;
        let attention_count = if cross_attention { layers } else { 0 };
        let attentions = ctx.transformers(
            vb.clone(),
            block,
            attention_count,
            block.only_cross_attention,
        )?;
        let upsampler = add_upsample
            .then(|| Upsample2D::new(vb.pp("upsamplers.0"), out, out))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Pops its skip connections from `skips`. With `match_skip_size`, the upsampler targets the
    /// size of the next skip instead of doubling (latent sizes not divisible by the total
    /// downsampling factor, diffusers' `forward_upsample_size`).
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        match_skip_size: bool,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                bail!("U-Net up block ran out of skip connections")
            };
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attention) = self.attentions.get(i) {
                xs = attention.forward(&xs, context)?;
            }
        }
        if let Some(upsampler) = &self.upsampler {
            let size = match (match_skip_size, skips.last()) {
                (true, Some(next_skip)) => {
                    let (_, _, height, width) = next_skip.dims4()?;
                    Some((height, width))
                }
                _ => None,
            };
            xs = upsampler.forward(&xs, size)?;
        }
        Ok(xs)
    }
}

/// diffusers' `UNet2DConditionModel` (SD 1.x/2.x layouts, including 9-channel inpainting).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    time_embed_act: Option<Activation>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    config: UNet2DConditionConfig,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (diffusers tensor names, e.g. `down_blocks.0.resnets.0.conv1`):
    /// pretrained weights from safetensors, or fresh trainable ones from a `VarMap`.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let layout = cfg.layout()?;
        let blocks = &layout.blocks;
        let n = blocks.len();
        let base_channels = cfg.block_out_channels[0];
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(4 * base_channels);
        let ctx = BlockContext {
            temb_channels: time_embed_dim,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            act: cfg.act_fn,
            use_linear_projection: cfg.use_linear_projection,
            downsample_padding: cfg.downsample_padding,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut in_channels = base_channels;
        for (i, block) in blocks.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let cross = layout.down_cross_attention[i];
            down_blocks.push(DownBlock::new(
                vb,
                &ctx,
                in_channels,
                block,
                cross,
                i + 1 < n,
            )?);
            in_channels = block.channels;
        }
        let mid_block = match layout.mid_cross_attention {
            Some(cross) => {
                let vb = vb.pp("mid_block");
                let scale = cfg.mid_block_scale_factor;
                Some(MidBlock::new(vb, &ctx, &blocks[n - 1], cross, scale)?)
            }
            None => None,
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_channels = blocks[n - 1].channels;
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let block = &blocks[n - 1 - i];
            let skip_channels = blocks[(n - 1 - i).saturating_sub(1)].channels;
            let cross = layout.up_cross_attention[i];
            let up = UpBlock::new(
                vb,
                &ctx,
                block,
                prev_channels,
                skip_channels,
                cross,
                i + 1 < n,
            )?;
            up_blocks.push(up);
            prev_channels = block.channels;
        }

        let conv = |vb: VarBuilder, in_channels, out_channels, kernel: usize| {
            conv2d(in_channels, out_channels, kernel, 1, (kernel - 1) / 2, vb)
        };
        Ok(Self {
            conv_in: conv(
                vb.pp("conv_in"),
                cfg.in_channels,
                base_channels,
                cfg.conv_in_kernel,
            )?,
            time_proj: Timesteps::new(base_channels, cfg.flip_sin_to_cos, cfg.freq_shift),
            time_embedding: TimestepEmbedding::new(
                vb.pp("time_embedding"),
                base_channels,
                time_embed_dim,
                cfg.act_fn,
                cfg.timestep_post_act,
            )?,
            time_embed_act: cfg.time_embedding_act_fn,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                base_channels,
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_act: cfg.act_fn,
            conv_out: conv(
                vb.pp("conv_out"),
                base_channels,
                cfg.out_channels,
                cfg.conv_out_kernel,
            )?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Predicts the model output (noise, v or sample, depending on the training objective).
    ///
    /// `sample`: `[batch, in_channels, height, width]`; `timesteps`: `[batch]` (one timestep
    /// per row), or `[1]`/`[]` for the whole batch, any dtype; `encoder_hidden_states`:
    /// `[batch, tokens, cross_attention_dim]`, in the model's dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (batch, _, height, width) = sample.dims4()?;
        let temb = self.embed_timesteps(timesteps, batch, sample)?;
        let sample = if self.config.center_input_sample {
            sample.affine(2., -1.)?
        } else {
            sample.clone()
        };
        let context = encoder_hidden_states;

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb, context, &mut skips)?;
        }
        if let Some(mid_block) = &self.mid_block {
            xs = mid_block.forward(&xs, &temb, context)?;
        }
        let upsamplers = self.up_blocks.len() - 1;
        let factor = 1 << upsamplers;
        let match_skip_size = !height.is_multiple_of(factor) || !width.is_multiple_of(factor);
        for block in &self.up_blocks {
            xs = block.forward(&xs, &temb, context, &mut skips, match_skip_size)?;
        }

        let xs = self.conv_norm_out.forward_then(&xs, self.conv_act)?;
        self.conv_out.forward(&xs)
    }

    /// `[batch, time_embed_dim]` in the sample's dtype; the sinusoids are taken in f32.
    fn embed_timesteps(&self, timesteps: &Tensor, batch: usize, sample: &Tensor) -> Result<Tensor> {
        if timesteps.rank() > 1 {
            bail!(
                "U-Net: timesteps must have shape [batch], [1] or [], got {:?}",
                timesteps.dims()
            );
        }
        let timesteps = timesteps.to_device(sample.device())?.flatten_all()?;
        let timesteps = match timesteps.dim(0)? {
            len if len == batch => timesteps,
            1 => timesteps.broadcast_as(batch)?,
            len => bail!("U-Net: {len} timesteps for a batch of {batch} (give {batch}, or 1)"),
        };
        let sinusoids = self
            .time_proj
            .forward(&timesteps)?
            .to_dtype(sample.dtype())?;
        let temb = self.time_embedding.forward(&sinusoids)?;
        match self.time_embed_act {
            Some(act) => act.apply(&temb),
            None => Ok(temb),
        }
    }
}
