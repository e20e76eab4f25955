//! Prompt text to the U-Net's conditioning, as AUTOMATIC1111 computes it: emphasis syntax
//! (`syntax`), prompts of any length in 75-token chunks (`chunks`), each chunk encoded on its
//! own with optional CLIP skip, weighted by A1111's "Original" emphasis, and the chunks joined
//! along the sequence.
//!
//! A plain prompt of up to 75 tokens is one chunk whose ids are exactly the diffusers
//! tokenization and whose weights are all 1, so its embeddings are diffusers' own.

pub mod chunks;
pub mod syntax;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::models::clip::ClipTextModel;
use crate::tokenizer::PromptTokenizer;
use chunks::{build_chunks, empty_chunk, Chunk, ChunkTokens};
use syntax::Piece;

/// How prompt text becomes conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptOptions {
    /// Read A1111's emphasis syntax and `BREAK` (off: the text is taken literally, as A1111's
    /// emphasis mode "None"; long prompts are still chunked).
    pub syntax: bool,
    /// A1111's "Clip skip": 1 uses the last layer, 2 the one before it, ... (diffusers'
    /// `clip_skip` is this minus 1).
    pub clip_skip: usize,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            syntax: true,
            clip_skip: 1,
        }
    }
}

/// The tokenizer and text encoder that turn prompts into embeddings.
pub struct PromptEncoder<'a> {
    pub tokenizer: &'a PromptTokenizer,
    pub text_encoder: &'a ClipTextModel,
    pub device: &'a Device,
}

impl PromptEncoder<'_> {
    fn chunk_tokens(&self) -> ChunkTokens {
        ChunkTokens {
            bos: self.tokenizer.bos_id(),
            eos: self.tokenizer.eos_id(),
            pad: self.tokenizer.pad_id(),
            comma: self.tokenizer.token_id(",</w>"),
            length: self.tokenizer.max_length() - 2,
        }
    }

    /// A prompt's weighted pieces, or the whole text at weight 1 when syntax is off; LoRA tags
    /// (`<lora:NAME:WEIGHT>`) are removed either way.
    pub fn pieces(prompt: &str, options: &PromptOptions) -> anyhow::Result<Vec<Piece>> {
        let prompt = &crate::lora::tags::strip_lora_tags(prompt);
        if options.syntax {
            syntax::parse(prompt).with_context(|| format!("in the prompt {prompt:?}"))
        } else {
            Ok(vec![Piece {
                text: prompt.to_string(),
                weight: 1.0,
            }])
        }
    }

    /// The encoder inputs of one prompt.
    pub fn chunks(&self, prompt: &str, options: &PromptOptions) -> anyhow::Result<Vec<Chunk>> {
        let pieces = Self::pieces(prompt, options)?;
        let tokens = pieces
            .iter()
            .map(|piece| self.tokenizer.tokens(&piece.text))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(build_chunks(&pieces, &tokens, &self.chunk_tokens()))
    }

    /// Fails when a prompt cannot be read with `options` (a bad weight) or the clip skip is
    /// deeper than the encoder: everything `encode` could refuse, without encoding.
    pub fn check(&self, prompt: &str, options: &PromptOptions) -> anyhow::Result<()> {
        Self::pieces(prompt, options)?;
        let layers = self.text_encoder.num_layers();
        anyhow::ensure!(
            (1..=layers).contains(&options.clip_skip),
            "clip skip {} is out of range: this text encoder has {layers} layers (1 to {layers})",
            options.clip_skip
        );
        Ok(())
    }

    /// `[B, 77·k, D]` embeddings of `prompts`, `k` the most chunks any of them needs; shorter
    /// prompts are padded with the empty prompt's chunk (as A1111 pads cond and uncond).
    pub fn encode(&self, prompts: &[&str], options: &PromptOptions) -> anyhow::Result<Tensor> {
        let per_prompt = prompts
            .iter()
            .map(|prompt| {
                self.check(prompt, options)?;
                self.chunks(prompt, options)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let count = per_prompt.iter().map(Vec::len).max().unwrap_or(1);
        let padding = &empty_chunk(&self.chunk_tokens());
        // Chunk i of every prompt, prompt by prompt: one encoder batch, and for one-chunk
        // prompts exactly the batch diffusers encodes.
        let all: Vec<&Chunk> = per_prompt
            .iter()
            .flat_map(|chunks| (0..count).map(move |i| chunks.get(i).unwrap_or(padding)))
            .collect();
        let rows = all
            .iter()
            .map(|chunk| Tensor::new(chunk.ids.as_slice(), self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let hidden = self
            .text_encoder
            .forward_with_skip(&Tensor::stack(&rows, 0)?, options.clip_skip - 1)?;
        let weighted = all
            .iter()
            .enumerate()
            .map(|(i, chunk)| emphasize(&hidden.get(i)?, chunk))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let prompts_embeddings = weighted
            .chunks(count)
            .map(|chunks| Tensor::cat(chunks, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&prompts_embeddings, 0)?)
    }
}

/// A1111's "Original" emphasis on one chunk's `[77, D]` embeddings: each token's vector
/// multiplied by its weight, then the whole chunk rescaled to its original mean.
fn emphasize(embeddings: &Tensor, chunk: &Chunk) -> anyhow::Result<Tensor> {
    if chunk.is_unweighted() {
        return Ok(embeddings.clone());
    }
    let dtype = embeddings.dtype();
    let mean = |t: &Tensor| -> candle_core::Result<f64> {
        t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()
    };
    let original_mean = mean(embeddings)?;
    let weights: Vec<f32> = chunk.weights.iter().map(|&w| w as f32).collect();
    let weights = Tensor::from_vec(weights, (chunk.weights.len(), 1), embeddings.device())?
        .to_dtype(dtype)?;
    let weighted = embeddings.broadcast_mul(&weights)?;
    let new_mean = mean(&weighted)?;
    Ok((weighted * (original_mean / new_mean))?)
}
