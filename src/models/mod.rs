//! The three networks of a latent diffusion model, written once for inference and training.
//!
//! Every layer here is differentiable: we avoid candle's fused ops that lack a backward pass
//! (LayerNorm, `softmax_last_dim`), so the same code trains (see `nn`).

pub mod attention;
pub mod clip;
pub mod embeddings;
pub mod nn;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;
