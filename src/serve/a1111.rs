//! AUTOMATIC1111's web API (`/sdapi/v1/...`), with the request and response shapes of its
//! `modules/api/models.py` and `api.py`, so webuiapi, Open WebUI, SillyTavern and the editor
//! plug-ins work unchanged. Fields ldm does not implement are accepted and ignored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use image::{DynamicImage, GrayImage, RgbImage};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{parse_json, A1111Error, ApiError};
use super::request::{self, Generation, ImageRequest, SourceRequest, MAX_IMAGES, MAX_STEPS};
use super::samplers;
use super::state::AppState;

/// A1111's defaults where a request leaves a field out (`StableDiffusionProcessing`).
const DEFAULT_STEPS: i64 = 50;
const DEFAULT_CFG_SCALE: f64 = 7.0;
const DEFAULT_SAMPLER: &str = "Euler";
const DEFAULT_DENOISING_STRENGTH: f64 = 0.75;

type Reply = Result<Json<Value>, A1111Error>;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
}

/// The fields of `txt2img` and `img2img` that ldm reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GenerationFields {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    seed: Option<i64>,
    sampler_name: Option<String>,
    sampler_index: Option<String>,
    scheduler: Option<String>,
    steps: Option<i64>,
    cfg_scale: Option<f64>,
    width: Option<i64>,
    height: Option<i64>,
    n_iter: Option<i64>,
    batch_size: Option<i64>,
    eta: Option<f64>,
    send_images: Option<bool>,
    override_settings: Option<Map<String, Value>>,
    init_images: Option<Vec<String>>,
    mask: Option<String>,
    denoising_strength: Option<f64>,
    inpainting_mask_invert: Option<i64>,
    include_init_images: Option<bool>,
}

async fn txt2img(State(state): State<Arc<AppState>>, body: Bytes) -> Reply {
    let (fields, mut parameters) = parse(&body)?;
    let request = image_request(&state, &fields, None)?;
    respond(&state, &fields, request, &mut parameters).await
}

async fn img2img(State(state): State<Arc<AppState>>, body: Bytes) -> Reply {
    let (fields, mut parameters) = parse(&body)?;
    let source = source_request(&fields)?;
    let request = image_request(&state, &fields, Some(source))?;
    if !fields.include_init_images.unwrap_or(false) {
        parameters.insert("init_images".into(), Value::Null);
        parameters.insert("mask".into(), Value::Null);
    }
    respond(&state, &fields, request, &mut parameters).await
}

/// The typed fields, and the request as sent (A1111 answers it back as `parameters`).
fn parse(body: &[u8]) -> Result<(GenerationFields, Map<String, Value>), ApiError> {
    let fields = parse_json(body)?;
    let parameters = serde_json::from_slice::<Map<String, Value>>(body).unwrap_or_default();
    Ok((fields, parameters))
}

fn image_request(
    state: &AppState,
    fields: &GenerationFields,
    source: Option<SourceRequest>,
) -> Result<ImageRequest, ApiError> {
    // As A1111: `sampler_name or sampler_index`, an empty name counting as none.
    let given = |name: &Option<String>| name.clone().filter(|n| !n.trim().is_empty());
    let (sampler_field, sampler_name) =
        match (given(&fields.sampler_name), given(&fields.sampler_index)) {
            (Some(name), _) => ("sampler_name", name),
            (None, Some(name)) => ("sampler_index", name),
            (None, None) => ("sampler_name", DEFAULT_SAMPLER.to_string()),
        };
    let (sampler, named_karras) = samplers::find(sampler_field, &sampler_name)?;
    let karras = samplers::schedule("scheduler", fields.scheduler.as_deref())? || named_karras;
    let model = match fields
        .override_settings
        .as_ref()
        .and_then(|settings| settings.get("sd_model_checkpoint"))
    {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => {
            Some(state.check_model("override_settings.sd_model_checkpoint", name)?)
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "override_settings.sd_model_checkpoint",
                format!("expected a model name, got {other}"),
            ))
        }
    };
    let batches = request::count_field("n_iter", fields.n_iter.unwrap_or(1), MAX_IMAGES)?;
    let batch_size =
        request::count_field("batch_size", fields.batch_size.unwrap_or(1), MAX_IMAGES)?;
    request::check_image_count("n_iter", batches, batch_size)?;
    Ok(ImageRequest {
        job: if source.is_some() {
            "img2img"
        } else {
            "txt2img"
        },
        model,
        prompt: fields.prompt.clone().unwrap_or_default(),
        negative_prompt: fields.negative_prompt.clone().unwrap_or_default(),
        seed: request::seed_field("seed", fields.seed)?,
        sampler,
        karras,
        steps: request::count_field("steps", fields.steps.unwrap_or(DEFAULT_STEPS), MAX_STEPS)?,
        guidance_scale: Some(request::number_field(
            "cfg_scale",
            fields.cfg_scale.unwrap_or(DEFAULT_CFG_SCALE),
            0.0,
            100.0,
        )?),
        eta: request::number_field("eta", fields.eta.unwrap_or(0.0), 0.0, 1.0)?,
        width: fields
            .width
            .map(|w| request::side_field("width", w))
            .transpose()?,
        height: fields
            .height
            .map(|h| request::side_field("height", h))
            .transpose()?,
        batches,
        batch_size,
        source,
    })
}

/// `init_images` (base64), the optional `mask` (white repaints, or the alpha channel when it
/// has transparency, as A1111 reads masks) and `denoising_strength`.
fn source_request(fields: &GenerationFields) -> Result<SourceRequest, ApiError> {
    let images = match &fields.init_images {
        Some(images) if !images.is_empty() => images,
        _ => {
            return Err(ApiError::invalid(
                "init_images",
                "img2img needs at least one base64-encoded image",
            ))
        }
    };
    let images = images
        .iter()
        .enumerate()
        .map(|(i, text)| {
            request::decode_base64_image(&format!("init_images[{i}]"), text).map(|i| i.to_rgb8())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mask = match fields.mask.as_deref().filter(|m| !m.is_empty()) {
        None => None,
        Some(text) => {
            let mask = repaint_mask(&request::decode_base64_image("mask", text)?);
            let invert = fields.inpainting_mask_invert.unwrap_or(0) != 0;
            Some(if invert { inverted(mask) } else { mask })
        }
    };
    let strength = request::number_field(
        "denoising_strength",
        fields
            .denoising_strength
            .unwrap_or(DEFAULT_DENOISING_STRENGTH),
        0.0,
        1.0,
    )?;
    Ok(SourceRequest {
        images,
        mask,
        strength,
    })
}

/// A1111's reading of a mask: the alpha channel when it is not fully opaque, else the image
/// itself; white (opaque) repaints.
fn repaint_mask(mask: &DynamicImage) -> RgbImage {
    let rgba = mask.to_rgba8();
    if mask.color().has_alpha() && rgba.pixels().any(|p| p.0[3] != 255) {
        let alpha = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([rgba.get_pixel(x, y).0[3]])
        });
        DynamicImage::ImageLuma8(alpha).to_rgb8()
    } else {
        mask.to_rgb8()
    }
}

fn inverted(mut mask: RgbImage) -> RgbImage {
    image::imageops::invert(&mut mask);
    mask
}

async fn respond(
    state: &AppState,
    fields: &GenerationFields,
    request: ImageRequest,
    parameters: &mut Map<String, Value>,
) -> Reply {
    let sampler_name = samplers::a1111_name(request.sampler, request.karras);
    let denoising_strength = request.source.as_ref().map(|s| s.strength);
    let summary = RequestSummary {
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        sampler_name,
        cfg_scale: request.guidance_scale.unwrap_or(DEFAULT_CFG_SCALE),
        steps: request.steps,
        batch_size: request.batch_size,
        denoising_strength,
    };
    let generation = state.generate(request).await?;
    let images: Vec<Value> = if fields.send_images.unwrap_or(true) {
        generation
            .images
            .iter()
            .map(|image| {
                base64::engine::general_purpose::STANDARD
                    .encode(&image.png)
                    .into()
            })
            .collect()
    } else {
        Vec::new()
    };
    let info = summary.info(&generation).to_string();
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info,
    })))
}

/// The request settings A1111 repeats in `info`.
struct RequestSummary {
    prompt: String,
    negative_prompt: String,
    sampler_name: String,
    cfg_scale: f64,
    steps: usize,
    batch_size: usize,
    denoising_strength: Option<f64>,
}

impl RequestSummary {
    /// A1111's `Processed.js()`: the run's settings, every image's seed and infotext.
    fn info(&self, generation: &Generation) -> Value {
        let count = generation.images.len();
        let seeds: Vec<u64> = generation.images.iter().map(|i| i.seed).collect();
        let infotexts: Vec<&str> = generation
            .images
            .iter()
            .map(|i| i.infotext.as_str())
            .collect();
        json!({
            "prompt": self.prompt,
            "all_prompts": vec![&self.prompt; count],
            "negative_prompt": self.negative_prompt,
            "all_negative_prompts": vec![&self.negative_prompt; count],
            "seed": seeds.first(),
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": vec![-1; count],
            "subseed_strength": 0,
            "width": generation.width,
            "height": generation.height,
            "sampler_name": self.sampler_name,
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "restore_faces": false,
            "face_restoration_model": null,
            "sd_model_name": generation.model,
            "sd_model_hash": null,
            "sd_vae_name": null,
            "sd_vae_hash": null,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": self.denoising_strength,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "clip_skip": 1,
            "is_using_inpainting_conditioning": false,
            "interrupted": generation.interrupted,
            "version": format!("ldm {}", env!("CARGO_PKG_VERSION")),
        })
    }
}

async fn progress(State(state): State<Arc<AppState>>) -> Json<Value> {
    let progress = state.queue.progress();
    let (fraction, eta) = progress.fraction_and_eta();
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": progress.interrupted,
            "stopping_generation": false,
            "job": progress.job,
            "job_count": progress.job_count,
            "job_timestamp": progress.job_timestamp,
            "job_no": progress.job_no,
            "sampling_step": progress.sampling_step,
            "sampling_steps": progress.sampling_steps,
            "queued": state.queue.waiting(),
        },
        "current_image": null,
        "textinfo": null,
    }))
}

async fn interrupt(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.queue.interrupt();
    Json(json!({}))
}

async fn samplers() -> Json<Value> {
    let list: Vec<Value> = samplers::SAMPLERS
        .iter()
        .map(|s| {
            let options = if s.karras {
                json!({"scheduler": "karras"})
            } else {
                json!({})
            };
            json!({"name": s.name, "aliases": s.aliases, "options": options})
        })
        .collect();
    Json(Value::Array(list))
}

async fn schedulers() -> Json<Value> {
    Json(json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": null, "need_inner_model": null},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": null},
    ]))
}

async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = state
        .catalog
        .folders()
        .iter()
        .map(|folder| {
            json!({
                "title": folder.name,
                "model_name": folder.name,
                "hash": null,
                "sha256": null,
                "filename": folder.location().display().to_string(),
                "config": null,
            })
        })
        .collect();
    Json(Value::Array(list))
}

async fn get_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut options = state.options.lock().expect("options lock").clone();
    options.insert("sd_model_checkpoint".into(), state.selected_model().into());
    options.insert("samples_format".into(), "png".into());
    Json(Value::Object(options))
}

/// Stores the options; `sd_model_checkpoint` loads that model (after the queued requests) and
/// answers once it is loaded.
async fn set_options(State(state): State<Arc<AppState>>, body: Bytes) -> Reply {
    let mut options: Map<String, Value> = parse_json(&body)?;
    if let Some(checkpoint) = options.remove("sd_model_checkpoint") {
        let Value::String(name) = checkpoint else {
            return Err(ApiError::invalid(
                "sd_model_checkpoint",
                format!("expected a model name, got {checkpoint}"),
            )
            .into());
        };
        let name = state.check_model("sd_model_checkpoint", &name)?;
        state.select_model(name).await?;
    }
    state.options.lock().expect("options lock").extend(options);
    Ok(Json(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_read_alpha_when_transparent_else_luma() {
        let mut rgba = image::RgbaImage::from_pixel(2, 1, image::Rgba([0, 0, 0, 255]));
        rgba.put_pixel(1, 0, image::Rgba([0, 0, 0, 0]));
        let mask = repaint_mask(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(mask.as_raw(), &vec![255, 255, 255, 0, 0, 0]);
        let opaque = image::RgbaImage::from_pixel(1, 1, image::Rgba([255, 255, 255, 255]));
        assert_eq!(
            repaint_mask(&DynamicImage::ImageRgba8(opaque)).as_raw(),
            &vec![255; 3]
        );
        assert_eq!(inverted(mask).as_raw(), &vec![0, 0, 0, 255, 255, 255]);
    }
}
