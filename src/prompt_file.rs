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
//! The batch pipeline (`crate::pipelines::batch`) expands the lines into jobs, one per image.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

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
    /// The entries to run, and the bad lines skipped. Without `keep_going` any bad line fails
    /// the whole file (listing every bad line); with it, bad lines are skipped and returned for
    /// the caller to warn about. A file with no usable prompt is an error either way.
    pub fn into_entries(
        self,
        file: &Path,
        keep_going: bool,
    ) -> anyhow::Result<(Vec<PromptEntry>, Vec<LineError>)> {
        if !self.errors.is_empty() && !keep_going {
            return Err(line_errors_report(file, &self.errors));
        }
        if self.entries.is_empty() {
            anyhow::bail!("{}: no prompts to run", file.display());
        }
        Ok((self.entries, self.errors))
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

#[cfg(test)]
mod tests {
    use super::*;

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
