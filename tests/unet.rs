//! The U-Net against diffusers' `UNet2DConditionModel`, and its fitness for training.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, fixture, load_case, max_abs_diff};
use ldm::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

/// Parity tolerance in f32 against diffusers' f32 output.
const F32_TOLERANCE: f32 = 1e-4;

fn unet_weights(pipeline: &str) -> std::path::PathBuf {
    fixture(&format!(
        "{pipeline}/unet/diffusion_pytorch_model.safetensors"
    ))
}

fn unet_config(pipeline: &str) -> UNet2DConditionConfig {
    UNet2DConditionConfig::from_file(&fixture(&format!("{pipeline}/unet/config.json"))).unwrap()
}

fn load_unet(pipeline: &str, dtype: DType) -> UNet2DConditionModel {
    let weights = unet_weights(pipeline);
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu) }.unwrap();
    UNet2DConditionModel::new(vb, &unet_config(pipeline)).unwrap()
}

/// Runs `case` (sample, per-row timesteps, text states) through `unet` in `dtype`.
fn run_case(unet: &UNet2DConditionModel, case: &HashMap<String, Tensor>, dtype: DType) -> Tensor {
    let input = |name: &str| case[name].to_dtype(dtype).unwrap();
    let timesteps = &case["timestep"];
    assert_eq!(
        timesteps.dims(),
        [2],
        "the cases use one timestep per batch row"
    );
    unet.forward(&input("sample"), timesteps, &input("encoder_hidden_states"))
        .unwrap()
}

fn check_parity(pipeline: &str, case_name: &str) {
    let unet = load_unet(pipeline, DType::F32);
    let case = load_case(case_name);
    let out = run_case(&unet, &case, DType::F32);
    assert_close(case_name, &out, &case["out"], F32_TOLERANCE);
}

#[test]
fn sd1_unet_matches_diffusers() {
    check_parity("tiny-sd1", "unet_sd1");
}

#[test]
fn sd2_unet_matches_diffusers() {
    check_parity("tiny-sd2", "unet_sd2");
}

#[test]
fn inpaint_unet_matches_diffusers() {
    check_parity("tiny-inpaint", "unet_inpaint");
}

/// f16 weights and activations (norms and softmax run in f32 inside). bf16 is not tested here:
/// candle's CPU matmul has no bf16 kernel.
#[test]
fn f16_tracks_f32() {
    let case = load_case("unet_sd1");
    let reference = &case["out"];
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let out = run_case(&load_unet("tiny-sd1", DType::F16), &case, DType::F16);
    assert_eq!(out.dtype(), DType::F16);
    let what = format!("unet_sd1 in f16 (output scale {scale:.2})");
    assert_close(&what, &out, reference, 1e-2 * scale);
}

/// A small SD2-style U-Net (cross-attention down/mid/up blocks, linear projections,
/// per-block head counts) for weights created from a `VarMap`.
fn small_config() -> UNet2DConditionConfig {
    serde_json::from_str(
        r#"{
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 12,
            "attention_head_dim": [2, 4],
            "use_linear_projection": true
        }"#,
    )
    .unwrap()
}

struct SmallUNet {
    varmap: VarMap,
    unet: UNet2DConditionModel,
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
}

fn small_unet(dtype: DType) -> SmallUNet {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
    let unet = UNet2DConditionModel::new(vb, &small_config()).unwrap();
    SmallUNet {
        varmap,
        unet,
        sample: common::randn(1, &[2, 4, 8, 8], dtype),
        timesteps: Tensor::new(&[5f32, 900.], &device).unwrap(),
        context: common::randn(2, &[2, 3, 12], dtype),
    }
}

fn scalar(xs: &Tensor) -> f64 {
    xs.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Index and value of the largest-magnitude entry.
fn largest_entry(xs: &Tensor) -> (usize, f64) {
    let values = xs
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let index = (0..values.len())
        .max_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()))
        .unwrap();
    (index, values[index])
}

#[test]
fn every_weight_gets_a_gradient_and_gradients_match_finite_differences() {
    // f64 so that central differences are accurate to ~1e-9.
    let small = small_unet(DType::F64);
    let probe = common::randn(3, &[2, 4, 8, 8], DType::F64);
    let loss = || {
        let out = small
            .unet
            .forward(&small.sample, &small.timesteps, &small.context)
            .unwrap();
        (out * &probe).unwrap().sum_all().unwrap()
    };
    let grads = loss().backward().unwrap();

    let vars: HashMap<String, Var> = small.varmap.data().lock().unwrap().clone();
    let mut without_gradient: Vec<&String> = vars
        .iter()
        .filter(|(_, var)| grads.get(var).is_none_or(|g| largest_entry(g).1 == 0.))
        .map(|(name, _)| name)
        .collect();
    without_gradient.sort();
    eprintln!(
        "{} variables, {} without gradient",
        vars.len(),
        without_gradient.len()
    );
    assert!(
        without_gradient.is_empty(),
        "no gradient for {without_gradient:?}"
    );

    let step = 1e-5;
    for name in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "mid_block.attentions.0.transformer_blocks.0.norm2.weight",
        "up_blocks.1.resnets.0.norm1.weight",
    ] {
        let var = &vars[name];
        let (index, analytic) = largest_entry(grads.get(var).unwrap());
        let original = var.as_tensor().copy().unwrap();
        let mut nudge = vec![0f64; original.elem_count()];
        nudge[index] = step;
        let nudge = Tensor::from_vec(nudge, original.shape(), &Device::Cpu).unwrap();
        var.set(&(&original + &nudge).unwrap()).unwrap();
        let plus = scalar(&loss());
        var.set(&(&original - &nudge).unwrap()).unwrap();
        let minus = scalar(&loss());
        var.set(&original).unwrap();
        let numeric = (plus - minus) / (2. * step);
        let error = (numeric - analytic).abs() / analytic.abs().max(1.);
        eprintln!(
            "{name}[{index}]: analytic {analytic:.9}, numeric {numeric:.9}, rel err {error:.1e}"
        );
        assert!(
            error < 1e-6,
            "{name}: gradient {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn per_row_timesteps_equal_running_rows_alone() {
    let small = small_unet(DType::F32);
    let unet = &small.unet;
    let batched = unet
        .forward(&small.sample, &small.timesteps, &small.context)
        .unwrap();
    for row in 0..2 {
        let alone = unet
            .forward(
                &small.sample.narrow(0, row, 1).unwrap(),
                &small.timesteps.narrow(0, row, 1).unwrap(),
                &small.context.narrow(0, row, 1).unwrap(),
            )
            .unwrap();
        assert_close(
            &format!("row {row}"),
            &batched.narrow(0, row, 1).unwrap(),
            &alone,
            1e-5,
        );
    }

    // The timestep really differs per row: identical inputs, different timesteps.
    let same_sample = small
        .sample
        .narrow(0, 0, 1)
        .unwrap()
        .repeat((2, 1, 1, 1))
        .unwrap();
    let same_context = small
        .context
        .narrow(0, 0, 1)
        .unwrap()
        .repeat((2, 1, 1))
        .unwrap();
    let out = unet
        .forward(&same_sample, &small.timesteps, &same_context)
        .unwrap();
    let row_gap = max_abs_diff(&out.narrow(0, 0, 1).unwrap(), &out.narrow(0, 1, 1).unwrap());
    eprintln!("same input, timesteps 5 and 900: rows differ by up to {row_gap:.3e}");
    assert!(
        row_gap > 1e-3,
        "rows with timesteps 5 and 900 agree to {row_gap}"
    );

    // A scalar or single timestep is shared by the batch.
    let both_900 = Tensor::new(&[900f32, 900.], &Device::Cpu).unwrap();
    let expected = unet
        .forward(&small.sample, &both_900, &small.context)
        .unwrap();
    for shared in [
        Tensor::new(900f32, &Device::Cpu),
        Tensor::new(&[900f64], &Device::Cpu),
    ] {
        let out = unet
            .forward(&small.sample, &shared.unwrap(), &small.context)
            .unwrap();
        assert_eq!(max_abs_diff(&out, &expected), 0.);
    }

    let three = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let err = unet
        .forward(&small.sample, &three, &small.context)
        .unwrap_err();
    assert!(
        err.to_string().contains("3 timesteps for a batch of 2"),
        "{err}"
    );
}

#[test]
fn sizes_not_divisible_by_the_downsampling_factor_keep_their_shape() {
    let small = small_unet(DType::F32);
    let sample = common::randn(4, &[1, 4, 9, 7], DType::F32);
    let context = small.context.narrow(0, 0, 1).unwrap();
    let timestep = Tensor::new(10f32, &Device::Cpu).unwrap();
    let out = small.unet.forward(&sample, &timestep, &context).unwrap();
    assert_eq!(out.dims(), [1, 4, 9, 7]);
}

#[test]
fn added_conditioning_is_rejected_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        r#"{"addition_embed_type": "text_time", "sample_size": 128}"#,
    )
    .unwrap();
    let err = UNet2DConditionConfig::from_file(&path).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("addition_embed_type") && message.contains("text_time"),
        "{message}"
    );
    assert!(message.contains("config.json"), "{message}");

    let config: UNet2DConditionConfig =
        serde_json::from_str(r#"{"class_embed_type": "timestep"}"#).unwrap();
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &config).unwrap_err();
    assert!(err.to_string().contains("class_embed_type"), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let mut tensors =
        candle_core::safetensors::load(unet_weights("tiny-sd1"), &Device::Cpu).unwrap();
    let missing = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    assert!(tensors.remove(missing).is_some());
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &unet_config("tiny-sd1")).unwrap_err();
    assert!(err.to_string().contains(missing), "{err}");
}
