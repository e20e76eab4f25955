//! What a `train` run is told: the architectures of the networks it builds, the objective, the
//! schedule of checkpoints and samples, and their defaults.

use std::path::PathBuf;

use candle_core::{DType, Device};

use super::super::optim::AdamWConfig;
use crate::models::clip::ClipTextConfig;
use crate::models::nn::Activation;
use crate::models::unet::{PerBlock, UNet2DConditionConfig};
use crate::tokenizer::PromptTokenizer;

/// The defaults of a `train` run: `TrainUNetOptions::new` and the CLI flags both take them from
/// here.
pub mod defaults {
    pub const TEXT_HIDDEN_SIZE: usize = 64;
    pub const TEXT_LAYERS: usize = 2;
    pub const TEXT_HEADS: usize = 4;
    pub const TEXT_INTERMEDIATE_SIZE: usize = 256;
    pub const UNET_CHANNELS: [usize; 3] = [32, 64, 64];
    pub const UNET_LAYERS_PER_BLOCK: usize = 1;
    pub const UNET_ATTENTION_HEADS: usize = 4;
    pub const UNET_NORM_GROUPS: usize = 32;
    pub const BATCH_SIZE: usize = 8;
    pub const MAX_STEPS: usize = 2000;
    pub const LR: f64 = 2e-4;
    /// torch.optim.AdamW's.
    pub const WEIGHT_DECAY: f64 = 1e-2;
    pub const WARMUP_STEPS: usize = 100;
    pub const MAX_GRAD_NORM: f64 = 1.0;
    pub const EMA_DECAY: f64 = 0.999;
    pub const UNCOND_PROB: f64 = 0.1;
    pub const SEED: u64 = 0;
    pub const SAVE_EVERY: usize = 500;
    pub const SAMPLE_EVERY: usize = 500;
    pub const SAMPLE_STEPS: usize = 20;
    pub const SAMPLE_GUIDANCE: f64 = 5.0;
}

/// What the U-Net learns to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PredictionTarget {
    /// The added noise ε (SD 1.x, SD 2 base).
    #[value(name = "epsilon")]
    Epsilon,
    /// The velocity √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768).
    #[value(name = "v_prediction")]
    VPrediction,
}

impl PredictionTarget {
    /// diffusers' `prediction_type` value.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
        }
    }
}

/// A fresh U-Net's architecture in a few numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetSizes {
    /// Channels of each resolution level (diffusers' `block_out_channels`).
    pub channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Heads of every attention (diffusers' `attention_head_dim`, which SD configs use as the
    /// head count).
    pub attention_heads: usize,
    pub norm_num_groups: usize,
}

impl UNetSizes {
    /// An SD-shaped config: cross-attention at every level and in the mid block, except the
    /// first (full latent resolution, where attention costs the most) when there are several.
    pub fn config(
        &self,
        latent_channels: usize,
        cross_attention_dim: usize,
        sample_size: usize,
    ) -> UNet2DConditionConfig {
        let levels = self.channels.len();
        let attends = |level: usize| levels == 1 || level > 0;
        let down_block_types = (0..levels)
            .map(|level| match attends(level) {
                true => "CrossAttnDownBlock2D",
                false => "DownBlock2D",
            })
            .map(String::from)
            .collect();
        let up_block_types = (0..levels)
            .rev()
            .map(|level| match attends(level) {
                true => "CrossAttnUpBlock2D",
                false => "UpBlock2D",
            })
            .map(String::from)
            .collect();
        UNet2DConditionConfig {
            sample_size: Some(crate::config::SampleSize::Square(sample_size)),
            in_channels: latent_channels,
            out_channels: latent_channels,
            down_block_types,
            up_block_types,
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            block_out_channels: self.channels.clone(),
            layers_per_block: PerBlock::Shared(self.layers_per_block),
            norm_num_groups: self.norm_num_groups,
            cross_attention_dim: PerBlock::Shared(cross_attention_dim),
            attention_head_dim: PerBlock::Shared(self.attention_heads),
            ..UNet2DConditionConfig::default()
        }
    }
}

/// Where the U-Net's architecture comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum UNetSetup {
    /// A diffusers `unet/config.json`, used as is (its channels and cross-attention width must
    /// match the VAE and text encoder).
    Config(Box<UNet2DConditionConfig>),
    Sizes(UNetSizes),
}

/// A fresh CLIP text encoder's architecture; its vocabulary and length come from the tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderSizes {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
}

impl TextEncoderSizes {
    pub fn config(&self, tokenizer: &PromptTokenizer) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: tokenizer.vocab_size(),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            max_position_embeddings: tokenizer.max_length(),
            hidden_act: self.activation,
            ..ClipTextConfig::default()
        }
    }
}

/// Where the text encoder comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TextEncoderSetup {
    /// A pretrained CLIP text encoder (a `text_encoder/` folder or a pipeline holding one),
    /// frozen.
    Pretrained(PathBuf),
    /// A new CLIP text encoder trained jointly with the U-Net.
    Scratch(TextEncoderSizes),
}

/// The periodic sample grids.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSettings {
    /// Every this many steps (and at the end); 0 for never.
    pub every: usize,
    /// Empty: the first distinct captions of the data set.
    pub prompts: Vec<String>,
    /// DDIM steps.
    pub steps: usize,
    pub guidance_scale: f64,
}

/// Everything a `train` run needs.
#[derive(Debug, Clone)]
pub struct TrainUNetOptions {
    /// A captioned image folder (see `data`).
    pub data_dir: PathBuf,
    /// Receives the pipeline, `checkpoint/`, `losses.csv`, `loss.png` and `samples/`.
    pub output_dir: PathBuf,
    /// A VAE folder (e.g. a `train-vae` output) or a pipeline folder with `vae/`.
    pub vae: PathBuf,
    /// A tokenizer folder or a pipeline folder with `tokenizer/`.
    pub tokenizer: PathBuf,
    pub text_encoder: TextEncoderSetup,
    pub unet: UNetSetup,
    pub prediction: PredictionTarget,
    /// Train on SD's schedule rescaled to zero terminal SNR (needs v-prediction); see
    /// [`export::ddim_scheduler_config`].
    pub zero_terminal_snr: bool,
    /// Training image size; `None` takes the VAE's `sample_size`.
    pub resolution: Option<usize>,
    pub batch_size: usize,
    /// Total optimizer updates, those before a resume included.
    pub max_steps: usize,
    pub optimizer: AdamWConfig,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub ema_decay: f64,
    /// Probability of training a sample on the empty prompt instead of its caption.
    pub uncond_prob: f64,
    pub random_flip: bool,
    pub seed: u64,
    /// Checkpoint (and export) every this many steps; 0 only at the end.
    pub save_every: usize,
    pub samples: SampleSettings,
    /// Precision of the exported weights (F32, or F16/BF16 to halve the size).
    pub save_dtype: DType,
    /// Continue from `output_dir/checkpoint`.
    pub resume: bool,
    pub device: Device,
    /// Compute precision: F32, or BF16/F16 (mixed precision, GPU only).
    pub dtype: DType,
}

impl TrainUNetOptions {
    /// Defaults for everything but the folders (see [`defaults`], which the CLI flags share): a
    /// small U-Net and text encoder trained from scratch, epsilon prediction, f32 on the CPU.
    pub fn new(data_dir: PathBuf, output_dir: PathBuf, vae: PathBuf, tokenizer: PathBuf) -> Self {
        Self {
            data_dir,
            output_dir,
            vae,
            tokenizer,
            text_encoder: TextEncoderSetup::Scratch(TextEncoderSizes {
                hidden_size: defaults::TEXT_HIDDEN_SIZE,
                num_layers: defaults::TEXT_LAYERS,
                num_heads: defaults::TEXT_HEADS,
                intermediate_size: defaults::TEXT_INTERMEDIATE_SIZE,
                activation: Activation::QuickGelu,
            }),
            unet: UNetSetup::Sizes(UNetSizes {
                channels: defaults::UNET_CHANNELS.to_vec(),
                layers_per_block: defaults::UNET_LAYERS_PER_BLOCK,
                attention_heads: defaults::UNET_ATTENTION_HEADS,
                norm_num_groups: defaults::UNET_NORM_GROUPS,
            }),
            prediction: PredictionTarget::Epsilon,
            zero_terminal_snr: false,
            resolution: None,
            batch_size: defaults::BATCH_SIZE,
            max_steps: defaults::MAX_STEPS,
            optimizer: AdamWConfig {
                lr: defaults::LR,
                weight_decay: defaults::WEIGHT_DECAY,
                ..AdamWConfig::default()
            },
            warmup_steps: defaults::WARMUP_STEPS,
            max_grad_norm: defaults::MAX_GRAD_NORM,
            ema_decay: defaults::EMA_DECAY,
            uncond_prob: defaults::UNCOND_PROB,
            random_flip: false,
            seed: defaults::SEED,
            save_every: defaults::SAVE_EVERY,
            samples: SampleSettings {
                every: defaults::SAMPLE_EVERY,
                prompts: Vec::new(),
                steps: defaults::SAMPLE_STEPS,
                guidance_scale: defaults::SAMPLE_GUIDANCE,
            },
            save_dtype: DType::F32,
            resume: false,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_unet_attends_below_full_resolution() {
        let sizes = UNetSizes {
            channels: vec![32, 64, 64],
            layers_per_block: 1,
            attention_heads: 4,
            norm_num_groups: 32,
        };
        let config = sizes.config(4, 48, 16);
        assert_eq!(
            config.down_block_types,
            [
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D"
            ]
        );
        assert_eq!(
            config.up_block_types,
            ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        );
        assert_eq!(config.cross_attention_dim, PerBlock::Shared(48));
        config.validate().unwrap();
    }
}
