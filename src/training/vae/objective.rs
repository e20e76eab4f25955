//! The VAE's training objective: the negative ELBO of one batch (see the module documentation
//! of `training::vae` for its normalisation).

use candle_core::{DType, Device, Tensor};

use super::ReconLoss;
use crate::models::vae::AutoencoderKL;

/// The terms of the negative ELBO for one batch (scalars, f32 — or the model dtype if wider).
pub struct NegativeElbo {
    pub reconstruction: Tensor,
    pub kl: Tensor,
    pub total: Tensor,
}

impl NegativeElbo {
    /// (reconstruction, KL, total) as f64, read back with one device sync.
    pub fn values(&self) -> candle_core::Result<[f64; 3]> {
        let values = Tensor::stack(&[&self.reconstruction, &self.kl, &self.total], 0)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok([values[0], values[1], values[2]])
    }
}

/// The negative ELBO of `images` with the reparameterised sample `z = μ + σ·eps`
/// (normalised as the module documentation says), and the decoded `z`.
pub fn negative_elbo(
    vae: &AutoencoderKL,
    images: &Tensor,
    eps: &Tensor,
    recon_loss: ReconLoss,
    kl_weight: f64,
) -> candle_core::Result<(NegativeElbo, Tensor)> {
    let posterior = vae.encode(images)?;
    let decoded = vae.decode(&posterior.sample(eps)?)?;
    let loss_dtype = crate::models::nn::internal_dtype(images.dtype());
    let error = (decoded.to_dtype(loss_dtype)? - images.to_dtype(loss_dtype)?)?;
    let reconstruction = match recon_loss {
        ReconLoss::L1 => error.abs()?.mean_all()?,
        ReconLoss::L2 => error.sqr()?.mean_all()?,
    };
    let kl = posterior.kl()?.to_dtype(loss_dtype)?.mean_all()?;
    let total = (&reconstruction + (&kl * kl_weight)?)?;
    let terms = NegativeElbo {
        reconstruction,
        kl,
        total,
    };
    Ok((terms, decoded))
}
