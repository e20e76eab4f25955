//! The networks a run works with, checked against each other: the frozen VAE, the text encoder
//! (frozen pretrained or trained from scratch) and the U-Net's config, and the settings that
//! cannot work.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use candle_core::{DType, Device};

use super::super::checkpoint;
use super::super::export;
use super::{PredictionTarget, TextEncoderSetup, TrainUNetOptions, UNetSetup};
use crate::model_source::{
    component_dir, var_builder, weights_file, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{PerBlock, UNet2DConditionConfig};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::tokenizer::PromptTokenizer;

/// The text encoder as the run uses it.
pub(super) enum TextEncoder {
    Frozen { model: ClipTextModel, dir: PathBuf },
    Trained { config: ClipTextConfig },
}

/// Flags that cannot work, and an output folder that does not fit `resume`.
pub(super) fn check_settings(cfg: &TrainUNetOptions) -> anyhow::Result<()> {
    let out = &cfg.output_dir;
    checkpoint::check_output(out, cfg.resume)?;
    ensure!(cfg.batch_size > 0, "the batch size must be at least 1");
    ensure!(
        !cfg.zero_terminal_snr || cfg.prediction == PredictionTarget::VPrediction,
        "--zero-terminal-snr needs --prediction-type v_prediction: at zero SNR the noise says nothing about the image"
    );
    ensure!(
        (0.0..=1.0).contains(&cfg.uncond_prob),
        "the caption drop probability must be in [0, 1], got {}",
        cfg.uncond_prob
    );
    ensure!(
        cfg.max_grad_norm > 0.0,
        "the gradient clipping norm must be positive"
    );
    ensure!(
        matches!(cfg.save_dtype, DType::F32 | DType::F16 | DType::BF16),
        "weights can be saved as f32, f16 or bf16, not {:?}",
        cfg.save_dtype
    );
    ensure!(
        cfg.samples.every == 0 || cfg.samples.steps > 0,
        "sampling needs at least one DDIM step"
    );
    Ok(())
}

/// The text encoder of the run and its config.
pub(super) fn text_encoder(
    cfg: &TrainUNetOptions,
    tokenizer: &PromptTokenizer,
) -> anyhow::Result<(TextEncoder, ClipTextConfig)> {
    match &cfg.text_encoder {
        TextEncoderSetup::Scratch(sizes) => {
            let config = sizes.config(tokenizer);
            ensure!(
                config.num_attention_heads > 0
                    && config.hidden_size % config.num_attention_heads == 0,
                "the text encoder's width {} is not a multiple of its {} heads",
                config.hidden_size,
                config.num_attention_heads
            );
            Ok((
                TextEncoder::Trained {
                    config: config.clone(),
                },
                config,
            ))
        }
        TextEncoderSetup::Pretrained(path) => {
            let dir = component_dir(path, export::TEXT_ENCODER_DIR);
            let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
            ensure!(
                tokenizer.max_length() <= config.max_position_embeddings,
                "the tokenizer's prompts are {} tokens long but the text encoder in {} takes at most {}",
                tokenizer.max_length(),
                dir.display(),
                config.max_position_embeddings
            );
            let vb = var_builder(
                &weights_file(&dir, TRANSFORMERS_WEIGHTS, cfg.dtype != DType::F32)?,
                cfg.dtype,
                &cfg.device,
            )?;
            let model = ClipTextModel::new(vb, &config)
                .with_context(|| format!("cannot load the text encoder from {}", dir.display()))?;
            Ok((TextEncoder::Frozen { model, dir }, config))
        }
    }
}

/// The U-Net config for this VAE and text encoder.
pub(super) fn unet_config(
    setup: &UNetSetup,
    latent_channels: usize,
    cross_attention_dim: usize,
    sample_size: usize,
) -> anyhow::Result<UNet2DConditionConfig> {
    let config = match setup {
        UNetSetup::Sizes(sizes) => sizes.config(latent_channels, cross_attention_dim, sample_size),
        UNetSetup::Config(config) => {
            ensure!(
                config.in_channels == latent_channels && config.out_channels == latent_channels,
                "the U-Net config has {} input and {} output channels but the VAE's latents have {latent_channels}",
                config.in_channels,
                config.out_channels
            );
            let widths = match &config.cross_attention_dim {
                PerBlock::Shared(width) => vec![*width],
                PerBlock::Each(widths) => widths.clone(),
            };
            ensure!(
                widths.iter().all(|&w| w == cross_attention_dim),
                "the U-Net config's cross_attention_dim {widths:?} does not match the text encoder's hidden size {cross_attention_dim}"
            );
            (**config).clone()
        }
    };
    config.validate().context("invalid U-Net config")?;
    Ok(config)
}

/// The VAE of a diffusers `vae/` folder, frozen, in f32 (as pipelines upcast it).
pub(super) fn load_frozen_vae(dir: &Path, device: &Device) -> anyhow::Result<AutoencoderKL> {
    let config = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
    let vb = var_builder(
        &weights_file(dir, DIFFUSERS_WEIGHTS, false)?,
        DType::F32,
        device,
    )?;
    AutoencoderKL::new(vb, &config)
        .with_context(|| format!("cannot load the VAE from {}", dir.display()))
}
