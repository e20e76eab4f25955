//! Where a pipeline's files come from: a local diffusers folder, a single-file checkpoint (with
//! the configs of a diffusers folder), a hub repo, a preset name, or the embedded default model
//! in `weights/`.
//!
//! Whatever the source, the result is a local folder in the diffusers layout
//! (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and for
//! SDXL `text_encoder_2/`, `tokenizer_2/`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo};

use crate::schedulers::PredictionType;

/// Presets users can name instead of a hub repo id.
pub const PRESETS: &[(&str, &str)] = &[
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("sd21", "stabilityai/stable-diffusion-2-1"),
    ("sd21-base", "stabilityai/stable-diffusion-2-1-base"),
    ("sd-turbo", "stabilityai/sd-turbo"),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("sdxl-turbo", "stabilityai/sdxl-turbo"),
];

/// The weight file stem diffusers gives its models (U-Net, VAE).
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";
/// The weight file stem transformers gives its models (the text encoder).
pub const TRANSFORMERS_WEIGHTS: &str = "model";

/// The model components a pipeline loads, with the weight file stem of each.
pub const COMPONENTS: &[(&str, &str)] = &[
    ("unet", DIFFUSERS_WEIGHTS),
    ("vae", DIFFUSERS_WEIGHTS),
    ("text_encoder", TRANSFORMERS_WEIGHTS),
    ("text_encoder_2", TRANSFORMERS_WEIGHTS),
];

const TOKENIZER_FILES: &[&str] = &["tokenizer_config.json", "special_tokens_map.json"];
const TOKENIZER_PAIR: &[&str] = &["vocab.json", "merges.txt"];

/// The pipeline classes of SDXL's base model, img2img and inpainting variants.
const SDXL_PIPELINES: &[&str] = &[
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
];

/// `model_index.json`: which pipeline a folder holds, and its pipeline-level config.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// SDXL: an empty negative prompt conditions on zeros instead of its embeddings
    /// (diffusers' default when the file does not say).
    #[serde(default = "default_true")]
    pub force_zeros_for_empty_prompt: bool,
    /// ldm's recommended settings for this model, under `_ldm` (diffusers ignores keys that
    /// start with `_`): the defaults of the flags a run leaves out.
    #[serde(rename = "_ldm", default)]
    pub recommended: Recommended,
}

/// A model's recommended sampling settings (`model_index.json`'s `_ldm`), e.g.
/// `{"guidance_scale": 2.0}` for a small model that over-saturates at SD's 7.5.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recommended {
    pub guidance_scale: Option<f64>,
}

fn default_true() -> bool {
    true
}

impl ModelIndex {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        crate::config::read_json(path)
    }

    /// Whether the folder is an SDXL pipeline (two text encoders, added conditioning).
    pub fn is_sdxl(&self) -> bool {
        SDXL_PIPELINES.contains(&self.class_name.as_str())
    }

    /// The text encoders and their tokenizers, in the order their embeddings are joined.
    pub fn text_encoders(&self) -> &'static [(&'static str, &'static str)] {
        if self.is_sdxl() {
            &[
                ("text_encoder", "tokenizer"),
                ("text_encoder_2", "tokenizer_2"),
            ]
        } else {
            &[("text_encoder", "tokenizer")]
        }
    }
}

/// How `--model` is read beyond its name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOptions {
    /// The diffusers folder whose tokenizer and configs a single-file checkpoint uses
    /// (`--config`); default: the checkpoint's own folder when it has a tokenizer.
    pub config: Option<PathBuf>,
    /// Replaces the scheduler config's prediction type (`--prediction-type`).
    pub prediction_type: Option<PredictionType>,
    /// A single-file checkpoint's U-Net from its EMA weights (`--extract-ema`).
    pub extract_ema: bool,
}

/// A single-file checkpoint (see [`crate::single_file`]) used in place of a folder's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct SingleFile {
    pub checkpoint: PathBuf,
    pub extract_ema: bool,
}

/// A pipeline folder on local disk, and the name it is known by (recorded in image metadata).
/// For a single-file checkpoint, the folder of its configs and tokenizer.
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    pub root: PathBuf,
    pub name: String,
    /// The weights, when they come from one checkpoint file instead of the folder's.
    pub single_file: Option<SingleFile>,
    /// Replaces the scheduler config's prediction type.
    pub prediction_type: Option<PredictionType>,
}

/// The folder of a single-file checkpoint's config folder that it cannot do without (the
/// component configs it lacks are inferred from the tensors, the scheduler's is SD's).
const TOKENIZER: &str = "tokenizer";

impl PipelineFolder {
    /// A local diffusers folder, its weights read from it.
    pub fn new(root: &Path, name: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            name: name.to_string(),
            single_file: None,
            prediction_type: None,
        }
    }

    /// Resolves `--model`: `None` means the embedded default.
    pub fn resolve(
        model: Option<&str>,
        half_precision: bool,
        options: &ModelOptions,
    ) -> anyhow::Result<Self> {
        let is_file = model.is_some_and(|m| Path::new(m).is_file());
        if !is_file && (options.config.is_some() || options.extract_ema) {
            bail!("--config and --extract-ema apply to single-file checkpoints only");
        }
        let mut folder = match model {
            Some(file) if is_file => Self::single_file(Path::new(file), options)?,
            _ => Self::resolve_folder(model, half_precision)?,
        };
        folder.prediction_type = options.prediction_type;
        Ok(folder)
    }

    /// A single-file checkpoint with the configs and tokenizer of `options.config`, else of
    /// the folder it lies in.
    fn single_file(checkpoint: &Path, options: &ModelOptions) -> anyhow::Result<Self> {
        let beside = checkpoint.parent().unwrap_or(Path::new("."));
        let config = match &options.config {
            Some(dir) => dir.clone(),
            None if beside.join(TOKENIZER).is_dir() => beside.to_path_buf(),
            None => bail!(
                "{} is a single-file checkpoint: it holds the weights but no tokenizer, which \
                 ldm reads from a diffusers folder of the same kind of model (as diffusers' \
                 from_single_file(config=...) does offline). Pass --config DIR, a folder with \
                 {TOKENIZER}/ and ideally model_index.json, scheduler/, text_encoder/, unet/ \
                 and vae/ configs (e.g. those of stable-diffusion-v1-5 for SD 1.x, \
                 stable-diffusion-2-1 for SD 2.x), or put the checkpoint in such a folder",
                checkpoint.display()
            ),
        };
        if !config.join(TOKENIZER).is_dir() {
            bail!(
                "{} cannot configure the single-file checkpoint {}: it has no {TOKENIZER}/ folder",
                config.display(),
                checkpoint.display()
            );
        }
        let name = checkpoint
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| checkpoint.display().to_string());
        Ok(Self {
            single_file: Some(SingleFile {
                checkpoint: checkpoint.to_path_buf(),
                extract_ema: options.extract_ema,
            }),
            ..Self::new(&config, &name)
        })
    }

    /// `--model` naming a folder, hub repo or preset (`None`: the embedded default).
    fn resolve_folder(model: Option<&str>, half_precision: bool) -> anyhow::Result<Self> {
        let Some(model) = model else {
            let dir = crate::default_model::dir()?;
            if !dir.join("model_index.json").is_file() {
                bail!(
                    "no default model in {} yet (see weights/README.md); pass --model with a \
                     diffusers folder, a hub repo id or a preset ({})",
                    dir.display(),
                    preset_names()
                );
            }
            return Self::local(&dir, "ldm-default");
        };
        let path = Path::new(model);
        if path.is_dir() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.to_string());
            return Self::local(path, &name);
        }
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ["safetensors", "ckpt", "pt", "pth"].contains(&extension) {
            bail!("no such checkpoint file: {}", path.display());
        }
        if let Some((_, repo)) = PRESETS.iter().find(|(preset, _)| *preset == model) {
            return Self::from_hub(repo, half_precision);
        }
        if looks_like_repo_id(model) && !path.exists() {
            return Self::from_hub(model, half_precision);
        }
        bail!(
            "model {model:?} is neither a single-file checkpoint, a pipeline folder, a hub repo id \
             (owner/name) nor a preset ({})",
            preset_names()
        )
    }

    fn local(root: &Path, name: &str) -> anyhow::Result<Self> {
        let index = root.join("model_index.json");
        if !index.is_file() {
            bail!(
                "{} is not a diffusers pipeline folder: {} is missing",
                root.display(),
                index.display()
            );
        }
        Ok(Self::new(root, name))
    }

    /// Fetches only the files a pipeline needs (the fp16 weights when running in half
    /// precision and the repo has them), through the hub cache.
    fn from_hub(repo_id: &str, half_precision: bool) -> anyhow::Result<Self> {
        let hub = HubRepo::open(repo_id)?;
        let index = hub.required("model_index.json")?;
        let model_index = ModelIndex::from_file(&index)?;
        hub.required("scheduler/scheduler_config.json")?;
        let mut components = vec!["unet", "vae"];
        for (encoder, tokenizer) in model_index.text_encoders() {
            components.push(encoder);
            for file in TOKENIZER_FILES {
                hub.required(&format!("{tokenizer}/{file}"))?;
            }
            if hub
                .optional(&format!("{tokenizer}/tokenizer.json"))
                .is_none()
            {
                for file in TOKENIZER_PAIR {
                    hub.required(&format!("{tokenizer}/{file}"))?;
                }
            }
        }
        for component in components {
            let stem = component_stem(component)?;
            hub.required(&format!("{component}/config.json"))?;
            let fp16 = format!("{component}/{stem}.fp16.safetensors");
            if !(half_precision && hub.optional(&fp16).is_some()) {
                hub.required(&format!("{component}/{stem}.safetensors"))?;
            }
        }
        let root = index
            .parent()
            .context("hub cache path has no parent")?
            .to_path_buf();
        Ok(Self::new(&root, repo_id))
    }

    /// What the model is read from, for messages: the checkpoint file, else the folder.
    pub fn location(&self) -> &Path {
        match &self.single_file {
            Some(file) => &file.checkpoint,
            None => &self.root,
        }
    }

    /// `model_index.json`; a Stable Diffusion pipeline for a single-file checkpoint whose
    /// config folder has none.
    pub fn model_index(&self) -> anyhow::Result<ModelIndex> {
        let path = self.root.join("model_index.json");
        if self.single_file.is_some() && !path.exists() {
            return Ok(ModelIndex {
                class_name: "StableDiffusionPipeline".into(),
                force_zeros_for_empty_prompt: true,
                recommended: Recommended::default(),
            });
        }
        ModelIndex::from_file(&path)
    }

    /// `<root>/<component>/config.json`.
    pub fn config(&self, component: &str) -> PathBuf {
        self.root.join(component).join("config.json")
    }

    /// The component's safetensors weights (see [`weights_file`]).
    pub fn weights(&self, component: &str, half_precision: bool) -> anyhow::Result<PathBuf> {
        let stem = component_stem(component)?;
        weights_file(&self.root.join(component), stem, half_precision)
    }
}

/// The weight file stem of a pipeline component.
fn component_stem(component: &str) -> anyhow::Result<&'static str> {
    COMPONENTS
        .iter()
        .find(|(c, _)| *c == component)
        .map(|(_, stem)| *stem)
        .with_context(|| format!("unknown pipeline component {component}"))
}

/// A model folder's safetensors weights, `<stem>.safetensors` or its `<stem>.fp16.safetensors`
/// variant: the fp16 one first when the weights are used in half precision, the full-precision
/// one first otherwise; whichever exists when only one does.
pub fn weights_file(dir: &Path, stem: &str, half_precision: bool) -> anyhow::Result<PathBuf> {
    let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
    let full = dir.join(format!("{stem}.safetensors"));
    let (first, second) = if half_precision {
        (fp16, full)
    } else {
        (full, fp16)
    };
    if first.is_file() {
        Ok(first)
    } else if second.is_file() {
        Ok(second)
    } else {
        bail!(
            "missing weights file {}",
            dir.join(format!("{stem}.safetensors")).display()
        )
    }
}

/// The component folder `component` inside `path` when `path` is a pipeline folder holding
/// one, else `path` itself (a component folder given directly).
pub fn component_dir(path: &Path, component: &str) -> PathBuf {
    let inside = path.join(component);
    if inside.is_dir() {
        inside
    } else {
        path.to_path_buf()
    }
}

/// A read-only `VarBuilder` over a safetensors file (tensors read on demand, see `weights_file`).
pub fn var_builder(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<VarBuilder<'static>> {
    var_builder_where(path, dtype, device, |_| true)
}

/// [`var_builder`] over the tensors whose names `keep` selects (the others are not read).
pub fn var_builder_where(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep: impl Fn(&str) -> bool + Sync,
) -> anyhow::Result<VarBuilder<'static>> {
    let file = crate::weights_file::WeightsFile::open(path)
        .with_context(|| format!("cannot read weights file {}", path.display()))?;
    file.into_var_builder_where(dtype, device, keep)
        .with_context(|| format!("cannot read weights file {}", path.display()))
}

fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(", ")
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty())
}

/// A hub repo seen through the local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`); files are downloaded only when missing, and never when
/// `HF_HUB_OFFLINE=1`.
struct HubRepo {
    id: String,
    cache: hf_hub::CacheRepo,
    api: Option<ApiRepo>,
}

impl HubRepo {
    fn open(id: &str) -> anyhow::Result<Self> {
        let cache = match std::env::var_os("HF_HUB_CACHE") {
            Some(dir) => Cache::new(PathBuf::from(dir)),
            None => Cache::from_env(),
        };
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        let api = if offline {
            None
        } else {
            let api = ApiBuilder::from_cache(cache.clone())
                .build()
                .context("cannot set up the hub client")?;
            Some(api.repo(Repo::model(id.to_string())))
        };
        Ok(Self {
            id: id.to_string(),
            cache: cache.repo(Repo::model(id.to_string())),
            api,
        })
    }

    fn fetch(&self, file: &str) -> anyhow::Result<PathBuf> {
        if let Some(path) = self.cache.get(file) {
            return Ok(path);
        }
        match &self.api {
            Some(api) => api
                .get(file)
                .with_context(|| format!("cannot download {file} from hub repo {}", self.id)),
            None => bail!(
                "{file} of hub repo {} is not in the local cache and HF_HUB_OFFLINE is set",
                self.id
            ),
        }
    }

    fn required(&self, file: &str) -> anyhow::Result<PathBuf> {
        self.fetch(file)
    }

    fn optional(&self, file: &str) -> Option<PathBuf> {
        self.fetch(file).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_owner_slash_name() {
        assert!(looks_like_repo_id("stabilityai/sd-turbo"));
        assert!(!looks_like_repo_id("sd15"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("/abs"));
    }

    #[test]
    fn weights_file_prefers_the_variant_of_the_working_precision() {
        let dir = tempfile::tempdir().unwrap();
        let (full, fp16) = (
            dir.path().join("model.safetensors"),
            dir.path().join("model.fp16.safetensors"),
        );
        let error = weights_file(dir.path(), "model", false).unwrap_err();
        assert!(error.to_string().contains("model.safetensors"), "{error}");
        std::fs::write(&fp16, b"").unwrap();
        assert_eq!(weights_file(dir.path(), "model", false).unwrap(), fp16);
        std::fs::write(&full, b"").unwrap();
        assert_eq!(weights_file(dir.path(), "model", false).unwrap(), full);
        assert_eq!(weights_file(dir.path(), "model", true).unwrap(), fp16);
        std::fs::remove_file(&fp16).unwrap();
        assert_eq!(weights_file(dir.path(), "model", true).unwrap(), full);
    }
}
