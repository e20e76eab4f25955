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
use serde_json::Value;

use super::checkpoint::{self, TrainState};
use super::data::{self, DataCursor, ImageFolder};
use super::driver::{self, LoopPlan, StepOutcome, TrainingRun};
use super::export::export_vae;
use super::metrics::{LossLog, TrainObserver, LOSS_PLOT};
use super::optim::{self, AdamW, AdamWConfig, Ema};
use super::SplitMix64;
use crate::image_io::image_grid;
use crate::model_source::{weights_file, DIFFUSERS_WEIGHTS};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::rng::TorchGenerator;

mod objective;
mod options;
mod scaling;

pub use objective::{negative_elbo, NegativeElbo};
pub use options::{defaults, ReconLoss, TrainVaeOptions, VaeArchitecture};
use scaling::measure_scaling_factor;
pub use scaling::SCALING_FACTOR_IMAGES;

/// Images shown (originals above reconstructions) in each sample grid.
const SAMPLE_IMAGES: usize = 8;
const LOSS_COLUMNS: [&str; 3] = ["reconstruction", "kl", "total"];

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

/// Everything a run needs, built once.
struct Run<'a> {
    opts: &'a TrainVaeOptions,
    data: ImageFolder,
    config: AutoencoderKLConfig,
    varmap: VarMap,
    /// Built once in f32, where its weights are the variables themselves and follow every
    /// update (in place); in mixed precision made again before each use (see `refresh_model`).
    model: Option<AutoencoderKL>,
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

impl<'a> Run<'a> {
    fn prepare(
        opts: &'a TrainVaeOptions,
        observer: &mut dyn TrainObserver,
    ) -> anyhow::Result<Self> {
        super::check_training_dtype(opts.dtype, &opts.device)?;
        checkpoint::check_output(&opts.output, opts.resume)?;
        let data = ImageFolder::open(&opts.data, opts.resolution)?;
        data.report_skipped(observer);
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
        opts.check_sizes(config.vae_scale_factor())?;

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
        log.report_malformed(observer);
        Ok(Self {
            opts,
            data,
            config,
            varmap,
            model: None,
            optim,
            ema,
            generator: TorchGenerator::from_state(&run_state.rng)?,
            cursor: run_state.cursor(),
            step: run_state.step,
            identity,
            log,
            frozen,
            last_losses: None,
        })
    }

    /// The model computing in the training dtype from the current master weights: built once
    /// in f32 (its weights are the variables, which the optimizer updates in place); in mixed
    /// precision its weights are half-precision copies of the variables, so it is made again
    /// every time (gradients flow back through the cast).
    fn refresh_model(&mut self) -> candle_core::Result<&AutoencoderKL> {
        if self.model.is_none() || self.opts.dtype != DType::F32 {
            let weights = self.with_frozen(super::var_tensors(&self.varmap));
            let vb = VarBuilder::from_tensors(weights, self.opts.dtype, &self.opts.device);
            self.model = Some(AutoencoderKL::new(vb, &self.config)?);
        }
        Ok(self.model.as_ref().expect("built above"))
    }

    /// The trained `weights` completed with the frozen ones: the whole model.
    fn with_frozen(&self, mut weights: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
        weights.extend(self.frozen.iter().map(|(n, t)| (n.clone(), t.clone())));
        weights
    }

    /// ε for `batch` images, from the run's generator (drawn on the CPU, as for inference).
    fn latent_noise(&mut self, batch: usize) -> candle_core::Result<Tensor> {
        let side = self.opts.trained_size() / self.config.vae_scale_factor();
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
            let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &self.opts.device);
            let vae = AutoencoderKL::new(vb, &self.config)?;
            let opts = self.opts;
            measure_scaling_factor(&vae, &self.data, opts.seed, opts.batch_size, &opts.device)?
        };
        let config = AutoencoderKLConfig {
            scaling_factor: factor,
            ..self.config.clone()
        };
        let dir = self.opts.output.join("vae");
        export_vae(&dir, &config, &weights)?;
        Ok((factor, dir))
    }

    /// This step's training images: a batch in the epoch's order, flipped and cropped as the
    /// options say.
    fn next_images(&mut self) -> anyhow::Result<Tensor> {
        let opts = self.opts;
        let (indices, flips) = data::next_batch(
            &mut self.cursor,
            self.data.len(),
            opts.batch_size,
            opts.seed,
            opts.flip,
        )?;
        let (images, _) = self.data.load_batch(&indices, &flips, &opts.device)?;
        Ok(match opts.crop {
            Some(size) => {
                let stream = format!("crops at step {}", self.step);
                data::random_crops(
                    &images,
                    size,
                    &mut SplitMix64::for_stream(opts.seed, &stream),
                )?
            }
            None => images,
        })
    }
}

impl TrainingRun for Run<'_> {
    fn step(&self) -> usize {
        self.step
    }

    fn train_step(&mut self) -> anyhow::Result<StepOutcome> {
        let opts = self.opts;
        let images = self.next_images()?;
        let eps = self.latent_noise(images.dim(0)?)?;
        let images = images.to_dtype(opts.dtype)?;
        let vae = self.refresh_model()?;
        let (terms, _) = negative_elbo(vae, &images, &eps, opts.recon_loss, opts.kl_weight)?;
        let losses = terms.values()?;
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
        let state = TrainState::new(self.step, self.cursor, &self.generator, &self.identity);
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
        let (opts, step) = (self.opts, self.step);
        let count = self.data.len().min(SAMPLE_IMAGES);
        let indices: Vec<usize> = (0..count).collect();
        let (images, _) = self
            .data
            .load_batch(&indices, &vec![false; count], &opts.device)?;
        let images = images.to_dtype(opts.dtype)?;
        let vae = self.refresh_model()?;
        let decoded = vae.decode(&vae.encode(&images)?.mode())?.detach();
        let originals = crate::image_io::decoded_to_images(&images)?;
        let reconstructions = crate::image_io::decoded_to_images(&decoded)?;
        let grid = image_grid(&[originals, reconstructions].concat(), count, 2);
        let dir = opts.output.join("samples");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("step-{step:06}.png"));
        let note = format!("ldm train-vae step {step}: originals (top), reconstructions (bottom)");
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
