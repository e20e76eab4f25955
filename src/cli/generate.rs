//! `ldm txt2img`, `img2img`, `inpaint` and `batch`: running them (their flags are in
//! `generate_args`), output naming and progress.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use super::generate_args::{
    BatchArgs, BatchRunArgs, ModelArgs, OutputArgs, PromptArgs, SamplingArgs,
};
pub use super::generate_args::{BatchCommandArgs, Img2ImgArgs, InpaintArgs, Txt2ImgArgs};
use super::lora::{add_prompt_loras, group_by_loras};
use crate::lora::LoraSpec;
use crate::pipelines::batch::{expand_jobs, JobDefaults};
use crate::pipelines::{ImageJob, Sampling, SourceImage, StableDiffusion, VaeParts};
use crate::prompt_file;
use crate::shard::Shard;

/// A progress bar of `len` on a terminal, unless `quiet`; hidden otherwise.
fn progress_bar(quiet: bool, len: u64) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    }
}

/// The denoising-step bar of txt2img, img2img and inpaint.
fn steps_bar(quiet: bool, len: u64) -> ProgressBar {
    progress_bar(quiet, len).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]",
        )
        .expect("valid template"),
    )
}

pub fn txt2img(args: Txt2ImgArgs) -> anyhow::Result<()> {
    let loras = args.model.lora.for_prompt(&args.prompt.text())?;
    if let Some(file) = &args.batch.from_file {
        // A prompt file's lines may name source images.
        let pipeline = args.model.load(&loras, VaeParts::EncoderAndDecoder)?;
        let (width, height) = pipeline.default_size();
        let guidance = pipeline.default_guidance_scale();
        let sampling = args.sampling.sampling(width, height, guidance, 1.0);
        let source = SourceArgs {
            image: None,
            mask: None,
            strength: 1.0,
        };
        let run = PromptFileRun {
            file,
            args: &args.batch.run,
            quiet: args.output.quiet,
        };
        return batch(
            &pipeline,
            &args.model,
            &run,
            &args.sampling,
            &sampling,
            &source,
        );
    }
    let outputs = Outputs::plan(&args.sampling, &args.output)?;
    let pipeline = args.model.load(&loras, VaeParts::DecoderOnly)?;
    let (width, height) = pipeline.default_size();
    let guidance = pipeline.default_guidance_scale();
    let sampling = args.sampling.sampling(width, height, guidance, 1.0);
    run(
        &pipeline,
        &sampling,
        &args.prompt,
        &args.sampling,
        None,
        &outputs,
        args.batch.run.batch_size,
    )
}

pub fn img2img(args: Img2ImgArgs) -> anyhow::Result<()> {
    let source = SourceArgs {
        image: args.image.as_deref(),
        mask: None,
        strength: args.strength,
    };
    edit(
        &args.prompt,
        &args.batch,
        &args.model,
        &args.sampling,
        &args.output,
        &source,
    )
}

pub fn inpaint(args: InpaintArgs) -> anyhow::Result<()> {
    let source = SourceArgs {
        image: args.image.as_deref(),
        mask: args.mask.as_deref(),
        strength: args.strength,
    };
    edit(
        &args.prompt,
        &args.batch,
        &args.model,
        &args.sampling,
        &args.output,
        &source,
    )
}

/// What img2img and inpaint start from (defaults for a prompt file's lines).
struct SourceArgs<'a> {
    image: Option<&'a Path>,
    mask: Option<&'a Path>,
    strength: f64,
}

/// img2img (no mask) and inpaint: one image from the command line, or a prompt file.
fn edit(
    prompt: &PromptArgs,
    batch_args: &BatchArgs,
    model: &ModelArgs,
    args: &SamplingArgs,
    output: &OutputArgs,
    source: &SourceArgs,
) -> anyhow::Result<()> {
    let loras = model.lora.for_prompt(&prompt.text())?;
    if let Some(file) = &batch_args.from_file {
        let pipeline = model.load(&loras, VaeParts::EncoderAndDecoder)?;
        let (width, height) = pipeline.default_size();
        let guidance = pipeline.default_guidance_scale();
        let sampling = args.sampling(width, height, guidance, source.strength);
        let run = PromptFileRun {
            file,
            args: &batch_args.run,
            quiet: output.quiet,
        };
        return batch(&pipeline, model, &run, args, &sampling, source);
    }
    // Unreadable inputs and unwritable outputs fail before the model loads.
    let image = crate::image_io::load_rgb(source.image.context("--image is required")?)?;
    let mask = source.mask.map(crate::image_io::load_rgb).transpose()?;
    let outputs = Outputs::plan(args, output)?;
    let pipeline = model.load(&loras, VaeParts::EncoderAndDecoder)?;
    let (width, height) = source_size(&pipeline, &image, args);
    let mask = match mask {
        Some(mask) => {
            if mask.dimensions() != image.dimensions() {
                eprintln!(
                    "note: the mask is {}x{} and the image {}x{}; the mask is resized to the image",
                    mask.width(),
                    mask.height(),
                    image.width(),
                    image.height()
                );
            }
            Some(crate::image_io::mask_tensor(&mask, width, height)?)
        }
        None => None,
    };
    let source_image = SourceImage {
        pixels: crate::image_io::source_image_tensor(&image, width, height)?,
        mask,
    };
    let guidance = pipeline.default_guidance_scale();
    let sampling = args.sampling(width, height, guidance, source.strength);
    run(
        &pipeline,
        &sampling,
        prompt,
        args,
        Some(source_image),
        &outputs,
        batch_args.run.batch_size,
    )
}

pub fn batch_command(args: BatchCommandArgs) -> anyhow::Result<()> {
    let pipeline = args
        .model
        .load(&args.model.lora.loras, VaeParts::EncoderAndDecoder)?;
    let (width, height) = pipeline.default_size();
    let guidance = pipeline.default_guidance_scale();
    let sampling = args
        .sampling
        .sampling(width, height, guidance, args.strength);
    let source = SourceArgs {
        image: args.image.as_deref(),
        mask: args.mask.as_deref(),
        strength: args.strength,
    };
    let run = PromptFileRun {
        file: &args.file,
        args: &args.run,
        quiet: args.quiet,
    };
    batch(
        &pipeline,
        &args.model,
        &run,
        &args.sampling,
        &sampling,
        &source,
    )
}

/// A prompt file and how to run it.
struct PromptFileRun<'a> {
    file: &'a Path,
    args: &'a BatchRunArgs,
    /// No progress bar.
    quiet: bool,
}

/// Runs a prompt file with the command line's settings as defaults.
fn batch(
    pipeline: &StableDiffusion,
    model: &ModelArgs,
    run: &PromptFileRun,
    sampling_args: &SamplingArgs,
    sampling: &Sampling,
    source: &SourceArgs,
) -> anyhow::Result<()> {
    let (file, args, quiet) = (run.file, run.args, run.quiet);
    if sampling.micro != Default::default() {
        bail!(
            "--original-size, --crops-coords-top-left and --target-size apply to single runs: \
             prompt files use diffusers' defaults (each image's own size, no crop)"
        );
    }
    let defaults = JobDefaults {
        negative_prompt: sampling_args.negative_prompt.clone(),
        // A fixed base seed keeps re-runs resumable: a random one would make every job new.
        base_seed: sampling_args.seed.filter(|&s| s >= 0).unwrap_or(0) as u64,
        steps: sampling.steps,
        guidance_scale: sampling.guidance_scale,
        guidance_rescale: sampling.guidance_rescale,
        eta: sampling.eta,
        width: sampling.width,
        height: sampling.height,
        scheduler: sampling.sampler.to_string(),
        model: pipeline.model_name.clone(),
        num_images: sampling_args.num_images,
        image: source.image.map(Path::to_path_buf),
        mask: source.mask.map(Path::to_path_buf),
        strength: sampling.strength,
        clip_skip: sampling_args.conditioning.clip_skip,
        loras: model.lora.loras.iter().map(LoraSpec::to_string).collect(),
    };
    let mut parsed = prompt_file::parse_prompt_file(file)?;
    defaults.check(&mut parsed);
    let (entries, skipped) = parsed.into_entries(file, args.keep_going)?;
    for line in &skipped {
        eprintln!("warning: {} (line skipped)", line.located(file));
    }
    let mut jobs = expand_jobs(&entries, &defaults);
    add_prompt_loras(&mut jobs, &model.lora)?;
    let shard = Shard::resolve(args.shard, args.shard_count, |name| {
        std::env::var(name).ok()
    })?;
    let manifest_file = match shard {
        Some((shard, source)) => {
            jobs = shard.select(&jobs, args.batch_size)?;
            eprintln!(
                "shard {shard} (from {source}): {} image(s) of this file",
                jobs.len()
            );
            shard.manifest_file()
        }
        None => crate::batch_manifest::MANIFEST_FILE.to_string(),
    };
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("cannot create {}", args.output_dir.display()))?;
    let bar = progress_bar(quiet, jobs.len() as u64);
    let syntax = !sampling_args.conditioning.no_prompt_syntax;
    let (mut generated, mut already_done) = (0, 0);
    // Jobs with other LoRAs than the command line's run on a pipeline loaded with theirs.
    for (loras, group) in group_by_loras(&jobs)? {
        let with_loras;
        let pipe = if loras == model.lora.loras {
            pipeline
        } else {
            with_loras = model.load(&loras, VaeParts::EncoderAndDecoder)?;
            &with_loras
        };
        let summary = pipe.run_batch(
            &group,
            &args.output_dir,
            &manifest_file,
            args.batch_size,
            syntax,
            &mut |path| {
                bar.inc(1);
                bar.suspend(|| println!("{}", path.display()));
            },
        )?;
        generated += summary.generated;
        already_done += summary.already_done;
    }
    bar.finish_and_clear();
    eprintln!(
        "{generated} image(s) generated, {already_done} already done, in {}",
        args.output_dir.display()
    );
    Ok(())
}

/// `--width/--height`, else the source image's size rounded down to the VAE factor.
fn source_size(
    pipeline: &StableDiffusion,
    image: &image::RgbImage,
    args: &SamplingArgs,
) -> (usize, usize) {
    let (width, height) = crate::image_io::default_size(image, pipeline.vae_scale_factor());
    (args.width.unwrap_or(width), args.height.unwrap_or(height))
}

/// One command's seeds and the files its images and latents go to, checked writable.
struct Outputs<'a> {
    seeds: Vec<u64>,
    paths: Vec<PathBuf>,
    args: &'a OutputArgs,
}

impl<'a> Outputs<'a> {
    fn plan(sampling: &SamplingArgs, args: &'a OutputArgs) -> anyhow::Result<Self> {
        if sampling.num_images == 0 {
            bail!("--num-images must be at least 1");
        }
        let seeds = sampling.seeds();
        let paths = args.image_paths(&seeds);
        args.check_writable(&paths)?;
        Ok(Self { seeds, paths, args })
    }
}

/// Runs one command's images, `batch_size` per forward pass, writing each batch's images as it
/// finishes (and all latents at the end).
fn run(
    pipeline: &StableDiffusion,
    sampling: &Sampling,
    prompt: &PromptArgs,
    args: &SamplingArgs,
    source: Option<SourceImage>,
    outputs: &Outputs,
    batch_size: usize,
) -> anyhow::Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let prompt = prompt.text();
    let jobs: Vec<ImageJob> = outputs
        .seeds
        .iter()
        .map(|&seed| ImageJob {
            prompt: prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            seed,
            source: source.clone(),
        })
        .collect();
    pipeline.validate(sampling, &jobs)?;
    let (output, paths) = (outputs.args, &outputs.paths);
    let options = args.conditioning.options();
    let batches = jobs.len().div_ceil(batch_size);
    let bar = steps_bar(output.quiet, 0);
    let mut latents = Vec::with_capacity(batches);
    for (index, (batch, paths)) in jobs
        .chunks(batch_size)
        .zip(paths.chunks(batch_size))
        .enumerate()
    {
        if index + 1 == batches {
            pipeline.release_unet_and_text_before_next_decode();
        }
        let generated = pipeline.generate_with(sampling, &options, batch, &mut |done, total| {
            bar.set_length((total * batches) as u64);
            bar.set_position((index * total + done) as u64);
        })?;
        bar.suspend(|| output.write_images(&generated, paths))?;
        latents.push(generated.latents);
    }
    bar.finish_and_clear();
    output.write_latents(&latents)
}
