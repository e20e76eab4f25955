//! CLIP text encoder: parity with transformers' `CLIPTextModel` (tests/fixtures/cases/text_encoder_*),
//! both weight layouts, half precision, loading errors, and trainability.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ldm::models::clip::{ClipTextConfig, ClipTextModel};
use ldm::models::nn::Activation;
use ldm::tokenizer::{PromptTokenizer, TokenizedPrompt};

/// f32 parity tolerance against transformers (float32 CPU).
const F32_TOL: f32 = 1e-5;

fn text_encoder_dir(pipeline: &str) -> PathBuf {
    common::fixture(&format!("tiny-{pipeline}/text_encoder"))
}

fn config(pipeline: &str) -> ClipTextConfig {
    ClipTextConfig::from_file(&text_encoder_dir(pipeline).join("config.json")).unwrap()
}

/// The pipeline's weights as stored (`text_model.*` keys, f16 on disk).
fn stored_weights(pipeline: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        text_encoder_dir(pipeline).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn load_model(pipeline: &str, dtype: DType) -> ClipTextModel {
    let path = text_encoder_dir(pipeline).join("model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, &Device::Cpu) }.unwrap();
    ClipTextModel::new(vb, &config(pipeline)).unwrap()
}

fn model_from_tensors(
    tensors: HashMap<String, Tensor>,
    cfg: &ClipTextConfig,
) -> candle_core::Result<ClipTextModel> {
    ClipTextModel::new(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        cfg,
    )
}

fn assert_matches_transformers(pipeline: &str) {
    let case = common::load_case(&format!("text_encoder_{pipeline}"));
    let model = load_model(pipeline, DType::F32);
    let ids = &case["input_ids"];
    common::assert_close(
        &format!("{pipeline} last_hidden_state"),
        &model.forward(ids).unwrap(),
        &case["last_hidden_state"],
        F32_TOL,
    );
    common::assert_close(
        &format!("{pipeline} clip skip 1"),
        &model.forward_with_skip(ids, 1).unwrap(),
        &case["clip_skip_1"],
        F32_TOL,
    );
}

#[test]
fn sd1_quick_gelu_matches_transformers() {
    assert_eq!(config("sd1").hidden_act, Activation::QuickGelu);
    assert_matches_transformers("sd1");
}

#[test]
fn sd2_gelu_matches_transformers() {
    assert_eq!(config("sd2").hidden_act, Activation::Gelu);
    assert_matches_transformers("sd2");
}

/// Prompt text -> our tokenizer -> our encoder gives the recorded conditioning.
#[test]
fn recorded_texts_end_to_end() {
    for pipeline in ["sd1", "sd2"] {
        let case_name = format!("text_encoder_{pipeline}");
        let case = common::load_case(&case_name);
        let texts: Vec<String> =
            serde_json::from_value(common::load_case_json(&case_name)["texts"].clone()).unwrap();
        let tokenizer =
            PromptTokenizer::from_dir(&common::fixture(&format!("tiny-{pipeline}/tokenizer")))
                .unwrap();
        let ids = tokenizer.encode_batch(&texts, &Device::Cpu).unwrap();
        let recorded = case["input_ids"].to_dtype(DType::U32).unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            recorded.to_vec2::<u32>().unwrap()
        );
        let out = load_model(pipeline, DType::F32).forward(&ids).unwrap();
        common::assert_close(
            &format!("{pipeline} from text"),
            &out,
            &case["last_hidden_state"],
            F32_TOL,
        );
    }
}

/// transformers >= 5 saves the weights without the `text_model.` prefix.
#[test]
fn prefixless_layout_loads() {
    let case = common::load_case("text_encoder_sd1");
    let stripped = stored_weights("sd1")
        .into_iter()
        .map(|(name, t)| (name.strip_prefix("text_model.").unwrap().to_string(), t))
        .collect();
    let model = model_from_tensors(stripped, &config("sd1")).unwrap();
    let prefixed = load_model("sd1", DType::F32)
        .forward(&case["input_ids"])
        .unwrap();
    let stripped_out = model.forward(&case["input_ids"]).unwrap();
    common::assert_close("prefixless vs prefixed", &stripped_out, &prefixed, 0.);
}

#[test]
fn half_precision_tracks_f32() {
    let case = common::load_case("text_encoder_sd1");
    // LayerNorm outputs are O(1); the tolerances reflect each format's mantissa.
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1.5e-1)] {
        let out = load_model("sd1", dtype)
            .forward(&case["input_ids"])
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        common::assert_close(
            &format!("{dtype:?} vs transformers f32"),
            &out,
            &case["last_hidden_state"],
            tol,
        );
    }
}

#[test]
fn missing_or_misshapen_tensor_is_named() {
    let cfg = config("sd1");
    let name = "text_model.encoder.layers.2.mlp.fc1.weight";
    let mut weights = stored_weights("sd1");
    weights.remove(name).unwrap();
    let err = model_from_tensors(weights, &cfg).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");

    let wider = ClipTextConfig {
        intermediate_size: cfg.intermediate_size + 1,
        ..cfg
    };
    let err = model_from_tensors(stored_weights("sd1"), &wider)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mlp.fc1.weight"), "{err}");
}

#[test]
fn config_fields_default_like_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        r#"{"hidden_size": 64, "hidden_act": "gelu", "projection_dim": 9}"#,
    )
    .unwrap();
    let cfg = ClipTextConfig::from_file(&path).unwrap();
    assert_eq!(
        cfg,
        ClipTextConfig {
            hidden_size: 64,
            hidden_act: Activation::Gelu,
            projection_dim: 9,
            ..ClipTextConfig::default()
        }
    );
    assert_eq!(cfg.vocab_size, 49408);
    assert_eq!(cfg.num_hidden_layers, 12);
    assert_eq!(cfg.max_position_embeddings, 77);

    std::fs::write(&path, r#"{"hidden_size": 30, "num_attention_heads": 4}"#).unwrap();
    let err = format!("{:#}", ClipTextConfig::from_file(&path).unwrap_err());
    assert!(err.contains("config.json"), "{err}");
}

fn small_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 6,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        ..Default::default()
    }
}

#[test]
fn backward_reaches_every_weight() -> candle_core::Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let cfg = small_config();
    let model = ClipTextModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg)?;
    let prompts = [
        TokenizedPrompt {
            ids: vec![1, 5, 9, 2, 0, 0],
            truncated: false,
            untruncated_len: 4,
        },
        TokenizedPrompt {
            ids: vec![1, 30, 2, 0, 0, 0],
            truncated: false,
            untruncated_len: 3,
        },
    ];
    let out = model.forward(&TokenizedPrompt::stack(&prompts, &device)?)?;
    // A random projection of the output: a plain sum of LayerNorm outputs has no gradient.
    let weights = common::randn(1, out.dims(), DType::F32);
    let grads = (out * weights)?.sum_all()?.backward()?;
    let vars = varmap.data().lock().unwrap();
    // Embeddings (2) and final LayerNorm (2), plus 4 projections, 2 MLP linears and 2 LayerNorms
    // (weight and bias each) per layer.
    assert_eq!(vars.len(), 4 + 16 * cfg.num_hidden_layers);
    for (name, var) in vars.iter() {
        assert!(name.starts_with("text_model."), "fresh weight named {name}");
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = grad.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(
            norm.is_finite() && norm > 0.,
            "gradient of {name}: squared norm {norm}"
        );
    }
    Ok(())
}

#[test]
fn rejects_overlong_input_and_excess_skip() {
    let device = Device::Cpu;
    let cfg = small_config();
    let model = ClipTextModel::new(
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &device),
        &cfg,
    )
    .unwrap();
    let too_long =
        Tensor::zeros((1, cfg.max_position_embeddings + 1), DType::U32, &device).unwrap();
    let err = model.forward(&too_long).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");

    let ids = Tensor::zeros((1, 4), DType::U32, &device).unwrap();
    assert!(model.forward_with_skip(&ids, 1).is_ok());
    assert!(model
        .forward_with_skip(&ids, cfg.num_hidden_layers)
        .is_err());
}

/// `CLIPTextModelWithProjection`'s pooled output: the final-LayerNorm state at the first end
/// token (or, for the legacy `eos_token_id` 2 of SDXL's configs, at the highest token id),
/// projected; the hidden state SDXL reads is the penultimate layer's, without the LayerNorm.
#[test]
fn pooled_output_reads_the_end_token_as_transformers_does() {
    let ids = Tensor::new(&[[1u32, 7, 5, 3, 5]], &Device::Cpu).unwrap();
    for (eos_token_id, position) in [(5u32, 2usize), (2, 1)] {
        let cfg = ClipTextConfig {
            architectures: vec!["CLIPTextModelWithProjection".into()],
            projection_dim: 3,
            eos_token_id,
            ..small_config()
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = ClipTextModel::new(vb, &cfg).unwrap();
        let (hidden, pooled) = model.forward_hidden(&ids, 1).unwrap();
        let last = model
            .forward(&ids)
            .unwrap()
            .get(0)
            .unwrap()
            .get(position)
            .unwrap();
        let projection = varmap.data().lock().unwrap()["text_projection.weight"].clone();
        let expected = projection
            .as_tensor()
            .matmul(&last.unsqueeze(1).unwrap())
            .unwrap();
        let pooled = pooled.expect("a projection model pools");
        common::assert_close(
            "pooled",
            &pooled.flatten_all().unwrap(),
            &expected.flatten_all().unwrap(),
            1e-6,
        );
        let skipped = model.forward_with_skip(&ids, 1).unwrap();
        assert!(
            common::max_abs_diff(&hidden, &skipped) > 1e-3,
            "no final LayerNorm on the hidden state"
        );
    }
    assert!(model_without_projection_pools_nothing());
}

fn model_without_projection_pools_nothing() -> bool {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ClipTextModel::new(vb, &small_config()).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    model.forward_hidden(&ids, 1).unwrap().1.is_none() && model.forward_hidden(&ids, 3).is_err()
}
