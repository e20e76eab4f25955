//! Batch jobs: the lines of a prompt file expanded into one [`Job`] per image, every setting
//! resolved against the command line's [`JobDefaults`], with deterministic seeds, output names
//! and content keys ([`job_key`]) that let an interrupted batch resume where it stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pipelines::Mode;
use crate::prompt_file::{LineError, ParsedPromptFile, PromptEntry};

/// The command-line settings, used wherever a line does not override them.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDefaults {
    pub negative_prompt: String,
    /// Lines without a seed get `base_seed + global image index`.
    pub base_seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    /// DDIM eta (not settable per line).
    pub eta: f64,
    pub width: usize,
    pub height: usize,
    pub scheduler: String,
    /// Identifies the weights (preset, repo id or folder), so a different model is new work.
    pub model: String,
    pub num_images: usize,
    pub image: Option<PathBuf>,
    pub mask: Option<PathBuf>,
    /// Applies to the jobs that have an image.
    pub strength: f64,
    /// A1111's "Clip skip" (1 = the last layer).
    pub clip_skip: usize,
    /// `--lora` files, `FILE:WEIGHT`, for every line.
    pub loras: Vec<String>,
}

impl JobDefaults {
    /// Moves the entries of `parsed` that cannot become jobs with these defaults (a mask or a
    /// strength with no image to apply it to) to its errors.
    pub fn check(&self, parsed: &mut ParsedPromptFile) {
        for entry in std::mem::take(&mut parsed.entries) {
            match self.missing_image(&entry) {
                None => parsed.entries.push(entry),
                Some(message) => parsed.errors.push(LineError {
                    line: entry.line,
                    message,
                }),
            }
        }
        parsed.errors.sort_by_key(|error| error.line);
    }

    /// Why `entry` cannot run: a mask or an explicit strength without any image.
    fn missing_image(&self, entry: &PromptEntry) -> Option<String> {
        let overrides = &entry.overrides;
        if overrides.image.is_some() || self.image.is_some() {
            return None;
        }
        if overrides.mask.is_some() || self.mask.is_some() {
            Some("a mask needs an image to inpaint (give \"image\" on the line or --image)".into())
        } else if overrides.strength.is_some() {
            Some("\"strength\" needs an image (give \"image\" on the line or --image)".into())
        } else {
            None
        }
    }
}

/// One image to make, with every setting resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Global image index over the whole file, from 0; also names the output file.
    pub index: usize,
    /// 1-based line of the prompt file.
    pub line: usize,
    /// Which of its line's images this is, from 0.
    pub image_in_line: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Absent from manifests written before it existed: 0 then.
    #[serde(default)]
    pub guidance_rescale: f64,
    pub eta: f64,
    pub width: usize,
    pub height: usize,
    pub scheduler: String,
    pub model: String,
    pub image: Option<PathBuf>,
    pub mask: Option<PathBuf>,
    /// Set exactly when `image` is.
    pub strength: Option<f64>,
    /// A1111's "Clip skip"; absent from manifests written before it existed: 1 then.
    #[serde(default = "no_clip_skip")]
    pub clip_skip: usize,
    /// LoRAs merged into the model, `FILE:WEIGHT`: `--lora`, the line's `lora`, then the
    /// prompt's `<lora:...>` tags once resolved.
    #[serde(default)]
    pub loras: Vec<String>,
}

fn no_clip_skip() -> usize {
    1
}

/// How many characters of the prompt go into an output file name.
const SLUG_CHARS: usize = 40;

impl Job {
    /// What the job does, by which input images it has.
    pub fn mode(&self) -> Mode {
        Mode::of(self.image.is_some(), self.mask.is_some())
    }

    /// `00007-a-red-apple.png`: unique per job (the index) and always a plain file name (no
    /// separators, no leading dot), whatever the prompt holds.
    pub fn file_name(&self) -> String {
        format!("{:05}-{}.png", self.index, slug(&self.prompt))
    }
}

/// Lowercase ASCII letters and digits of the prompt's start, other runs turned into one '-'.
fn slug(prompt: &str) -> String {
    let mut slug = String::new();
    for c in prompt.chars() {
        if slug.len() >= SLUG_CHARS {
            break;
        }
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    match slug.trim_end_matches('-') {
        "" => "image".to_string(),
        trimmed => trimmed.to_string(),
    }
}

/// One job per image, in file order. Seeds: a line's explicit seed `s` gives `s, s+1, ...` for
/// its images; otherwise an image's seed is `base_seed + its global index`.
pub fn expand_jobs(entries: &[PromptEntry], defaults: &JobDefaults) -> Vec<Job> {
    let mut jobs = Vec::new();
    for entry in entries {
        let o = &entry.overrides;
        let image = o.image.clone().or_else(|| defaults.image.clone());
        let mask = o.mask.clone().or_else(|| defaults.mask.clone());
        let strength = image
            .as_ref()
            .map(|_| o.strength.unwrap_or(defaults.strength));
        for image_in_line in 0..o.num_images.unwrap_or(defaults.num_images) {
            let index = jobs.len();
            let seed = match o.seed {
                Some(seed) => seed.wrapping_add(image_in_line as u64),
                None => defaults.base_seed.wrapping_add(index as u64),
            };
            jobs.push(Job {
                index,
                line: entry.line,
                image_in_line,
                prompt: entry.prompt.clone(),
                negative_prompt: o
                    .negative_prompt
                    .clone()
                    .unwrap_or_else(|| defaults.negative_prompt.clone()),
                seed,
                steps: o.steps.unwrap_or(defaults.steps),
                guidance_scale: o.guidance_scale.unwrap_or(defaults.guidance_scale),
                guidance_rescale: o.guidance_rescale.unwrap_or(defaults.guidance_rescale),
                eta: defaults.eta,
                width: o.width.unwrap_or(defaults.width),
                height: o.height.unwrap_or(defaults.height),
                scheduler: o
                    .scheduler
                    .clone()
                    .unwrap_or_else(|| defaults.scheduler.clone()),
                model: defaults.model.clone(),
                image: image.clone(),
                mask: mask.clone(),
                strength,
                clip_skip: o.clip_skip.unwrap_or(defaults.clip_skip),
                loras: defaults.loras.iter().chain(&o.lora).cloned().collect(),
            });
        }
    }
    jobs
}

/// The settings that decide a job's image (not its place in the file), in a fixed order.
#[derive(Serialize)]
struct KeyFields<'a> {
    version: u32,
    prompt: &'a str,
    negative_prompt: &'a str,
    seed: u64,
    steps: usize,
    guidance_scale: f64,
    /// Left out at 0, so jobs keep the keys they had before guidance rescale existed.
    #[serde(skip_serializing_if = "is_zero")]
    guidance_rescale: f64,
    eta: f64,
    width: usize,
    height: usize,
    scheduler: &'a str,
    model: &'a str,
    image: Option<&'a Path>,
    mask: Option<&'a Path>,
    strength: Option<f64>,
    /// Left out at 1 (no skip), so jobs keep the keys they had before clip skip existed.
    #[serde(skip_serializing_if = "is_one")]
    clip_skip: usize,
    /// Left out when empty, for the same reason.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    loras: &'a [String],
}

fn is_one(value: &usize) -> bool {
    *value == 1
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

/// A stable content key of the job: SHA-256 (hex) of every setting that influences its image.
/// Equal keys mean the same image, wherever the job sits in the file. Input images count by
/// path, not by content.
pub fn job_key(job: &Job) -> String {
    let fields = KeyFields {
        version: 1,
        prompt: &job.prompt,
        negative_prompt: &job.negative_prompt,
        seed: job.seed,
        steps: job.steps,
        guidance_scale: job.guidance_scale,
        guidance_rescale: job.guidance_rescale,
        eta: job.eta,
        width: job.width,
        height: job.height,
        scheduler: &job.scheduler,
        model: &job.model,
        image: job.image.as_deref(),
        mask: job.mask.as_deref(),
        strength: job.strength,
        clip_skip: job.clip_skip,
        loras: &job.loras,
    };
    let canonical = serde_json::to_vec(&fields).expect("job settings always serialise");
    crate::hex::encode(&Sha256::digest(&canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_keeps_ascii_words_and_dashes_the_rest() {
        assert_eq!(slug("A Red  Apple!"), "a-red-apple");
        assert_eq!(slug("  --cat--  "), "cat");
        assert_eq!(slug("../../etc/passwd"), "etc-passwd");
        assert_eq!(slug("猫 🐱"), "image");
        assert_eq!(slug(""), "image");
    }

    #[test]
    fn slug_is_cut_to_its_length_without_a_trailing_dash() {
        let long = "word ".repeat(50);
        let s = slug(&long);
        assert!(s.len() <= SLUG_CHARS, "{s}");
        assert!(!s.ends_with('-'), "{s}");
        assert!(s.starts_with("word-word-"));
    }
}
