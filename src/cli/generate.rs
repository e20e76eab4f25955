//! `ldm txt2img`: options shared by the generation commands, output naming and progress.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{DeviceSpec, Precision};
use crate::model_source::PipelineFolder;
use crate::pipelines::{GenerateRequest, Generated, StableDiffusion};
use crate::schedulers::SamplerKind;

/// Model, device and precision: how a pipeline is loaded.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Pipeline to use: a local diffusers folder, a hub repo id (owner/name) or a preset
    /// (sd15, sd21, sd21-base, sd-turbo). Default: the embedded ldm model in weights/.
    #[arg(short, long, value_name = "MODEL")]
    pub model: Option<String>,

    /// Device: cpu, cuda, cuda:N or metal. Default: the first GPU this build supports, else cpu.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,

    /// Precision of the weights and activations. Default: f32 on cpu, f16 on a GPU.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<Precision>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<StableDiffusion> {
        let device_spec = self.device.unwrap_or_else(default_device);
        let device = device_spec.open()?;
        let precision = self.dtype.unwrap_or(match device_spec {
            DeviceSpec::Cpu => Precision::F32,
            _ => Precision::F16,
        });
        let folder = PipelineFolder::resolve(self.model.as_deref(), precision != Precision::F32)?;
        StableDiffusion::load(&folder, &device, precision.dtype())
            .with_context(|| format!("cannot load model {}", folder.root.display()))
    }
}

fn default_device() -> DeviceSpec {
    if candle_core::utils::cuda_is_available() {
        DeviceSpec::Cuda(0)
    } else if candle_core::utils::metal_is_available() {
        DeviceSpec::Metal(0)
    } else {
        DeviceSpec::Cpu
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
    #[arg(long, visible_alias = "sample-steps", default_value_t = 50, value_name = "N")]
    pub steps: usize,

    /// Classifier-free guidance scale; 1 or less runs without the unconditional pass.
    #[arg(short = 'g', long, visible_aliases = ["cfg-scale", "cfg"], default_value_t = 7.5, value_name = "G")]
    pub guidance_scale: f64,

    /// Seed of image 1; image i uses seed + i - 1. Random (and printed) when omitted or -1.
    #[arg(short, long, allow_negative_numbers = true, value_name = "SEED")]
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
}

impl SamplingArgs {
    /// The seeds of this run: the given one (or a random one, printed) counting up.
    fn seeds(&self) -> Vec<u64> {
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
    fn image_paths(&self, seeds: &[u64]) -> Vec<PathBuf> {
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
    fn check_writable(&self, paths: &[PathBuf]) -> anyhow::Result<()> {
        for path in paths.iter().chain(&self.save_latents) {
            if !self.overwrite && path.exists() {
                bail!("{} already exists (pass --overwrite to replace it)", path.display());
            }
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                bail!("cannot write {}: folder {} does not exist", path.display(), dir.display());
            }
        }
        Ok(())
    }

    fn write(&self, generated: &Generated, paths: &[PathBuf]) -> anyhow::Result<()> {
        for ((image, info), path) in generated.images.iter().zip(&generated.infos).zip(paths) {
            crate::image_io::save_png(image, path, &info.to_infotext(), self.overwrite)?;
            println!("{}", path.display());
        }
        if let Some(path) = &self.save_latents {
            let latents = generated.latents.to_dtype(candle_core::DType::F32)?;
            let bytes = safetensors::serialize([("latents", &latents)], None)?;
            crate::image_io::write_atomically(path, &bytes, self.overwrite)?;
        }
        Ok(())
    }

    fn progress_bar(&self) -> ProgressBar {
        if self.quiet || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]")
                .expect("valid template"),
        );
        bar
    }
}

/// `out.png`, 2 -> `out-2.png`.
fn numbered(path: &Path, index: usize) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    path.with_file_name(name)
}

#[derive(Debug, Args)]
pub struct Txt2ImgArgs {
    /// The prompt (or give it with -p/--prompt).
    #[arg(value_name = "PROMPT", required_unless_present = "prompt_flag")]
    pub prompt: Option<String>,

    /// The prompt, as A1111 and stable-diffusion.cpp users type it.
    #[arg(short = 'p', long = "prompt", value_name = "TEXT", conflicts_with = "prompt")]
    pub prompt_flag: Option<String>,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn txt2img(args: Txt2ImgArgs) -> anyhow::Result<()> {
    let prompt = args.prompt.or(args.prompt_flag).unwrap_or_default();
    if args.sampling.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    let pipeline = args.model.load()?;
    let sampling = &args.sampling;
    let size = pipeline.default_size();
    let seeds = sampling.seeds();
    let request = GenerateRequest {
        prompt,
        negative_prompt: sampling.negative_prompt.clone(),
        sampler: sampling.scheduler,
        steps: sampling.steps,
        guidance_scale: sampling.guidance_scale,
        eta: sampling.eta,
        width: sampling.width.unwrap_or(size),
        height: sampling.height.unwrap_or(size),
        seeds,
    };
    pipeline.validate(&request)?;
    let paths = args.output.image_paths(&request.seeds);
    args.output.check_writable(&paths)?;
    let bar = args.output.progress_bar();
    let generated = pipeline.txt2img(&request, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    args.output.write(&generated, &paths)
}
