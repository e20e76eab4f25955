//! The original (CompVis `openaimodel.py`) U-Net tensor names as diffusers names them, as
//! diffusers' `convert_ldm_unet_checkpoint` reads them.
//!
//! The original numbers the down path's modules `input_blocks.N` (N = 0: `conv_in`; then, per
//! down block, `layers_per_block` resnet(+attention) layers and one downsampler) and the up
//! path's `output_blocks.N` (per up block, `layers_per_block + 1` layers, the last of which
//! also holds the upsampler as `.1.conv` or, after an attention, `.2.conv`).

/// The diffusers name of `name` (without `model.diffusion_model.`), `None` for a module
/// SD 1.x/2.x U-Nets do not have.
pub fn diffusers_name(name: &str, layers_per_block: usize) -> Option<String> {
    let per_block = layers_per_block + 1;
    let (module, rest) = split(name)?;
    match module {
        "time_embed" => {
            let (index, rest) = split(rest)?;
            let linear = match index {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            Some(format!("time_embedding.{linear}.{rest}"))
        }
        "out" => {
            let (index, rest) = split(rest)?;
            let target = match index {
                "0" => "conv_norm_out",
                "2" => "conv_out",
                _ => return None,
            };
            Some(format!("{target}.{rest}"))
        }
        "input_blocks" => {
            let (index, rest) = split(rest)?;
            let index: usize = index.parse().ok()?;
            if index == 0 {
                return Some(format!("conv_in.{}", rest.strip_prefix("0.")?));
            }
            let (block, layer) = ((index - 1) / per_block, (index - 1) % per_block);
            let (part, rest) = split(rest)?;
            match (part, rest.strip_prefix("op.")) {
                ("0", Some(param)) => {
                    Some(format!("down_blocks.{block}.downsamplers.0.conv.{param}"))
                }
                ("0", None) => Some(format!(
                    "down_blocks.{block}.resnets.{layer}.{}",
                    resnet(rest)
                )),
                ("1", None) => Some(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
                _ => None,
            }
        }
        "middle_block" => {
            let (index, rest) = split(rest)?;
            match index {
                "0" => Some(format!("mid_block.resnets.0.{}", resnet(rest))),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                "2" => Some(format!("mid_block.resnets.1.{}", resnet(rest))),
                _ => None,
            }
        }
        "output_blocks" => {
            let (index, rest) = split(rest)?;
            let index: usize = index.parse().ok()?;
            let (block, layer) = (index / per_block, index % per_block);
            let (part, rest) = split(rest)?;
            match (part, rest.strip_prefix("conv.")) {
                ("1" | "2", Some(param)) => {
                    Some(format!("up_blocks.{block}.upsamplers.0.conv.{param}"))
                }
                ("0", None) => Some(format!(
                    "up_blocks.{block}.resnets.{layer}.{}",
                    resnet(rest)
                )),
                ("1", None) => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A resnet's parameter: `in_layers.0.weight` -> `norm1.weight` and so on.
fn resnet(rest: &str) -> String {
    const NAMES: &[(&str, &str)] = &[
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(original, ours)| rest.strip_prefix(original).map(|p| format!("{ours}{p}")))
        .unwrap_or_else(|| rest.to_string())
}

/// `a.rest` -> `(a, rest)`.
fn split(name: &str) -> Option<(&str, &str)> {
    name.split_once('.')
}

#[cfg(test)]
mod tests {
    use super::diffusers_name;

    #[test]
    fn sd15_names_map_as_diffusers_converts_them() {
        let cases = [
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.6.0.op.bias",
                "down_blocks.1.downsamplers.0.conv.bias",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.11.0.out_layers.3.weight",
                "up_blocks.3.resnets.2.conv2.weight",
            ),
            (
                "output_blocks.10.1.proj_out.bias",
                "up_blocks.3.attentions.1.proj_out.bias",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
        ];
        for (original, expected) in cases {
            assert_eq!(
                diffusers_name(original, 2).as_deref(),
                Some(expected),
                "{original}"
            );
        }
        assert_eq!(diffusers_name("label_emb.0.0.weight", 2), None);
    }
}
