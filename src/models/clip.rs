//! The CLIP text encoders (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`)
//! that condition the U-Net.
//!
//! A pre-LayerNorm causal transformer over token + position embeddings; SD conditions on the
//! final-LayerNorm output of every position (`last_hidden_state`), SDXL on a hidden state
//! before it plus the projected output at the end token (`text_embeds`).

use std::path::Path;

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::nn::{self, Activation, LayerNorm, Linear};

/// `text_encoder/config.json`, with transformers' `CLIPTextConfig` names and defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `["CLIPTextModelWithProjection"]` for an encoder with `text_projection`.
    pub architectures: Vec<String>,
    pub projection_dim: usize,
    /// Where the pooled output is read: the first position of this token, or, for the legacy
    /// value 2 (SDXL's configs), the position of the highest token id.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            architectures: Vec::new(),
            projection_dim: 512,
            eos_token_id: 49407,
        }
    }
}

/// transformers' `eos_token_id` of CLIP configs saved before its PR #24773, kept by SDXL.
const LEGACY_EOS_TOKEN_ID: u32 = 2;

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = crate::config::read_json(path)?;
        anyhow::ensure!(
            cfg.num_attention_heads > 0 && cfg.hidden_size.is_multiple_of(cfg.num_attention_heads),
            "{}: hidden_size {} is not a multiple of num_attention_heads {}",
            path.display(),
            cfg.hidden_size,
            cfg.num_attention_heads
        );
        Ok(cfg)
    }

    /// Whether the encoder is a `CLIPTextModelWithProjection` (SDXL's second encoder).
    pub fn has_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
    }
}

/// Token embedding plus learned absolute position embedding.
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("token_embedding"))?,
            position_embedding: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embedding"),
            )?,
        })
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let max_positions = self.position_embedding.embeddings().dim(0)?;
        if seq_len > max_positions {
            bail!("sequence of {seq_len} tokens exceeds max_position_embeddings {max_positions}");
        }
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        self.token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)
    }
}

/// An embedding table initialised like transformers' (N(0, 0.02)) when created fresh.
fn embedding(entries: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    let init = Init::Randn {
        mean: 0.,
        stdev: 0.02,
    };
    Ok(Embedding::new(
        vb.get_with_hints((entries, dim), "weight", init)?,
        dim,
    ))
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let dim = cfg.hidden_size;
        Ok(Self {
            q_proj: nn::linear(dim, dim, true, vb.pp("q_proj"))?,
            k_proj: nn::linear(dim, dim, true, vb.pp("k_proj"))?,
            v_proj: nn::linear(dim, dim, true, vb.pp("v_proj"))?,
            out_proj: nn::linear(dim, dim, true, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// Causal self-attention: no token looks ahead.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attended = crate::kernels::attention(
            &self.q_proj.forward(xs)?,
            &self.k_proj.forward(xs)?,
            &self.v_proj.forward(xs)?,
            self.heads,
            true,
        )?;
        self.out_proj.forward(&attended)
    }
}

#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: nn::linear(cfg.hidden_size, cfg.intermediate_size, true, vb.pp("fc1"))?,
            fc2: nn::linear(cfg.intermediate_size, cfg.hidden_size, true, vb.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self.activation.apply(&self.fc1.forward(xs)?)?;
        self.fc2.forward(&hidden)
    }
}

/// Pre-LN residual block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let norm = |name: &str| LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp(name));
        Ok(Self {
            layer_norm1: norm("layer_norm1")?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: norm("layer_norm2")?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
    }
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when its config says so.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: u32,
}

impl ClipTextModel {
    /// Builds the model from `vb`, whose tensors are named either `text_model.*` (SD repos,
    /// transformers < 5) or without that prefix (transformers ≥ 5). A fresh `VarMap` gets the
    /// `text_model.*` names, so trained weights save in the layout every loader accepts.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let text_projection = cfg
            .has_projection()
            .then(|| {
                nn::linear(
                    cfg.hidden_size,
                    cfg.projection_dim,
                    false,
                    vb.pp("text_projection"),
                )
            })
            .transpose()?;
        let vb = if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb
        } else {
            vb.pp("text_model")
        };
        let encoder = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(encoder.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(vb.pp("embeddings"), cfg)?,
            layers,
            final_layer_norm: LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            text_projection,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// How many transformer layers the encoder has (diffusers' `clip_skip` goes up to one less).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `last_hidden_state` `[batch, len, hidden]` for `[batch, len]` integer token ids: the
    /// conditioning SD uses.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_skip(input_ids, 0)
    }

    /// CLIP skip as diffusers counts it (`clip_skip`): the final LayerNorm applied to the output
    /// of the layer `skip` places before the last, so `skip = 0` is [`Self::forward`] and
    /// A1111's "Clip skip: N" is `skip = N - 1`.
    pub fn forward_with_skip(&self, input_ids: &Tensor, skip: usize) -> Result<Tensor> {
        if skip >= self.layers.len() {
            bail!(
                "clip skip {skip} needs more than {} layers",
                self.layers.len()
            );
        }
        let mut xs = self.embeddings.forward(input_ids)?;
        for layer in &self.layers[..self.layers.len() - skip] {
            xs = layer.forward(&xs)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// SDXL's reading of the encoder, in one run: the output of the layer `skip` places before
    /// the last (no final LayerNorm; transformers' `hidden_states[-(skip + 1)]`, `skip = 1` the
    /// penultimate layer), and for an encoder with a projection the projected output at each
    /// row's end token (`text_embeds`, always from the last layer).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        skip: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let count = self.layers.len();
        if skip == 0 || skip > count {
            bail!("hidden layer {skip} from the end is out of range 1 to {count}");
        }
        let mut xs = self.embeddings.forward(input_ids)?;
        let mut hidden = (skip == count).then(|| xs.clone());
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if i + 1 + skip == count {
                hidden = Some(xs.clone());
                if self.text_projection.is_none() {
                    break;
                }
            }
        }
        let Some(hidden) = hidden else {
            bail!("no hidden state {skip} layers from the end")
        };
        let pooled = match &self.text_projection {
            Some(projection) => {
                let last = self.final_layer_norm.forward(&xs)?;
                Some(projection.forward(&self.at_end_tokens(&last, input_ids)?)?)
            }
            None => None,
        };
        Ok((hidden, pooled))
    }

    /// `[batch, hidden]`: each row's state at its end token, found as transformers does.
    fn at_end_tokens(&self, states: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids
            .to_dtype(candle_core::DType::U32)?
            .to_vec2::<u32>()?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(row, ids)| {
                let position = if self.eos_token_id == LEGACY_EOS_TOKEN_ID {
                    // torch's argmax: the first of the highest ids.
                    let highest = ids.iter().copied().max().unwrap_or(0);
                    ids.iter().position(|&id| id == highest)
                } else {
                    ids.iter().position(|&id| id == self.eos_token_id)
                };
                states.get(row)?.get(position.unwrap_or(0))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}
