//! The latent scaling factor, measured as the LDM paper does: `1 / std` of sampled latents of
//! the training images.

use candle_core::{DType, Device, Tensor};

use super::super::data::ImageFolder;
use crate::models::vae::AutoencoderKL;
use crate::rng::TorchGenerator;

/// The scaling factor is measured on at most this many training images.
pub const SCALING_FACTOR_IMAGES: usize = 1024;
/// Offsets the run's seed for the measurement's generator, apart from the training one.
const LATENT_SEED_OFFSET: u64 = 0x5ca1e;

/// `1 / std` of latents sampled by `vae` (z = μ + σ·ε, ε from a generator seeded apart from the
/// training one) for up to `SCALING_FACTOR_IMAGES` images of `data`, `batch_size` at a time.
pub(super) fn measure_scaling_factor(
    vae: &AutoencoderKL,
    data: &ImageFolder,
    seed: u64,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<f64> {
    let mut generator = TorchGenerator::new(seed.wrapping_add(LATENT_SEED_OFFSET));
    let count = data.len().min(SCALING_FACTOR_IMAGES);
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0usize);
    for chunk in (0..count).collect::<Vec<_>>().chunks(batch_size.max(1)) {
        let (images, _) = data.load_batch(chunk, &vec![false; chunk.len()], device)?;
        let posterior = vae.encode(&images)?;
        let shape = posterior.mean.shape().clone();
        let eps = Tensor::from_vec(generator.randn(shape.elem_count()), shape, &Device::Cpu)?
            .to_device(device)?;
        let z = posterior
            .sample(&eps)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?;
        sum += z.sum_all()?.to_scalar::<f64>()?;
        sum_sq += z.sqr()?.sum_all()?.to_scalar::<f64>()?;
        n += z.elem_count();
    }
    anyhow::ensure!(n > 1, "too few latents to measure the scaling factor");
    // Unbiased variance, as torch's `std()`.
    let variance = (sum_sq - sum * sum / n as f64) / (n - 1) as f64;
    anyhow::ensure!(
        variance > 0.0 && variance.is_finite(),
        "the latents have no spread (variance {variance}); cannot set scaling_factor"
    );
    Ok(1.0 / variance.sqrt())
}
