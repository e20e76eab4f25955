//! Batch runs from prompt files: the file's lines expanded into jobs (`jobs`), grouped by shape
//! into batched forward passes (`grouping`), each image saved atomically and recorded in
//! `manifest.jsonl`, so a re-run skips what is done.

mod grouping;
mod jobs;

use std::path::Path;

use anyhow::Context;

pub use grouping::group_for_batching;
pub use jobs::{expand_jobs, job_key, Job, JobDefaults};

use super::{ImageJob, Sampling, SourceImage, StableDiffusion};
use crate::batch_manifest::{Manifest, ManifestEntry};
use crate::conditioning::PromptOptions;
use crate::schedulers::SamplerKind;

/// What a batch run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    pub generated: usize,
    pub already_done: usize,
}

impl StableDiffusion {
    /// Makes every job's image in `out_dir`, `batch_size` images per forward pass at most,
    /// reading prompts with A1111 syntax when `prompt_syntax` is on, and recording them in
    /// `out_dir/manifest_file` (other manifests there count as done too). All jobs are checked
    /// before any work starts. `on_image(path)` reports each saved image. The last group
    /// decodes with the U-Net's and text encoders' weights paged out
    /// ([`Self::release_unet_and_text_before_next_decode`]).
    pub fn run_batch(
        &self,
        jobs: &[Job],
        out_dir: &Path,
        manifest_file: &str,
        batch_size: usize,
        prompt_syntax: bool,
        on_image: &mut dyn FnMut(&Path),
    ) -> anyhow::Result<BatchSummary> {
        anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
        for job in jobs {
            let options = job_prompt_options(job, prompt_syntax);
            self.validate_sampling(&job_sampling(job)?)
                .and_then(|()| self.check_prompt(&job.prompt, &options))
                .and_then(|()| self.check_prompt(&job.negative_prompt, &options))
                .with_context(|| format!("prompt file line {}", job.line))?;
        }
        let mut manifest = Manifest::open_as(out_dir, manifest_file)?;
        let pending: Vec<&Job> = jobs
            .iter()
            .filter(|job| !manifest.is_done(&job_key(job)))
            .collect();
        let already_done = jobs.len() - pending.len();
        let pending_jobs: Vec<Job> = pending.into_iter().cloned().collect();
        let groups = group_for_batching(&pending_jobs, batch_size)?;
        let last = groups.len().saturating_sub(1);
        for (index, group) in groups.into_iter().enumerate() {
            if index == last {
                self.release_unet_and_text_before_next_decode();
            }
            let group: Vec<&Job> = group.iter().map(|&i| &pending_jobs[i]).collect();
            let sampling = job_sampling(group[0])?;
            let image_jobs = group
                .iter()
                .map(|job| image_job(job, &sampling))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let options = job_prompt_options(group[0], prompt_syntax);
            let generated = self.generate_with(&sampling, &options, &image_jobs, &mut |_, _| {})?;
            for ((job, image), info) in group.iter().zip(&generated.images).zip(&generated.infos) {
                let path = out_dir.join(job.file_name());
                let parameters = info.to_infotext();
                // Overwrite: an image saved just before a crash was never recorded, so it is
                // made again and must be allowed to replace the unrecorded file.
                crate::image_io::save_png(image, &path, &parameters, true)?;
                manifest.record(ManifestEntry::new(job, Some(parameters)))?;
                on_image(&path);
            }
        }
        Ok(BatchSummary {
            generated: pending_jobs.len(),
            already_done,
        })
    }
}

fn job_prompt_options(job: &Job, syntax: bool) -> PromptOptions {
    PromptOptions {
        syntax,
        clip_skip: job.clip_skip,
    }
}

fn job_sampling(job: &Job) -> anyhow::Result<Sampling> {
    let sampler: SamplerKind = job.scheduler.parse().map_err(|err| {
        anyhow::anyhow!(
            "line {}: unknown scheduler {:?}: {err}",
            job.line,
            job.scheduler
        )
    })?;
    Ok(Sampling {
        sampler,
        steps: job.steps,
        guidance_scale: job.guidance_scale,
        guidance_rescale: job.guidance_rescale,
        eta: job.eta,
        width: job.width,
        height: job.height,
        strength: job.strength.unwrap_or(1.0),
        micro: Default::default(),
    })
}

fn image_job(job: &Job, sampling: &Sampling) -> anyhow::Result<ImageJob> {
    let source = match &job.image {
        None => None,
        Some(path) => {
            let image = crate::image_io::load_rgb(path)?;
            let pixels =
                crate::image_io::source_image_tensor(&image, sampling.width, sampling.height)?;
            let mask = match &job.mask {
                None => None,
                Some(path) => Some(crate::image_io::mask_tensor(
                    &crate::image_io::load_rgb(path)?,
                    sampling.width,
                    sampling.height,
                )?),
            };
            Some(SourceImage { pixels, mask })
        }
    };
    Ok(ImageJob {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        seed: job.seed,
        source,
    })
}
