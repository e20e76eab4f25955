//! The flags of `ldm txt2img`, `img2img`, `inpaint` and `batch`: model, sampling, SDXL
//! micro-conditioning, prompts and outputs (running them is `generate`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::Args;

use super::conditioning::ConditioningArgs;
use super::lora::LoraArgs;
use crate::device::{DeviceSpec, Precision};
use crate::lora::LoraSpec;
use crate::model_source::{ModelOptions, PipelineFolder};
use crate::models::nn::Quantization;
use crate::pipelines::{Generated, MicroConditioning, Sampling, StableDiffusion, VaeParts};
use crate::schedulers::{PredictionType, SamplerKind};
use crate::shard::Shard;

/// Model, device and precision: how a pipeline is loaded.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Pipeline to use: a local diffusers folder, a single-file SD 1.x/2.x checkpoint
    /// (.safetensors or .ckpt; see --config), a hub repo id (owner/name) or a preset
    /// (sd15, sd21, sd21-base, sd-turbo, sdxl, sdxl-turbo). Default: the embedded ldm model in weights/.
    #[arg(short, long, value_name = "MODEL")]
    pub model: Option<String>,

    /// Single-file checkpoints: the diffusers folder of the same kind of model whose tokenizer
    /// (required) and configs to use; configs it lacks are inferred from the tensors, weights
    /// in it are ignored. Default: the checkpoint's own folder, when it has a tokenizer/.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,

    /// The model's prediction type (epsilon, v_prediction, sample), replacing the scheduler
    /// config's: single files do not record it (SD 2.x 768 models are v_prediction).
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<PredictionType>,

    /// Single-file checkpoints: read the U-Net from the EMA weights (model_ema.*) of a
    /// training checkpoint that holds both, as diffusers' extract_ema=True does.
    #[arg(long)]
    pub extract_ema: bool,

    /// Device: cpu, cuda, cuda:N or metal. Default: the first GPU this build supports, else cpu.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,

    /// Precision of the weights and activations. Default: f32 on cpu, f16 on a GPU. On the
    /// CPU, f16 and bf16 run slower than f32 (ldm's kernels widen them to f32 inside each op).
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<Precision>,

    /// Store the U-Net's and text encoder's linear layers in 8 bits (q8_0, as
    /// stable-diffusion.cpp offers): less memory and faster products on the CPU (AVX-512-VNNI),
    /// at the cost of a slightly different image. CPU only.
    #[arg(long, value_enum, value_name = "TYPE")]
    pub quantize: Option<Quantization>,

    #[command(flatten)]
    pub lora: LoraArgs,
}

impl ModelArgs {
    /// The pipeline with `loras` merged in, and the VAE parts the run needs.
    pub fn load(&self, loras: &[LoraSpec], vae_parts: VaeParts) -> anyhow::Result<StableDiffusion> {
        let (device, dtype) = self.device_and_dtype()?;
        let folder =
            PipelineFolder::resolve(self.model.as_deref(), dtype != DType::F32, &self.options())?;
        StableDiffusion::load_with_loras(&folder, &device, dtype, self.quantize, loras, vae_parts)
            .with_context(|| format!("cannot load model {}", folder.location().display()))
    }

    /// How `--model` is read.
    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            config: self.config.clone(),
            prediction_type: self.prediction_type,
            extract_ema: self.extract_ema,
        }
    }

    /// The device opened, and the precision to run in on it.
    pub fn device_and_dtype(&self) -> anyhow::Result<(candle_core::Device, DType)> {
        let device = crate::device::open(self.device)?;
        let precision = self.dtype.unwrap_or(if device.is_cpu() {
            Precision::F32
        } else {
            Precision::F16
        });
        Ok((device, precision.dtype()))
    }
}

/// Sampling options shared by txt2img, img2img and inpaint.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// What to keep out of the image (classifier-free guidance's unconditional prompt).
    #[arg(short = 'n', long, default_value = "", value_name = "TEXT")]
    pub negative_prompt: String,

    /// Sampler.
    #[arg(long, visible_alias = "sampler", value_enum, default_value_t = SamplerKind::Ddim)]
    pub scheduler: SamplerKind,

    /// Number of denoising steps.
    #[arg(
        long,
        visible_alias = "sample-steps",
        default_value_t = 50,
        value_name = "N"
    )]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 or less runs without the unconditional pass.
    /// Default: the model's recommended scale (`_ldm` in its model_index.json), else 7.5.
    #[arg(short = 'g', long, visible_aliases = ["cfg-scale", "cfg"], value_name = "G")]
    pub guidance_scale: Option<f64>,

    /// Guidance rescale φ in [0, 1] (diffusers' `guidance_rescale`): pulls the guided
    /// prediction back to the spread of the text-conditioned one; 0.7 suits zero-terminal-SNR
    /// models at high guidance.
    #[arg(long, default_value_t = 0.0, value_name = "PHI")]
    pub guidance_rescale: f64,

    /// Seed of image 1; image i uses seed + i - 1. Random (and printed) when omitted or -1.
    #[arg(short, long, allow_negative_numbers = true, value_name = "SEED", value_parser = parse_seed)]
    pub seed: Option<i64>,

    /// DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise at every step.
    #[arg(long, default_value_t = 0.0, value_name = "E")]
    pub eta: f64,

    /// Image width in pixels (a multiple of the VAE factor). Default: the model's native size.
    #[arg(short = 'W', long, value_name = "PX")]
    pub width: Option<usize>,

    /// Image height in pixels (a multiple of the VAE factor). Default: the model's native size.
    #[arg(short = 'H', long, value_name = "PX")]
    pub height: Option<usize>,

    /// How many images to make.
    #[arg(short = 'N', long, visible_aliases = ["batch-count", "n-samples"], default_value_t = 1, value_name = "N")]
    pub num_images: usize,

    #[command(flatten)]
    pub conditioning: ConditioningArgs,

    #[command(flatten)]
    pub micro: MicroArgs,
}

/// SDXL's micro-conditioning (diffusers' `original_size`, `crops_coords_top_left`,
/// `target_size`); other models ignore it.
#[derive(Debug, Args)]
pub struct MicroArgs {
    /// SDXL: the size the image is conditioned as coming from, WIDTHxHEIGHT. Default: the
    /// output size.
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,

    /// SDXL: the crop's top-left corner the image is conditioned on, TOP,LEFT in pixels (as
    /// diffusers orders it).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_top_left, default_value = "0,0")]
    pub crops_coords_top_left: (usize, usize),

    /// SDXL: the size the image is conditioned as aimed at, WIDTHxHEIGHT. Default: the output
    /// size.
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,
}

impl MicroArgs {
    pub fn micro(&self) -> MicroConditioning {
        MicroConditioning {
            original_size: self.original_size,
            crops_coords_top_left: self.crops_coords_top_left,
            target_size: self.target_size,
        }
    }
}

/// `1024x768` -> `(1024, 768)`.
fn parse_size(text: &str) -> Result<(usize, usize), String> {
    parse_pair(text, 'x').and_then(|(w, h)| {
        if w == 0 || h == 0 {
            Err(format!("{text:?}: width and height must be positive"))
        } else {
            Ok((w, h))
        }
    })
}

/// `0,256` -> `(0, 256)`.
fn parse_top_left(text: &str) -> Result<(usize, usize), String> {
    parse_pair(text, ',')
}

fn parse_pair(text: &str, separator: char) -> Result<(usize, usize), String> {
    let parse = |part: &str| part.trim().parse::<usize>().ok();
    match text.split_once(separator) {
        Some((a, b)) => match (parse(a), parse(b)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!(
                "{text:?} is not two whole numbers separated by {separator:?}"
            )),
        },
        None => Err(format!(
            "{text:?} is not two whole numbers separated by {separator:?}"
        )),
    }
}

impl SamplingArgs {
    /// The run's settings; width, height and the guidance scale given here are defaults for
    /// unset flags.
    pub fn sampling(
        &self,
        width: usize,
        height: usize,
        guidance_scale: f64,
        strength: f64,
    ) -> Sampling {
        Sampling {
            sampler: self.scheduler,
            steps: self.steps,
            guidance_scale: self.guidance_scale.unwrap_or(guidance_scale),
            guidance_rescale: self.guidance_rescale,
            eta: self.eta,
            width: self.width.unwrap_or(width),
            height: self.height.unwrap_or(height),
            strength,
            micro: self.micro.micro(),
        }
    }

    /// The seeds of this run: the given one (or a random one, printed) counting up.
    pub(super) fn seeds(&self) -> Vec<u64> {
        let base = match self.seed {
            Some(seed) if seed >= 0 => seed as u64,
            _ => {
                let seed = rand::random::<u32>() as u64;
                eprintln!("seed: {seed}");
                seed
            }
        };
        (0..self.num_images as u64)
            .map(|i| base.wrapping_add(i))
            .collect()
    }
}

/// A seed: -1 (random, A1111's convention) or a non-negative number; anything below -1 is a
/// mistake, not a request for a random seed.
fn parse_seed(text: &str) -> Result<i64, String> {
    let seed: i64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if seed < -1 {
        return Err(format!(
            "{seed} is not a seed: give -1 for a random seed or a number from 0 up"
        ));
    }
    Ok(seed)
}

/// Where and how results are written.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output PNG. With several images, a number is added: out-1.png, out-2.png, ...
    /// Default: ldm-<seed>.png in the current folder.
    #[arg(short, long, value_name = "FILE.png")]
    pub output: Option<PathBuf>,

    /// Replace existing files instead of refusing to.
    #[arg(long)]
    pub overwrite: bool,

    /// Also save the final latents (before VAE decoding) as safetensors, key "latents".
    #[arg(long, value_name = "FILE.safetensors")]
    pub save_latents: Option<PathBuf>,

    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

impl OutputArgs {
    pub(super) fn image_paths(&self, seeds: &[u64]) -> Vec<PathBuf> {
        match &self.output {
            None => seeds
                .iter()
                .map(|seed| PathBuf::from(format!("ldm-{seed}.png")))
                .collect(),
            Some(path) if seeds.len() == 1 => vec![path.clone()],
            Some(path) => (1..=seeds.len()).map(|i| numbered(path, i)).collect(),
        }
    }

    /// Fails before any work when an output cannot be written.
    pub(super) fn check_writable(&self, paths: &[PathBuf]) -> anyhow::Result<()> {
        for path in paths.iter().chain(&self.save_latents) {
            if !self.overwrite && path.exists() {
                bail!(
                    "{} already exists (pass --overwrite to replace it)",
                    path.display()
                );
            }
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                bail!(
                    "cannot write {}: folder {} does not exist",
                    path.display(),
                    dir.display()
                );
            }
        }
        Ok(())
    }

    pub(super) fn write_images(
        &self,
        generated: &Generated,
        paths: &[PathBuf],
    ) -> anyhow::Result<()> {
        for ((image, info), path) in generated.images.iter().zip(&generated.infos).zip(paths) {
            crate::image_io::save_png(image, path, &info.to_infotext(), self.overwrite)?;
            println!("{}", path.display());
        }
        Ok(())
    }

    /// `--save-latents`: the final latents of every image, `[N, C, h, w]`.
    pub(super) fn write_latents(&self, latents: &[Tensor]) -> anyhow::Result<()> {
        if let Some(path) = &self.save_latents {
            let latents = Tensor::cat(latents, 0)?.to_dtype(candle_core::DType::F32)?;
            let bytes = safetensors::serialize([("latents", &latents)], None)?;
            crate::durable::write_atomically(path, &bytes, self.overwrite)?;
        }
        Ok(())
    }
}

/// `out.png`, 2 -> `out-2.png`.
fn numbered(path: &Path, index: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    path.with_file_name(name)
}

/// The prompt, positional or as A1111 / stable-diffusion.cpp users type it.
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// The prompt (or give it with -p/--prompt).
    #[arg(value_name = "PROMPT", required_unless_present_any = ["prompt_flag", "from_file"])]
    pub prompt: Option<String>,

    /// The prompt.
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "TEXT",
        conflicts_with = "prompt"
    )]
    pub prompt_flag: Option<String>,
}

impl PromptArgs {
    pub(super) fn text(&self) -> String {
        self.prompt
            .clone()
            .or(self.prompt_flag.clone())
            .unwrap_or_default()
    }
}

/// Many prompts from a file instead of one (see `ldm batch`).
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Prompt file: one prompt per line, or JSON Lines with per-line overrides.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "prompt_flag", "output"])]
    pub from_file: Option<PathBuf>,

    #[command(flatten)]
    pub run: BatchRunArgs,
}

/// How a prompt file runs.
#[derive(Debug, Args)]
pub struct BatchRunArgs {
    /// Folder for a prompt file's images and its manifest.jsonl; re-running skips what is
    /// recorded there.
    #[arg(long, default_value = "outputs", value_name = "DIR")]
    pub output_dir: PathBuf,

    /// Images per batched forward pass: prompts of the same shape run together, and -N images
    /// of one prompt run this many at a time.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch_size: usize,

    /// Skip malformed prompt-file lines (with a warning) instead of refusing to start.
    #[arg(long)]
    pub keep_going: bool,

    /// Make only share I (from 0) of N of the file's images, so N workers on one output folder
    /// make each image once. Default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set.
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    pub shard: Option<Shard>,

    /// The number of shards, with the shard index from JOB_COMPLETION_INDEX (a Kubernetes
    /// indexed Job).
    #[arg(long, value_name = "N")]
    pub shard_count: Option<usize>,
}

#[derive(Debug, Args)]
pub struct Txt2ImgArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub batch: BatchArgs,

    /// The image to start from (any format the image crate reads).
    #[arg(
        short = 'i',
        long,
        visible_alias = "init-img",
        value_name = "FILE",
        required_unless_present = "from_file"
    )]
    pub image: Option<PathBuf>,

    /// How much to change the image: 0 keeps it, 1 repaints it completely.
    #[arg(
        long,
        visible_alias = "denoising-strength",
        default_value_t = 0.8,
        value_name = "S"
    )]
    pub strength: f64,

    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub batch: BatchArgs,

    /// The image to repaint.
    #[arg(
        short = 'i',
        long,
        visible_alias = "init-img",
        value_name = "FILE",
        required_unless_present = "from_file"
    )]
    pub image: Option<PathBuf>,

    /// The mask: white is repainted, black is kept (any size; resized to the image).
    #[arg(long, value_name = "FILE", required_unless_present = "from_file")]
    pub mask: Option<PathBuf>,

    /// How much to change the masked region: 1 repaints it from pure noise.
    #[arg(
        long,
        visible_alias = "denoising-strength",
        default_value_t = 1.0,
        value_name = "S"
    )]
    pub strength: f64,

    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct BatchCommandArgs {
    /// Prompt file: one prompt per line (# comments), or JSON Lines with per-line overrides
    /// (negative_prompt, seed, steps, guidance_scale, guidance_rescale, width, height, scheduler,
    /// num_images, image, mask, strength, clip_skip, lora).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    #[command(flatten)]
    pub run: BatchRunArgs,

    /// Default source image for lines without one (img2img).
    #[arg(short = 'i', long, value_name = "FILE")]
    pub image: Option<PathBuf>,

    /// Default mask for lines without one (inpaint).
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,

    /// Default strength for lines with a source image.
    #[arg(long, default_value_t = 0.8, value_name = "S")]
    pub strength: f64,

    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}
