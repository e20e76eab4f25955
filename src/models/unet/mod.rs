//! diffusers' `UNet2DConditionModel`: the noise-predicting U-Net of Stable Diffusion 1.x/2.x and
//! SDXL, conditioned on the timestep (sinusoids + MLP, added in every resnet), on the text
//! encoders' hidden states (cross-attention in the spatial transformers) and, for SDXL, on the
//! pooled text embeddings and micro-conditioning (`text_time`, added to the time embedding).
//!
//! One code path serves inference and training: every op is differentiable and the timesteps are
//! a tensor with one entry per batch row.

mod blocks;
mod config;

pub use config::{LayerCount, PerBlock, TransformerLayers, UNet2DConditionConfig};

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::embeddings::{TextTimeEmbedding, TimestepEmbedding, Timesteps};
use super::nn::{conv2d, group_norm, Activation, Conv2d, GroupNorm};
use blocks::{BlockContext, DownBlock, MidBlock, UpBlock};

/// SDXL's added conditioning (diffusers' `added_cond_kwargs`), one row per batch row.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// Pooled, projected text embeddings `[batch, projection_dim]`.
    pub text_embeds: Tensor,
    /// Micro-conditioning `[batch, 6]`: original size, crop top-left, target size (height
    /// before width each).
    pub time_ids: Tensor,
}

/// diffusers' `UNet2DConditionModel` (SD 1.x/2.x and SDXL layouts, including 9-channel
/// inpainting).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
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
            let depths = &layout.down_transformers[i];
            down_blocks.push(DownBlock::new(
                vb,
                &ctx,
                in_channels,
                block,
                depths,
                i + 1 < n,
            )?);
            in_channels = block.channels;
        }
        let mid_block = match &layout.mid_transformers {
            Some(depths) => {
                let vb = vb.pp("mid_block");
                let scale = cfg.mid_block_scale_factor;
                Some(MidBlock::new(vb, &ctx, &blocks[n - 1], depths, scale)?)
            }
            None => None,
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_channels = blocks[n - 1].channels;
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let block = &blocks[n - 1 - i];
            let skip_channels = blocks[(n - 1 - i).saturating_sub(1)].channels;
            let up = UpBlock::new(
                vb,
                &ctx,
                block,
                prev_channels,
                skip_channels,
                &layout.up_transformers[i],
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
            add_embedding: text_time_embedding(vb.clone(), cfg, time_embed_dim)?,
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
        self.forward_with(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with SDXL's added conditioning, which a `text_time` U-Net requires
    /// and any other refuses.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let (batch, _, height, width) = sample.dims4()?;
        let temb = self.embed_timesteps(timesteps, batch, sample)?;
        let temb = match (&self.add_embedding, added) {
            (Some(embedding), Some(added)) => (temb + embedding.forward(added, sample.dtype())?)?,
            (None, None) => temb,
            (Some(_), None) => bail!(
                "this U-Net (addition_embed_type \"text_time\") needs pooled text embeddings and time ids"
            ),
            (None, Some(_)) => bail!("this U-Net takes no added text/time conditioning"),
        };
        let temb = match self.time_embed_act {
            Some(act) => act.apply(&temb)?,
            None => temb,
        };
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

    /// `[batch, time_embed_dim]` in the sample's dtype, before `time_embed_act`; the sinusoids
    /// are taken in f32.
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
        self.time_embedding.forward(&sinusoids)
    }
}

/// SDXL's `add_time_proj` + `add_embedding` when the config asks for `text_time`.
fn text_time_embedding(
    vb: VarBuilder,
    cfg: &UNet2DConditionConfig,
    time_embed_dim: usize,
) -> Result<Option<TextTimeEmbedding>> {
    if !cfg.has_text_time() {
        return Ok(None);
    }
    // Present, as validated with the config.
    let (Some(time_dim), Some(in_dim)) = (
        cfg.addition_time_embed_dim,
        cfg.projection_class_embeddings_input_dim,
    ) else {
        bail!("UNet config: text_time without its dimensions")
    };
    let time_proj = Timesteps::new(time_dim, cfg.flip_sin_to_cos, cfg.freq_shift);
    let embedding = TimestepEmbedding::new(
        vb.pp("add_embedding"),
        in_dim,
        time_embed_dim,
        Activation::Silu,
        None,
    )?;
    Ok(Some(TextTimeEmbedding::new(time_proj, embedding, in_dim)))
}
