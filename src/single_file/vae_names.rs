//! The original (CompVis `autoencoder.py`) VAE tensor names as diffusers names them, as
//! diffusers' `convert_ldm_vae_checkpoint` reads them: `down.N.block.M` / `up.N.block.M`
//! resnets (the decoder's `up` levels numbered from the lowest resolution, diffusers' from the
//! highest), `mid.block_1/2`, and the mid attention `mid.attn_1` whose q/k/v/proj_out are 1x1
//! convolutions where diffusers has linear layers.

/// The diffusers name of `name` (without `first_stage_model.`) and whether the tensor is a
/// 1x1 convolution kernel to read as a linear weight; `None` for a tensor the VAE lacks.
/// `up_blocks`: the number of decoder levels.
pub fn diffusers_name(name: &str, up_blocks: usize) -> Option<(String, bool)> {
    let plain = |name: String| Some((name, false));
    let (side, rest) = name.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return plain(name.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let (module, rest) = rest.split_once('.')?;
    match module {
        "conv_in" | "conv_out" => plain(name.to_string()),
        "norm_out" => plain(format!("{side}.conv_norm_out.{rest}")),
        "mid" => {
            let (part, rest) = rest.split_once('.')?;
            if let Some(index) = part.strip_prefix("block_") {
                let index: usize = index.parse().ok()?;
                return plain(format!(
                    "{side}.mid_block.resnets.{}.{}",
                    index.checked_sub(1)?,
                    resnet(rest)
                ));
            }
            if part != "attn_1" {
                return None;
            }
            let (layer, param) = rest.split_once('.')?;
            let target = match layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            let conv_kernel = layer != "norm" && param == "weight";
            Some((
                format!("{side}.mid_block.attentions.0.{target}.{param}"),
                conv_kernel,
            ))
        }
        "down" | "up" if (module == "down") == (side == "encoder") => {
            let (level, rest) = rest.split_once('.')?;
            let level: usize = level.parse().ok()?;
            let (blocks, level) = if side == "encoder" {
                ("down_blocks", level)
            } else {
                ("up_blocks", up_blocks.checked_sub(level + 1)?)
            };
            let (part, rest) = rest.split_once('.')?;
            match part {
                "block" => {
                    let (index, rest) = rest.split_once('.')?;
                    plain(format!(
                        "{side}.{blocks}.{level}.resnets.{index}.{}",
                        resnet(rest)
                    ))
                }
                "downsample" | "upsample" => {
                    let sampler = if part == "downsample" {
                        "downsamplers"
                    } else {
                        "upsamplers"
                    };
                    plain(format!(
                        "{side}.{blocks}.{level}.{sampler}.0.{}",
                        rest.strip_prefix("conv.").map(|p| format!("conv.{p}"))?
                    ))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A resnet's parameter: the original's `nin_shortcut` is diffusers' `conv_shortcut`.
fn resnet(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(param) => format!("conv_shortcut.{param}"),
        None => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::diffusers_name;

    #[test]
    fn sd_vae_names_map_as_diffusers_converts_them() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                false,
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.mid.block_2.norm2.bias",
                "decoder.mid_block.resnets.1.norm2.bias",
                false,
            ),
            (
                "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
                true,
            ),
            (
                "encoder.mid.attn_1.q.bias",
                "encoder.mid_block.attentions.0.to_q.bias",
                false,
            ),
            (
                "decoder.mid.attn_1.norm.weight",
                "decoder.mid_block.attentions.0.group_norm.weight",
                false,
            ),
            ("decoder.norm_out.bias", "decoder.conv_norm_out.bias", false),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
        ];
        for (original, expected, conv) in cases {
            assert_eq!(
                diffusers_name(original, 4),
                Some((expected.to_string(), conv)),
                "{original}"
            );
        }
        assert_eq!(
            diffusers_name("decoder.down.0.block.0.conv1.weight", 4),
            None
        );
        assert_eq!(diffusers_name("decoder.up.4.block.0.conv1.weight", 4), None);
    }
}
