//! The text encoders' tensor names: SD 1.x's OpenAI CLIP (`cond_stage_model.transformer.*`,
//! already transformers' names) and SD 2.x's OpenCLIP (`cond_stage_model.model.*`), whose
//! attention has one fused `in_proj` for q, k and v, as diffusers' `convert_ldm_clip_checkpoint`
//! and `convert_open_clip_checkpoint` read them.

use super::Transform;

/// The prefix of SD 1.x's OpenAI CLIP text encoder.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// The prefix of SD 2.x's OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// The transformers name of a `cond_stage_model.transformer.` tensor (without the prefix);
/// `None` for the `position_ids` buffer.
pub fn clip_name(name: &str) -> Option<String> {
    (!name.ends_with("position_ids")).then(|| name.to_string())
}

/// The transformers names of an OpenCLIP tensor (without `cond_stage_model.model.`), with the
/// part of the tensor each takes: one name, or three for a fused q/k/v projection. Empty for
/// what the text encoder does not use (`text_projection`, `logit_scale`, `attn_mask`).
pub fn open_clip_names(name: &str) -> Vec<(String, Transform)> {
    let whole = |target: String| vec![(target, Transform::Whole)];
    match name {
        "token_embedding.weight" => {
            return whole("text_model.embeddings.token_embedding.weight".into())
        }
        "positional_embedding" => {
            return whole("text_model.embeddings.position_embedding.weight".into())
        }
        _ => {}
    }
    if let Some(param) = name.strip_prefix("ln_final.") {
        return whole(format!("text_model.final_layer_norm.{param}"));
    }
    let Some(rest) = name.strip_prefix("transformer.resblocks.") else {
        return Vec::new();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return Vec::new();
    };
    let prefix = format!("text_model.encoder.layers.{layer}");
    if let Some(param) = rest.strip_prefix("attn.in_proj_") {
        return ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .map(|(i, proj)| {
                (
                    format!("{prefix}.self_attn.{proj}.{param}"),
                    Transform::Third(i),
                )
            })
            .collect();
    }
    const MODULES: &[(&str, &str)] = &[
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ];
    MODULES
        .iter()
        .find_map(|(original, ours)| {
            rest.strip_prefix(original)
                .map(|param| whole(format!("{prefix}.{ours}{param}")))
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_clip_attention_is_split_in_three() {
        let names = open_clip_names("transformer.resblocks.4.attn.in_proj_weight");
        assert_eq!(
            names,
            vec![
                (
                    "text_model.encoder.layers.4.self_attn.q_proj.weight".to_string(),
                    Transform::Third(0)
                ),
                (
                    "text_model.encoder.layers.4.self_attn.k_proj.weight".to_string(),
                    Transform::Third(1)
                ),
                (
                    "text_model.encoder.layers.4.self_attn.v_proj.weight".to_string(),
                    Transform::Third(2)
                ),
            ]
        );
        assert_eq!(
            open_clip_names("transformer.resblocks.0.mlp.c_proj.bias"),
            vec![(
                "text_model.encoder.layers.0.mlp.fc2.bias".to_string(),
                Transform::Whole
            )]
        );
        assert_eq!(
            open_clip_names("positional_embedding")[0].0,
            "text_model.embeddings.position_embedding.weight"
        );
        assert!(open_clip_names("text_projection").is_empty());
        assert!(open_clip_names("logit_scale").is_empty());
        assert_eq!(
            clip_name("text_model.embeddings.position_ids"),
            None,
            "a buffer, not a weight"
        );
    }
}
