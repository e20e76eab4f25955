//! How prompts are read: A1111 syntax on or off, and CLIP skip.

use clap::Args;

use crate::conditioning::PromptOptions;

/// Prompt reading options shared by txt2img, img2img, inpaint and batch.
#[derive(Debug, Args)]
pub struct ConditioningArgs {
    /// Take prompts literally: no A1111 emphasis ((word), [word], (word:1.5), escapes) and no
    /// BREAK. Prompts over 75 tokens are still encoded in chunks.
    #[arg(long)]
    pub no_prompt_syntax: bool,

    /// A1111's "Clip skip": 1 conditions on CLIP's last layer, 2 on the one before it, and so
    /// on (diffusers' clip_skip is N - 1).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub clip_skip: usize,
}

impl ConditioningArgs {
    pub fn options(&self) -> PromptOptions {
        PromptOptions {
            syntax: !self.no_prompt_syntax,
            clip_skip: self.clip_skip,
        }
    }
}
