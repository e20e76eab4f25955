//! `manifest.jsonl`: the record of a batch's finished images, kept in its output folder.
//!
//! One JSON line per image with every setting of its [`Job`], its [`job_key`] and its file name.
//! The file is rewritten atomically after each image (temporary file, fsync, rename), so a crash
//! leaves either the old or the new record, and re-running the same batch skips what is done.
//! Workers sharing a folder (`ldm batch --shard`) each write their own `manifest*.jsonl`; every
//! run reads them all to know what is done, and writes only its own.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::pipelines::batch::{job_key, Job};

/// The manifest's file name inside the output folder.
pub const MANIFEST_FILE: &str = "manifest.jsonl";

/// One finished image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub job_key: String,
    /// The image's file name, relative to the output folder.
    pub file: String,
    #[serde(flatten)]
    pub job: Job,
    /// The A1111 infotext written into the PNG, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<String>,
}

impl ManifestEntry {
    /// The entry for `job` saved under its [`Job::file_name`].
    pub fn new(job: &Job, parameters: Option<String>) -> Self {
        Self {
            job_key: job_key(job),
            file: job.file_name(),
            job: job.clone(),
            parameters,
        }
    }
}

/// The finished images of one output folder.
#[derive(Debug)]
pub struct Manifest {
    out_dir: PathBuf,
    /// This run's manifest file name.
    file: String,
    entries: Vec<ManifestEntry>,
    /// What the folder's other manifests (other shards') record.
    others: Vec<ManifestEntry>,
}

impl Manifest {
    /// Reads `out_dir/manifest.jsonl` (creating the folder if needed; no manifest yet means
    /// nothing done). A last line cut short by a crash is dropped and the file rewritten clean;
    /// a bad line anywhere else is an error naming it, since dropping it would lose a record.
    pub fn open(out_dir: &Path) -> anyhow::Result<Self> {
        Self::open_as(out_dir, MANIFEST_FILE)
    }

    /// [`Manifest::open`] with `file` as this run's own manifest; the folder's other
    /// `manifest*.jsonl` files count as done too, and are only read.
    pub fn open_as(out_dir: &Path, file: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("cannot create output folder {}", out_dir.display()))?;
        let mut manifest = Self {
            out_dir: out_dir.to_path_buf(),
            file: file.to_string(),
            entries: Vec::new(),
            others: other_manifests(out_dir, file)?,
        };
        let path = manifest.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(manifest),
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()))
            }
        };
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(index, line)| (index + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty())
            .collect();
        let mut dropped_last = false;
        for (position, &(line, content)) in lines.iter().enumerate() {
            match serde_json::from_str(content) {
                Ok(entry) => manifest.entries.push(entry),
                Err(_) if position + 1 == lines.len() => dropped_last = true,
                Err(error) => anyhow::bail!(
                    "{}:{line}: unreadable manifest line ({error}); fix or delete that line",
                    path.display()
                ),
            }
        }
        if dropped_last {
            manifest.write(&manifest.entries)?;
        }
        Ok(manifest)
    }

    /// `out_dir/manifest.jsonl` (or this shard's manifest).
    pub fn path(&self) -> PathBuf {
        self.out_dir.join(&self.file)
    }

    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    /// Done means recorded AND its image still on disk (a deleted image is made again).
    pub fn is_done(&self, job_key: &str) -> bool {
        self.entries
            .iter()
            .chain(&self.others)
            .any(|entry| entry.job_key == job_key && self.out_dir.join(&entry.file).is_file())
    }

    /// Adds `entry` (replacing an earlier record of the same job) and rewrites the manifest
    /// atomically. On error the manifest, on disk and here, is unchanged.
    pub fn record(&mut self, entry: ManifestEntry) -> anyhow::Result<()> {
        let mut entries = self.entries.clone();
        match entries.iter_mut().find(|e| e.job_key == entry.job_key) {
            Some(existing) => *existing = entry,
            None => entries.push(entry),
        }
        self.write(&entries)?;
        self.entries = entries;
        Ok(())
    }

    fn write(&self, entries: &[ManifestEntry]) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut bytes, entry)
                .with_context(|| format!("cannot record {} in the manifest", entry.file))?;
            bytes.push(b'\n');
        }
        crate::durable::write_atomically(&self.path(), &bytes, true)
    }
}

/// The entries of every `manifest*.jsonl` in `out_dir` but `own`. They are written by atomic
/// renames, so a line that does not parse is skipped rather than fatal: its image is made again.
fn other_manifests(out_dir: &Path, own: &str) -> anyhow::Result<Vec<ManifestEntry>> {
    let listing =
        std::fs::read_dir(out_dir).with_context(|| format!("cannot list {}", out_dir.display()))?;
    let mut entries = Vec::new();
    for item in listing {
        let name = item
            .with_context(|| format!("cannot list {}", out_dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name == own || !(name.starts_with("manifest") && name.ends_with(".jsonl")) {
            continue;
        }
        let path = out_dir.join(&name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        entries.extend(
            text.lines()
                .filter_map(|line| serde_json::from_str(line).ok()),
        );
    }
    Ok(entries)
}
