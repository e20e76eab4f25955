//! What a checkpoint file holds, recognised from its tensors' names and shapes as diffusers'
//! `infer_diffusers_model_type` does: an SD 1.x/2.x checkpoint (inpainting or not), or else a
//! clear error saying what the file is (a LoRA, a diffusers component, SDXL, another model).

use anyhow::bail;

use super::clip_names::{CLIP_PREFIX, OPEN_CLIP_PREFIX};
use super::{TensorSource, EMA_PREFIX, UNET_PREFIX, VAE_PREFIX};

/// The text encoder a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// SD 1.x: OpenAI's CLIP ViT-L/14 text model.
    Clip,
    /// SD 2.x: OpenCLIP ViT-H/14.
    OpenClip,
}

/// What a checkpoint holds, from its tensors' names and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    pub text_encoder: TextEncoderKind,
    /// 4, or 9 for an inpainting U-Net (latents, mask, masked-image latents).
    pub unet_in_channels: usize,
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = match self.text_encoder {
            TextEncoderKind::Clip => "SD 1.x",
            TextEncoderKind::OpenClip => "SD 2.x",
        };
        write!(f, "{family}")?;
        if self.unet_in_channels == 9 {
            write!(f, " inpainting")?;
        }
        Ok(())
    }
}

/// Recognises an SD 1.x/2.x checkpoint; any other file is an error saying what it is.
pub(super) fn recognise(source: &TensorSource) -> anyhow::Result<Architecture> {
    let names = source.names();
    let any = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if names.is_empty() {
        bail!("the file holds no tensors");
    }
    if any("conditioner.embedders.") {
        bail!(
            "it is an SDXL checkpoint (conditioner.embedders.*): single-file SDXL is not \
             supported yet, use a diffusers folder"
        );
    }
    if !any(UNET_PREFIX) {
        let lora = names
            .iter()
            .any(|n| n.contains("lora_down") || n.contains("lora_A") || n.starts_with("lora_"));
        if lora {
            bail!("it is a LoRA, not a checkpoint: pass it with --lora");
        }
        if any(EMA_PREFIX) {
            bail!(
                "it holds only EMA weights ({EMA_PREFIX}*) and no {UNET_PREFIX}* U-Net \
                 (diffusers cannot read such a file either)"
            );
        }
        let mut some = names.clone();
        some.sort_unstable();
        some.truncate(3);
        bail!(
            "it has no {UNET_PREFIX}* tensors (it holds {} tensors such as {})",
            names.len(),
            some.join(", ")
        );
    }
    let conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    let Some(&[_, in_channels, _, _]) = source.shape(&conv_in) else {
        bail!(
            "unknown architecture: {UNET_PREFIX}* holds no 4-D {conv_in} (not an SD 1.x/2.x \
             U-Net; SD3, Flux and other transformers are not supported)"
        );
    };
    if any(&format!("{UNET_PREFIX}label_emb.")) {
        bail!(
            "unknown architecture: its U-Net has class embeddings (label_emb: an x4 upscaler or \
             unCLIP model), which ldm does not support"
        );
    }
    let text_encoder = if source
        .shape(&format!(
            "{CLIP_PREFIX}text_model.embeddings.position_embedding.weight"
        ))
        .is_some()
    {
        TextEncoderKind::Clip
    } else if source
        .shape(&format!("{OPEN_CLIP_PREFIX}token_embedding.weight"))
        .is_some()
    {
        TextEncoderKind::OpenClip
    } else {
        bail!(
            "unknown architecture: no text encoder ({CLIP_PREFIX}text_model.* for SD 1.x or \
             {OPEN_CLIP_PREFIX}* for SD 2.x)"
        );
    };
    if !any(VAE_PREFIX) {
        bail!("it holds no VAE ({VAE_PREFIX}*)");
    }
    Ok(Architecture {
        text_encoder,
        unet_in_channels: in_channels,
    })
}
