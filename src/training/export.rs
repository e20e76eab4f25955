//! A trained model written as a diffusers pipeline folder, the layout that
//! `StableDiffusionPipeline.from_pretrained` and `ldm txt2img --model` load:
//!
//! ```text
//! OUT/model_index.json
//! OUT/unet/config.json, diffusion_pytorch_model.safetensors
//! OUT/text_encoder/config.json, model.safetensors          (transformers' CLIPTextModel)
//! OUT/vae/config.json, diffusion_pytorch_model.safetensors (copied)
//! OUT/tokenizer/...                                        (copied)
//! OUT/scheduler/scheduler_config.json                      (DDIM over the training schedule)
//! ```
//!
//! The folder is built whole in a temporary folder inside OUT, then moved in: `model_index.json`
//! is removed first, the components are swapped by renames, and `model_index.json` comes back
//! last. A kill at any moment therefore leaves either a complete pipeline or a folder without
//! `model_index.json`, which no loader accepts — never a pipeline mixing two exports. Other
//! files of OUT (checkpoints, losses, samples) are left alone; diffusers ignores them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::durable::{self, create_dir, remove_file_if_present, rename};
use crate::model_source::{weights_file, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};
use crate::models::clip::ClipTextConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use crate::tokenizer::PromptTokenizer;

pub const MODEL_INDEX: &str = "model_index.json";
pub const UNET_DIR: &str = "unet";
pub const VAE_DIR: &str = "vae";
pub const TEXT_ENCODER_DIR: &str = "text_encoder";
pub const TOKENIZER_DIR: &str = "tokenizer";
pub const SCHEDULER_DIR: &str = "scheduler";
const CONFIG_FILE: &str = "config.json";
const SCHEDULER_CONFIG_FILE: &str = "scheduler_config.json";
const TEMP_PREFIX: &str = ".export-tmp-";
/// The diffusers release whose file formats these configs follow.
const DIFFUSERS_FORMAT_VERSION: &str = "0.42.1";

/// Stable Diffusion's training noise schedule (scaled_linear 0.00085 → 0.012 over 1000 steps).
pub const SD_NUM_TRAIN_TIMESTEPS: usize = 1000;
pub const SD_BETA_START: f64 = 0.00085;
pub const SD_BETA_END: f64 = 0.012;

/// `scheduler_config.json` for a model trained on SD's schedule with `prediction_type`
/// ("epsilon" or "v_prediction"): DDIM as the SD pipelines configure it (`steps_offset` 1, no
/// sample clipping, ᾱ before the first step taken as ᾱ₀). Training reads its noise schedule
/// from this same value, so the exported sampler and the training schedule cannot disagree.
///
/// `zero_terminal_snr` rescales the betas so that the last timestep is pure noise and samples
/// from it ("trailing" spacing), as Lin et al. 2023 ("Common Diffusion Noise Schedules and
/// Sample Steps are Flawed") and diffusers recommend: SD's schedule keeps √ᾱ ≈ 0.068 of the
/// image at t = 999, so a model learns to read the image's mean from its "pure noise" input
/// and then meets real pure noise at sampling time.
pub fn ddim_scheduler_config(prediction_type: &str, zero_terminal_snr: bool) -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "num_train_timesteps": SD_NUM_TRAIN_TIMESTEPS,
        "beta_start": SD_BETA_START,
        "beta_end": SD_BETA_END,
        "beta_schedule": "scaled_linear",
        "trained_betas": null,
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "timestep_spacing": if zero_terminal_snr { "trailing" } else { "leading" },
        "thresholding": false,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "rescale_betas_zero_snr": zero_terminal_snr,
    })
}

/// Where the exported text encoder comes from.
pub enum TextEncoderExport<'a> {
    /// Trained here: `weights` are named as transformers names them (`text_model.…`).
    Trained {
        config: &'a ClipTextConfig,
        weights: &'a HashMap<String, Tensor>,
        /// Supplies the special token ids recorded in the config.
        tokenizer: &'a PromptTokenizer,
    },
    /// A frozen pretrained `text_encoder/` folder, copied.
    Copied(&'a Path),
}

/// Everything a pipeline folder is made of.
pub struct PipelineExport<'a> {
    pub unet_config: &'a UNet2DConditionConfig,
    /// diffusers names (`down_blocks.0.resnets.0.conv1.weight`, ...).
    pub unet_weights: &'a HashMap<String, Tensor>,
    pub text_encoder: TextEncoderExport<'a>,
    /// A diffusers `vae/` folder, copied.
    pub vae_dir: &'a Path,
    /// A `tokenizer/` folder, copied.
    pub tokenizer_dir: &'a Path,
    pub scheduler_config: &'a Value,
    /// Precision of the written weights: F32, or F16 to halve the size. Copied components keep
    /// their precision under F32 and are converted under F16.
    pub save_dtype: DType,
}

/// Writes `export` as a pipeline folder into `out_dir` (created if needed), replacing a
/// previous export there.
pub fn export_pipeline(out_dir: &Path, export: &PipelineExport) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(export.save_dtype, DType::F32 | DType::F16 | DType::BF16),
        "cannot save weights as {:?}",
        export.save_dtype
    );
    let staged = durable::staging_dir(out_dir, TEMP_PREFIX)?;
    stage(staged.path(), export)?;
    durable::sync_files(staged.path())?;
    install(out_dir, staged.path())
}

/// Writes every component and `model_index.json` into `dir`.
fn stage(dir: &Path, export: &PipelineExport) -> anyhow::Result<()> {
    let dtype = export.save_dtype;
    let unet = create_dir(&dir.join(UNET_DIR))?;
    write_json(
        &unet.join(CONFIG_FILE),
        &unet_config_json(export.unet_config)?,
    )?;
    write_weights(
        &unet.join(format!("{DIFFUSERS_WEIGHTS}.safetensors")),
        export.unet_weights,
        dtype,
    )?;

    let text_encoder = dir.join(TEXT_ENCODER_DIR);
    match &export.text_encoder {
        TextEncoderExport::Trained {
            config,
            weights,
            tokenizer,
        } => {
            create_dir(&text_encoder)?;
            let config_json = text_encoder_config_json(config, tokenizer)?;
            write_json(&text_encoder.join(CONFIG_FILE), &config_json)?;
            write_weights(
                &text_encoder.join(format!("{TRANSFORMERS_WEIGHTS}.safetensors")),
                weights,
                dtype,
            )?;
        }
        TextEncoderExport::Copied(source) => {
            copy_model(source, &text_encoder, TRANSFORMERS_WEIGHTS, dtype)?
        }
    }
    copy_model(export.vae_dir, &dir.join(VAE_DIR), DIFFUSERS_WEIGHTS, dtype)?;
    copy_files(export.tokenizer_dir, &dir.join(TOKENIZER_DIR))?;
    let scheduler = create_dir(&dir.join(SCHEDULER_DIR))?;
    write_json(
        &scheduler.join(SCHEDULER_CONFIG_FILE),
        export.scheduler_config,
    )?;
    write_json(
        &dir.join(MODEL_INDEX),
        &model_index_json(export.scheduler_config),
    )
}

/// Moves the staged components into `out_dir`, `model_index.json` last (see the module doc).
fn install(out_dir: &Path, staged: &Path) -> anyhow::Result<()> {
    let index = out_dir.join(MODEL_INDEX);
    remove_file_if_present(&index)?;
    // Replaced components go into the staging folder, deleted with it.
    let retired = create_dir(&staged.join("retired"))?;
    for component in [
        UNET_DIR,
        TEXT_ENCODER_DIR,
        VAE_DIR,
        TOKENIZER_DIR,
        SCHEDULER_DIR,
    ] {
        let target = out_dir.join(component);
        if target.symlink_metadata().is_ok() {
            rename(&target, &retired.join(component))?;
        }
        rename(&staged.join(component), &target)?;
    }
    durable::sync_dir(out_dir)?;
    rename(&staged.join(MODEL_INDEX), &index)?;
    durable::sync_dir(out_dir)
}

/// A diffusers model config as its `config.json` holds it: the fields, the model's class and
/// the diffusers version whose format it follows.
fn diffusers_config_json(config: &impl serde::Serialize, class: &str) -> anyhow::Result<Value> {
    let mut json = serde_json::to_value(config)?;
    let fields = json
        .as_object_mut()
        .with_context(|| format!("{class} config is not an object"))?;
    fields.insert("_class_name".into(), class.into());
    fields.insert("_diffusers_version".into(), DIFFUSERS_FORMAT_VERSION.into());
    Ok(json)
}

fn unet_config_json(config: &UNet2DConditionConfig) -> anyhow::Result<Value> {
    diffusers_config_json(config, "UNet2DConditionModel")
}

/// diffusers' `AutoencoderKL` config as `vae/config.json`.
fn vae_config_json(config: &AutoencoderKLConfig) -> anyhow::Result<Value> {
    diffusers_config_json(config, "AutoencoderKL")
}

/// Writes a diffusers `vae/` folder (what `train-vae` exports): `config.json` and
/// `diffusion_pytorch_model.safetensors` (f32), each atomically.
pub fn export_vae(
    dir: &Path,
    config: &AutoencoderKLConfig,
    weights: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights = weights
        .iter()
        .map(|(name, t)| {
            Ok((
                name.clone(),
                t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    super::checkpoint::save_tensors_atomically(
        &dir.join(format!("{DIFFUSERS_WEIGHTS}.safetensors")),
        &weights,
    )?;
    let text = serde_json::to_string_pretty(&vae_config_json(config)?)? + "\n";
    durable::write_atomically(&dir.join(CONFIG_FILE), text.as_bytes(), true)
}

/// transformers' `CLIPTextConfig` as `text_encoder/config.json`.
fn text_encoder_config_json(
    config: &ClipTextConfig,
    tokenizer: &PromptTokenizer,
) -> anyhow::Result<Value> {
    let mut json = serde_json::to_value(config)?;
    let fields = json
        .as_object_mut()
        .context("text encoder config is not an object")?;
    fields.insert("architectures".into(), json!(["CLIPTextModel"]));
    fields.insert("model_type".into(), "clip_text_model".into());
    fields.insert("bos_token_id".into(), tokenizer.bos_id().into());
    fields.insert("eos_token_id".into(), tokenizer.eos_id().into());
    fields.insert("pad_token_id".into(), tokenizer.pad_id().into());
    Ok(json)
}

fn model_index_json(scheduler_config: &Value) -> Value {
    let scheduler_class = scheduler_config
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("DDIMScheduler");
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// Safetensors with the `{"format": "pt"}` metadata transformers requires; floating-point
/// tensors cast to `dtype`.
fn write_weights(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> anyhow::Result<()> {
    let cast = tensors
        .iter()
        .map(|(name, tensor)| {
            let tensor = if tensor.dtype().is_float() {
                tensor.to_dtype(dtype)?
            } else {
                tensor.clone()
            };
            Ok((name.clone(), tensor.to_device(&Device::Cpu)?))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(cast, Some(metadata), path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Copies a model folder's `config.json` and weights (see [`weights_file`]; the fp16 variant
/// first when saving in half precision) to `dest`, the weights under `<stem>.safetensors`;
/// converted when saving in half precision.
fn copy_model(source: &Path, dest: &Path, stem: &str, dtype: DType) -> anyhow::Result<()> {
    create_dir(dest)?;
    copy_file(&source.join(CONFIG_FILE), &dest.join(CONFIG_FILE))?;
    let weights = weights_file(source, stem, dtype != DType::F32)?;
    let target = dest.join(format!("{stem}.safetensors"));
    if dtype == DType::F32 {
        copy_file(&weights, &target)
    } else {
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .with_context(|| format!("cannot read {}", weights.display()))?;
        write_weights(&target, &tensors, dtype)
    }
}

/// Copies every file directly inside `source` (a tokenizer folder) to `dest`.
fn copy_files(source: &Path, dest: &Path) -> anyhow::Result<()> {
    create_dir(dest)?;
    let entries =
        std::fs::read_dir(source).with_context(|| format!("cannot list {}", source.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", source.display()))?
            .path();
        if path.is_file() {
            copy_file(
                &path,
                &dest.join(path.file_name().expect("a file has a name")),
            )?;
        }
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
