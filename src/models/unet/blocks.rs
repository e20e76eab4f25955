//! The U-Net's down, mid and up blocks: resnets, optionally each followed by a spatial
//! transformer, with a downsampler or upsampler between resolutions.

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

use super::super::nn::Activation;
use super::super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use super::super::transformer::{Transformer2DConfig, Transformer2DModel};
use super::config::BlockSettings;
/// What every block of one U-Net shares.
#[derive(Debug, Clone)]
pub(super) struct BlockContext {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub use_linear_projection: bool,
    pub downsample_padding: usize,
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
        depth: usize,
        only_cross_attention: bool,
    ) -> Result<Transformer2DModel> {
        let cfg = Transformer2DConfig {
            in_channels: block.channels,
            num_attention_heads: block.heads,
            attention_head_dim: block.channels / block.heads,
            num_layers: depth,
            norm_num_groups: self.groups,
            cross_attention_dim: block.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention,
        };
        Transformer2DModel::new(vb, &cfg)
    }

    /// One spatial transformer (`attentions.{i}`) of each depth in `depths`: none for a block
    /// without attention.
    fn transformers(
        &self,
        vb: VarBuilder,
        block: &BlockSettings,
        depths: &[usize],
        only_cross_attention: bool,
    ) -> Result<Vec<Transformer2DModel>> {
        let vb = vb.pp("attentions");
        depths
            .iter()
            .enumerate()
            .map(|(i, &depth)| self.transformer(vb.pp(i), block, depth, only_cross_attention))
            .collect()
    }
}

/// `CrossAttnDownBlock2D` (resnet + transformer pairs) or `DownBlock2D` (resnets only),
/// with an optional strided-conv downsampler.
#[derive(Debug, Clone)]
pub(super) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `depths`: the transformer depth after each resnet, empty without attention.
    pub fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        in_channels: usize,
        block: &BlockSettings,
        depths: &[usize],
        add_downsample: bool,
    ) -> Result<Self> {
        let out = block.channels;
        let resnets = (0..block.layers)
            .map(|i| {
                let in_channels = if i == 0 { in_channels } else { out };
                ctx.resnet(vb.pp("resnets").pp(i), in_channels, out, 1.)
            })
            .collect::<Result<_>>()?;
        let attentions = ctx.transformers(vb.clone(), block, depths, block.only_cross_attention)?;
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
    pub fn forward(
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
pub(super) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// `depths`: one transformer depth with cross-attention, empty without.
    pub fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        block: &BlockSettings,
        depths: &[usize],
        output_scale_factor: f64,
    ) -> Result<Self> {
        let channels = block.channels;
        let resnet_count = depths.len() + 1;
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
        let attentions = ctx.transformers(vb, block, depths, false)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
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
pub(super) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev_channels`: channels coming from below; `skip_channels`: those of the down block
    /// one level further out, whose downsampler output feeds this block's last resnet;
    /// `depths`: the transformer depth after each resnet, empty without attention.
    pub fn new(
        vb: VarBuilder,
        ctx: &BlockContext,
        block: &BlockSettings,
        prev_channels: usize,
        skip_channels: usize,
        depths: &[usize],
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
        let attentions = ctx.transformers(vb.clone(), block, depths, block.only_cross_attention)?;
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
    pub fn forward(
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
