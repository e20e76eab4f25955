//! The prompt tokenizer of a pipeline's `tokenizer/` folder: CLIP's byte-level BPE.
//!
//! It reproduces transformers' `CLIPTokenizer` called as the SD pipelines call it
//! (`padding="max_length"`, `truncation=True`): `<|startoftext|>`, at most `max_length - 2`
//! prompt tokens, `<|endoftext|>`, then the pad token up to `max_length`.

use std::path::Path;

use anyhow::{bail, ensure, Context};
use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence, Strip, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// OpenAI CLIP's pre-tokenization pattern: special tokens, contractions, letter runs, single
/// digits, punctuation runs.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD_SUFFIX: &str = "</w>";
/// CLIP's context length, used when `tokenizer_config.json` gives no usable `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;

/// One prompt as the text encoder receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids: bos, prompt tokens, eos, padding.
    pub ids: Vec<u32>,
    /// Whether prompt tokens were dropped to fit `max_length`.
    pub truncated: bool,
    /// Length of the full encoding (bos and eos included) before truncation.
    pub untruncated_len: usize,
}

impl TokenizedPrompt {
    /// Stacks equally long prompts into a `[batch, max_length]` u32 tensor.
    pub fn stack(prompts: &[TokenizedPrompt], device: &Device) -> candle_core::Result<Tensor> {
        let rows = prompts
            .iter()
            .map(|p| Tensor::new(p.ids.as_slice(), device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

/// The special tokens and length limit from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone)]
struct TokenizerSettings {
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
    max_length: usize,
}

impl TokenizerSettings {
    /// Reads both optional files; `special_tokens_map.json` wins over `tokenizer_config.json`,
    /// as in transformers' loader, and CLIPTokenizer's defaults fill the gaps.
    fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str, default: &str| {
            [&special_map, &config]
                .into_iter()
                .find_map(|file| file.get(key).and_then(special_token))
                .unwrap_or_else(|| AddedToken::from(default, true))
        };
        // Configs saved without a limit carry a huge float sentinel; that is no context length.
        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .map_or(DEFAULT_MAX_LENGTH, |n| n as usize);
        ensure!(
            max_length >= 2,
            "model_max_length {max_length} in {} leaves no room for bos and eos",
            dir.display()
        );
        Ok(Self {
            bos: token("bos_token", "<|startoftext|>"),
            eos: token("eos_token", "<|endoftext|>"),
            unk: token("unk_token", "<|endoftext|>"),
            pad: token("pad_token", "<|endoftext|>"),
            max_length,
        })
    }

    /// In transformers' registration order; a later entry for the same text replaces the
    /// earlier one's flags (SD1's plain-string pad makes `<|endoftext|>` match unnormalized).
    fn special_tokens(&self) -> Vec<AddedToken> {
        vec![
            self.bos.clone(),
            self.eos.clone(),
            self.unk.clone(),
            self.pad.clone(),
        ]
    }
}

/// A special-token entry: the token text itself, matched before normalisation, or an
/// AddedToken object `{"content": ..., "normalized": ..., ...}` with its own flags.
fn special_token(value: &Value) -> Option<AddedToken> {
    match value {
        Value::String(content) => Some(AddedToken::from(content.as_str(), true)),
        Value::Object(fields) => {
            let flag = |key: &str| fields.get(key).and_then(Value::as_bool).unwrap_or(false);
            let content = fields.get("content")?.as_str()?;
            Some(
                AddedToken::from(content, true)
                    .normalized(flag("normalized"))
                    .lstrip(flag("lstrip"))
                    .rstrip(flag("rstrip"))
                    .single_word(flag("single_word")),
            )
        }
        _ => None,
    }
}

/// The JSON object in `path`, or an empty object when the file does not exist.
fn read_optional_json(path: &Path) -> anyhow::Result<Value> {
    if !path.exists() {
        return Ok(Value::Object(Default::default()));
    }
    crate::config::read_json(path)
}

/// CLIP's tokenizer built from the `vocab.json` + `merges.txt` pair, as transformers'
/// `CLIPTokenizer` builds it.
fn clip_bpe_tokenizer(vocab: &Path, merges: &Path, unk: &str) -> anyhow::Result<Tokenizer> {
    let as_str = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("non UTF-8 path {}", p.display()))
    };
    let bpe = BPE::from_file(&as_str(vocab)?, &as_str(merges)?)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD_SUFFIX.to_string())
        .unk_token(unk.to_string())
        .fuse_unk(false)
        .build()
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            format!(
                "cannot build the BPE model from {} and {}",
                vocab.display(),
                merges.display()
            )
        })?;
    let normalizer = Sequence::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(anyhow::Error::msg)?
            .into(),
        Lowercase.into(),
        Strip::new(true, true).into(),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(anyhow::Error::msg)?;
    let pre_tokenizer =
        PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(anyhow::Error::msg)?
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// Tokenizes prompts for the CLIP text encoder.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl PromptTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `vocab.json` + `merges.txt`; special tokens and the length from the config files.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        ensure!(
            dir.is_dir(),
            "tokenizer folder {} does not exist",
            dir.display()
        );
        let settings = TokenizerSettings::from_dir(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        let mut tokenizer = if tokenizer_json.exists() {
            Tokenizer::from_file(&tokenizer_json)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("cannot load {}", tokenizer_json.display()))?
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for file in [&vocab, &merges] {
                if !file.exists() {
                    bail!(
                        "tokenizer folder {} has no tokenizer.json and no {}",
                        dir.display(),
                        file.file_name().unwrap_or_default().to_string_lossy()
                    );
                }
            }
            clip_bpe_tokenizer(&vocab, &merges, &settings.unk.content)?
        };
        // transformers (re-)registers every configured special token, e.g. SD2's pad "!", as an
        // added token, so it is matched whole in prompts, with the config's flags.
        tokenizer
            .add_special_tokens(settings.special_tokens())
            .map_err(anyhow::Error::msg)?;
        let id_of = |token: &str| {
            tokenizer.token_to_id(token).with_context(|| {
                format!(
                    "token {token:?} is not in the vocabulary of {}",
                    dir.display()
                )
            })
        };
        Ok(Self {
            bos_id: id_of(&settings.bos.content)?,
            eos_id: id_of(&settings.eos.content)?,
            pad_id: id_of(&settings.pad.content)?,
            max_length: settings.max_length,
            tokenizer,
        })
    }

    /// Length of every encoded prompt (77 for SD).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// How many token ids there are, added tokens included: the rows a text encoder's token
    /// embedding needs for this tokenizer.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of `token` (a vocabulary entry such as `,</w>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The prompt's token ids alone: no bos, eos, padding or truncation.
    pub fn tokens(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot tokenize prompt {prompt:?}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `bos, tokens[..max_length - 2], eos, pad...`, exactly `max_length` ids.
    pub fn encode(&self, prompt: &str) -> anyhow::Result<TokenizedPrompt> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot tokenize prompt {prompt:?}"))?;
        let tokens = encoding.get_ids();
        let room = self.max_length - 2;
        let kept = &tokens[..tokens.len().min(room)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(kept);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt {
            ids,
            truncated: tokens.len() > room,
            untruncated_len: tokens.len() + 2,
        })
    }

    /// The prompts as a `[batch, max_length]` u32 tensor of ids.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        prompts: &[S],
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        let encoded = prompts
            .iter()
            .map(|p| self.encode(p.as_ref()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(TokenizedPrompt::stack(&encoded, device)?)
    }

    /// Text of `ids` without special tokens, words separated by single spaces (e.g. to show
    /// what truncation removed).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(anyhow::Error::msg)?;
        Ok(text.replace(END_OF_WORD_SUFFIX, " ").trim().to_string())
    }
}
