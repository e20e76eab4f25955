//! Prompts of any length as A1111 feeds them to CLIP: 75-token chunks, each wrapped in start
//! and end tokens and padded to 77, with one weight per token.
//!
//! A chunk ends when it is full or at a `BREAK`. When a chunk fills up and a comma lies within
//! its last [`COMMA_BACKTRACK`] tokens, the tokens after the comma move on to the next chunk,
//! so a phrase is not cut in two (A1111's `comma_padding_backtrack`, default 20).

use super::syntax::Piece;

/// How far back from a full chunk's end a comma may be to move the rest into the next chunk.
pub const COMMA_BACKTRACK: usize = 20;

/// The special tokens a chunk is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTokens {
    pub bos: u32,
    pub eos: u32,
    /// Fills the chunk after its end token (SD2's `!`; SD1 pads with the end token).
    pub pad: u32,
    /// The `,</w>` token, when the vocabulary has it.
    pub comma: Option<u32>,
    /// Prompt tokens per chunk: the encoder's context length minus 2 (75 for SD).
    pub length: usize,
}

/// One encoder input: `length + 2` token ids and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

impl Chunk {
    /// Whether every token has weight 1 (emphasis leaves the embeddings as they are).
    pub fn is_unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// Builds chunks from tokenized prompt pieces.
struct Chunker<'a> {
    special: &'a ChunkTokens,
    chunks: Vec<Chunk>,
    ids: Vec<u32>,
    weights: Vec<f64>,
    /// Position in the current chunk of its last comma.
    last_comma: Option<usize>,
}

impl Chunker<'_> {
    /// Closes the current chunk: end-padded to `length`, wrapped in start and end tokens,
    /// everything after the first end token replaced by the pad token.
    fn finish_chunk(&mut self) {
        let special = self.special;
        let mut ids = Vec::with_capacity(special.length + 2);
        ids.push(special.bos);
        ids.append(&mut self.ids);
        ids.resize(special.length + 1, special.eos);
        ids.push(special.eos);
        if let Some(end) = ids.iter().position(|&id| id == special.eos) {
            ids[end + 1..].fill(special.pad);
        }
        let mut weights = Vec::with_capacity(special.length + 2);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.resize(special.length + 2, 1.0);
        self.chunks.push(Chunk { ids, weights });
        self.last_comma = None;
    }

    fn push(&mut self, token: u32, weight: f64) {
        let length = self.special.length;
        if Some(token) == self.special.comma {
            self.last_comma = Some(self.ids.len());
        } else if let Some(comma) = self
            .last_comma
            .filter(|&c| self.ids.len() == length && length - c <= COMMA_BACKTRACK)
        {
            let moved_ids = self.ids.split_off(comma + 1);
            let moved_weights = self.weights.split_off(comma + 1);
            self.finish_chunk();
            self.ids = moved_ids;
            self.weights = moved_weights;
        }
        if self.ids.len() == length {
            self.finish_chunk();
        }
        self.ids.push(token);
        self.weights.push(weight);
    }
}

/// The chunks of a prompt whose pieces are tokenized (`tokens[i]` are `pieces[i]`'s tokens).
/// There is always at least one chunk.
pub fn build_chunks(pieces: &[Piece], tokens: &[Vec<u32>], special: &ChunkTokens) -> Vec<Chunk> {
    let mut chunker = Chunker {
        special,
        chunks: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
        last_comma: None,
    };
    for (piece, piece_tokens) in pieces.iter().zip(tokens) {
        if piece.is_break() {
            chunker.finish_chunk();
            continue;
        }
        for &token in piece_tokens {
            chunker.push(token, piece.weight);
        }
    }
    if !chunker.ids.is_empty() || chunker.chunks.is_empty() {
        chunker.finish_chunk();
    }
    chunker.chunks
}

/// The chunk of an empty prompt: what shorter prompts of a batch are padded with.
pub fn empty_chunk(special: &ChunkTokens) -> Chunk {
    build_chunks(&[], &[], special).remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECIAL: ChunkTokens = ChunkTokens {
        bos: 1000,
        eos: 1001,
        pad: 0,
        comma: Some(7),
        length: 75,
    };

    fn piece(weight: f64) -> Piece {
        Piece {
            text: "x".into(),
            weight,
        }
    }

    fn prompt_tokens(chunk: &Chunk) -> Vec<u32> {
        chunk.ids[1..]
            .iter()
            .copied()
            .take_while(|&id| id != SPECIAL.eos)
            .collect()
    }

    #[test]
    fn short_prompt_is_one_padded_chunk() {
        let chunks = build_chunks(&[piece(1.5)], &[vec![5, 6]], &SPECIAL);
        assert_eq!(chunks.len(), 1);
        let chunk = &chunks[0];
        assert_eq!(chunk.ids.len(), 77);
        assert_eq!(&chunk.ids[..4], &[1000, 5, 6, 1001]);
        assert!(chunk.ids[4..].iter().all(|&id| id == 0));
        assert_eq!(&chunk.weights[..4], &[1.0, 1.5, 1.5, 1.0]);
    }

    #[test]
    fn exactly_75_tokens_fit_in_one_chunk_76_need_two() {
        let chunks = build_chunks(&[piece(1.0)], &[vec![5; 75]], &SPECIAL);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].ids[76], SPECIAL.eos);
        let chunks = build_chunks(&[piece(1.0)], &[vec![5; 76]], &SPECIAL);
        assert_eq!(chunks.len(), 2);
        assert_eq!(prompt_tokens(&chunks[1]), vec![5]);
    }

    #[test]
    fn full_chunk_moves_the_words_after_a_late_comma() {
        // Comma at position 60: 14 tokens after it move to chunk 2.
        let mut tokens = vec![5; 60];
        tokens.push(7);
        tokens.extend(vec![6; 20]);
        let chunks = build_chunks(&[piece(1.0)], &[tokens.clone()], &SPECIAL);
        assert_eq!(prompt_tokens(&chunks[0]).len(), 61);
        assert_eq!(prompt_tokens(&chunks[1]), vec![6; 20]);
        // Comma at position 50: too far back (25 > 20), the chunk is cut at 75.
        let mut tokens = vec![5; 50];
        tokens.push(7);
        tokens.extend(vec![6; 30]);
        let chunks = build_chunks(&[piece(1.0)], &[tokens], &SPECIAL);
        assert_eq!(prompt_tokens(&chunks[0]).len(), 75);
        assert_eq!(prompt_tokens(&chunks[1]).len(), 6);
    }

    #[test]
    fn break_closes_the_chunk_even_when_empty() {
        let brk = Piece {
            text: "BREAK".into(),
            weight: -1.0,
        };
        let pieces = [piece(1.0), brk.clone(), piece(1.0)];
        let chunks = build_chunks(&pieces, &[vec![], vec![], vec![5]], &SPECIAL);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0], empty_chunk(&SPECIAL));
        let chunks = build_chunks(&[piece(1.0), brk], &[vec![5], vec![]], &SPECIAL);
        assert_eq!(chunks.len(), 1);
    }
}
