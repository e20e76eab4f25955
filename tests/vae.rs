//! The VAE (`AutoencoderKL`) and the blocks it shares with the U-Net: parity with diffusers,
//! checkpoint-name compatibility, the posterior's KL term, and gradients for training.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use ldm::config::SampleSize;
use ldm::models::resnet::{
    upsample_nearest, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D,
};
use ldm::models::vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};

use common::{assert_close, fixture, load_case, max_abs_diff};

const CPU: Device = Device::Cpu;

fn load_pipeline_vae(pipeline: &str) -> (AutoencoderKLConfig, HashMap<String, Tensor>) {
    let dir = fixture(&format!("{pipeline}/vae"));
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &CPU)
            .unwrap();
    (cfg, weights)
}

fn vae_from_tensors(
    cfg: &AutoencoderKLConfig,
    weights: HashMap<String, Tensor>,
) -> candle_core::Result<AutoencoderKL> {
    AutoencoderKL::new(VarBuilder::from_tensors(weights, DType::F32, &CPU), cfg)
}

// ---------------------------------------------------------------- parity with diffusers

/// Encoder moments, the reparameterised sample and the decoder against diffusers (f32).
fn check_against_diffusers(pipeline: &str, case: &str) {
    let (cfg, weights) = load_pipeline_vae(pipeline);
    let vae = vae_from_tensors(&cfg, weights).unwrap();
    let t = load_case(case);

    let check = |what: &str, actual: &Tensor, tol: f32| {
        assert_close(&format!("{case} {what}"), actual, &t[what], tol);
    };

    let posterior = vae.encode(&t["image"]).unwrap();
    check("mean", &posterior.mean, 1e-5);
    check("logvar", &posterior.logvar, 1e-5);
    check("std", &posterior.std().unwrap(), 1e-5);
    check("sample", &posterior.sample(&t["sample_eps"]).unwrap(), 1e-5);
    check("decoded", &vae.decode(&t["latents"]).unwrap(), 1e-4);
}

#[test]
fn sd1_vae_matches_diffusers() {
    check_against_diffusers("tiny-sd1", "vae_sd1");
}

#[test]
fn sd2_vae_matches_diffusers() {
    check_against_diffusers("tiny-sd2", "vae_sd2");
}

#[test]
fn config_reads_diffusers_fields_and_defaults() {
    let (cfg, _) = load_pipeline_vae("tiny-sd1");
    assert_eq!(cfg.block_out_channels, [32, 64]);
    assert_eq!(cfg.sample_size, SampleSize::Square(64));
    assert_eq!(cfg.shift_factor, None);
    assert_eq!(cfg.vae_scale_factor(), 2);

    let defaults: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(defaults.block_out_channels, [64]);
    assert_eq!(defaults.layers_per_block, 1);
    assert_eq!(defaults.latent_channels, 4);
    assert_eq!(defaults.scaling_factor, 0.18215);
    assert_eq!(defaults.shift_factor, None);
    assert!(defaults.use_quant_conv && defaults.use_post_quant_conv);
    assert!(defaults.mid_block_add_attention && defaults.force_upcast);
    assert_eq!(defaults.vae_scale_factor(), 1);
}

#[test]
fn unsupported_block_type_is_rejected() {
    let cfg: AutoencoderKLConfig = serde_json::from_value(serde_json::json!({
        "down_block_types": ["AttnDownEncoderBlock2D"],
    }))
    .unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("AttnDownEncoderBlock2D"), "{err}");
}

// ---------------------------------------------------------------- checkpoint names

/// Older SD checkpoints name the mid-block attention `query/key/value/proj_attn`, some with
/// 1×1-conv weights; both must load and compute the same as the current names.
#[test]
fn legacy_attention_names_load() {
    let (cfg, weights) = load_pipeline_vae("tiny-sd1");
    let reference = vae_from_tensors(&cfg, weights.clone()).unwrap();
    let renames = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    let legacy = |as_conv: bool| -> HashMap<String, Tensor> {
        weights
            .iter()
            .map(|(name, tensor)| {
                let Some((from, to)) = renames.iter().find(|(from, _)| name.contains(from)) else {
                    return (name.clone(), tensor.clone());
                };
                let tensor = if as_conv && tensor.rank() == 2 {
                    tensor.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
                } else {
                    tensor.clone()
                };
                (name.replace(from, to), tensor)
            })
            .collect()
    };
    let image = common::randn(1, &[1, cfg.in_channels, 32, 32], DType::F32);
    let latents = common::randn(2, &[1, cfg.latent_channels, 8, 8], DType::F32);
    let expected_mean = reference.encode(&image).unwrap().mean;
    let expected_decode = reference.decode(&latents).unwrap();
    for as_conv in [false, true] {
        let renamed = legacy(as_conv);
        assert!(renamed.contains_key("encoder.mid_block.attentions.0.query.weight"));
        let vae = vae_from_tensors(&cfg, renamed).unwrap();
        let mean_diff = max_abs_diff(&vae.encode(&image).unwrap().mean, &expected_mean);
        let decode_diff = max_abs_diff(&vae.decode(&latents).unwrap(), &expected_decode);
        eprintln!("legacy names (1x1 conv weights: {as_conv}): {mean_diff:e} / {decode_diff:e}");
        assert_eq!((mean_diff, decode_diff), (0.0, 0.0));
    }
}

#[test]
fn missing_tensor_error_names_it() {
    let (cfg, mut weights) = load_pipeline_vae("tiny-sd1");
    for name in [
        "decoder.conv_out.weight",
        "encoder.mid_block.attentions.0.to_k.bias",
    ] {
        let removed = weights.remove(name).unwrap();
        let err = vae_from_tensors(&cfg, weights.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "error does not name {name}: {err}");
        weights.insert(name.to_string(), removed);
    }
}

// ---------------------------------------------------------------- the posterior

/// Closed-form KL against a Monte-Carlo estimate of E_q[log q(z) − log p(z)].
#[test]
fn closed_form_kl_matches_monte_carlo() {
    let (batch, c, h, w) = (2, 3, 4, 4);
    let samples = 20_000;
    let posterior = DiagonalGaussian {
        mean: common::randn(10, &[batch, c, h, w], DType::F64),
        logvar: (common::randn(11, &[batch, c, h, w], DType::F64) * 0.7).unwrap(),
    };
    let kl = posterior.kl().unwrap().to_vec1::<f64>().unwrap();

    // Many draws at once: broadcast the posterior over a leading sample axis.
    let shape = (samples, batch, c, h, w);
    let broadcast = DiagonalGaussian {
        mean: posterior.mean.broadcast_as(shape).unwrap(),
        logvar: posterior.logvar.broadcast_as(shape).unwrap(),
    };
    let eps = common::randn(12, &[samples, batch, c, h, w], DType::F64);
    let z = broadcast.sample(&eps).unwrap();
    // log q(z) − log p(z) per element: −½ logσ² − ½ ε² + ½ z² (the 2π terms cancel).
    let log_ratio = ((z.sqr().unwrap() - eps.sqr().unwrap()).unwrap() - &broadcast.logvar)
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
        .flatten_from(2)
        .unwrap()
        .sum(D::Minus1)
        .unwrap(); // [samples, batch]
    let mc_mean = log_ratio.mean(0).unwrap().to_vec1::<f64>().unwrap();
    let mc_var = log_ratio
        .broadcast_sub(&log_ratio.mean_keepdim(0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean(0)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for b in 0..batch {
        let std_err = (mc_var[b] / samples as f64).sqrt();
        let diff = (kl[b] - mc_mean[b]).abs();
        eprintln!(
            "KL[{b}]: closed form {:.4}, Monte Carlo {:.4} ± {std_err:.4} (diff {diff:.4}, tolerance 4 SE)",
            kl[b], mc_mean[b]
        );
        assert!(
            std_err < 0.01 * kl[b],
            "Monte-Carlo estimate too noisy to test"
        );
        assert!(diff < 4.0 * std_err);
    }
}

#[test]
fn posterior_splits_and_clamps_moments() {
    let moments = Tensor::new(&[[[[1f32]], [[2.]], [[-40.]], [[25.]]]], &CPU).unwrap();
    let posterior = DiagonalGaussian::from_moments(&moments).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&posterior.mean), [1., 2.]);
    assert_eq!(flat(&posterior.logvar), [-30., 20.]);
    assert_eq!(flat(&posterior.mode()), [1., 2.]);
    let std = flat(&posterior.std().unwrap());
    assert!((std[1] - 10f32.exp()).abs() / 10f32.exp() < 1e-6);
    let var = flat(&posterior.var().unwrap());
    assert!((var[1] - 20f32.exp()).abs() / 20f32.exp() < 1e-6);
}

// ---------------------------------------------------------------- training

fn tiny_config() -> AutoencoderKLConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "norm_num_groups": 4,
        "latent_channels": 2,
        "layers_per_block": 1,
    }))
    .unwrap()
}

/// Reconstruction MSE plus a weighted KL: the VAE training objective's shape.
fn elbo_loss(vae: &AutoencoderKL, image: &Tensor, eps: &Tensor) -> Tensor {
    let posterior = vae.encode(image).unwrap();
    let reconstruction = vae.decode(&posterior.sample(eps).unwrap()).unwrap();
    let mse = (reconstruction - image)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let kl = posterior.kl().unwrap().mean_all().unwrap();
    (mse + (kl * 1e-2).unwrap()).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Central finite difference of the loss in one element of `var`.
fn finite_difference(var: &Var, index: usize, loss: impl Fn() -> f64) -> f64 {
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let step = 1e-5;
    let evaluate_at = |delta: f64| {
        let mut values = original.clone();
        values[index] += delta;
        var.set(&Tensor::from_vec(values, var.shape(), &CPU).unwrap())
            .unwrap();
        loss()
    };
    let slope = (evaluate_at(step) - evaluate_at(-step)) / (2.0 * step);
    var.set(&Tensor::from_vec(original, var.shape(), &CPU).unwrap())
        .unwrap();
    slope
}

#[test]
fn elbo_gradients_reach_every_weight_and_match_finite_differences() {
    let cfg = tiny_config();
    let varmap = VarMap::new();
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F64, &CPU), &cfg).unwrap();
    let image = common::randn(20, &[2, 3, 8, 8], DType::F64);
    let eps = common::randn(21, &[2, cfg.latent_channels, 4, 4], DType::F64);

    let grads = elbo_loss(&vae, &image, &eps).backward().unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in &names {
        let grad = grads
            .get(vars[*name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let largest = scalar(&grad.abs().unwrap().flatten_all().unwrap().max(0).unwrap());
        assert!(largest > 0.0, "zero gradient for {name}");
    }
    eprintln!("{} variables, all with non-zero gradients", names.len());

    // One weight from each part: encoder attention, posterior head, decoder upsampler.
    for (name, index) in [
        ("encoder.mid_block.attentions.0.to_q.weight", 5),
        ("quant_conv.weight", 3),
        ("decoder.up_blocks.0.upsamplers.0.conv.weight", 17),
        ("decoder.mid_block.resnets.1.norm1.bias", 2),
    ] {
        let var = &vars[name];
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic = analytic.get(index).unwrap().to_scalar::<f64>().unwrap();
        let numeric = finite_difference(var, index, || scalar(&elbo_loss(&vae, &image, &eps)));
        let rel = (analytic - numeric).abs() / analytic.abs().max(1e-8);
        eprintln!("d loss / d {name}[{index}]: backprop {analytic:.6e}, central FD {numeric:.6e}, rel diff {rel:.1e} (tolerance 1e-5)");
        assert!(rel < 1e-5);
    }
}

/// Each image of a batch is encoded and decoded as it would be alone.
#[test]
fn batch_items_are_independent() {
    let (cfg, weights) = load_pipeline_vae("tiny-sd1");
    let vae = vae_from_tensors(&cfg, weights).unwrap();
    let images = common::randn(3, &[2, cfg.in_channels, 16, 16], DType::F32);
    let latents = common::randn(4, &[2, cfg.latent_channels, 4, 4], DType::F32);
    let batched = vae.encode(&images).unwrap();
    let decoded = vae.decode(&latents).unwrap();
    for i in 0..2 {
        let item = |t: &Tensor| t.narrow(0, i, 1).unwrap();
        let single = vae.encode(&item(&images)).unwrap();
        assert_close("batched mean", &item(&batched.mean), &single.mean, 1e-5);
        assert_close(
            "batched logvar",
            &item(&batched.logvar),
            &single.logvar,
            1e-5,
        );
        let single_decoded = vae.decode(&item(&latents)).unwrap();
        assert_close("batched decode", &item(&decoded), &single_decoded, 1e-5);
    }
}

/// f16 weights and activations (norms and softmax run in f32 inside). candle's CPU backend
/// has no bf16 matmul, so bf16 is left to accelerator runs.
#[test]
fn vae_runs_in_f16() {
    let cfg = tiny_config();
    let varmap = VarMap::new();
    let vae32 =
        AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, &CPU), &cfg).unwrap();
    let image = common::randn(30, &[1, 3, 8, 8], DType::F32);
    let expected = vae32.decode(&vae32.encode(&image).unwrap().mean).unwrap();
    let dtype = DType::F16;
    {
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        let vae = AutoencoderKL::new(VarBuilder::from_tensors(weights, dtype, &CPU), &cfg).unwrap();
        let posterior = vae.encode(&image.to_dtype(dtype).unwrap()).unwrap();
        assert_eq!(posterior.mean.dtype(), dtype);
        assert_eq!(posterior.kl().unwrap().dtype(), DType::F32);
        let decoded = vae.decode(&posterior.mean).unwrap();
        let diff = max_abs_diff(&decoded, &expected);
        eprintln!("{dtype:?} round trip vs f32: max abs diff {diff:.3e} (tolerance 0.1)");
        assert!(diff < 0.1);
    }
}

// ---------------------------------------------------------------- shared blocks

#[test]
fn resnet_block_shapes_and_time_embedding() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &CPU);
    let cfg = ResnetBlock2DConfig {
        groups: 4,
        ..ResnetBlock2DConfig::new(8, 12, Some(16))
    };
    let block = ResnetBlock2D::new(vb.pp("block"), &cfg).unwrap();
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    for expected in ["conv_shortcut.weight", "time_emb_proj.weight", "norm2.bias"] {
        assert!(names.contains(&format!("block.{expected}")), "{names:?}");
    }
    let xs = common::randn(40, &[2, 8, 5, 7], DType::F32);
    let temb = common::randn(41, &[2, 16], DType::F32);
    let out = block.forward(&xs, Some(&temb)).unwrap();
    assert_eq!(out.dims(), [2, 12, 5, 7]);
    let other_temb = block.forward(&xs, Some(&(temb + 1.0).unwrap())).unwrap();
    assert!(
        max_abs_diff(&out, &other_temb) > 1e-3,
        "time embedding has no effect"
    );

    // Same channels: identity shortcut, no projection created.
    let same = ResnetBlock2D::new(
        vb.pp("same"),
        &ResnetBlock2DConfig {
            groups: 4,
            ..ResnetBlock2DConfig::new(8, 8, None)
        },
    )
    .unwrap();
    assert_eq!(same.forward(&xs, None).unwrap().dims(), [2, 8, 5, 7]);
    assert!(!varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("same.conv_shortcut.weight"));
}

#[test]
fn downsample_shapes_follow_diffusers_padding() {
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &CPU);
    let xs = common::randn(50, &[1, 4, 5, 7], DType::F32);
    // padding 0: pad right/bottom to 6×8, then 3×3 stride 2 → 2×3.
    let asymmetric = Downsample2D::new(vb.pp("a"), 4, 6, 0).unwrap();
    assert_eq!(asymmetric.forward(&xs).unwrap().dims(), [1, 6, 2, 3]);
    // padding 1: (5 + 2 − 3) / 2 + 1 = 3, (7 + 2 − 3) / 2 + 1 = 4.
    let symmetric = Downsample2D::new(vb.pp("s"), 4, 4, 1).unwrap();
    assert_eq!(symmetric.forward(&xs).unwrap().dims(), [1, 4, 3, 4]);
}

#[test]
fn upsample_shapes_values_and_gradient() {
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &CPU);
    let up = Upsample2D::new(vb.pp("up"), 4, 6).unwrap();
    let xs = common::randn(60, &[1, 4, 5, 7], DType::F32);
    assert_eq!(up.forward(&xs, None).unwrap().dims(), [1, 6, 10, 14]);
    assert_eq!(
        up.forward(&xs, Some((9, 13))).unwrap().dims(),
        [1, 6, 9, 13]
    );

    // The broadcast upsampling equals candle's nearest kernel, and each input pixel's
    // gradient counts its four copies.
    let var = Var::from_tensor(&xs).unwrap();
    let repeated = upsample_nearest(var.as_tensor(), 10, 14).unwrap();
    assert_eq!(
        max_abs_diff(&repeated, &xs.upsample_nearest2d(10, 14).unwrap()),
        0.0
    );
    let grad = repeated.sum_all().unwrap().backward().unwrap();
    let grad = grad.get(var.as_tensor()).unwrap();
    assert_eq!(
        max_abs_diff(grad, &Tensor::full(4f32, xs.shape(), &CPU).unwrap()),
        0.0
    );
}

/// A VAE whose config sets `force_upcast` decodes in f32 when the pipeline runs in f16 (SDXL's
/// overflows in f16), as diffusers does; without it (an fp16-fix VAE) and in bf16 it stays in
/// the pipeline's precision.
#[test]
fn force_upcast_decodes_in_f32_under_f16() {
    use ldm::model_source::PipelineFolder;
    use ldm::pipelines::StableDiffusion;

    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fp16-fix");
    common::copy_dir(&common::fixture("tiny-sdxl"), &fixed);
    let config = fixed.join("vae/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(r#""force_upcast": true"#));
    std::fs::write(
        &config,
        text.replace(r#""force_upcast": true"#, r#""force_upcast": false"#),
    )
    .unwrap();
    let decoded_dtype = |root: std::path::PathBuf, dtype: DType| {
        let folder = PipelineFolder::new(&root, "tiny-sdxl");
        let pipe = StableDiffusion::load(&folder, &Device::Cpu, dtype).unwrap();
        let latents = Tensor::zeros((1, 4, 8, 8), dtype, &Device::Cpu).unwrap();
        pipe.decode_latents(&latents).unwrap().dtype()
    };
    let sdxl = common::fixture("tiny-sdxl");
    assert_eq!(decoded_dtype(sdxl.clone(), DType::F16), DType::F32);
    assert_eq!(decoded_dtype(sdxl, DType::BF16), DType::BF16);
    assert_eq!(decoded_dtype(fixed, DType::F16), DType::F16);
}

/// txt2img loads the VAE's decoder alone: it decodes exactly as the whole VAE does, and
/// encoding is then a clear error rather than a missing-tensor panic.
#[test]
fn decoder_only_vae_decodes_the_same_and_refuses_to_encode() {
    use ldm::model_source::PipelineFolder;
    use ldm::pipelines::{StableDiffusion, VaeParts};
    let folder = PipelineFolder::new(&fixture("tiny-sd1"), "tiny-sd1");
    let load = |parts| {
        StableDiffusion::load_with_loras(&folder, &Device::Cpu, DType::F32, None, &[], parts)
            .unwrap()
    };
    let (whole, decoder) = (
        load(VaeParts::EncoderAndDecoder),
        load(VaeParts::DecoderOnly),
    );
    let latents = common::randn(7, &[1, 4, 8, 8], DType::F32);
    let expected = whole.decode_latents(&latents).unwrap();
    assert_eq!(
        max_abs_diff(&decoder.decode_latents(&latents).unwrap(), &expected),
        0.0
    );
    let image = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(whole.vae.encode(&image).is_ok());
    let err = decoder.vae.encode(&image).unwrap_err().to_string();
    assert!(err.contains("without its encoder"), "{err}");
}
