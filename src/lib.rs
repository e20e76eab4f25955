//! ldm: a latent diffusion toolkit.
//!
//! The tree mirrors the latent diffusion model: `models` holds the three networks (CLIP text
//! encoder, VAE, U-Net), `schedulers` the samplers, `pipelines` the generation modes that share
//! one denoising loop, `rng` the PyTorch-compatible noise source, `image_io` the PNG side,
//! `durable` the kill-safe writes behind every output, `model_source` where a pipeline's files come from, `single_file` the original-layout
//! checkpoints, `serve` the HTTP server, and `cli` the thin command-line layer.

pub mod batch_manifest;
pub mod cli;
pub mod conditioning;
pub mod config;
pub mod default_model;
pub mod device;
pub mod durable;
pub mod hex;
pub mod image_io;
pub mod infotext;
pub mod kernels;
pub mod lora;
pub mod mapped_memory;
pub mod model_source;
pub mod models;
pub mod pipelines;
pub mod prompt_file;
pub mod rng;
pub mod schedulers;
pub mod serve;
pub mod shard;
pub mod single_file;
pub mod threads;
pub mod tokenizer;
pub mod training;
pub mod weights_file;
