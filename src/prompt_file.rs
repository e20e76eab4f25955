//! Batch prompt files: many prompts for one run (`ldm batch FILE`, `--from-file`).
//!
//! Two kinds, told apart per file:
//!
//! * plain text: one prompt per line;
//! * JSON Lines (`.jsonl`/`.json`, or a first prompt line starting with `{`): one object per line
//!   with a `prompt` and optional per-line overrides of the command-line settings:
//!
//! ```text
//! # emoji-style subjects
//! {"prompt": "a red apple", "seed": 42, "num_images": 2}
//! {"prompt": "a black cat", "negative_prompt": "blurry", "steps": 30, "cfg_scale": 9}
//! ```
//!
//! In both kinds blank lines and lines starting with `#` are skipped. A bad line is recorded
//! with its line number instead of stopping the parse, so every mistake is reported at once
//! and `--keep-going` can skip them.
//!
//! Each prompt line then expands into [`Job`]s, one per image, with deterministic seeds, output
//! names and content keys ([`job_key`]) that let an interrupted batch resume where it stopped.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lora::LoraSpec;

/// The two prompt-file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFileKind {
    /// One prompt per line.
    PlainText,
    /// One JSON object per line: `prompt` plus optional overrides.
    JsonLines,
}

impl PromptFileKind {
    /// JSON Lines when the extension says so (`.jsonl`, `.json`) or the first line that is
    /// neither blank nor a comment starts with `{`; plain text otherwise.
    pub fn detect(path: &Path, text: &str) -> Self {
        let json_extension = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| {
                ext.eq_ignore_ascii_case("jsonl") || ext.eq_ignore_ascii_case("json")
            });
        let first_line_is_object = prompt_lines(text)
            .next()
            .is_some_and(|(_, line)| line.starts_with('{'));
        if json_extension || first_line_is_object {
            Self::JsonLines
        } else {
            Self::PlainText
        }
    }
}

/// Per-line settings of a JSON Lines prompt file; `None` keeps the command-line value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub negative_prompt: Option<String>,
    /// Seed of the line's first image; its further images count up from it.
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    #[serde(alias = "cfg_scale")]
    pub guidance_scale: Option<f64>,
    pub guidance_rescale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    #[serde(alias = "sampler")]
    pub scheduler: Option<String>,
    pub num_images: Option<usize>,
    /// Init image; relative paths are resolved against the prompt file's folder.
    pub image: Option<PathBuf>,
    /// Inpainting mask; relative paths are resolved against the prompt file's folder.
    pub mask: Option<PathBuf>,
    pub strength: Option<f64>,
    /// A1111's "Clip skip" (1 = the last layer).
    pub clip_skip: Option<usize>,
    /// LoRAs for this line, `FILE[:WEIGHT]` (one string or a list), added to `--lora`;
    /// relative paths are resolved against the prompt file's folder.
    #[serde(default, deserialize_with = "one_or_many")]
    pub lora: Vec<String>,
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

impl Overrides {
    /// Range checks serde cannot express.
    fn validate(&self) -> Result<(), String> {
        let at_least_one = [
            ("steps", self.steps),
            ("num_images", self.num_images),
            ("width", self.width),
            ("height", self.height),
            ("clip_skip", self.clip_skip),
        ];
        for (name, value) in at_least_one {
            if value == Some(0) {
                return Err(format!("\"{name}\" must be at least 1"));
            }
        }
        if let Some(phi) = self.guidance_rescale.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(format!(
                "\"guidance_rescale\" must be between 0 and 1, got {phi}"
            ));
        }
        if let Some(strength) = self.strength.filter(|s| !(0.0..=1.0).contains(s)) {
            return Err(format!(
                "\"strength\" must be between 0 and 1, got {strength}"
            ));
        }
        if self
            .scheduler
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return Err("\"scheduler\" is empty".to_string());
        }
        for lora in &self.lora {
            lora.parse::<LoraSpec>()
                .map_err(|e| format!("\"lora\": {e}"))?;
        }
        for (name, path) in [("image", &self.image), ("mask", &self.mask)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(format!("\"{name}\" is an empty path"));
            }
        }
        Ok(())
    }

    /// Makes relative image/mask paths relative to `base_dir` (the prompt file's folder).
    fn resolve_paths(&mut self, base_dir: &Path) {
        for path in [&mut self.image, &mut self.mask].into_iter().flatten() {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
        for lora in &mut self.lora {
            let mut spec: LoraSpec = lora.parse().expect("validated before");
            if spec.path.is_relative() {
                spec.path = base_dir.join(&spec.path);
            }
            *lora = spec.to_string();
        }
    }
}

/// One usable prompt line.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEntry {
    /// 1-based line number in the file.
    pub line: usize,
    pub prompt: String,
    pub overrides: Overrides,
}

/// A line that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the file.
    pub line: usize,
    pub message: String,
}

/// Everything a prompt file holds: the good lines and the bad ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPromptFile {
    pub kind: PromptFileKind,
    pub entries: Vec<PromptEntry>,
    /// Sorted by line.
    pub errors: Vec<LineError>,
}

impl ParsedPromptFile {
    /// Moves the entries that cannot become jobs with these command-line `defaults` (a mask or a
    /// strength with no image to apply it to) to `errors`.
    pub fn check_with_defaults(&mut self, defaults: &JobDefaults) {
        for entry in std::mem::take(&mut self.entries) {
            match missing_image(&entry, defaults) {
                None => self.entries.push(entry),
                Some(message) => self.errors.push(LineError {
                    line: entry.line,
                    message,
                }),
            }
        }
        self.errors.sort_by_key(|error| error.line);
    }

    /// The entries to run. Without `keep_going` any bad line fails the whole file (listing every
    /// bad line); with it, bad lines are skipped with a warning each. A file with no usable
    /// prompt is an error either way.
    pub fn into_entries(self, file: &Path, keep_going: bool) -> anyhow::Result<Vec<PromptEntry>> {
        if !self.errors.is_empty() {
            if !keep_going {
                return Err(line_errors_report(file, &self.errors));
            }
            for error in &self.errors {
                eprintln!("warning: {} (line skipped)", error.located(file));
            }
        }
        if self.entries.is_empty() {
            anyhow::bail!("{}: no prompts to run", file.display());
        }
        Ok(self.entries)
    }
}

impl LineError {
    /// `FILE:LINE: message`, the form editors and terminals link to.
    pub fn located(&self, file: &Path) -> String {
        format!("{}:{}: {}", file.display(), self.line, self.message)
    }
}

/// One error listing every bad line as `FILE:LINE: message`.
pub fn line_errors_report(file: &Path, errors: &[LineError]) -> anyhow::Error {
    let lines: Vec<String> = errors.iter().map(|error| error.located(file)).collect();
    anyhow::anyhow!(
        "{} bad line(s) in {} (fix them, or pass --keep-going to skip them):\n{}",
        errors.len(),
        file.display(),
        lines.join("\n")
    )
}

/// Reads and parses a prompt file; image/mask paths in it are relative to its folder.
pub fn parse_prompt_file(path: &Path) -> anyhow::Result<ParsedPromptFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    let base_dir = path.parent().unwrap_or(Path::new(""));
    Ok(parse_prompt_text(
        &text,
        base_dir,
        PromptFileKind::detect(path, &text),
    ))
}

/// Parses prompt-file text of a known kind; relative image/mask paths are joined to `base_dir`.
pub fn parse_prompt_text(text: &str, base_dir: &Path, kind: PromptFileKind) -> ParsedPromptFile {
    let mut parsed = ParsedPromptFile {
        kind,
        entries: Vec::new(),
        errors: Vec::new(),
    };
    for (line, content) in prompt_lines(text) {
        let entry = match kind {
            PromptFileKind::PlainText => Ok((content.to_string(), Overrides::default())),
            PromptFileKind::JsonLines => parse_json_line(content, base_dir),
        };
        match entry {
            Ok((prompt, overrides)) => parsed.entries.push(PromptEntry {
                line,
                prompt,
                overrides,
            }),
            Err(message) => parsed.errors.push(LineError { line, message }),
        }
    }
    parsed
}

/// The lines that carry a prompt, trimmed, with their 1-based numbers: no blanks, no comments.
fn prompt_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

fn parse_json_line(line: &str, base_dir: &Path) -> Result<(String, Overrides), String> {
    if !line.starts_with('{') {
        return Err(r#"expected a JSON object such as {"prompt": "a red apple"}"#.to_string());
    }
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(line).map_err(|error| json_syntax_message(&error))?;
    let prompt = match object.remove("prompt") {
        Some(serde_json::Value::String(prompt)) => prompt.trim().to_string(),
        Some(other) => return Err(format!("\"prompt\" must be a string, got {other}")),
        None => return Err("missing \"prompt\"".to_string()),
    };
    if prompt.is_empty() {
        return Err("empty prompt".to_string());
    }
    let mut overrides: Overrides = serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|error| error.to_string())?;
    overrides.validate()?;
    overrides.resolve_paths(base_dir);
    Ok((prompt, overrides))
}

/// serde_json's message without its "at line 1 column N" (the line is ours to number).
fn json_syntax_message(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    format!("invalid JSON: {message} (column {})", error.column())
}

/// Why `entry` cannot run with `defaults`: a mask or an explicit strength without any image.
fn missing_image(entry: &PromptEntry, defaults: &JobDefaults) -> Option<String> {
    let overrides = &entry.overrides;
    if overrides.image.is_some() || defaults.image.is_some() {
        return None;
    }
    if overrides.mask.is_some() || defaults.mask.is_some() {
        Some("a mask needs an image to inpaint (give \"image\" on the line or --image)".into())
    } else if overrides.strength.is_some() {
        Some("\"strength\" needs an image (give \"image\" on the line or --image)".into())
    } else {
        None
    }
}

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

/// What a job does, decided by which inputs it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobMode {
    Txt2Img,
    Img2Img,
    Inpaint,
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
    pub fn mode(&self) -> JobMode {
        match (&self.image, &self.mask) {
            (None, _) => JobMode::Txt2Img,
            (Some(_), None) => JobMode::Img2Img,
            (Some(_), Some(_)) => JobMode::Inpaint,
        }
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

/// What must be equal for jobs to share one batched forward pass (prompts, negative prompts,
/// seeds and input images may differ).
#[derive(PartialEq)]
struct BatchShape<'a> {
    width: usize,
    height: usize,
    steps: usize,
    guidance_scale: u64,
    guidance_rescale: u64,
    eta: u64,
    scheduler: &'a str,
    model: &'a str,
    strength: Option<u64>,
    mode: JobMode,
    clip_skip: usize,
    loras: &'a [String],
}

impl<'a> BatchShape<'a> {
    fn of(job: &'a Job) -> Self {
        Self {
            width: job.width,
            height: job.height,
            steps: job.steps,
            guidance_scale: job.guidance_scale.to_bits(),
            guidance_rescale: job.guidance_rescale.to_bits(),
            eta: job.eta.to_bits(),
            scheduler: &job.scheduler,
            model: &job.model,
            strength: job.strength.map(f64::to_bits),
            mode: job.mode(),
            clip_skip: job.clip_skip,
            loras: &job.loras,
        }
    }
}

/// Splits `jobs` into batches of positions in `jobs`: each batch holds jobs of one shape, at
/// most `batch_size` of them, in file order; batches are ordered by their first job, so work
/// follows the file as closely as batching allows. A batch size of 0 is an error.
pub fn group_for_batching(jobs: &[Job], batch_size: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    anyhow::ensure!(batch_size > 0, "the batch size must be at least 1");
    let mut groups: Vec<(BatchShape, Vec<usize>)> = Vec::new();
    for (position, job) in jobs.iter().enumerate() {
        let shape = BatchShape::of(job);
        match groups.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, members)) => members.push(position),
            None => groups.push((shape, vec![position])),
        }
    }
    let mut batches: Vec<Vec<usize>> = groups
        .into_iter()
        .flat_map(|(_, members)| {
            members
                .chunks(batch_size)
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    batches.sort_by_key(|batch| batch[0]);
    Ok(batches)
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

    #[test]
    fn json_syntax_message_drops_serde_line_number() {
        let error = serde_json::from_str::<serde_json::Value>(r#"{"prompt": }"#).unwrap_err();
        let message = json_syntax_message(&error);
        assert!(!message.contains("line 1"), "{message}");
        assert!(
            message.starts_with("invalid JSON: expected value"),
            "{message}"
        );
        assert!(message.ends_with("(column 12)"), "{message}");
    }
}
