//! OpenAI's Images API: `POST /v1/images/generations` (JSON) and `POST /v1/images/edits`
//! (multipart: image + mask → inpainting), answering `{"created", "data": [...]}` with
//! `b64_json` or a `url` this server serves, and errors in OpenAI's error object.
//!
//! ldm extensions, ignored by OpenAI's SDKs unless sent: `negative_prompt`, `seed`, `steps`,
//! `cfg_scale`, `sampler_name` and (edits) `strength`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use image::{DynamicImage, RgbImage};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{parse_json, ApiError, OpenAiError};
use super::request::{self, Generation, ImageRequest, SourceRequest, MAX_STEPS};
use super::samplers;
use super::state::AppState;

/// OpenAI's limit on `n`.
const MAX_N: i64 = 10;
/// Where a request leaves them out: the CLI's defaults.
/// (The guidance scale left out is the model's default, as the CLI's.)
const DEFAULT_STEPS: i64 = 50;
const DEFAULT_SAMPLER: &str = "DDIM";
/// img2img strength of an edit without a mask (A1111's default).
const DEFAULT_EDIT_STRENGTH: f64 = 0.75;
/// Model names OpenAI's SDKs send by default; they mean the selected model here.
const OPENAI_MODEL_PREFIXES: &[&str] = &["dall-e", "gpt-image"];

type Reply = Result<Json<Value>, OpenAiError>;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/images/files/{name}", get(file))
}

/// The fields both endpoints share (edits send them as multipart text fields).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fields {
    prompt: Option<String>,
    model: Option<String>,
    n: Option<i64>,
    size: Option<String>,
    response_format: Option<String>,
    negative_prompt: Option<String>,
    seed: Option<i64>,
    steps: Option<i64>,
    cfg_scale: Option<f64>,
    sampler_name: Option<String>,
    strength: Option<f64>,
}

async fn generations(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Reply {
    let fields: Fields = parse_json(&body)?;
    let format = ResponseFormat::parse(fields.response_format.as_deref())?;
    let request = image_request(&state, &fields, None)?;
    let generation = state.generate(request).await?;
    Ok(Json(response(&state, &headers, format, generation)))
}

async fn edits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    multipart: Multipart,
) -> Reply {
    let form = EditForm::read(multipart).await?;
    let format = ResponseFormat::parse(form.fields.response_format.as_deref())?;
    let source = form.source()?;
    let request = image_request(&state, &form.fields, Some(source))?;
    let generation = state.generate(request).await?;
    Ok(Json(response(&state, &headers, format, generation)))
}

/// A PNG kept for a `url` response.
async fn file(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.files.get(&name) {
        Some(png) => ([(header::CONTENT_TYPE, "image/png")], png.to_vec()).into_response(),
        None => OpenAiError(ApiError::new(
            super::error::ErrorKind::NotFound,
            format!(
                "no image {name:?} (generated images are kept for the last {} only)",
                super::state::KEPT_FILES
            ),
        ))
        .into_response(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFormat {
    Url,
    B64Json,
}

impl ResponseFormat {
    fn parse(format: Option<&str>) -> Result<Self, ApiError> {
        match format {
            None | Some("url") => Ok(Self::Url),
            Some("b64_json") => Ok(Self::B64Json),
            Some(other) => Err(ApiError::invalid(
                "response_format",
                format!("{other:?} is not supported: use \"url\" or \"b64_json\""),
            )),
        }
    }
}

fn image_request(
    state: &AppState,
    fields: &Fields,
    source: Option<SourceRequest>,
) -> Result<ImageRequest, ApiError> {
    let prompt = match fields.prompt.as_deref().map(str::trim) {
        Some(prompt) if !prompt.is_empty() => prompt.to_string(),
        _ => return Err(ApiError::invalid("prompt", "a prompt is required")),
    };
    let model = match fields.model.as_deref() {
        None => None,
        Some(name) if OPENAI_MODEL_PREFIXES.iter().any(|p| name.starts_with(p)) => None,
        Some(name) => Some(state.check_model("model", name)?),
    };
    let (width, height) = match fields.size.as_deref() {
        None | Some("auto") => (None, None),
        Some(size) => {
            let (width, height) = parse_size(size)?;
            (Some(width), Some(height))
        }
    };
    let sampler_name = fields.sampler_name.as_deref().unwrap_or(DEFAULT_SAMPLER);
    let (sampler, karras) = samplers::find("sampler_name", sampler_name)?;
    Ok(ImageRequest {
        job: if source.is_some() {
            "edit"
        } else {
            "generation"
        },
        model,
        prompt,
        negative_prompt: fields.negative_prompt.clone().unwrap_or_default(),
        seed: request::seed_field("seed", fields.seed)?,
        sampler,
        karras,
        steps: request::count_field("steps", fields.steps.unwrap_or(DEFAULT_STEPS), MAX_STEPS)?,
        guidance_scale: fields
            .cfg_scale
            .map(|scale| request::number_field("cfg_scale", scale, 0.0, 100.0))
            .transpose()?,
        eta: 0.0,
        width,
        height,
        batches: 1,
        batch_size: request::count_field("n", fields.n.unwrap_or(1), MAX_N)?,
        source,
    })
}

/// `"WxH"`, each side checked like A1111's width and height.
fn parse_size(size: &str) -> Result<(usize, usize), ApiError> {
    let invalid = || {
        ApiError::invalid(
            "size",
            format!(
                "{size:?} is not a size: give \"WIDTHxHEIGHT\" such as \"512x512\", or \"auto\""
            ),
        )
    };
    let (width, height) = size.split_once('x').ok_or_else(invalid)?;
    let width: i64 = width.trim().parse().map_err(|_| invalid())?;
    let height: i64 = height.trim().parse().map_err(|_| invalid())?;
    Ok((
        request::side_field("size", width)?,
        request::side_field("size", height)?,
    ))
}

fn response(
    state: &AppState,
    headers: &HeaderMap,
    format: ResponseFormat,
    generation: Generation,
) -> Value {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let data: Vec<Value> = generation
        .images
        .into_iter()
        .map(|image| match format {
            ResponseFormat::B64Json => {
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(&image.png)})
            }
            ResponseFormat::Url => {
                let name = state.files.keep(image.png);
                json!({"url": format!("http://{host}/v1/images/files/{name}")})
            }
        })
        .collect();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({"created": created, "data": data})
}

/// The multipart form of an edit: the image, the optional mask, and the text fields.
struct EditForm {
    image: Option<DynamicImage>,
    mask: Option<DynamicImage>,
    fields: Fields,
}

impl EditForm {
    async fn read(mut multipart: Multipart) -> Result<Self, ApiError> {
        let mut form = Self {
            image: None,
            mask: None,
            fields: Fields::default(),
        };
        let mut text = serde_json::Map::new();
        loop {
            let field = multipart.next_field().await.map_err(|error| {
                ApiError::malformed(None, format!("the multipart body is malformed: {error}"))
            })?;
            let Some(field) = field else { break };
            let name = field.name().unwrap_or_default().to_string();
            let bytes = field.bytes().await.map_err(|error| {
                ApiError::malformed(
                    Some(name.clone()),
                    format!("{name}: cannot read it: {error}"),
                )
            })?;
            match name.as_str() {
                // gpt-image-1 takes several images as image[]; the first is edited.
                "image" | "image[]" if form.image.is_none() => {
                    form.image = Some(request::decode_image("image", &bytes)?);
                }
                "mask" => form.mask = Some(request::decode_image("mask", &bytes)?),
                _ => {
                    let value = String::from_utf8_lossy(&bytes).into_owned();
                    let value = if NUMERIC_FIELDS.contains(&name.as_str()) {
                        number(value)
                    } else {
                        value.into()
                    };
                    text.insert(name, value);
                }
            }
        }
        let body = serde_json::to_vec(&text).expect("a JSON map serialises");
        form.fields = parse_json(&body)?;
        Ok(form)
    }

    /// OpenAI's mask: fully transparent areas are edited. Without a mask, the image's own
    /// transparency is, and an opaque image without one is changed as a whole (img2img).
    fn source(&self) -> Result<SourceRequest, ApiError> {
        let image = self
            .image
            .as_ref()
            .ok_or_else(|| ApiError::invalid("image", "an image file is required"))?;
        let mask = match &self.mask {
            Some(mask) => {
                if (mask.width(), mask.height()) != (image.width(), image.height()) {
                    return Err(ApiError::invalid(
                        "mask",
                        format!(
                            "the mask is {}x{} but the image is {}x{}; they must match",
                            mask.width(),
                            mask.height(),
                            image.width(),
                            image.height()
                        ),
                    ));
                }
                if !mask.color().has_alpha() {
                    return Err(ApiError::invalid(
                        "mask",
                        "the mask needs an alpha channel: its transparent areas are edited",
                    ));
                }
                Some(transparent_repaints(mask))
            }
            None if has_transparency(image) => Some(transparent_repaints(image)),
            None => None,
        };
        let default_strength = if mask.is_some() {
            1.0
        } else {
            DEFAULT_EDIT_STRENGTH
        };
        let strength = request::number_field(
            "strength",
            self.fields.strength.unwrap_or(default_strength),
            0.0,
            1.0,
        )?;
        Ok(SourceRequest {
            images: vec![image.to_rgb8()],
            mask,
            strength,
        })
    }
}

fn has_transparency(image: &DynamicImage) -> bool {
    image.color().has_alpha() && image.to_rgba8().pixels().any(|p| p.0[3] != 255)
}

/// A white-repaints mask from transparency: white where alpha is low.
fn transparent_repaints(image: &DynamicImage) -> RgbImage {
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let value = 255 - rgba.get_pixel(x, y).0[3];
        image::Rgb([value; 3])
    })
}

/// The multipart text fields that carry numbers.
const NUMERIC_FIELDS: &[&str] = &["n", "seed", "steps", "cfg_scale", "strength"];

/// A numeric multipart field as JSON: a number when it reads as one, else the string (which
/// then fails to parse, naming the field).
fn number(value: String) -> Value {
    if let Ok(integer) = value.trim().parse::<i64>() {
        return integer.into();
    }
    match value.trim().parse::<f64>() {
        Ok(number) if number.is_finite() => number.into(),
        _ => value.into(),
    }
}

/// A 404 in OpenAI's shape for unknown paths.
pub async fn not_found() -> Response {
    let error = ApiError::new(super::error::ErrorKind::NotFound, "no such endpoint");
    OpenAiError(error).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_name_the_field() {
        assert_eq!(parse_size("64x32"), Ok((64, 32)));
        for bad in ["64", "axb", "0x64", "65x64", "99999x64"] {
            let error = parse_size(bad).unwrap_err();
            assert_eq!(error.field.as_deref(), Some("size"), "{bad}");
        }
    }

    #[test]
    fn transparency_becomes_the_repaint_mask() {
        let mut rgba = image::RgbaImage::from_pixel(2, 1, image::Rgba([9, 9, 9, 255]));
        rgba.put_pixel(0, 0, image::Rgba([9, 9, 9, 0]));
        let image = DynamicImage::ImageRgba8(rgba);
        assert!(has_transparency(&image));
        assert_eq!(
            transparent_repaints(&image).as_raw(),
            &vec![255, 255, 255, 0, 0, 0]
        );
        assert_eq!(number("4".into()), json!(4));
        assert_eq!(number("0.5".into()), json!(0.5));
        assert_eq!(number("many".into()), json!("many"));
    }
}
