//! A folder of captioned training images, in the Hugging Face `imagefolder` convention.
//!
//! Captions come from `DIR/metadata.jsonl` (one JSON object per line with `file_name`, relative
//! to DIR, and `text`: a caption, or a list of alternative captions of which training picks one
//! at random each time, as diffusers' `train_text_to_image.py` does) or, for images it does not list, from a `.txt` file beside the image with
//! the same stem. Images are found recursively (png, jpg, jpeg, webp). Anything unusable — an
//! image that does not decode, an image without a caption, a bad metadata line — is recorded in
//! `skipped` with its path and reason and left out; it never stops training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{Rgb, RgbImage, RgbaImage};
use serde::Deserialize;

use super::metrics::TrainObserver;
use super::SplitMix64;

/// The file HF `imagefolder` reads captions from.
pub const METADATA_FILE: &str = "metadata.jsonl";
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

#[derive(Debug, Clone, PartialEq)]
pub struct CaptionedImage {
    pub path: PathBuf,
    /// One or more alternative captions (never empty).
    pub captions: Vec<String>,
}

impl CaptionedImage {
    /// The first caption: the one used where a single fixed caption is needed.
    pub fn caption(&self) -> &str {
        &self.captions[0]
    }
}

#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Usable images, sorted by path.
    pub items: Vec<CaptionedImage>,
    /// What was left out, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    resolution: usize,
}

#[derive(Deserialize)]
struct MetadataLine {
    file_name: String,
    text: MetadataText,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MetadataText {
    One(String),
    Alternatives(Vec<String>),
}

impl ImageFolder {
    /// Scans `dir`, decoding every image once so that a broken one is found (and skipped) here
    /// rather than in the middle of training.
    pub fn open(dir: &Path, resolution: usize) -> anyhow::Result<Self> {
        if resolution == 0 {
            anyhow::bail!("the training resolution must be positive");
        }
        if !dir.is_dir() {
            anyhow::bail!("training data folder {} does not exist", dir.display());
        }
        let mut skipped = Vec::new();
        let metadata = read_metadata(dir, &mut skipped)?;
        let mut items = Vec::new();
        for path in image_files(dir)? {
            let captions = match metadata.get(&path) {
                Some(texts) => Some(texts.clone()),
                None => read_sidecar_caption(&path, &mut skipped).map(|c| vec![c]),
            };
            let Some(captions) = captions else { continue };
            match load_rgb_on_white(&path) {
                Ok(_) => items.push(CaptionedImage { path, captions }),
                Err(e) => skipped.push((path, format!("{e:#}"))),
            }
        }
        let listed_but_missing = metadata.keys().filter(|p| !p.is_file());
        for path in listed_but_missing {
            skipped.push((
                path.clone(),
                format!("listed in {METADATA_FILE} but missing"),
            ));
        }
        skipped.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            items,
            skipped,
            resolution,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Tells `observer` of each file left out, and why.
    pub fn report_skipped(&self, observer: &mut dyn TrainObserver) {
        for (path, reason) in &self.skipped {
            observer.on_message(&format!("warning: skipping {}: {reason}", path.display()));
        }
    }

    /// Items `indices` as `[B, 3, R, R]` f32 in [-1, 1] on `device`, with their first captions;
    /// `flip[i]` mirrors item `i` horizontally.
    pub fn load_batch(
        &self,
        indices: &[usize],
        flip: &[bool],
        device: &Device,
    ) -> anyhow::Result<(Tensor, Vec<String>)> {
        anyhow::ensure!(
            indices.len() == flip.len(),
            "{} indices but {} flip flags",
            indices.len(),
            flip.len()
        );
        let r = self.resolution;
        let mut values = Vec::with_capacity(indices.len() * 3 * r * r);
        let mut captions = Vec::with_capacity(indices.len());
        for (&index, &mirrored) in indices.iter().zip(flip) {
            let item = self.items.get(index).with_context(|| {
                format!("image index {index} out of range ({} images)", self.len())
            })?;
            let mut image = resize_and_center_crop(&load_rgb_on_white(&item.path)?, r);
            if mirrored {
                image::imageops::flip_horizontal_in_place(&mut image);
            }
            values.extend(channels_first_unit_range(&image));
            captions.push(item.caption().to_string());
        }
        let batch = Tensor::from_vec(values, (indices.len(), 3, r, r), &Device::Cpu)?;
        Ok((batch.to_device(device)?, captions))
    }
}

/// `metadata.jsonl` as image path → captions; malformed lines (an empty caption list included)
/// are recorded in `skipped`.
fn read_metadata(
    dir: &Path,
    skipped: &mut Vec<(PathBuf, String)>,
) -> anyhow::Result<HashMap<PathBuf, Vec<String>>> {
    let path = dir.join(METADATA_FILE);
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut captions = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_error = |why: String| (path.clone(), format!("line {}: {why}", number + 1));
        match serde_json::from_str::<MetadataLine>(line) {
            Ok(MetadataLine {
                text: MetadataText::Alternatives(texts),
                ..
            }) if texts.is_empty() => skipped.push(line_error("an empty caption list".into())),
            Ok(entry) => {
                let texts = match entry.text {
                    MetadataText::One(text) => vec![text],
                    MetadataText::Alternatives(texts) => texts,
                };
                captions.insert(dir.join(entry.file_name), texts);
            }
            Err(e) => skipped.push(line_error(e.to_string())),
        }
    }
    Ok(captions)
}

/// Every image file under `dir`, recursively, sorted.
fn image_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder)
            .with_context(|| format!("cannot list {}", folder.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot list {}", folder.display()))?
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if is_image(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The caption in `<stem>.txt` beside the image, or a skip record when there is none.
fn read_sidecar_caption(image: &Path, skipped: &mut Vec<(PathBuf, String)>) -> Option<String> {
    let sidecar = image.with_extension("txt");
    match std::fs::read_to_string(&sidecar) {
        Ok(text) => Some(text.trim().to_string()),
        Err(_) => {
            let reason = format!(
                "no caption (not in {METADATA_FILE}, no {})",
                sidecar.display()
            );
            skipped.push((image.to_path_buf(), reason));
            None
        }
    }
}

/// Decodes an image of any supported format; transparency is composited on white.
fn load_rgb_on_white(path: &Path) -> anyhow::Result<RgbImage> {
    let decoded = crate::image_io::decode_image(path)?;
    if !decoded.color().has_alpha() {
        return Ok(decoded.to_rgb8());
    }
    let rgba: RgbaImage = decoded.to_rgba8();
    Ok(RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0.map(u32::from);
        let over_white = |c: u32| ((c * a + 255 * (255 - a) + 127) / 255) as u8;
        Rgb([over_white(r), over_white(g), over_white(b)])
    }))
}

/// torchvision's `Resize(r)` (bilinear, shorter side to r) then `CenterCrop(r)`, as the
/// diffusers training scripts prepare images.
fn resize_and_center_crop(image: &RgbImage, r: usize) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let scale = r as f64 / w.min(h) as f64;
    let (new_w, new_h) = if w <= h {
        (r, ((h as f64 * scale) as usize).max(r))
    } else {
        (((w as f64 * scale) as usize).max(r), r)
    };
    let resized = if (new_w, new_h) == (w, h) {
        image.clone()
    } else {
        image::imageops::resize(image, new_w as u32, new_h as u32, FilterType::Triangle)
    };
    let left = ((new_w - r) as f64 / 2.0).round() as u32;
    let top = ((new_h - r) as f64 / 2.0).round() as u32;
    image::imageops::crop_imm(&resized, left, top, r as u32, r as u32).to_image()
}

/// `[3, H, W]` values in [-1, 1], channel-major.
fn channels_first_unit_range(image: &RgbImage) -> Vec<f32> {
    let raw = image.as_raw();
    (0..3)
        .flat_map(|c| raw.iter().skip(c).step_by(3))
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect()
}

/// A shuffled order of `0..len` that depends only on `(seed, epoch)` (Fisher-Yates over
/// SplitMix64), so a resumed run sees the same batches.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SplitMix64::for_stream(seed, &format!("epoch order {epoch}"));
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Whether each position of an epoch is mirrored (probability 1/2), from `(seed, epoch)` alone.
pub fn epoch_flips(len: usize, seed: u64, epoch: usize) -> Vec<bool> {
    let mut rng = SplitMix64::for_stream(seed, &format!("epoch flips {epoch}"));
    (0..len).map(|_| rng.next_u64() >> 63 == 1).collect()
}

/// A `size`×`size` window of each image of `[B, C, H, W]` `images`, each at a random position.
pub fn random_crops(images: &Tensor, size: usize, rng: &mut SplitMix64) -> anyhow::Result<Tensor> {
    let (batch, _, height, width) = images.dims4()?;
    anyhow::ensure!(
        size > 0 && size <= height.min(width),
        "the crop size ({size}) must be between 1 and the training resolution ({})",
        height.min(width)
    );
    let crops = (0..batch)
        .map(|i| {
            let (top, left) = (rng.below(height - size + 1), rng.below(width - size + 1));
            images
                .narrow(0, i, 1)?
                .narrow(2, top, size)?
                .narrow(3, left, size)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&crops, 0)?)
}

/// Where a run is in its data: the epoch, and how many images of it were consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataCursor {
    pub epoch: usize,
    pub position_in_epoch: usize,
}

/// The next batch's indices and flip flags, advancing `cursor`. Each epoch is a fresh
/// `epoch_order`; a last partial batch is dropped (every batch has `batch_size` images).
pub fn next_batch(
    cursor: &mut DataCursor,
    len: usize,
    batch_size: usize,
    seed: u64,
    flip: bool,
) -> anyhow::Result<(Vec<usize>, Vec<bool>)> {
    anyhow::ensure!(batch_size > 0, "the batch size must be positive");
    anyhow::ensure!(
        batch_size <= len,
        "the batch size ({batch_size}) exceeds the number of usable images ({len})"
    );
    if cursor.position_in_epoch + batch_size > len {
        cursor.epoch += 1;
        cursor.position_in_epoch = 0;
    }
    let range = cursor.position_in_epoch..cursor.position_in_epoch + batch_size;
    let indices = epoch_order(len, seed, cursor.epoch)[range.clone()].to_vec();
    let flips = if flip {
        epoch_flips(len, seed, cursor.epoch)[range].to_vec()
    } else {
        vec![false; batch_size]
    };
    cursor.position_in_epoch += batch_size;
    Ok((indices, flips))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_crops_are_windows_of_their_own_image() {
        let images = Tensor::arange(0f32, 2.0 * 36.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 6, 6))
            .unwrap();
        let crops = random_crops(&images, 4, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(crops.dims(), &[2, 1, 4, 4]);
        for i in 0..2 {
            let crop: Vec<Vec<f32>> = crops.get(i).unwrap().get(0).unwrap().to_vec2().unwrap();
            let (top, left) = ((crop[0][0] as usize % 36) / 6, crop[0][0] as usize % 6);
            assert_eq!(crop[0][0] as usize / 36, i, "crop {i} comes from image {i}");
            for (y, row) in crop.iter().enumerate() {
                for (x, &v) in row.iter().enumerate() {
                    assert_eq!(v as usize, i * 36 + (top + y) * 6 + left + x);
                }
            }
        }
        assert!(random_crops(&images, 7, &mut SplitMix64::new(3)).is_err());
    }

    #[test]
    fn resize_keeps_aspect_and_crops_the_centre() {
        // 24x4 in red | green | blue bands of 8: the shorter side to 2 gives 12x2, whose
        // centre 2x2 (columns 5 and 6) lies well inside the green band.
        let bands = [[255, 0, 0], [0, 255, 0], [0, 0, 255]];
        let image = RgbImage::from_fn(24, 4, |x, _| Rgb(bands[x as usize / 8]));
        let out = resize_and_center_crop(&image, 2);
        assert_eq!(out.dimensions(), (2, 2));
        assert!(out.pixels().all(|p| p.0 == [0, 255, 0]));
        let unit = channels_first_unit_range(&out);
        assert_eq!(&unit[..8], &[-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]);
        // Tall images keep their width and lose top and bottom.
        let tall = RgbImage::from_fn(2, 6, |_, y| Rgb(bands[y as usize / 2]));
        assert!(resize_and_center_crop(&tall, 2)
            .pixels()
            .all(|p| p.0 == [0, 255, 0]));
    }

    #[test]
    fn batches_walk_epochs_and_drop_the_partial_tail() {
        let mut cursor = DataCursor::default();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (indices, flips) = next_batch(&mut cursor, 7, 3, 5, false).unwrap();
            assert!(flips.iter().all(|f| !f));
            seen.push((cursor, indices));
        }
        assert_eq!(seen[1].1, epoch_order(7, 5, 0)[3..6]);
        assert_eq!(
            seen[2].0,
            DataCursor {
                epoch: 1,
                position_in_epoch: 3
            }
        );
        assert_eq!(seen[2].1, epoch_order(7, 5, 1)[..3]);
        assert!(next_batch(&mut cursor, 2, 3, 5, false).is_err());
    }
}
