//! `unet/config.json`: diffusers' `UNet2DConditionModel` config, its per-block lists expanded
//! into a [`Layout`] and the features ldm does not implement rejected.

use std::fmt::Debug;
use std::path::Path;

use anyhow::Context;
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

use super::super::nn::Activation;
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
    pub(super) fn expand(&self, field: &str, blocks: usize) -> Result<Vec<T>> {
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

/// `transformer_layers_per_block`: one count for every block, or one entry per down block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    Shared(usize),
    Each(Vec<LayerCount>),
}

/// One block's transformer depth: the same for each of its layers, or one count per layer
/// (diffusers' nested lists, for asymmetric U-Nets).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LayerCount {
    Block(usize),
    Layers(Vec<usize>),
}

impl LayerCount {
    /// The depth of each of `layers` transformers.
    fn per_layer(&self, what: &str, layers: usize) -> Result<Vec<usize>> {
        match self {
            Self::Block(depth) => Ok(vec![*depth; layers]),
            Self::Layers(depths) if depths.len() == layers => Ok(depths.clone()),
            Self::Layers(depths) => bail!(
                "UNet config: {what} lists {} transformer depths for {layers} layers",
                depths.len()
            ),
        }
    }
}

/// `unet/config.json`, with diffusers' field names and defaults.
///
/// Fields describing features ldm does not implement (class embeddings, addition embeddings
/// other than SDXL's `text_time`, fourier time embedding, dual cross-attention, ...) are read so
/// that a config using them is rejected with a clear error instead of silently building a
/// different network. `time_cond_proj_dim` (LCM)
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
    pub transformer_layers_per_block: TransformerLayers,
    /// The up blocks' transformer depths, in up-block order (default: the down blocks' reversed).
    pub reverse_transformer_layers_per_block: Option<Vec<LayerCount>>,
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
    /// `"text_time"` (SDXL): pooled text embeddings and micro-conditioning added to the time
    /// embedding.
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
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
            transformer_layers_per_block: TransformerLayers::Shared(1),
            reverse_transformer_layers_per_block: None,
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
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_type: "default".to_string(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
        }
    }
}

/// SDXL's `addition_embed_type`.
const TEXT_TIME: &str = "text_time";
const CROSS_ATTN_DOWN_BLOCK: &str = "CrossAttnDownBlock2D";
const DOWN_BLOCK: &str = "DownBlock2D";
const CROSS_ATTN_MID_BLOCK: &str = "UNetMidBlock2DCrossAttn";
const MID_BLOCK: &str = "UNetMidBlock2D";
const CROSS_ATTN_UP_BLOCK: &str = "CrossAttnUpBlock2D";
const UP_BLOCK: &str = "UpBlock2D";

/// The settings of one down block and of its mirror-image up block.
#[derive(Debug, Clone)]
pub(super) struct BlockSettings {
    pub channels: usize,
    pub layers: usize,
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub only_cross_attention: bool,
}

/// The config's per-block lists expanded and its block type names checked. Transformer depths
/// are listed per layer of a block, empty for a block without attention.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// In down-block order; up block `i` mirrors `blocks[len - 1 - i]`.
    pub blocks: Vec<BlockSettings>,
    pub down_transformers: Vec<Vec<usize>>,
    /// In up-block order.
    pub up_transformers: Vec<Vec<usize>>,
    /// `None` without a mid block.
    pub mid_transformers: Option<Vec<usize>>,
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

    /// Whether the U-Net takes SDXL's added conditioning (pooled text embeddings and time ids).
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some(TEXT_TIME)
    }

    pub(super) fn layout(&self) -> Result<Layout> {
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
        let cross_dims = self.cross_attention_dim.expand("cross_attention_dim", n)?;
        let only_cross = self
            .only_cross_attention
            .expand("only_cross_attention", n)?;
        let blocks = (0..n)
            .map(|i| BlockSettings {
                channels: self.block_out_channels[i],
                layers: layers[i],
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
        let down_cross = kinds(&self.down_block_types, CROSS_ATTN_DOWN_BLOCK, DOWN_BLOCK)?;
        let up_cross = kinds(&self.up_block_types, CROSS_ATTN_UP_BLOCK, UP_BLOCK)?;
        let (down_depths, up_depths) = self.transformer_depths(n)?;
        let per_layer = |cross: bool, depth: &LayerCount, what: String, layers: usize| {
            if cross {
                depth.per_layer(&what, layers)
            } else {
                Ok(Vec::new())
            }
        };
        let down_transformers = (0..n)
            .map(|i| {
                let what = format!("transformer_layers_per_block[{i}]");
                per_layer(down_cross[i], &down_depths[i], what, layers[i])
            })
            .collect::<Result<_>>()?;
        let up_transformers = (0..n)
            .map(|i| {
                let what = format!("reverse_transformer_layers_per_block[{i}]");
                per_layer(up_cross[i], &up_depths[i], what, layers[n - 1 - i] + 1)
            })
            .collect::<Result<_>>()?;
        // The mid block has one layer and takes the last down block's depth (its first entry
        // when that is a list, as diffusers indexes it).
        let mid_depth = match &down_depths[n - 1] {
            LayerCount::Block(depth) => *depth,
            LayerCount::Layers(depths) => match depths.first() {
                Some(depth) => *depth,
                None => bail!("UNet config: the last transformer_layers_per_block entry is empty"),
            },
        };
        let mid_transformers = self
            .mid_block_type
            .as_deref()
            .map(|name| block_has_cross_attention(name, CROSS_ATTN_MID_BLOCK, MID_BLOCK))
            .transpose()?
            .map(|cross| if cross { vec![mid_depth] } else { Vec::new() });
        Ok(Layout {
            blocks,
            down_transformers,
            up_transformers,
            mid_transformers,
        })
    }

    /// `transformer_layers_per_block` per down block, and per up block (the reverse list, or
    /// the down blocks' reversed; diffusers requires the reverse list with nested entries).
    fn transformer_depths(&self, n: usize) -> Result<(Vec<LayerCount>, Vec<LayerCount>)> {
        let down = match &self.transformer_layers_per_block {
            TransformerLayers::Shared(depth) => vec![LayerCount::Block(*depth); n],
            TransformerLayers::Each(depths) if depths.len() == n => depths.clone(),
            TransformerLayers::Each(depths) => bail!(
                "UNet config: transformer_layers_per_block has {} entries but there are {n} down blocks",
                depths.len()
            ),
        };
        let up = match &self.reverse_transformer_layers_per_block {
            Some(depths) if depths.len() == n => depths.clone(),
            Some(depths) => bail!(
                "UNet config: reverse_transformer_layers_per_block has {} entries but there are {n} up blocks",
                depths.len()
            ),
            None if down.iter().any(|d| matches!(d, LayerCount::Layers(_))) => bail!(
                "UNet config: per-layer transformer_layers_per_block lists need \
                 reverse_transformer_layers_per_block (as in diffusers)"
            ),
            None => down.iter().rev().cloned().collect(),
        };
        Ok((down, up))
    }

    fn reject_unsupported(&self) -> Result<()> {
        reject_if_set("class_embed_type", &self.class_embed_type)?;
        reject_if_set("num_class_embeds", &self.num_class_embeds)?;
        match self.addition_embed_type.as_deref() {
            None => {}
            Some(TEXT_TIME)
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                bail!(
                    "UNet config: addition_embed_type \"text_time\" needs \
                     addition_time_embed_dim and projection_class_embeddings_input_dim"
                );
            }
            Some(TEXT_TIME) => {}
            Some(other) => return Err(unsupported("addition_embed_type", other)),
        }
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
         (ldm implements the Stable Diffusion 1.x/2.x and SDXL U-Nets)"
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A three-block SDXL-like config: a first block without attention, then two with.
    fn config(depths: &str, reverse: Option<&str>) -> UNet2DConditionConfig {
        let reverse = reverse.map_or(String::new(), |r| {
            format!(r#", "reverse_transformer_layers_per_block": {r}"#)
        });
        let json = format!(
            r#"{{"block_out_channels": [16, 32, 32], "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": {depths}{reverse}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn transformer_depths_expand_per_block_and_per_layer() {
        let layout = config("2", None).layout().unwrap();
        assert_eq!(layout.down_transformers, [vec![], vec![2, 2], vec![2, 2]]);
        assert_eq!(layout.up_transformers, [vec![2; 3], vec![2; 3], vec![]]);
        assert_eq!(layout.mid_transformers, Some(vec![2]));

        // A per-block list: the up blocks mirror it, the mid block takes the last entry.
        let layout = config("[1, 2, 10]", None).layout().unwrap();
        assert_eq!(layout.down_transformers, [vec![], vec![2, 2], vec![10, 10]]);
        assert_eq!(layout.up_transformers, [vec![10; 3], vec![2; 3], vec![]]);
        assert_eq!(layout.mid_transformers, Some(vec![10]));

        // Nested lists give each layer its depth; the up blocks' come from the reverse list.
        let layout = config("[1, [1, 2], [3, 4]]", Some("[[5, 6, 7], 2, 1]"))
            .layout()
            .unwrap();
        assert_eq!(layout.down_transformers, [vec![], vec![1, 2], vec![3, 4]]);
        assert_eq!(layout.up_transformers, [vec![5, 6, 7], vec![2; 3], vec![]]);
        assert_eq!(layout.mid_transformers, Some(vec![3]));
    }

    #[test]
    fn inconsistent_transformer_depths_are_errors() {
        let error = |c: UNet2DConditionConfig| c.layout().unwrap_err().to_string();
        assert!(error(config("[1, 2]", None)).contains("2 entries but there are 3"));
        assert!(error(config("[1, [1, 2], 3]", None)).contains("reverse_transformer_layers"));
        let wrong_layers = error(config("[1, [1, 2, 3], 3]", Some("[3, 2, 1]")));
        assert!(
            wrong_layers.contains("3 transformer depths for 2 layers"),
            "{wrong_layers}"
        );
        let short_reverse = error(config("[1, 2, 3]", Some("[3, 2]")));
        assert!(short_reverse.contains("2 entries but there are 3 up blocks"));
    }

    #[test]
    fn text_time_needs_its_dimensions_and_other_additions_are_refused() {
        let mut cfg = config("1", None);
        cfg.addition_embed_type = Some(TEXT_TIME.to_string());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("addition_time_embed_dim"));
        cfg.addition_time_embed_dim = Some(256);
        cfg.projection_class_embeddings_input_dim = Some(2816);
        cfg.validate().unwrap();
        assert!(cfg.has_text_time());
        cfg.addition_embed_type = Some("image".to_string());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("addition_embed_type"));
    }
}
