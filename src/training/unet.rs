//! `ldm train`: a text-conditioned latent U-Net with Stable Diffusion's objective.
//!
//! The VAE is frozen. Every image (and, with `random_flip`, its mirror image) is encoded once
//! and its posterior's mean and log-variance are cached; each step then draws a fresh latent
//! `z = mean + exp(logvar / 2)·ε'` with our generator — what encoding every step with
//! `latent_dist.sample()` would give, for the cost of one encoding. The latent is scaled as the
//! pipelines scale it, `x₀ = (z − shift)·scaling_factor`.
//!
//! The loss is ‖target − ε_θ(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, c)‖² (mean over elements), with t uniform
//! per sample over the training timesteps, target ε or the velocity, and c the text encoder's
//! hidden states of the caption — of the empty prompt with probability `uncond_prob`, so that
//! classifier-free guidance works. The text encoder is a frozen pretrained CLIP, or a small CLIP
//! trained jointly from scratch. AdamW with warm-up and gradient clipping updates the weights;
//! their EMA is what gets exported (see `export`) as a diffusers pipeline and sampled from.
//!
//! Randomness, all from `seed`: initial weights (per variable name), data order and flips (per
//! epoch), timesteps and caption dropout (per step), posterior samples and diffusion noise (one
//! torch-compatible generator whose state is checkpointed). A resumed run therefore repeats an
//! uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{json, Value};

use super::checkpoint::{self, TrainState};
use super::data::{self, DataCursor, ImageFolder};
use super::driver::{self, LoopPlan, StepOutcome, TrainingRun};
use super::export::{self, PipelineExport, TextEncoderExport};
use super::metrics::{self, LossLog, TrainObserver, LOSS_PLOT};
use super::optim::{self, AdamW, AdamWConfig, Ema};
use super::SplitMix64;
use crate::model_source::{
    component_dir, mmap_var_builder, weights_file, PipelineFolder, DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::nn::Activation;
use crate::models::unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
use crate::pipelines::{ImageJob, Sampling, StableDiffusion};
use crate::rng::TorchGenerator;
use crate::schedulers::{NoiseSchedule, SamplerKind, SchedulerConfig};
use crate::tokenizer::PromptTokenizer;

/// Variable-name prefixes of the two trained networks in the run's one `VarMap`.
pub const UNET_PREFIX: &str = "unet";
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder";
/// Where sample grids go, inside the output folder.
pub const SAMPLES_DIR: &str = "samples";
const LOSS_COLUMNS: [&str; 1] = ["loss"];
/// How many captions become the default sample prompts.
const DEFAULT_SAMPLE_PROMPTS: usize = 4;

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
    /// Defaults for everything but the folders: the flag defaults of the CLI (a small U-Net and
    /// text encoder trained from scratch, epsilon prediction, f32 on the CPU).
    pub fn new(data_dir: PathBuf, output_dir: PathBuf, vae: PathBuf, tokenizer: PathBuf) -> Self {
        Self {
            data_dir,
            output_dir,
            vae,
            tokenizer,
            text_encoder: TextEncoderSetup::Scratch(TextEncoderSizes {
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                intermediate_size: 256,
                activation: Activation::QuickGelu,
            }),
            unet: UNetSetup::Sizes(UNetSizes {
                channels: vec![32, 64, 64],
                layers_per_block: 1,
                attention_heads: 4,
                norm_num_groups: 32,
            }),
            prediction: PredictionTarget::Epsilon,
            zero_terminal_snr: false,
            resolution: None,
            batch_size: 8,
            max_steps: 2000,
            optimizer: AdamWConfig {
                lr: 2e-4,
                ..AdamWConfig::default()
            },
            warmup_steps: 100,
            max_grad_norm: 1.0,
            ema_decay: 0.999,
            uncond_prob: 0.1,
            random_flip: false,
            seed: 0,
            save_every: 500,
            samples: SampleSettings {
                every: 500,
                prompts: Vec::new(),
                steps: 20,
                guidance_scale: 5.0,
            },
            save_dtype: DType::F32,
            resume: false,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainUNetSummary {
    /// Updates completed, those before a resume included.
    pub step: usize,
    /// Updates run by this call.
    pub steps_run: usize,
    pub seconds: f64,
    /// Stopped by the observer (Ctrl-C) before `max_steps`; the checkpoint holds where.
    pub interrupted: bool,
    /// `(step, loss)` of every step in `losses.csv`, those before a resume included.
    pub losses: Vec<(usize, f64)>,
}

/// The training loss for one batch: `latents` are scaled x₀, `noise` ε, `timesteps[i]` the
/// timestep of row i, `conditioning` the text encoder's hidden states. Returns the mean squared
/// error in f32, a scalar.
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    conditioning: &Tensor,
    schedule: &NoiseSchedule,
    prediction: PredictionTarget,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
) -> candle_core::Result<Tensor> {
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let target = match prediction {
        PredictionTarget::Epsilon => noise.clone(),
        PredictionTarget::VPrediction => schedule.velocity(latents, noise, timesteps)?,
    };
    let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, timesteps.len(), latents.device())?;
    let predicted = unet.forward(&noisy, &t, conditioning)?;
    (predicted.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()
}

/// The per-step random choices that are not noise, one per batch row. A stream of its own per
/// step, so a resumed run makes the same choices.
#[derive(Debug, Clone, PartialEq)]
pub struct StepChoices {
    /// Uniform over the training timesteps.
    pub timesteps: Vec<usize>,
    /// Whether the caption is replaced by the empty prompt.
    pub dropped: Vec<bool>,
    /// Uniform in [0, 1): which of an image's alternative captions is used.
    pub caption_picks: Vec<f64>,
}

pub fn step_choices(
    seed: u64,
    step: usize,
    batch: usize,
    num_timesteps: usize,
    uncond_prob: f64,
) -> StepChoices {
    let mut rng = SplitMix64::for_stream(seed, &format!("unet step {step}"));
    let timesteps = (0..batch).map(|_| rng.below(num_timesteps)).collect();
    let dropped = (0..batch).map(|_| rng.next_f64() < uncond_prob).collect();
    let caption_picks = (0..batch).map(|_| rng.next_f64()).collect();
    StepChoices {
        timesteps,
        dropped,
        caption_picks,
    }
}

/// The caption of one batch row: the empty prompt when dropped, else the alternative `pick`
/// (uniform in [0, 1)) selects.
fn pick_caption(alternatives: &[String], dropped: bool, pick: f64) -> &str {
    if dropped {
        return "";
    }
    let index = ((pick * alternatives.len() as f64) as usize).min(alternatives.len() - 1);
    &alternatives[index]
}

/// Trains (or resumes) as `cfg` says, reporting to `observer`; see the module documentation.
pub fn train(
    cfg: &TrainUNetOptions,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainUNetSummary> {
    let started = Instant::now();
    let mut trainer = Trainer::prepare(cfg, observer)?;
    let resumed_from = trainer.step;
    let plan = LoopPlan {
        max_steps: cfg.max_steps,
        save_every: cfg.save_every,
        sample_every: cfg.samples.every,
        resumed: cfg.resume,
    };
    let interrupted = driver::run_loop(&mut trainer, &plan, observer)?;
    trainer.export()?;
    trainer.log.plot(&cfg.output_dir.join(LOSS_PLOT))?;
    observer.on_message(&format!(
        "{} at step {}: pipeline in {}",
        if interrupted { "stopped" } else { "finished" },
        trainer.step,
        cfg.output_dir.display()
    ));
    Ok(TrainUNetSummary {
        step: trainer.step,
        steps_run: trainer.step - resumed_from,
        seconds: started.elapsed().as_secs_f64(),
        interrupted,
        losses: trainer.log.rows().iter().map(|(s, v)| (*s, v[0])).collect(),
    })
}

/// The frozen VAE's posterior of every image (rows `0..n`) and, with flips, of every mirrored
/// image (rows `n..2n`), kept on the CPU.
struct LatentCache {
    mean: Tensor,
    logvar: Tensor,
    images: usize,
    scaling_factor: f64,
    shift_factor: Option<f64>,
}

impl LatentCache {
    fn encode(
        vae: &AutoencoderKL,
        images: &ImageFolder,
        mirrored: bool,
        chunk: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let n = images.len();
        let orientations: &[bool] = if mirrored { &[false, true] } else { &[false] };
        let (mut means, mut logvars) = (Vec::new(), Vec::new());
        for &flip in orientations {
            let indices: Vec<usize> = (0..n).collect();
            for part in indices.chunks(chunk.max(1)) {
                let (pixels, _) = images.load_batch(part, &vec![flip; part.len()], device)?;
                let posterior = vae.encode(&pixels)?;
                means.push(posterior.mean.to_device(&Device::Cpu)?);
                logvars.push(posterior.logvar.to_device(&Device::Cpu)?);
            }
        }
        let cfg = vae.config();
        Ok(Self {
            mean: Tensor::cat(&means, 0)?,
            logvar: Tensor::cat(&logvars, 0)?,
            images: n,
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift_factor,
        })
    }

    /// Scaled latents x₀ `[B, C, h, w]` (f32, on `device`) of items `indices`, mirrored where
    /// `flips` says, each a fresh posterior sample drawn from `generator`.
    fn sample(
        &self,
        indices: &[usize],
        flips: &[bool],
        generator: &mut TorchGenerator,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        let rows: Vec<u32> = indices
            .iter()
            .zip(flips)
            .map(|(&i, &flip)| (i + if flip { self.images } else { 0 }) as u32)
            .collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        let posterior = DiagonalGaussian {
            mean: self.mean.index_select(&rows, 0)?.to_device(device)?,
            logvar: self.logvar.index_select(&rows, 0)?.to_device(device)?,
        };
        let eps = standard_normal(generator, posterior.mean.dims(), device)?;
        let mut z = posterior.sample(&eps)?;
        if let Some(shift) = self.shift_factor {
            z = (z - shift)?;
        }
        Ok((z * self.scaling_factor)?)
    }
}

/// N(0, 1) noise of `shape` from the torch-compatible generator, drawn on the CPU.
fn standard_normal(
    generator: &mut TorchGenerator,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let count = shape.iter().product();
    Tensor::from_vec(generator.randn(count), shape, &Device::Cpu)?.to_device(device)
}

/// The text encoder as the run uses it.
enum TextEncoder {
    Frozen { model: ClipTextModel, dir: PathBuf },
    Trained { config: ClipTextConfig },
}

/// One training run in progress.
struct Trainer<'a> {
    cfg: &'a TrainUNetOptions,
    tokenizer: PromptTokenizer,
    tokenizer_dir: PathBuf,
    vae_dir: PathBuf,
    text_encoder: TextEncoder,
    unet_config: UNet2DConditionConfig,
    schedule: NoiseSchedule,
    scheduler_json: Value,
    latents: LatentCache,
    /// Each image's alternative captions.
    captions: Vec<Vec<String>>,
    sample_prompts: Vec<String>,
    resolution: usize,
    varmap: VarMap,
    optim: AdamW,
    ema: Ema,
    generator: TorchGenerator,
    cursor: DataCursor,
    step: usize,
    log: LossLog,
    /// The settings a resume must agree with, stored in the checkpoint.
    identity: Value,
    exported_at: Option<usize>,
}

impl<'a> Trainer<'a> {
    fn prepare(
        cfg: &'a TrainUNetOptions,
        observer: &mut dyn TrainObserver,
    ) -> anyhow::Result<Self> {
        super::check_training_dtype(cfg.dtype, &cfg.device)?;
        check_settings(cfg)?;
        let out = &cfg.output_dir;
        let tokenizer_dir = component_dir(&cfg.tokenizer, export::TOKENIZER_DIR);
        let tokenizer = PromptTokenizer::from_dir(&tokenizer_dir)?;
        let vae_dir = component_dir(&cfg.vae, export::VAE_DIR);
        let vae = load_frozen_vae(&vae_dir, &cfg.device)?;
        let vae_config = vae.config().clone();
        let factor = vae_config.vae_scale_factor();
        let resolution = cfg
            .resolution
            .unwrap_or_else(|| vae_config.sample_size.height_width().0);
        ensure!(
            resolution > 0 && resolution.is_multiple_of(factor),
            "the resolution {resolution} must be a positive multiple of {factor} (the VAE's downscaling factor)"
        );

        let images = ImageFolder::open(&cfg.data_dir, resolution)?;
        for (path, reason) in &images.skipped {
            observer.on_message(&format!("warning: skipping {}: {reason}", path.display()));
        }
        ensure!(
            images.len() >= cfg.batch_size,
            "{} has {} usable captioned images, fewer than the batch size {}",
            cfg.data_dir.display(),
            images.len(),
            cfg.batch_size
        );

        let (text_encoder, text_config) = text_encoder(cfg, &tokenizer)?;
        let unet_config = unet_config(
            &cfg.unet,
            vae_config.latent_channels,
            text_config.hidden_size,
            resolution / factor,
        )?;
        let scheduler_json =
            export::ddim_scheduler_config(cfg.prediction.diffusers_name(), cfg.zero_terminal_snr);
        let scheduler_config: SchedulerConfig = serde_json::from_value(scheduler_json.clone())
            .map_err(|e| anyhow::anyhow!("bad training scheduler config: {e}"))?;
        let schedule = NoiseSchedule::new(&scheduler_config);

        observer.on_message(&format!(
            "encoding {} images{} with the frozen VAE",
            images.len(),
            if cfg.random_flip {
                " (and their mirror images)"
            } else {
                ""
            }
        ));
        let latents =
            LatentCache::encode(&vae, &images, cfg.random_flip, cfg.batch_size, &cfg.device)?;
        drop(vae);

        let varmap = VarMap::new();
        let vb = super::seeded_var_builder(&varmap, cfg.seed, DType::F32, &cfg.device);
        UNet2DConditionModel::new(vb.pp(UNET_PREFIX), &unet_config)
            .context("cannot build the U-Net")?;
        if let TextEncoder::Trained { config } = &text_encoder {
            ClipTextModel::new(vb.pp(TEXT_ENCODER_PREFIX), config)
                .context("cannot build the text encoder")?;
        }
        let mut optim = AdamW::new(&varmap, cfg.optimizer)?;
        let mut ema = Ema::new(&varmap, cfg.ema_decay)?;

        let captions: Vec<Vec<String>> = images.items.iter().map(|i| i.captions.clone()).collect();
        let identity = json!({
            "unet": unet_config,
            "text_encoder": match &text_encoder {
                TextEncoder::Trained { config } => json!({ "trained": config }),
                TextEncoder::Frozen { dir, .. } => json!({ "frozen": dir }),
            },
            "vae": vae_dir,
            "prediction_type": cfg.prediction.diffusers_name(),
            "zero_terminal_snr": cfg.zero_terminal_snr,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "resolution": resolution,
            "random_flip": cfg.random_flip,
            "images": images.len(),
        });
        let state = checkpoint::start(
            out,
            cfg.resume,
            cfg.seed,
            &identity,
            &varmap,
            &mut optim,
            Some(&mut ema),
        )?;
        if cfg.resume {
            observer.on_message(&format!("resuming from step {}", state.step));
        }
        let (step, generator) = (state.step, TorchGenerator::from_state(&state.rng)?);
        let cursor = DataCursor {
            epoch: state.epoch,
            position_in_epoch: state.position_in_epoch,
        };
        let log = LossLog::open(out, &LOSS_COLUMNS, cfg.resume.then_some(step))?;
        let sample_prompts = if cfg.samples.prompts.is_empty() {
            default_sample_prompts(&captions)
        } else {
            cfg.samples.prompts.clone()
        };
        Ok(Self {
            cfg,
            tokenizer,
            tokenizer_dir,
            vae_dir,
            text_encoder,
            unet_config,
            schedule,
            scheduler_json,
            latents,
            captions,
            sample_prompts,
            resolution,
            varmap,
            optim,
            ema,
            generator,
            cursor,
            step,
            log,
            identity,
            exported_at: None,
        })
    }

    /// Writes the EMA weights as the pipeline in the output folder (once per step).
    fn export(&mut self) -> anyhow::Result<()> {
        if self.exported_at == Some(self.step) {
            return Ok(());
        }
        let ema = self.ema.tensors();
        let unet_weights = strip_prefix(&ema, UNET_PREFIX);
        let text_weights;
        let text_encoder = match &self.text_encoder {
            TextEncoder::Frozen { dir, .. } => TextEncoderExport::Copied(dir),
            TextEncoder::Trained { config } => {
                text_weights = strip_prefix(&ema, TEXT_ENCODER_PREFIX);
                TextEncoderExport::Trained {
                    config,
                    weights: &text_weights,
                    tokenizer: &self.tokenizer,
                }
            }
        };
        export::export_pipeline(
            &self.cfg.output_dir,
            &PipelineExport {
                unet_config: &self.unet_config,
                unet_weights: &unet_weights,
                text_encoder,
                vae_dir: &self.vae_dir,
                tokenizer_dir: &self.tokenizer_dir,
                scheduler_config: &self.scheduler_json,
                save_dtype: self.cfg.save_dtype,
            },
        )?;
        self.exported_at = Some(self.step);
        Ok(())
    }
}

impl TrainingRun for Trainer<'_> {
    fn step(&self) -> usize {
        self.step
    }

    /// One optimizer update.
    fn train_step(&mut self) -> anyhow::Result<StepOutcome> {
        let cfg = self.cfg;
        let device = &cfg.device;
        let (indices, flips) = data::next_batch(
            &mut self.cursor,
            self.captions.len(),
            cfg.batch_size,
            cfg.seed,
            cfg.random_flip,
        )?;
        let choices = step_choices(
            cfg.seed,
            self.step,
            cfg.batch_size,
            self.schedule.num_train_timesteps(),
            cfg.uncond_prob,
        );
        let latents = self
            .latents
            .sample(&indices, &flips, &mut self.generator, device)?;
        let noise = standard_normal(&mut self.generator, latents.dims(), device)?;
        let captions: Vec<&str> = (0..indices.len())
            .map(|row| {
                let alternatives = &self.captions[indices[row]];
                pick_caption(
                    alternatives,
                    choices.dropped[row],
                    choices.caption_picks[row],
                )
            })
            .collect();
        let input_ids = self.tokenizer.encode_batch(&captions, device)?;

        let vb = super::compute_var_builder(&self.varmap, cfg.dtype, device);
        let conditioning = match &self.text_encoder {
            TextEncoder::Frozen { model, .. } => model.forward(&input_ids)?,
            TextEncoder::Trained { config } => {
                ClipTextModel::new(vb.pp(TEXT_ENCODER_PREFIX), config)?.forward(&input_ids)?
            }
        };
        let unet = UNet2DConditionModel::new(vb.pp(UNET_PREFIX), &self.unet_config)?;
        let loss = diffusion_loss(
            &unet,
            &conditioning,
            &self.schedule,
            cfg.prediction,
            &latents.to_dtype(cfg.dtype)?,
            &noise.to_dtype(cfg.dtype)?,
            &choices.timesteps,
        )?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        ensure!(
            loss_value.is_finite(),
            "the loss became {loss_value} at step {}; lower the learning rate (the last checkpoint is intact)",
            self.step + 1
        );
        let mut grads = loss.backward()?;
        let grad_norm = optim::clip_grad_norm(&mut grads, &self.varmap, cfg.max_grad_norm)?;
        let lr = optim::warmup_lr(self.step, cfg.optimizer.lr, cfg.warmup_steps);
        self.optim.step(&grads, lr)?;
        self.ema.update(&self.varmap)?;
        self.step += 1;
        self.log.record(self.step, &[loss_value])?;
        Ok(StepOutcome {
            lr,
            grad_norm,
            losses: vec![(LOSS_COLUMNS[0], loss_value)],
        })
    }

    /// Saves the checkpoint, exports the pipeline it corresponds to, and redraws the loss plot.
    fn save_checkpoint(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()> {
        let state = TrainState {
            step: self.step,
            epoch: self.cursor.epoch,
            position_in_epoch: self.cursor.position_in_epoch,
            rng: self.generator.state(),
            extra: self.identity.clone(),
        };
        let out = &self.cfg.output_dir;
        checkpoint::save_checkpoint(out, &self.varmap, &self.optim, Some(&self.ema), &state)?;
        self.export()?;
        self.log.plot(&out.join(LOSS_PLOT))?;
        observer.on_message(&format!("step {}: checkpoint saved", self.step));
        Ok(())
    }

    /// Exports the EMA weights, loads them with the real pipeline and saves a grid of the
    /// sample prompts (fixed seeds, DDIM) as `samples/step-NNNNNN.png`.
    fn save_samples(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()> {
        self.export()?;
        let out = &self.cfg.output_dir;
        let folder = PipelineFolder {
            root: out.clone(),
            name: format!("step {}", self.step),
        };
        let pipeline = StableDiffusion::load(&folder, &self.cfg.device, DType::F32)?;
        let settings = &self.cfg.samples;
        let sampling = Sampling {
            sampler: SamplerKind::Ddim,
            steps: settings.steps,
            guidance_scale: settings.guidance_scale,
            guidance_rescale: 0.0,
            eta: 0.0,
            width: self.resolution,
            height: self.resolution,
            strength: 1.0,
        };
        let jobs: Vec<ImageJob> = self
            .sample_prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| ImageJob {
                prompt: prompt.clone(),
                negative_prompt: String::new(),
                seed: self.cfg.seed.wrapping_add(i as u64),
                source: None,
            })
            .collect();
        let generated = pipeline.generate(&sampling, &jobs, &mut |_, _| {})?;
        let path = out
            .join(SAMPLES_DIR)
            .join(format!("step-{:06}.png", self.step));
        std::fs::create_dir_all(path.parent().expect("has a parent"))
            .with_context(|| format!("cannot create {}", out.join(SAMPLES_DIR).display()))?;
        let description = format!(
            "step {}, DDIM {} steps, guidance {}, seeds from {}; prompts: {}",
            self.step,
            settings.steps,
            settings.guidance_scale,
            self.cfg.seed,
            self.sample_prompts.join(" | ")
        );
        let columns = (generated.images.len() as f64).sqrt().ceil() as usize;
        let grid = metrics::image_grid(&generated.images, columns, 0);
        crate::image_io::save_png(&grid, &path, &description, true)?;
        observer.on_message(&format!(
            "step {}: samples in {}",
            self.step,
            path.display()
        ));
        Ok(())
    }
}

/// Flags that cannot work, and an output folder that does not fit `resume`.
fn check_settings(cfg: &TrainUNetOptions) -> anyhow::Result<()> {
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
fn text_encoder(
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
            let vb = mmap_var_builder(
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
fn unet_config(
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
fn load_frozen_vae(dir: &Path, device: &Device) -> anyhow::Result<AutoencoderKL> {
    let config = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
    let vb = mmap_var_builder(
        &weights_file(dir, DIFFUSERS_WEIGHTS, false)?,
        DType::F32,
        device,
    )?;
    AutoencoderKL::new(vb, &config)
        .with_context(|| format!("cannot load the VAE from {}", dir.display()))
}

/// The tensors named `<prefix>.<rest>`, renamed `<rest>`.
fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let prefix = format!("{prefix}.");
    tensors
        .iter()
        .filter_map(|(name, t)| Some((name.strip_prefix(&prefix)?.to_string(), t.clone())))
        .collect()
}

/// The first few distinct (first) captions, in data-set order.
fn default_sample_prompts(captions: &[Vec<String>]) -> Vec<String> {
    let mut prompts: Vec<String> = Vec::new();
    for caption in captions.iter().map(|alternatives| &alternatives[0]) {
        if !prompts.contains(caption) {
            prompts.push(caption.clone());
            if prompts.len() == DEFAULT_SAMPLE_PROMPTS {
                break;
            }
        }
    }
    prompts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_choices_are_uniform_and_reproducible() {
        let choices = step_choices(7, 3, 20_000, 1000, 0.1);
        assert_eq!(choices, step_choices(7, 3, 20_000, 1000, 0.1));
        let StepChoices {
            timesteps,
            dropped,
            caption_picks,
        } = choices;
        assert_ne!(timesteps, step_choices(7, 4, 20_000, 1000, 0.1).timesteps);
        assert!(timesteps.iter().all(|&t| t < 1000));
        let mean = timesteps.iter().sum::<usize>() as f64 / timesteps.len() as f64;
        assert!((mean - 499.5).abs() < 10.0, "mean timestep {mean}");
        let rate = dropped.iter().filter(|&&d| d).count() as f64 / dropped.len() as f64;
        assert!((rate - 0.1).abs() < 0.01, "drop rate {rate}");
        assert!(caption_picks.iter().all(|p| (0.0..1.0).contains(p)));
        let mean = caption_picks.iter().sum::<f64>() / caption_picks.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean caption pick {mean}");
    }

    #[test]
    fn pick_caption_covers_every_alternative() {
        let alternatives = ["a cat".to_string(), "a cat, noto style".to_string()];
        assert_eq!(pick_caption(&alternatives, false, 0.0), "a cat");
        assert_eq!(pick_caption(&alternatives, false, 0.49), "a cat");
        assert_eq!(pick_caption(&alternatives, false, 0.5), "a cat, noto style");
        assert_eq!(
            pick_caption(&alternatives, false, 0.999),
            "a cat, noto style"
        );
        assert_eq!(pick_caption(&alternatives, true, 0.7), "");
    }

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
