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
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context};
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

use super::checkpoint::{self, TrainState};
use super::data::{self, DataCursor, ImageFolder};
use super::data_parallel;
use super::driver::{self, LoopPlan, StepOutcome, TrainingRun};
use super::export::{self, PipelineExport, TextEncoderExport};
use super::metrics::{LossLog, TrainObserver, LOSS_PLOT};
use super::optim::{self, AdamW, Ema};
use crate::model_source::{component_dir, PipelineFolder};
use crate::models::clip::ClipTextModel;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipelines::{ImageJob, Sampling, StableDiffusion};
use crate::rng::TorchGenerator;

mod components;
mod latents;
mod objective;
mod options;

use crate::schedulers::{NoiseSchedule, SamplerKind, SchedulerConfig};
use crate::tokenizer::PromptTokenizer;
use components::{check_settings, load_frozen_vae, text_encoder, unet_config, TextEncoder};
use latents::{standard_normal, LatentCache};
use objective::pick_caption;
pub use objective::{diffusion_loss, step_choices, StepChoices};
pub use options::{
    defaults, PredictionTarget, SampleSettings, TextEncoderSetup, TextEncoderSizes,
    TrainUNetOptions, UNetSetup, UNetSizes,
};

/// Variable-name prefixes of the two trained networks in the run's one `VarMap`.
pub const UNET_PREFIX: &str = "unet";
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder";
/// Where sample grids go, inside the output folder.
pub const SAMPLES_DIR: &str = "samples";
const LOSS_COLUMNS: [&str; 1] = ["loss"];
/// How many captions become the default sample prompts.
const DEFAULT_SAMPLE_PROMPTS: usize = 4;

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

/// The trained networks, built over the run's variables.
struct Networks {
    unet: UNet2DConditionModel,
    /// The text encoder when it is trained with the U-Net.
    text_encoder: Option<ClipTextModel>,
}

impl Networks {
    /// The networks over `vb`; their variables are created if `vb` creates them.
    fn build(
        vb: VarBuilder,
        unet_config: &UNet2DConditionConfig,
        text_encoder: &TextEncoder,
    ) -> anyhow::Result<Self> {
        let unet = UNet2DConditionModel::new(vb.pp(UNET_PREFIX), unet_config)
            .context("cannot build the U-Net")?;
        let text_encoder = match text_encoder {
            TextEncoder::Trained { config } => Some(
                ClipTextModel::new(vb.pp(TEXT_ENCODER_PREFIX), config)
                    .context("cannot build the text encoder")?,
            ),
            TextEncoder::Frozen { .. } => None,
        };
        Ok(Self { unet, text_encoder })
    }
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
    /// Built once in f32, where their weights are the variables themselves and follow every
    /// update (in place); `None` in mixed precision until a step builds them (see `networks`).
    networks: Option<Networks>,
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
        images.report_skipped(observer);
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
        let networks = Networks::build(vb, &unet_config, &text_encoder)?;
        let networks = (cfg.dtype == DType::F32).then_some(networks);
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
        let cursor = state.cursor();
        let log = LossLog::open(out, &LOSS_COLUMNS, cfg.resume.then_some(step))?;
        log.report_malformed(observer);
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
            networks,
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

    /// Makes sure `networks` holds this step's networks: in mixed precision their weights are
    /// half-precision copies of the variables, so they are made again from the updated f32
    /// master weights every step (gradients flow back through the cast).
    fn refresh_networks(&mut self) -> anyhow::Result<()> {
        if self.networks.is_none() || self.cfg.dtype != DType::F32 {
            let vb = super::compute_var_builder(&self.varmap, self.cfg.dtype, &self.cfg.device);
            self.networks = Some(Networks::build(vb, &self.unet_config, &self.text_encoder)?);
        }
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

        self.refresh_networks()?;
        let networks = self.networks.as_ref().expect("refreshed above");
        let latents = latents.to_dtype(cfg.dtype)?;
        let noise = noise.to_dtype(cfg.dtype)?;
        let shard_loss = |rows: Range<usize>| -> candle_core::Result<Tensor> {
            let ids = input_ids.narrow(0, rows.start, rows.len())?;
            let conditioning = match (&networks.text_encoder, &self.text_encoder) {
                (Some(trained), _) => trained.forward(&ids)?,
                (None, TextEncoder::Frozen { model, .. }) => model.forward(&ids)?,
                (None, TextEncoder::Trained { .. }) => unreachable!("built with the networks"),
            };
            diffusion_loss(
                &networks.unet,
                &conditioning,
                &self.schedule,
                cfg.prediction,
                &latents.narrow(0, rows.start, rows.len())?,
                &noise.narrow(0, rows.start, rows.len())?,
                &choices.timesteps[rows],
            )
        };
        let vars = self.varmap.all_vars();
        let (loss_value, mut grads) =
            data_parallel::sharded_backward(indices.len(), device, &vars, shard_loss)?;
        ensure!(
            loss_value.is_finite(),
            "the loss became {loss_value} at step {}; lower the learning rate (the last checkpoint is intact)",
            self.step + 1
        );
        let grad_norm = optim::clip_grad_norm(&mut grads, &self.varmap, cfg.max_grad_norm)?;
        let lr = optim::warmup_lr(self.step, cfg.optimizer.lr, cfg.warmup_steps);
        self.optim.step(&grads, lr)?;
        self.ema.update(&self.varmap)?;
        self.step += 1;
        self.log.record(self.step, &[loss_value])?;
        Ok(StepOutcome {
            lr,
            grad_norm: grad_norm.value()?,
            losses: vec![(LOSS_COLUMNS[0], loss_value)],
        })
    }

    /// Saves the checkpoint, exports the pipeline it corresponds to, and redraws the loss plot.
    fn save_checkpoint(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()> {
        let state = TrainState::new(self.step, self.cursor, &self.generator, &self.identity);
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
        let folder = PipelineFolder::new(out, &format!("step {}", self.step));
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
            micro: Default::default(),
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
        let grid = crate::image_io::image_grid(&generated.images, columns, 0);
        crate::image_io::save_png(&grid, &path, &description, true)?;
        observer.on_message(&format!(
            "step {}: samples in {}",
            self.step,
            path.display()
        ));
        Ok(())
    }
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
