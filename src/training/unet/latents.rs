//! The latent cache: the frozen VAE's posterior of every training image, encoded once, from
//! which every step draws fresh latents.

use candle_core::{Device, Tensor};

use super::super::data::ImageFolder;
use crate::models::vae::{AutoencoderKL, DiagonalGaussian};
use crate::rng::TorchGenerator;

/// The frozen VAE's posterior of every image (rows `0..n`) and, with flips, of every mirrored
/// image (rows `n..2n`), kept on the training device (4·(h/8)·(w/8) f32 values twice per
/// image: 128 KiB at 512²), so that a batch is gathered there without a host round trip.
pub(super) struct LatentCache {
    mean: Tensor,
    logvar: Tensor,
    images: usize,
    scaling_factor: f64,
    shift_factor: Option<f64>,
}

impl LatentCache {
    pub(super) fn encode(
        vae: &AutoencoderKL,
        images: &ImageFolder,
        mirrored: bool,
        chunk: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let n = images.len();
        let orientations: &[bool] = if mirrored { &[false, true] } else { &[false] };
        let (mut means, mut logvars) = (Vec::new(), Vec::new());
        for &flip in orientations {
            let indices: Vec<usize> = (0..n).collect();
            for part in indices.chunks(chunk.max(1)) {
                let (pixels, _) = images.load_batch(part, &vec![flip; part.len()], device)?;
                let posterior = vae.encode(&pixels)?;
                means.push(posterior.mean);
                logvars.push(posterior.logvar);
            }
        }
        let cfg = vae.config();
        // The posterior's halves are views of the encoder's moments; with a single chunk `cat`
        // returns that view, and the rows are gathered from it with `index_select`, which
        // needs contiguous storage.
        Ok(Self {
            mean: Tensor::cat(&means, 0)?.contiguous()?,
            logvar: Tensor::cat(&logvars, 0)?.contiguous()?,
            images: n,
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift_factor,
        })
    }

    /// Scaled latents x₀ `[B, C, h, w]` (f32, on `device`) of items `indices`, mirrored where
    /// `flips` says, each a fresh posterior sample drawn from `generator`.
    pub(super) fn sample(
        &self,
        indices: &[usize],
        flips: &[bool],
        generator: &mut TorchGenerator,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        let rows: Vec<u32> = indices
            .iter()
            .zip(flips)
            .map(|(&i, &flip)| (i + if flip { self.images } else { 0 }) as u32)
            .collect();
        let rows = Tensor::new(rows.as_slice(), self.mean.device())?;
        let posterior = DiagonalGaussian {
            mean: self.mean.index_select(&rows, 0)?,
            logvar: self.logvar.index_select(&rows, 0)?,
        };
        let eps = standard_normal(generator, posterior.mean.dims(), device)?;
        let mut z = posterior.sample(&eps)?;
        if let Some(shift) = self.shift_factor {
            z = (z - shift)?;
        }
        Ok((z * self.scaling_factor)?)
    }
}

/// N(0, 1) noise of `shape` from the torch-compatible generator, drawn on the CPU.
pub(super) fn standard_normal(
    generator: &mut TorchGenerator,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let count = shape.iter().product();
    Tensor::from_vec(generator.randn(count), shape, &Device::Cpu)?.to_device(device)
}
