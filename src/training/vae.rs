//! `ldm train-vae`: trains a diffusers `AutoencoderKL` by minimising the negative ELBO.
//!
//! Per batch of images `x` (in [-1, 1]):
//!
//! ```text
//! q(z|x) = N(μ, diag σ²)        from the encoder (mean and log-variance)
//! z      = μ + σ · ε            ε ~ N(0, I) from TorchGenerator(seed): the reparameterisation
//! loss   = reconstruction(decode(z), x) + kl_weight · KL(q(z|x) ‖ N(0, I))
//! ```
//!
//! Normalisation, as diffusers' `train_autoencoderkl.py`: the reconstruction term (`l1`: |x̂ − x|,
//! `l2`: (x̂ − x)²) is a mean over every pixel and channel of the batch; the KL term is the closed
//! form `½ Σ (μ² + σ² − 1 − log σ²)` summed over each image's latent elements, then averaged over
//! the batch. Because the KL is a per-image sum and the reconstruction a per-pixel mean, useful
//! `kl_weight`s are small (default 1e-6, diffusers' default).
//!
//! A run may start from a trained VAE (`VaeArchitecture::Pretrained`) and, with `decoder_only`,
//! train only its decoder: the encoder, hence the latent space a diffusion model was trained on,
//! stays bit-identical, and so does the scaling factor (how Stable Diffusion's ft-EMA/ft-MSE
//! VAEs were made). The KL term then has no gradient; it is still logged.
//!
//! At the end the latent scaling factor is measured as the LDM paper does — `1 / std` of sampled
//! training latents (all images, at most `SCALING_FACTOR_IMAGES`) — and written into the
//! exported `OUT/vae/config.json` with the weights (EMA ones if `ema_decay` is set).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

use super::checkpoint::{self, TrainState};
use super::data::{self, DataCursor, ImageFolder};
use super::driver::{self, LoopPlan, StepOutcome, TrainingRun};
use super::export;
use super::metrics::{LossLog, TrainObserver, LOSS_PLOT};
use super::optim::{self, AdamW, AdamWConfig, Ema};
use super::SplitMix64;
use crate::config::SampleSize;
use crate::image_io::image_grid;
use crate::model_source::{component_dir, weights_file, DIFFUSERS_WEIGHTS};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig, DECODER_BLOCK, ENCODER_BLOCK};
use crate::rng::TorchGenerator;

/// The scaling factor is measured on at most this many training images.
pub const SCALING_FACTOR_IMAGES: usize = 1024;
/// Images shown (originals above reconstructions) in each sample grid.
const SAMPLE_IMAGES: usize = 8;
const LOSS_COLUMNS: [&str; 3] = ["reconstruction", "kl", "total"];
const LATENT_SEED_OFFSET: u64 = 0x5ca1e;

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
    fn config(&self, resolution: usize) -> anyhow::Result<AutoencoderKLConfig> {
        match self {
            Self::ConfigFile(path) => AutoencoderKLConfig::from_file(path),
            Self::Pretrained(_) => AutoencoderKLConfig::from_file(
                &self
                    .pretrained_dir()
                    .expect("pretrained")
                    .join("config.json"),
            ),
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
    fn pretrained_dir(&self) -> Option<PathBuf> {
        match self {
            Self::Pretrained(path) => Some(component_dir(path, export::VAE_DIR)),
            _ => None,
        }
    }
}

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

    /// What must not change between a run and its resumption.
    fn identity(&self, config: &AutoencoderKLConfig, images: usize) -> Value {
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

/// How a call to [`train`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainVaeSummary {
    /// Optimizer updates completed in total (including before a resume).
    pub step: usize,
    /// Updates run by this call.
    pub steps_run: usize,
    /// Stopped by the observer (Ctrl-C) before `max_steps`: checkpointed, not exported.
    pub interrupted: bool,
    pub images: usize,
    pub skipped_images: usize,
    /// The last step's (reconstruction, KL, total), if any step ran.
    pub last_losses: Option<[f64; 3]>,
    /// Measured and written into the exported config (when not interrupted).
    pub scaling_factor: Option<f64>,
    /// `output/vae`, when exported.
    pub vae_dir: Option<PathBuf>,
    pub seconds: f64,
}

/// The terms of the negative ELBO for one batch (scalars, f32 — or the model dtype if wider).
pub struct NegativeElbo {
    pub reconstruction: Tensor,
    pub kl: Tensor,
    pub total: Tensor,
}

/// The negative ELBO of `images` with the reparameterised sample `z = μ + σ·eps`
/// (normalised as the module documentation says), and the decoded `z`.
pub fn negative_elbo(
    vae: &AutoencoderKL,
    images: &Tensor,
    eps: &Tensor,
    recon_loss: ReconLoss,
    kl_weight: f64,
) -> candle_core::Result<(NegativeElbo, Tensor)> {
    let posterior = vae.encode(images)?;
    let decoded = vae.decode(&posterior.sample(eps)?)?;
    let loss_dtype = crate::models::nn::internal_dtype(images.dtype());
    let error = (decoded.to_dtype(loss_dtype)? - images.to_dtype(loss_dtype)?)?;
    let reconstruction = match recon_loss {
        ReconLoss::L1 => error.abs()?.mean_all()?,
        ReconLoss::L2 => error.sqr()?.mean_all()?,
    };
    let kl = posterior.kl()?.to_dtype(loss_dtype)?.mean_all()?;
    let total = (&reconstruction + (&kl * kl_weight)?)?;
    let terms = NegativeElbo {
        reconstruction,
        kl,
        total,
    };
    Ok((terms, decoded))
}

/// Everything a run needs, built once.
struct Run<'a> {
    opts: &'a TrainVaeOptions,
    data: ImageFolder,
    config: AutoencoderKLConfig,
    varmap: VarMap,
    optim: AdamW,
    ema: Option<Ema>,
    generator: TorchGenerator,
    cursor: DataCursor,
    step: usize,
    identity: Value,
    log: LossLog,
    /// Weights that are not trained (the encoder's, in decoder-only runs).
    frozen: HashMap<String, Tensor>,
    /// The last step's (reconstruction, KL, total), once a step ran.
    last_losses: Option<[f64; 3]>,
}

/// Trains (or resumes) as `opts` says, reporting to `observer`; see the module documentation.
pub fn train(
    opts: &TrainVaeOptions,
    observer: &mut dyn TrainObserver,
) -> anyhow::Result<TrainVaeSummary> {
    let started = Instant::now();
    let mut run = Run::prepare(opts, observer)?;
    let resumed_from = run.step;
    let plan = LoopPlan {
        max_steps: opts.max_steps,
        save_every: opts.save_every.unwrap_or(0),
        sample_every: opts.sample_every.unwrap_or(0),
        resumed: opts.resume,
    };
    let interrupted = driver::run_loop(&mut run, &plan, observer)?;
    run.log.plot(&opts.output.join(LOSS_PLOT))?;
    let (scaling_factor, vae_dir) = if interrupted {
        (None, None)
    } else {
        let (factor, dir) = run.export()?;
        (Some(factor), Some(dir))
    };
    Ok(TrainVaeSummary {
        step: run.step,
        steps_run: run.step - resumed_from,
        interrupted,
        images: run.data.len(),
        skipped_images: run.data.skipped.len(),
        last_losses: run.last_losses,
        scaling_factor,
        vae_dir,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Scalar tensors (of one dtype) as f64, read back with one device sync.
fn scalars(tensors: &[&Tensor]) -> candle_core::Result<Vec<f64>> {
    Tensor::stack(tensors, 0)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()
}

impl<'a> Run<'a> {
    fn prepare(
        opts: &'a TrainVaeOptions,
        observer: &mut dyn TrainObserver,
    ) -> anyhow::Result<Self> {
        super::check_training_dtype(opts.dtype, &opts.device)?;
        checkpoint::check_output(&opts.output, opts.resume)?;
        let data = ImageFolder::open(&opts.data, opts.resolution)?;
        for (path, reason) in &data.skipped {
            observer.on_message(&format!("warning: skipping {}: {reason}", path.display()));
        }
        anyhow::ensure!(
            !data.is_empty(),
            "no usable images in {}",
            opts.data.display()
        );
        observer.on_message(&format!(
            "{} images ({} skipped) from {}",
            data.len(),
            data.skipped.len(),
            opts.data.display()
        ));

        let config = opts.architecture.config(opts.resolution)?;
        let factor = config.vae_scale_factor();
        anyhow::ensure!(
            opts.resolution.is_multiple_of(factor),
            "--resolution {} is not a multiple of the VAE's downsampling factor {factor}",
            opts.resolution
        );
        if let Some(crop) = opts.crop {
            anyhow::ensure!(
                crop <= opts.resolution && crop.is_multiple_of(factor) && crop > 0,
                "--crop {crop} must be a positive multiple of the VAE's downsampling factor \
                 {factor} and at most --resolution {}",
                opts.resolution
            );
        }

        let varmap = VarMap::new();
        let builder = super::seeded_var_builder(&varmap, opts.seed, DType::F32, &opts.device);
        AutoencoderKL::new(builder, &config).context("cannot build the VAE")?;
        let frozen = match opts.architecture.pretrained_dir() {
            Some(dir) => load_pretrained(&varmap, &dir, opts.decoder_only)?,
            None => {
                anyhow::ensure!(
                    !opts.decoder_only,
                    "decoder-only training needs a pretrained VAE to start from"
                );
                HashMap::new()
            }
        };
        let adamw = AdamWConfig {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..AdamWConfig::default()
        };
        let mut optim = AdamW::new(&varmap, adamw)?;
        let mut ema = opts
            .ema_decay
            .map(|decay| Ema::new(&varmap, decay))
            .transpose()?;
        let identity = opts.identity(&config, data.len());
        let run_state = checkpoint::start(
            &opts.output,
            opts.resume,
            opts.seed,
            &identity,
            &varmap,
            &mut optim,
            ema.as_mut(),
        )?;
        if opts.resume {
            observer.on_message(&format!("resuming at step {}", run_state.step));
        }
        let log = LossLog::open(
            &opts.output,
            &LOSS_COLUMNS,
            opts.resume.then_some(run_state.step),
        )?;
        Ok(Self {
            opts,
            data,
            config,
            varmap,
            optim,
            ema,
            generator: TorchGenerator::from_state(&run_state.rng)?,
            cursor: DataCursor {
                epoch: run_state.epoch,
                position_in_epoch: run_state.position_in_epoch,
            },
            step: run_state.step,
            identity,
            log,
            frozen,
            last_losses: None,
        })
    }

    /// The model computing in the training dtype from the current master weights.
    fn model(&self) -> candle_core::Result<AutoencoderKL> {
        let weights = self.with_frozen(super::var_tensors(&self.varmap));
        let vb = VarBuilder::from_tensors(weights, self.opts.dtype, &self.opts.device);
        AutoencoderKL::new(vb, &self.config)
    }

    /// The trained `weights` completed with the frozen ones: the whole model.
    fn with_frozen(&self, mut weights: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        weights.extend(self.frozen.iter().map(|(n, t)| (n.clone(), t.clone())));
        weights
    }

    /// ε for `batch` images, from the run's generator (drawn on the CPU, as for inference).
    fn latent_noise(&mut self, batch: usize) -> candle_core::Result<Tensor> {
        let trained_size = self.opts.crop.unwrap_or(self.opts.resolution);
        let side = trained_size / self.config.vae_scale_factor();
        let shape = (batch, self.config.latent_channels, side, side);
        let count = batch * self.config.latent_channels * side * side;
        Tensor::from_vec(self.generator.randn(count), shape, &Device::Cpu)?
            .to_dtype(self.opts.dtype)?
            .to_device(&self.opts.device)
    }

    /// Writes `output/vae/` and returns its scaling factor (measured, or the pretrained one in
    /// decoder-only runs) with the folder.
    fn export(&self) -> anyhow::Result<(f64, PathBuf)> {
        let weights = self.with_frozen(match &self.ema {
            Some(ema) => ema.tensors(),
            None => super::var_tensors(&self.varmap),
        });
        // A frozen encoder keeps the latents, and the diffusion models trained on them need
        // the scaling factor they were trained with.
        let factor = if self.opts.decoder_only {
            self.config.scaling_factor
        } else {
            self.measure_scaling_factor(&weights)?
        };
        let config = AutoencoderKLConfig {
            scaling_factor: factor,
            ..self.config.clone()
        };
        let dir = self.opts.output.join("vae");
        export_vae(&dir, &config, &weights)?;
        Ok((factor, dir))
    }

    /// `1 / std` of latents sampled (z = μ + σ·ε, ε from a generator seeded apart from the
    /// training one) for up to `SCALING_FACTOR_IMAGES` training images, with the exported weights.
    fn measure_scaling_factor(
        &self,
        weights: &std::collections::HashMap<String, Tensor>,
    ) -> anyhow::Result<f64> {
        let vb =
            candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &self.opts.device);
        let vae = AutoencoderKL::new(vb, &self.config)?;
        let mut generator = TorchGenerator::new(self.opts.seed.wrapping_add(LATENT_SEED_OFFSET));
        let count = self.data.len().min(SCALING_FACTOR_IMAGES);
        let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0usize);
        for chunk in (0..count)
            .collect::<Vec<_>>()
            .chunks(self.opts.batch_size.max(1))
        {
            let (images, _) =
                self.data
                    .load_batch(chunk, &vec![false; chunk.len()], &self.opts.device)?;
            let posterior = vae.encode(&images)?;
            let shape = posterior.mean.shape().clone();
            let eps = Tensor::from_vec(generator.randn(shape.elem_count()), shape, &Device::Cpu)?
                .to_device(&self.opts.device)?;
            let z = posterior
                .sample(&eps)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?;
            sum += z.sum_all()?.to_scalar::<f64>()?;
            sum_sq += z.sqr()?.sum_all()?.to_scalar::<f64>()?;
            n += z.elem_count();
        }
        anyhow::ensure!(n > 1, "too few latents to measure the scaling factor");
        // Unbiased variance, as torch's `std()`.
        let variance = (sum_sq - sum * sum / n as f64) / (n - 1) as f64;
        anyhow::ensure!(
            variance > 0.0 && variance.is_finite(),
            "the latents have no spread (variance {variance}); cannot set scaling_factor"
        );
        Ok(1.0 / variance.sqrt())
    }
}

impl TrainingRun for Run<'_> {
    fn step(&self) -> usize {
        self.step
    }

    fn train_step(&mut self) -> anyhow::Result<StepOutcome> {
        let opts = self.opts;
        let (indices, flips) = data::next_batch(
            &mut self.cursor,
            self.data.len(),
            opts.batch_size,
            opts.seed,
            opts.flip,
        )?;
        let (images, _) = self.data.load_batch(&indices, &flips, &opts.device)?;
        let images = match opts.crop {
            Some(size) => {
                let stream = format!("crops at step {}", self.step);
                data::random_crops(
                    &images,
                    size,
                    &mut SplitMix64::for_stream(opts.seed, &stream),
                )?
            }
            None => images,
        };
        let vae = self.model()?;
        let eps = self.latent_noise(indices.len())?;
        let images = images.to_dtype(opts.dtype)?;
        let (terms, _) = negative_elbo(&vae, &images, &eps, opts.recon_loss, opts.kl_weight)?;
        let losses = scalars(&[&terms.reconstruction, &terms.kl, &terms.total])?;
        let losses = [losses[0], losses[1], losses[2]];
        if !losses.iter().all(|v| v.is_finite()) {
            anyhow::bail!(
                "the loss is not finite at step {} (reconstruction {}, KL {}): try a lower --lr, --max-grad-norm or --dtype f32",
                self.step + 1,
                losses[0],
                losses[1]
            );
        }
        let mut grads = terms.total.backward()?;
        let max_norm = opts.max_grad_norm.unwrap_or(f64::INFINITY);
        let grad_norm = optim::clip_grad_norm(&mut grads, &self.varmap, max_norm)?;
        let lr = optim::warmup_lr(self.step, opts.lr, opts.warmup_steps);
        self.optim.step(&grads, lr)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.varmap)?;
        }
        self.step += 1;
        self.log.record(self.step, &losses)?;
        self.last_losses = Some(losses);
        Ok(StepOutcome {
            lr,
            grad_norm: grad_norm.value()?,
            losses: LOSS_COLUMNS.into_iter().zip(losses).collect(),
        })
    }

    fn save_checkpoint(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()> {
        let state = TrainState {
            step: self.step,
            epoch: self.cursor.epoch,
            position_in_epoch: self.cursor.position_in_epoch,
            rng: self.generator.state(),
            extra: self.identity.clone(),
        };
        checkpoint::save_checkpoint(
            &self.opts.output,
            &self.varmap,
            &self.optim,
            self.ema.as_ref(),
            &state,
        )?;
        observer.on_message(&format!("checkpoint saved at step {}", self.step));
        Ok(())
    }

    /// `output/samples/step-NNNNNN.png` (named as the U-Net trainer's): the first images of the
    /// data set (top row) above their reconstructions from the posterior mean (bottom row).
    fn save_samples(&mut self, observer: &mut dyn TrainObserver) -> anyhow::Result<()> {
        let count = self.data.len().min(SAMPLE_IMAGES);
        let indices: Vec<usize> = (0..count).collect();
        let (images, _) = self
            .data
            .load_batch(&indices, &vec![false; count], &self.opts.device)?;
        let vae = self.model()?;
        let images = images.to_dtype(self.opts.dtype)?;
        let decoded = vae.decode(&vae.encode(&images)?.mode())?.detach();
        let originals = crate::image_io::decoded_to_images(&images)?;
        let reconstructions = crate::image_io::decoded_to_images(&decoded)?;
        let grid = image_grid(&[originals, reconstructions].concat(), count, 2);
        let dir = self.opts.output.join("samples");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("step-{:06}.png", self.step));
        let note = format!(
            "ldm train-vae step {}: originals (top), reconstructions (bottom)",
            self.step
        );
        crate::image_io::save_png(&grid, &path, &note, true)?;
        observer.on_message(&format!("samples: {}", path.display()));
        Ok(())
    }
}

/// Sets `varmap` to the weights of the trained VAE in `dir`. With `decoder_only`, the variables
/// outside the decoder are then taken out of `varmap` (so no optimizer sees them) and returned.
fn load_pretrained(
    varmap: &VarMap,
    dir: &Path,
    decoder_only: bool,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let path = weights_file(dir, DIFFUSERS_WEIGHTS, false)?;
    let device = varmap
        .all_vars()
        .first()
        .map_or(Device::Cpu, |v| v.device().clone());
    let weights = candle_core::safetensors::load(&path, &device)
        .with_context(|| format!("cannot read {}", path.display()))?;
    checkpoint::set_vars(varmap, &weights).with_context(|| {
        format!(
            "{} does not fit its config.json (or the architecture flags)",
            path.display()
        )
    })?;
    if !decoder_only {
        return Ok(HashMap::new());
    }
    let is_decoder =
        |name: &str| name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
    let mut vars = varmap.data().lock().unwrap();
    let frozen: Vec<String> = vars.keys().filter(|n| !is_decoder(n)).cloned().collect();
    Ok(frozen
        .into_iter()
        .filter_map(|name| {
            let var = vars.remove(&name)?;
            Some((name, var.as_tensor().detach()))
        })
        .collect())
}

/// Writes a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
/// (f32), each atomically.
pub fn export_vae(
    dir: &Path,
    config: &AutoencoderKLConfig,
    weights: &std::collections::HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights = weights
        .iter()
        .map(|(name, t)| {
            Ok((
                name.clone(),
                t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    checkpoint::save_tensors_atomically(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &weights,
    )?;
    let text = serde_json::to_string_pretty(&export::vae_config_json(config)?)? + "\n";
    crate::durable::write_atomically(&dir.join("config.json"), text.as_bytes(), true)
}
