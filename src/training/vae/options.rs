//! What a `train-vae` run is told: the architecture it builds or starts from, the objective,
//! the optimizer and schedule, and their defaults.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::super::export::VAE_DIR;
use crate::config::SampleSize;
use crate::model_source::component_dir;
use crate::models::vae::{AutoencoderKLConfig, DECODER_BLOCK, ENCODER_BLOCK};

/// The defaults of a `train-vae` run: `TrainVaeOptions::new` and the CLI flags both take them
/// from here.
pub mod defaults {
    pub const BLOCK_OUT_CHANNELS: [usize; 2] = [32, 64];
    pub const LAYERS_PER_BLOCK: usize = 1;
    pub const LATENT_CHANNELS: usize = 4;
    pub const NORM_NUM_GROUPS: usize = 32;
    pub const RESOLUTION: usize = 64;
    pub const KL_WEIGHT: f64 = 1e-6;
    pub const LR: f64 = 1e-4;
    pub const WARMUP_STEPS: usize = 0;
    pub const WEIGHT_DECAY: f64 = 1e-2;
    /// 0 on the command line disables clipping.
    pub const MAX_GRAD_NORM: f64 = 1.0;
    pub const BATCH_SIZE: usize = 4;
    pub const MAX_STEPS: usize = 1000;
    pub const SEED: u64 = 0;
}

/// The reconstruction term of the ELBO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReconLoss {
    /// Mean absolute error (a Laplace likelihood).
    L1,
    /// Mean squared error (a Gaussian likelihood).
    L2,
}

/// The VAE's architecture: a diffusers `vae/config.json`, or the sizes that matter.
#[derive(Debug, Clone, PartialEq)]
pub enum VaeArchitecture {
    ConfigFile(PathBuf),
    /// A trained VAE to start from: a `vae/` folder, or a pipeline folder holding one; its
    /// config gives the architecture and its weights the initial values.
    Pretrained(PathBuf),
    Sizes {
        block_out_channels: Vec<usize>,
        layers_per_block: usize,
        latent_channels: usize,
        norm_num_groups: usize,
    },
}

impl VaeArchitecture {
    /// The config: read from the file, or built from the sizes with diffusers' defaults for the
    /// rest and `sample_size` set to the training size.
    pub(super) fn config(&self, resolution: usize) -> anyhow::Result<AutoencoderKLConfig> {
        match self {
            Self::ConfigFile(path) => AutoencoderKLConfig::from_file(path),
            Self::Pretrained(path) => {
                AutoencoderKLConfig::from_file(&component_dir(path, VAE_DIR).join("config.json"))
            }
            Self::Sizes {
                block_out_channels,
                layers_per_block,
                latent_channels,
                norm_num_groups,
            } => {
                let levels = block_out_channels.len();
                let config = AutoencoderKLConfig {
                    down_block_types: vec![ENCODER_BLOCK.to_string(); levels],
                    up_block_types: vec![DECODER_BLOCK.to_string(); levels],
                    block_out_channels: block_out_channels.clone(),
                    layers_per_block: *layers_per_block,
                    latent_channels: *latent_channels,
                    norm_num_groups: *norm_num_groups,
                    sample_size: SampleSize::Square(resolution),
                    ..AutoencoderKLConfig::default()
                };
                config.validate().context("invalid VAE configuration")?;
                Ok(config)
            }
        }
    }

    /// The `vae/` folder of a pretrained architecture.
    pub(super) fn pretrained_dir(&self) -> Option<PathBuf> {
        match self {
            Self::Pretrained(path) => Some(component_dir(path, VAE_DIR)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainVaeOptions {
    pub data: PathBuf,
    pub output: PathBuf,
    pub architecture: VaeArchitecture,
    pub resolution: usize,
    /// Mirror each image with probability ½ (fixed per seed and epoch).
    pub flip: bool,
    /// Train on random `crop`×`crop` windows of the images (the VAE is convolutional: windows
    /// teach it the full-resolution detail at a fraction of the cost).
    pub crop: Option<usize>,
    pub recon_loss: ReconLoss,
    pub kl_weight: f64,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub batch_size: usize,
    pub max_steps: usize,
    pub seed: u64,
    pub device: Device,
    /// f32, or bf16/f16 mixed precision on a GPU.
    pub dtype: DType,
    pub ema_decay: Option<f64>,
    /// Train only the decoder (and `post_quant_conv`) of a `Pretrained` VAE.
    pub decoder_only: bool,
    pub save_every: Option<usize>,
    pub sample_every: Option<usize>,
    /// Continue from `output/checkpoint` (required when one exists).
    pub resume: bool,
}

impl TrainVaeOptions {
    /// Defaults for everything but the data and output folders (see [`defaults`], which the CLI
    /// flags share).
    pub fn new(data: PathBuf, output: PathBuf) -> Self {
        Self {
            data,
            output,
            architecture: VaeArchitecture::Sizes {
                block_out_channels: defaults::BLOCK_OUT_CHANNELS.to_vec(),
                layers_per_block: defaults::LAYERS_PER_BLOCK,
                latent_channels: defaults::LATENT_CHANNELS,
                norm_num_groups: defaults::NORM_NUM_GROUPS,
            },
            resolution: defaults::RESOLUTION,
            flip: false,
            crop: None,
            recon_loss: ReconLoss::L1,
            kl_weight: defaults::KL_WEIGHT,
            lr: defaults::LR,
            warmup_steps: defaults::WARMUP_STEPS,
            weight_decay: defaults::WEIGHT_DECAY,
            max_grad_norm: Some(defaults::MAX_GRAD_NORM),
            batch_size: defaults::BATCH_SIZE,
            max_steps: defaults::MAX_STEPS,
            seed: defaults::SEED,
            device: Device::Cpu,
            dtype: DType::F32,
            ema_decay: None,
            decoder_only: false,
            save_every: None,
            sample_every: None,
            resume: false,
        }
    }

    /// The side of the square images a step trains on: the crop, else the resolution.
    pub(super) fn trained_size(&self) -> usize {
        self.crop.unwrap_or(self.resolution)
    }

    /// Checks the resolution and crop against the VAE's downsampling `factor`.
    pub(super) fn check_sizes(&self, factor: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.resolution.is_multiple_of(factor),
            "--resolution {} is not a multiple of the VAE's downsampling factor {factor}",
            self.resolution
        );
        if let Some(crop) = self.crop {
            anyhow::ensure!(
                crop <= self.resolution && crop.is_multiple_of(factor) && crop > 0,
                "--crop {crop} must be a positive multiple of the VAE's downsampling factor \
                 {factor} and at most --resolution {}",
                self.resolution
            );
        }
        Ok(())
    }

    /// What must not change between a run and its resumption.
    pub(super) fn identity(&self, config: &AutoencoderKLConfig, images: usize) -> Value {
        json!({
            "vae_config": config,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "resolution": self.resolution,
            "flip": self.flip,
            "crop": self.crop,
            "images": images,
            "ema": self.ema_decay.is_some(),
            "pretrained": self.architecture.pretrained_dir(),
            // Absent unless set, so checkpoints from before the option still resume.
            "decoder_only": self.decoder_only.then_some(true),
        })
    }
}
