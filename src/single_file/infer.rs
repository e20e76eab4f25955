//! Component configs inferred from a checkpoint's tensors, for a config folder that has none:
//! everything the shapes show (channels, levels, layers per block, where the attention is,
//! projection kind, cross-attention width, latent channels, vocabulary, depth), and for the
//! rest Stable Diffusion's own settings, those of the configs diffusers' `from_single_file`
//! fetches for the recognised model (`stable-diffusion-v1-5`, `stable-diffusion-2-1`):
//! 8 attention heads in every SD 1.x U-Net block and heads of 64 channels in SD 2.x's, 64-channel
//! CLIP heads, GroupNorm of 32 groups, the VAE's scaling factor 0.18215.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::clip_names::{CLIP_PREFIX, OPEN_CLIP_PREFIX};
use super::{Architecture, Checkpoint, TextEncoderKind, UNET_PREFIX, VAE_PREFIX};
use crate::models::clip::ClipTextConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;

/// The channels of an attention head in SD 2.x's U-Net and in both CLIP text encoders.
const HEAD_CHANNELS: usize = 64;
/// SD 1.x's U-Net: diffusers' `attention_head_dim` 8 (the number of heads, in its legacy naming).
const SD1_HEADS: usize = 8;

impl Checkpoint {
    fn dims(&self, name: &str) -> anyhow::Result<&[usize]> {
        self.source
            .shape(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))
    }

    /// How many `<prefix>N.` indices the file holds (N = 0, 1, …).
    fn count(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                let start = format!("{prefix}{i}.");
                self.source.names().iter().any(|n| n.starts_with(&start))
            })
            .count()
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.source.names().iter().any(|n| n.starts_with(prefix))
    }

    /// The image size of diffusers' configs for the model: SD 1.5's and the inpainting
    /// models' 512 px, SD 2.1's 768 px.
    fn image_size(&self) -> usize {
        match self.architecture {
            Architecture {
                text_encoder: TextEncoderKind::OpenClip,
                unet_in_channels: 4,
            } => 768,
            _ => 512,
        }
    }

    /// The U-Net config.
    pub fn infer_unet_config(&self) -> anyhow::Result<UNet2DConditionConfig> {
        let p = UNET_PREFIX;
        let conv_in = self.dims(&format!("{p}input_blocks.0.0.weight"))?;
        let inputs = self.count(&format!("{p}input_blocks."));
        let levels = 1
            + (1..inputs)
                .filter(|i| self.has_prefix(&format!("{p}input_blocks.{i}.0.op.")))
                .count();
        if !inputs.is_multiple_of(levels) || inputs / levels < 2 {
            bail!("{inputs} input blocks do not make {levels} U-Net levels");
        }
        let per_level = inputs / levels;
        let first = |level: usize| 1 + level * per_level;
        let mut channels = Vec::new();
        let mut down = Vec::new();
        let mut up = Vec::new();
        let mut attention = None;
        for level in 0..levels {
            let block = format!("{p}input_blocks.{}", first(level));
            channels.push(self.dims(&format!("{block}.0.out_layers.3.weight"))?[0]);
            let cross = self.has_prefix(&format!("{block}.1.proj_in."));
            down.push(if cross {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            });
            if cross && attention.is_none() {
                attention = Some(format!("{block}.1"));
            }
            // Up block `level` (numbered from the lowest resolution) starts at this index.
            let up_block = format!("{p}output_blocks.{}", level * per_level);
            let cross_up = self.has_prefix(&format!("{up_block}.1.proj_in."));
            up.push(if cross_up {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            });
        }
        let attention = attention.context("the U-Net has no cross-attention")?;
        let cross_attention_dim = self.dims(&format!(
            "{attention}.transformer_blocks.0.attn2.to_k.weight"
        ))?[1];
        let linear = self.dims(&format!("{attention}.proj_in.weight"))?.len() == 2;
        let depth = self.count(&format!("{attention}.transformer_blocks."));
        let family = self.architecture.text_encoder;
        let heads = match family {
            TextEncoderKind::Clip => json!(SD1_HEADS),
            TextEncoderKind::OpenClip => json!(channels
                .iter()
                .map(|c| heads(*c, "U-Net block"))
                .collect::<anyhow::Result<Vec<_>>>()?),
        };
        let config = json!({
            "in_channels": conv_in[1],
            "out_channels": self.dims(&format!("{p}out.2.weight"))?[0],
            "block_out_channels": channels,
            "down_block_types": down,
            "up_block_types": up,
            "layers_per_block": per_level - 1,
            "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": heads,
            "use_linear_projection": linear,
            "upcast_attention": family == TextEncoderKind::OpenClip,
            "transformer_layers_per_block": depth,
            "sample_size": self.image_size() / 8,
        });
        let config: UNet2DConditionConfig = parse(config, "U-Net")?;
        config.validate()?;
        Ok(config)
    }

    /// The VAE config.
    pub fn infer_vae_config(&self) -> anyhow::Result<AutoencoderKLConfig> {
        let p = VAE_PREFIX;
        let levels = self.count(&format!("{p}encoder.down."));
        let channels = (0..levels)
            .map(|i| Ok(self.dims(&format!("{p}encoder.down.{i}.block.0.conv2.weight"))?[0]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = json!({
            "in_channels": self.dims(&format!("{p}encoder.conv_in.weight"))?[1],
            "out_channels": self.dims(&format!("{p}decoder.conv_out.weight"))?[0],
            "latent_channels": self.dims(&format!("{p}decoder.conv_in.weight"))?[1],
            "block_out_channels": channels,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "layers_per_block": self.count(&format!("{p}encoder.down.0.block.")),
            "use_quant_conv": self.has_prefix(&format!("{p}quant_conv.")),
            "use_post_quant_conv": self.has_prefix(&format!("{p}post_quant_conv.")),
            "mid_block_add_attention": self.has_prefix(&format!("{p}encoder.mid.attn_1.")),
            "norm_num_groups": 32,
            "scaling_factor": 0.18215,
            "sample_size": self.image_size(),
        });
        let config: AutoencoderKLConfig = parse(config, "VAE")?;
        config.validate()?;
        Ok(config)
    }

    /// The text encoder config. SD 2.x's OpenCLIP files hold one more resblock than its
    /// text encoder uses (SD 2.x conditions on the penultimate layer; diffusers drops the last).
    pub fn infer_text_encoder_config(&self) -> anyhow::Result<ClipTextConfig> {
        let (embedding, positions, layers, fc1, act, projection) =
            match self.architecture.text_encoder {
                TextEncoderKind::Clip => {
                    let p = format!("{CLIP_PREFIX}text_model.");
                    (
                        format!("{p}embeddings.token_embedding.weight"),
                        format!("{p}embeddings.position_embedding.weight"),
                        self.count(&format!("{p}encoder.layers.")),
                        format!("{p}encoder.layers.0.mlp.fc1.weight"),
                        "quick_gelu",
                        768,
                    )
                }
                TextEncoderKind::OpenClip => {
                    let p = OPEN_CLIP_PREFIX;
                    let blocks = self.count(&format!("{p}transformer.resblocks."));
                    (
                        format!("{p}token_embedding.weight"),
                        format!("{p}positional_embedding"),
                        blocks.saturating_sub(1),
                        format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
                        "gelu",
                        512,
                    )
                }
            };
        let &[vocab, hidden] = self.dims(&embedding)? else {
            bail!("{embedding} is not a matrix");
        };
        let config = json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.dims(&fc1)?[0],
            "num_hidden_layers": layers,
            "num_attention_heads": heads(hidden, "text encoder")?,
            "max_position_embeddings": self.dims(&positions)?[0],
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": projection,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        });
        parse(config, "text encoder")
    }
}

/// The heads of 64 channels in `channels`.
fn heads(channels: usize, what: &str) -> anyhow::Result<usize> {
    if !channels.is_multiple_of(HEAD_CHANNELS) {
        bail!(
            "cannot infer the attention heads of a {what} of {channels} channels (SD's are \
             {HEAD_CHANNELS} channels each): give its config in the --config folder"
        );
    }
    Ok(channels / HEAD_CHANNELS)
}

fn parse<T: serde::de::DeserializeOwned>(config: Value, what: &str) -> anyhow::Result<T> {
    serde_json::from_value(config).with_context(|| format!("inferring the {what} config"))
}
