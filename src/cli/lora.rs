//! `--lora FILE[:WEIGHT]` and `--lora-dir DIR` (for `<lora:NAME:WEIGHT>` prompt tags).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::lora::{prompt_loras, LoraSpec};
use crate::pipelines::batch::Job;

/// LoRAs merged into the model when it loads.
#[derive(Debug, Args)]
pub struct LoraArgs {
    /// A LoRA to merge into the U-Net and text encoder, kohya/A1111 or diffusers/PEFT format,
    /// scaled by WEIGHT (default 1). Repeatable.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<LoraSpec>,

    /// Where `<lora:NAME:WEIGHT>` prompt tags find NAME.safetensors (subfolders searched too).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
}

impl LoraArgs {
    /// The `--lora` files followed by those the prompt's tags name.
    pub fn for_prompt(&self, prompt: &str) -> anyhow::Result<Vec<LoraSpec>> {
        let mut loras = self.loras.clone();
        loras.extend(prompt_loras(prompt, self.lora_dir.as_deref())?);
        Ok(loras)
    }
}

/// Adds the LoRAs each job's prompt names in `<lora:...>` tags to its `loras`.
pub fn add_prompt_loras(jobs: &mut [Job], args: &LoraArgs) -> anyhow::Result<()> {
    for job in jobs {
        let tagged = prompt_loras(&job.prompt, args.lora_dir.as_deref())
            .with_context(|| format!("prompt file line {}", job.line))?;
        job.loras.extend(tagged.iter().map(LoraSpec::to_string));
    }
    Ok(())
}

/// The jobs split by the LoRA set they need, in order of first appearance, each set parsed.
pub fn group_by_loras(jobs: &[Job]) -> anyhow::Result<Vec<(Vec<LoraSpec>, Vec<Job>)>> {
    let mut groups: Vec<(Vec<String>, Vec<Job>)> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|(loras, _)| *loras == job.loras) {
            Some((_, members)) => members.push(job.clone()),
            None => groups.push((job.loras.clone(), vec![job.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(loras, members)| {
            let specs = loras
                .iter()
                .map(|l| l.parse::<LoraSpec>().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((specs, members))
        })
        .collect()
}
