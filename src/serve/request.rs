//! One generation request as both APIs describe it once parsed and checked, what the queue
//! runs, and the limits every request is held to.

use image::RgbImage;

use super::error::ApiError;
use crate::schedulers::SamplerKind;

/// The largest width or height served, in pixels.
pub const MAX_SIDE: i64 = 2048;
/// The most images one request may ask for.
pub const MAX_IMAGES: i64 = 64;
/// The most denoising steps one request may ask for.
pub const MAX_STEPS: i64 = 1000;

/// A checked generation request, independent of the API it came through.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// What the progress endpoint calls the job ("txt2img", "img2img", ...).
    pub job: &'static str,
    /// The model to run; `None` is the selected one.
    pub model: Option<String>,
    pub prompt: String,
    pub negative_prompt: String,
    /// The first image's seed; image `i` uses `seed + i`.
    pub seed: u64,
    pub sampler: SamplerKind,
    /// Karras sigmas whatever the scheduler config says ("DPM++ 2M Karras").
    pub karras: bool,
    pub steps: usize,
    /// `None`: the model's recommended scale, else 7.5 (as the CLI).
    pub guidance_scale: Option<f64>,
    pub eta: f64,
    /// `None`: the model's native size (txt2img) or the source image's (img2img).
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Batches run one after the other (A1111's `n_iter`).
    pub batches: usize,
    /// Images per batch, denoised together.
    pub batch_size: usize,
    pub source: Option<SourceRequest>,
}

impl ImageRequest {
    pub fn image_count(&self) -> usize {
        self.batches * self.batch_size
    }

    /// The seed of every image, in order.
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.image_count() as u64)
            .map(|i| self.seed.wrapping_add(i))
            .collect()
    }
}

/// What img2img and inpainting start from.
#[derive(Debug, Clone)]
pub struct SourceRequest {
    /// Image `i` of a batch starts from `images[i % len]`.
    pub images: Vec<RgbImage>,
    /// White repaints, black keeps (the CLI's convention).
    pub mask: Option<RgbImage>,
    pub strength: f64,
}

/// One finished image: its PNG (with the A1111 infotext chunk) and its record.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub infotext: String,
    pub seed: u64,
}

/// What a request produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub images: Vec<GeneratedImage>,
    pub model: String,
    pub width: usize,
    pub height: usize,
    /// Stopped early by an interrupt: the last batch is only partly denoised and later
    /// batches were not run.
    pub interrupted: bool,
}

/// A random seed, as the CLI draws one.
pub fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}

/// `seed` with A1111's -1 (or none) meaning random.
pub fn seed_field(field: &str, seed: Option<i64>) -> Result<u64, ApiError> {
    match seed {
        None | Some(-1) => Ok(random_seed()),
        Some(seed) if seed >= 0 => Ok(seed as u64),
        Some(seed) => Err(ApiError::invalid(
            field,
            format!("{seed} is not a seed: give a number >= 0, or -1 for a random one"),
        )),
    }
}

/// An image side: positive, at most [`MAX_SIDE`], a multiple of 8 (the VAE's factor).
pub fn side_field(field: &str, value: i64) -> Result<usize, ApiError> {
    if value <= 0 || value > MAX_SIDE || value % 8 != 0 {
        return Err(ApiError::invalid(
            field,
            format!("{value} is not a usable size: give a multiple of 8 from 8 to {MAX_SIDE}"),
        ));
    }
    Ok(value as usize)
}

/// A count in `1..=max`.
pub fn count_field(field: &str, value: i64, max: i64) -> Result<usize, ApiError> {
    if !(1..=max).contains(&value) {
        return Err(ApiError::invalid(
            field,
            format!("{value} is out of range: give 1 to {max}"),
        ));
    }
    Ok(value as usize)
}

/// A finite number in `min..=max`.
pub fn number_field(field: &str, value: f64, min: f64, max: f64) -> Result<f64, ApiError> {
    if !(value.is_finite() && (min..=max).contains(&value)) {
        return Err(ApiError::invalid(
            field,
            format!("{value} is out of range: give {min} to {max}"),
        ));
    }
    Ok(value)
}

/// Checks the total number of images of a request.
pub fn check_image_count(field: &str, batches: usize, batch_size: usize) -> Result<(), ApiError> {
    let total = batches * batch_size;
    if total as i64 > MAX_IMAGES {
        return Err(ApiError::invalid(
            field,
            format!(
                "{total} images were asked for; this server makes at most {MAX_IMAGES} per request"
            ),
        ));
    }
    Ok(())
}

/// Decodes an image sent as base64 (optionally a `data:image/...;base64,` URL).
pub fn decode_base64_image(field: &str, text: &str) -> Result<image::DynamicImage, ApiError> {
    use base64::Engine;
    let data = match text.strip_prefix("data:") {
        Some(url) => url.split_once(',').map_or("", |(_, data)| data),
        None => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|error| ApiError::invalid(field, format!("not valid base64 ({error})")))?;
    decode_image(field, &bytes)
}

/// Decodes image file bytes in any format the image crate reads.
pub fn decode_image(field: &str, bytes: &[u8]) -> Result<image::DynamicImage, ApiError> {
    image::load_from_memory(bytes)
        .map_err(|error| ApiError::invalid(field, format!("not a readable image ({error})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn fields_are_checked_and_named() {
        assert_eq!(side_field("width", 64), Ok(64));
        for bad in [0, -8, 65, MAX_SIDE + 8] {
            let error = side_field("width", bad).unwrap_err();
            assert!(error.message.starts_with("width: "), "{error:?}");
            assert_eq!(error.field.as_deref(), Some("width"));
        }
        assert_eq!(seed_field("seed", Some(7)), Ok(7));
        assert!(seed_field("seed", Some(-1)).unwrap() <= u32::MAX as u64);
        assert!(seed_field("seed", Some(-2)).is_err());
        assert!(count_field("n", 0, 10).is_err());
        assert!(number_field("cfg_scale", f64::NAN, 0.0, 30.0).is_err());
        assert!(check_image_count("n_iter", 8, 9).is_err());
    }

    #[test]
    fn base64_images_decode_with_or_without_data_url() {
        let image = RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let png = crate::image_io::encode_png(&image, "x").unwrap();
        let text = base64::engine::general_purpose::STANDARD.encode(&png);
        for sent in [text.clone(), format!("data:image/png;base64,{text}")] {
            let decoded = decode_base64_image("init_images", &sent).unwrap();
            assert_eq!(decoded.to_rgb8(), image);
        }
        let error = decode_base64_image("mask", "%%%").unwrap_err();
        assert!(
            error.message.starts_with("mask: not valid base64"),
            "{error:?}"
        );
        let garbage = base64::engine::general_purpose::STANDARD.encode(b"not an image");
        let error = decode_base64_image("mask", &garbage).unwrap_err();
        assert!(
            error.message.starts_with("mask: not a readable image"),
            "{error:?}"
        );
    }
}
