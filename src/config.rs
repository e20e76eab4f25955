//! Reading the JSON config files that every diffusers component ships.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Parses a component's JSON config, naming the file in any error. Python's `json` writes
/// infinities and NaN as bare `Infinity`/`NaN` (diffusers' DPM-Solver configs carry
/// `"lambda_min_clipped": -Infinity`), which strict JSON lacks: such files are read as JSON5.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    serde_json::from_str(&text)
        .or_else(|strict| json5::from_str(&text).map_err(|_| strict))
        .with_context(|| format!("malformed config file {}", path.display()))
}

/// A model's native `sample_size`: diffusers accepts one size or a `[height, width]` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

impl SampleSize {
    pub fn height_width(self) -> (usize, usize) {
        match self {
            Self::Square(size) => (size, size),
            Self::HeightWidth([height, width]) => (height, width),
        }
    }
}
