//! Timestep embeddings of the U-Net: diffusers' `Timesteps` (fixed sinusoids) and
//! `TimestepEmbedding` (the learned two-layer MLP on top of them).

use std::sync::OnceLock;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::nn::{linear, Activation, Linear};

/// The period of the slowest sinusoid, as in DDPM and diffusers.
const MAX_PERIOD: f64 = 10_000.;

/// Sinusoidal embedding of (possibly fractional) timesteps, diffusers' `get_timestep_embedding`.
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    /// The `[1, half]` frequencies, uploaded on the first call rather than on every step.
    frequencies: OnceLock<Tensor>,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
            frequencies: OnceLock::new(),
        }
    }

    /// `timesteps`: `[batch]`, any float dtype -> `[batch, num_channels]` in f32.
    ///
    /// Everything is computed in f32 like diffusers, whatever the model dtype: half precision
    /// cannot even represent timesteps near 1000 exactly.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let batch = timesteps.dims1()?;
        let frequencies = self.frequencies_on(timesteps.device())?;
        let angles = timesteps
            .to_dtype(DType::F32)?
            .reshape((batch, 1))?
            .broadcast_mul(&frequencies)?;
        let (sin, cos) = (angles.sin()?, angles.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)?
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)?
        };
        // An odd channel count gets one zero column, as in diffusers.
        emb.pad_with_zeros(D::Minus1, 0, self.num_channels % 2)
    }

    /// The frequencies on `device`: the cached tensor, unless it lives on another device.
    fn frequencies_on(&self, device: &Device) -> Result<Tensor> {
        if let Some(cached) = self.frequencies.get() {
            if cached.device().same_device(device) {
                return Ok(cached.clone());
            }
        }
        let half = self.num_channels / 2;
        let frequencies = Tensor::from_vec(self.frequencies(half), (1, half), device)?;
        // The first device asked for keeps the cache (a model runs on one device).
        let _ = self.frequencies.set(frequencies.clone());
        Ok(frequencies)
    }

    /// `exp(-ln(max_period) * i / (half - shift))` for `i < half`, with diffusers' f32 rounding.
    fn frequencies(&self, half: usize) -> Vec<f32> {
        let log_period = -(MAX_PERIOD.ln() as f32);
        let denominator = half as f32 - self.downscale_freq_shift as f32;
        (0..half)
            .map(|i| (log_period * i as f32 / denominator).exp())
            .collect()
    }
}

/// diffusers' `TimestepEmbedding`: `linear_1` -> activation -> `linear_2` (-> optional post activation).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, time_embed_dim, true, vb.pp("linear_1"))?,
            act,
            linear_2: linear(time_embed_dim, time_embed_dim, true, vb.pp("linear_2"))?,
            post_act,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.act.apply(&self.linear_1.forward(xs)?)?;
        let xs = self.linear_2.forward(&xs)?;
        match self.post_act {
            Some(act) => act.apply(&xs),
            None => Ok(xs),
        }
    }
}

/// SDXL's added conditioning (diffusers' `addition_embed_type="text_time"`): the micro-
/// conditioning values each embedded as sinusoids (`add_time_proj`), appended to the pooled
/// text embeddings, and projected by an MLP (`add_embedding`) onto the time embedding.
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
    in_channels: usize,
}

impl TextTimeEmbedding {
    pub fn new(time_proj: Timesteps, embedding: TimestepEmbedding, in_channels: usize) -> Self {
        Self {
            time_proj,
            embedding,
            in_channels,
        }
    }

    /// `[batch, time_embed_dim]` in `dtype` for `text_embeds` `[batch, P]` and `time_ids`
    /// `[batch, K]` (`P + K · addition_time_embed_dim` must be the MLP's input width).
    pub fn forward(
        &self,
        added: &crate::models::unet::AddedConditioning,
        dtype: DType,
    ) -> Result<Tensor> {
        let (batch, text_dim) = added.text_embeds.dims2()?;
        let (time_batch, count) = added.time_ids.dims2()?;
        let width = text_dim + count * self.time_proj.num_channels;
        if time_batch != batch || width != self.in_channels {
            candle_core::bail!(
                "U-Net text_time conditioning: text embeddings {:?} and time ids {:?} give {width} \
                 values per row, the U-Net's add_embedding takes {} (projection_class_embeddings_input_dim)",
                added.text_embeds.dims(),
                added.time_ids.dims(),
                self.in_channels
            );
        }
        let time_embeds = self
            .time_proj
            .forward(&added.time_ids.flatten_all()?)?
            .reshape((batch, count * self.time_proj.num_channels))?;
        let text_embeds = added.text_embeds.to_dtype(DType::F32)?;
        let joined = Tensor::cat(&[&text_embeds, &time_embeds], D::Minus1)?.to_dtype(dtype)?;
        self.embedding.forward(&joined)
    }
}
