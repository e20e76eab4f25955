//! Images in and out: decoded latents to RGB, PNGs that record how they were made, written
//! atomically, and input images read with their path named in every error.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// The key A1111 and its ecosystem read generation parameters from.
pub const PARAMETERS_KEY: &str = "parameters";

/// VAE decoder output `[B, 3, H, W]` in [-1, 1] to 8-bit images, as diffusers does:
/// `clamp(x / 2 + 0.5, 0, 1)` in f32, then numpy's `(v * 255).round()` (ties to even).
pub fn decoded_to_images(decoded: &Tensor) -> anyhow::Result<Vec<RgbImage>> {
    let (batch, channels, height, width) = decoded.dims4()?;
    if channels != 3 {
        bail!("the VAE decoded {channels} channels, expected 3 (RGB)");
    }
    let unit = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?;
    (0..batch)
        .map(|i| {
            let data = unit
                .get(i)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|v| (v * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(width as u32, height as u32, data)
                .context("decoded image has an inconsistent size")
        })
        .collect()
}

/// Writes `image` as PNG with `parameters` in a text chunk, through a temporary file renamed
/// into place, so a crash never leaves a half-written image. Refuses to replace an existing
/// file unless `overwrite`.
pub fn save_png(
    image: &RgbImage,
    path: &Path,
    parameters: &str,
    overwrite: bool,
) -> anyhow::Result<()> {
    if !overwrite && path.exists() {
        bail!(
            "{} already exists (pass --overwrite to replace it)",
            path.display()
        );
    }
    let bytes = encode_png(image, parameters)?;
    crate::durable::write_atomically(path, &bytes, overwrite)
}

/// Encodes an RGB PNG with one text chunk: tEXt when the text is Latin-1, else iTXt (as PIL
/// does for A1111).
pub fn encode_png(image: &RgbImage, parameters: &str) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let key = PARAMETERS_KEY.to_string();
    if parameters.chars().all(|c| (c as u32) < 256) {
        encoder.add_text_chunk(key, parameters.to_string())?;
    } else {
        encoder.add_itxt_chunk(key, parameters.to_string())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(bytes)
}

/// Reads the `parameters` text of a PNG (tEXt, zTXt or iTXt), if any.
pub fn read_png_parameters(path: &Path) -> anyhow::Result<Option<String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
        .map(|c| c.text.clone());
    let utf8 = || {
        info.utf8_text
            .iter()
            .find(|c| c.keyword == PARAMETERS_KEY)
            .and_then(|c| c.get_text().ok())
    };
    Ok(latin1.or_else(utf8))
}

/// Decodes an image of any supported format (told by its content), naming the path when it
/// cannot.
pub fn decode_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))
}

/// Opens an image of any supported format as RGB (an alpha channel is dropped).
pub fn load_rgb(path: &Path) -> anyhow::Result<RgbImage> {
    Ok(decode_image(path)?.to_rgb8())
}

/// A source image as diffusers' `VaeImageProcessor` prepares it: resized (Lanczos) to
/// `width`x`height` when its size differs, then `[3, H, W]` in [-1, 1] (f32, CPU).
pub fn source_image_tensor(
    image: &RgbImage,
    width: usize,
    height: usize,
) -> anyhow::Result<Tensor> {
    let image = resize_rgb(image, width, height);
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 255.0 * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (height, width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// An inpainting mask as diffusers' mask processor prepares it: grayscale with PIL's `L`
/// weights, resized to `width`x`height`, then binarised (>= 0.5 → 1: repaint). `[1, H, W]`.
pub fn mask_tensor(mask: &RgbImage, width: usize, height: usize) -> anyhow::Result<Tensor> {
    let gray = image::GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        let [r, g, b] = mask.get_pixel(x, y).0.map(u32::from);
        // PIL's ITU-R 601-2 luma in 16-bit fixed point.
        image::Luma([((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8])
    });
    let gray = if (gray.width() as usize, gray.height() as usize) == (width, height) {
        gray
    } else {
        image::imageops::resize(
            &gray,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        )
    };
    let data: Vec<f32> = gray
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(data, (1, height, width), &Device::Cpu)?)
}

fn resize_rgb(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    if (image.width() as usize, image.height() as usize) == (width, height) {
        image.clone()
    } else {
        image::imageops::resize(
            image,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        )
    }
}

/// diffusers' default size for a source image: its own, rounded down to a multiple of `factor`.
pub fn default_size(image: &RgbImage, factor: usize) -> (usize, usize) {
    let round = |v: u32| (v as usize / factor) * factor;
    (round(image.width()), round(image.height()))
}

/// Equally sized images in a grid of `columns` columns, row by row, on white with `gutter`
/// pixels between cells (sample sheets).
pub fn image_grid(images: &[RgbImage], columns: usize, gutter: u32) -> RgbImage {
    let Some(first) = images.first() else {
        return RgbImage::new(1, 1);
    };
    let (width, height) = first.dimensions();
    let columns = columns.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(columns);
    let span = |cells: u32, size: u32| cells * size + (cells - 1) * gutter;
    let mut grid = RgbImage::from_pixel(
        span(columns, width),
        span(rows, height),
        image::Rgb([255, 255, 255]),
    );
    for (i, image) in images.iter().enumerate() {
        let (column, row) = (i as u32 % columns, i as u32 / columns);
        let x = column * (width + gutter);
        let y = row * (height + gutter);
        image::imageops::replace(&mut grid, image, x as i64, y as i64);
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_survive_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let image = RgbImage::from_fn(8, 4, |x, y| image::Rgb([x as u8 * 30, y as u8 * 60, 7]));
        for (name, text) in [
            ("latin.png", "a cat\nSteps: 5"),
            ("utf8.png", "一只猫 🐱\nSteps: 5"),
        ] {
            let path = dir.path().join(name);
            save_png(&image, &path, text, false).unwrap();
            assert_eq!(read_png_parameters(&path).unwrap().as_deref(), Some(text));
            assert_eq!(load_rgb(&path).unwrap(), image);
        }
    }

    #[test]
    fn existing_files_are_kept_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let image = RgbImage::new(2, 2);
        save_png(&image, &path, "first", false).unwrap();
        let err = save_png(&image, &path, "second", false).unwrap_err();
        assert!(err.to_string().contains("--overwrite"), "{err}");
        assert_eq!(
            read_png_parameters(&path).unwrap().as_deref(),
            Some("first")
        );
        save_png(&image, &path, "second", true).unwrap();
        assert_eq!(
            read_png_parameters(&path).unwrap().as_deref(),
            Some("second")
        );
    }

    #[test]
    fn masks_are_binarised_and_sources_normalised() {
        let mask = RgbImage::from_fn(4, 2, |x, _| {
            if x < 2 {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([100, 120, 130])
            }
        });
        let mask = mask_tensor(&mask, 4, 2).unwrap();
        assert_eq!(
            mask.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1., 1., 0., 0., 1., 1., 0., 0.]
        );
        let source = RgbImage::from_fn(2, 1, |x, _| image::Rgb([0, 255 * x as u8, 51]));
        let source = source_image_tensor(&source, 2, 1).unwrap();
        assert_eq!(source.dims(), [3, 1, 2]);
        let values = source.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&values[..4], &[-1.0, -1.0, -1.0, 1.0]);
        assert_eq!(default_size(&RgbImage::new(70, 33), 8), (64, 32));
    }

    #[test]
    fn decoded_values_map_like_diffusers() {
        let decoded = Tensor::new(&[-1.5f32, -1.0, 0.0, 0.5, 1.0, 3.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 2))
            .unwrap();
        let images = decoded_to_images(&decoded).unwrap();
        // x/2+0.5 clamped, times 255, ties to even: 0, 0 | 128 (127.5), 191 | 255, 255
        assert_eq!(images[0].as_raw(), &vec![0, 128, 255, 0, 191, 255]);
    }

    #[test]
    fn grid_places_images_row_by_row_with_gutters() {
        let images: Vec<RgbImage> = (0..5)
            .map(|i| RgbImage::from_pixel(4, 3, image::Rgb([i, 0, 0])))
            .collect();
        let grid = image_grid(&images, 3, 2);
        assert_eq!(grid.dimensions(), (3 * 4 + 2 * 2, 2 * 3 + 2));
        assert_eq!(grid.get_pixel(6, 0).0, [1, 0, 0]);
        assert_eq!(grid.get_pixel(4, 0).0, [255, 255, 255], "gutter");
        assert_eq!(grid.get_pixel(6, 5).0, [4, 0, 0]);
        assert_eq!(grid.get_pixel(15, 7).0, [255, 255, 255], "empty cell");
        assert_eq!(image_grid(&images, 0, 0).dimensions(), (4, 15));
    }
}
