//! diffusers' `Attention` (attention_processor.py): the multi-head attention behind the U-Net's
//! self/cross-attention (`attn1`/`attn2`) and the VAE mid-block attention.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::nn::{self, Linear};

/// Tensor names of the four projections: (query, key, value, output).
type ProjectionNames = [&'static str; 4];
const CURRENT_NAMES: ProjectionNames = ["to_q", "to_k", "to_v", "to_out.0"];
/// The names of diffusers' deprecated `AttentionBlock`, still shipped by older SD VAE weights.
const LEGACY_NAMES: ProjectionNames = ["query", "key", "value", "proj_attn"];

/// Multi-head attention with query/key/value/output projections (scores in f32, see
/// `kernels::attention`).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// query_dim: channels of the hidden states; cross_attention_dim: channels of the context (None = self-attention);
    /// heads × dim_head = inner dim; qkv_bias: diffusers' `bias` (false in UNet transformers, true in the VAE).
    ///
    /// Accepts the legacy names `query`/`key`/`value`/`proj_attn` when the current ones are
    /// absent, and 1×1-convolution-shaped `[out, in, 1, 1]` projection weights.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner_dim = heads * dim_head;
        let context_dim = cross_attention_dim.unwrap_or(query_dim);
        let [q, k, v, out] = projection_names(&vb);
        Ok(Self {
            to_q: projection(query_dim, inner_dim, qkv_bias, vb.pp(q))?,
            to_k: projection(context_dim, inner_dim, qkv_bias, vb.pp(k))?,
            to_v: projection(context_dim, inner_dim, qkv_bias, vb.pp(v))?,
            to_out: projection(inner_dim, query_dim, true, vb.pp(out))?,
            heads,
        })
    }

    /// hidden: [B, L, query_dim]; context: [B, S, cross_dim] or None.
    pub fn forward(&self, hidden: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        // The projections flatten [B, L, C] into one matrix, which needs the tokens contiguous
        // (the VAE hands in a [B, C, H·W] -> [B, H·W, C] transposed view): copy once here.
        let hidden = hidden.contiguous()?;
        let context = match context {
            Some(context) => context.contiguous()?,
            None => hidden.clone(),
        };
        let attended = crate::kernels::attention(
            &self.to_q.forward(&hidden)?,
            &self.to_k.forward(&context)?,
            &self.to_v.forward(&context)?,
            self.heads,
            false,
        )?;
        self.to_out.forward(&attended)
    }
}

/// Legacy names only when the weights have them and lack the current ones, so fresh
/// (VarMap) models and current checkpoints use diffusers' present names.
fn projection_names(vb: &VarBuilder) -> ProjectionNames {
    let legacy = vb.contains_tensor(&format!("{}.weight", LEGACY_NAMES[0]))
        && !vb.contains_tensor(&format!("{}.weight", CURRENT_NAMES[0]));
    if legacy {
        LEGACY_NAMES
    } else {
        CURRENT_NAMES
    }
}

/// A linear layer whose weight may be stored as `[out, in]` or as a 1×1 conv `[out, in, 1, 1]`.
fn projection(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    nn::linear(in_dim, out_dim, bias, vb.clone()).or_else(|linear_err| {
        // Only a conv-shaped weight is worth a retry; otherwise report the linear layer's error.
        let Ok(conv_weight) = vb.get((out_dim, in_dim, 1, 1), "weight") else {
            return Err(linear_err);
        };
        let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        Linear::new(conv_weight.reshape((out_dim, in_dim))?, bias)
    })
}
