//! Prompt text to the U-Net's conditioning, as AUTOMATIC1111 computes it: emphasis syntax
//! (`syntax`), prompts of any length in 75-token chunks (`chunks`), each chunk encoded on its
//! own with optional CLIP skip, weighted by A1111's "Original" emphasis, and the chunks joined
//! along the sequence.
//!
//! A plain prompt of up to 75 tokens is one chunk whose ids are exactly the diffusers
//! tokenization and whose weights are all 1, so its embeddings are diffusers' own.
//!
//! SDXL reads two encoders: each one's hidden state before the last layer (or `clip_skip`
//! deeper), joined along the channels, plus the second encoder's pooled projection of the
//! first chunk (as A1111 pools long prompts).

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

/// One text encoder and its tokenizer.
pub struct TextEncoder {
    pub tokenizer: PromptTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    fn chunk_tokens(&self) -> ChunkTokens {
        let tokenizer = &self.tokenizer;
        ChunkTokens {
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
            pad: tokenizer.pad_id(),
            comma: tokenizer.token_id(",</w>"),
            length: tokenizer.max_length() - 2,
        }
    }

    /// The encoder inputs of a prompt's pieces.
    fn chunks(&self, pieces: &[Piece]) -> anyhow::Result<Vec<Chunk>> {
        let tokens = pieces
            .iter()
            .map(|piece| self.tokenizer.tokens(&piece.text))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(build_chunks(pieces, &tokens, &self.chunk_tokens()))
    }
}

/// Which hidden states condition the U-Net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderStyle {
    /// SD 1.x/2.x: one encoder, the final LayerNorm applied to its last (or clip-skipped)
    /// layer's output.
    Final,
    /// SDXL: every encoder's output one layer before the last (or clip-skipped further), no
    /// final LayerNorm, joined along the channels; pooled output of the last encoder.
    Penultimate,
}

/// Prompt embeddings `[B, 77·k, D]`, and for SDXL the pooled embeddings `[B, P]`.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

/// The tokenizers and text encoders that turn prompts into embeddings.
pub struct PromptEncoder<'a> {
    pub encoders: &'a [TextEncoder],
    pub style: EncoderStyle,
    pub device: &'a Device,
}

impl PromptEncoder<'_> {
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

    /// The first encoder's inputs for one prompt.
    pub fn chunks(&self, prompt: &str, options: &PromptOptions) -> anyhow::Result<Vec<Chunk>> {
        self.first()?.chunks(&Self::pieces(prompt, options)?)
    }

    fn first(&self) -> anyhow::Result<&TextEncoder> {
        self.encoders
            .first()
            .context("the pipeline has no text encoder")
    }

    /// The clip skips the encoders allow: 1 to the layer count of the shallowest (SD), one
    /// less with SDXL's penultimate layer (`hidden_states[-(skip + 1)]` exists down to the
    /// embeddings).
    fn clip_skip_range(&self) -> std::ops::RangeInclusive<usize> {
        let layers = self
            .encoders
            .iter()
            .map(|e| e.model.num_layers())
            .min()
            .unwrap_or(0);
        1..=layers
    }

    /// Fails when a prompt cannot be read with `options` (a bad weight) or the clip skip is
    /// deeper than the encoders: everything `encode` could refuse, without encoding.
    pub fn check(&self, prompt: &str, options: &PromptOptions) -> anyhow::Result<()> {
        Self::pieces(prompt, options)?;
        let range = self.clip_skip_range();
        anyhow::ensure!(
            range.contains(&options.clip_skip),
            "clip skip {} is out of range: this text encoder has {} layers ({} to {})",
            options.clip_skip,
            range.end(),
            range.start(),
            range.end()
        );
        Ok(())
    }

    /// Embeddings of `prompts`, `k` the most chunks any of them needs with any encoder;
    /// shorter prompts are padded with the empty prompt's chunk (as A1111 pads cond and
    /// uncond).
    pub fn encode(
        &self,
        prompts: &[&str],
        options: &PromptOptions,
    ) -> anyhow::Result<PromptEmbeddings> {
        let pieces = prompts
            .iter()
            .map(|prompt| {
                self.check(prompt, options)?;
                Self::pieces(prompt, options)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // [encoder][prompt] -> chunks
        let chunks = self
            .encoders
            .iter()
            .map(|encoder| pieces.iter().map(|p| encoder.chunks(p)).collect())
            .collect::<anyhow::Result<Vec<Vec<_>>>>()?;
        let count = chunks.iter().flatten().map(Vec::len).max().unwrap_or(1);
        let mut hidden = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (encoder, per_prompt) in self.encoders.iter().zip(&chunks) {
            let (states, pooled_rows) = self.encode_chunks(encoder, per_prompt, count, options)?;
            hidden.push(states);
            if let Some(rows) = pooled_rows {
                // The pooled output of each prompt's first chunk.
                let firsts: Vec<u32> = (0..prompts.len()).map(|i| (i * count) as u32).collect();
                let firsts = Tensor::new(firsts.as_slice(), rows.device())?;
                pooled = Some(rows.index_select(&firsts, 0)?);
            }
        }
        if self.style == EncoderStyle::Penultimate && pooled.is_none() {
            anyhow::bail!("SDXL's last text encoder must be a CLIPTextModelWithProjection (no text_projection found)");
        }
        Ok(PromptEmbeddings {
            hidden: Tensor::cat(&hidden, 2)?,
            pooled,
        })
    }

    /// One encoder's `[B, 77·count, D]` weighted hidden states, and its pooled output per
    /// chunk when it has a projection.
    fn encode_chunks(
        &self,
        encoder: &TextEncoder,
        per_prompt: &[Vec<Chunk>],
        count: usize,
        options: &PromptOptions,
    ) -> anyhow::Result<(Tensor, Option<Tensor>)> {
        let padding = &empty_chunk(&encoder.chunk_tokens());
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
        let ids = Tensor::stack(&rows, 0)?;
        let (hidden, pooled) = match self.style {
            EncoderStyle::Final => (
                encoder
                    .model
                    .forward_with_skip(&ids, options.clip_skip - 1)?,
                None,
            ),
            EncoderStyle::Penultimate => encoder.model.forward_hidden(&ids, options.clip_skip)?,
        };
        let weighted = all
            .iter()
            .enumerate()
            .map(|(i, chunk)| emphasize(&hidden.get(i)?, chunk))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let prompts_embeddings = weighted
            .chunks(count)
            .map(|chunks| Tensor::cat(chunks, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Tensor::stack(&prompts_embeddings, 0)?, pooled))
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
