//! Single-file (original-layout) checkpoints through the CLI against diffusers'
//! `from_single_file(file, config=<tiny folder>)` (scripts/make_single_file_fixtures.py): SD 1.x
//! with diffusers' default non-EMA and its `extract_ema` weights, with a LoRA fused, SD 2.x (OpenCLIP, fused q/k/v,
//! from a PyTorch pickle) with v-prediction from the config folder or the flag, inpainting; and
//! the errors for files and folders that do not fit.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// Final latents, as in tests/cli_parity.rs (f32 end to end; values up to |40|).
const LATENT_TOL: f32 = 2e-4;
/// Image in [0, 1] before 8-bit rounding, as in tests/cli_parity.rs.
const IMAGE_TOL: f32 = 1e-4;

fn fixture_str(rel: &str) -> String {
    common::fixture(rel).to_str().unwrap().to_string()
}

fn ldm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

/// Runs the recorded call of `case` on its checkpoint with `extra` flags; returns the final
/// latents and checks the PNG against diffusers' image.
fn run_case(case: &str, extra: &[&str]) -> (Tensor, Tensor) {
    let json = common::load_case_json(case);
    let expected = common::load_case(case);
    let out = tempfile::tempdir().unwrap();
    let output = common::parity_command(json["checkpoint"].as_str().unwrap(), &json, out.path())
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{case}: ldm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let latents = common::saved_latents(&out.path().join("latents.safetensors"));
    common::assert_png_matches(
        case,
        &out.path().join("image.png"),
        &expected["image"].get(0).unwrap(),
        IMAGE_TOL,
    );
    (latents, expected["latents_final"].clone())
}

fn check_case(case: &str, extra: &[&str]) {
    let (ours, theirs) = run_case(case, extra);
    common::assert_close(&format!("{case} final latents"), &ours, &theirs, LATENT_TOL);
}

fn config_flag(case: &str) -> [String; 2] {
    let json = common::load_case_json(case);
    [
        "--config".into(),
        fixture_str(json["config"].as_str().unwrap()),
    ]
}

#[test]
fn sd1_checkpoint_matches_diffusers_from_single_file() {
    let [flag, dir] = config_flag("single_file_sd1");
    check_case("single_file_sd1", &[&flag, &dir]);
}

#[test]
fn extract_ema_reads_the_ema_weights_as_diffusers_does() {
    let [flag, dir] = config_flag("single_file_sd1_ema");
    check_case("single_file_sd1_ema", &[&flag, &dir, "--extract-ema"]);
}

#[test]
fn loras_merge_into_a_checkpoint_as_diffusers_fuses_them() {
    let [flag, dir] = config_flag("single_file_sd1_lora");
    let lora = fixture_str("lora/kohya_sd1.safetensors:0.8");
    check_case("single_file_sd1_lora", &[&flag, &dir, "--lora", &lora]);
}

#[test]
fn sd2_pickle_with_open_clip_matches_diffusers_from_single_file() {
    let [flag, dir] = config_flag("single_file_sd2");
    check_case("single_file_sd2", &[&flag, &dir]);
}

/// The configs of tiny-sd2 without its scheduler (nor any weights): ldm falls back to SD's
/// scheduler defaults (epsilon), so v-prediction must come from the flag.
fn sd2_configs_without_scheduler(dir: &Path) -> PathBuf {
    let configs = dir.join("configs");
    let source = common::fixture("tiny-sd2");
    common::copy_dir(&source.join("tokenizer"), &configs.join("tokenizer"));
    for file in [
        "model_index.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
    ] {
        let target = configs.join(file);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(source.join(file), target).unwrap();
    }
    configs
}

#[test]
fn v_prediction_comes_from_the_flag_when_the_config_folder_has_no_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let configs = sd2_configs_without_scheduler(dir.path());
    let configs = configs.to_str().unwrap();
    check_case(
        "single_file_sd2",
        &["--config", configs, "--prediction-type", "v_prediction"],
    );

    // Without the flag: SD's default epsilon-prediction, visibly another result.
    let json = common::load_case_json("single_file_sd2");
    let out = tempfile::tempdir().unwrap();
    let output = common::parity_command("single_file/sd2.ckpt", &json, out.path())
        .args(["--config", configs])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let latents = common::saved_latents(&out.path().join("latents.safetensors"));
    let expected = &common::load_case("single_file_sd2")["latents_final"];
    let diff = common::max_abs_diff(&latents, expected);
    assert!(
        diff > 0.1,
        "epsilon-prediction gave v-prediction's latents ({diff})"
    );
}

#[test]
fn inpainting_checkpoint_matches_diffusers_from_single_file() {
    let [flag, dir] = config_flag("single_file_inpaint");
    check_case("single_file_inpaint", &[&flag, &dir]);
}

/// The configs a config folder lacks are inferred from the tensors (tiny-sd1's U-Net and VAE
/// follow SD 1.x's conventions: 8 heads, 32 groups; its text encoder's 8-channel heads do not).
#[test]
fn missing_component_configs_are_inferred_from_the_tensors() {
    let checkpoint =
        ldm::single_file::Checkpoint::open(&common::fixture("single_file/sd1_ema.safetensors"))
            .unwrap();
    let tiny = common::fixture("tiny-sd1");
    let inferred = checkpoint.infer_unet_config().unwrap();
    let mut expected =
        ldm::models::unet::UNet2DConditionConfig::from_file(&tiny.join("unet/config.json"))
            .unwrap();
    // Not in the tensors: SD 1.x's 512 px (64 latents); tiny-sd1 says 32.
    assert_eq!(
        inferred.sample_size,
        Some(ldm::config::SampleSize::Square(64))
    );
    expected.sample_size = inferred.sample_size;
    assert_eq!(inferred, expected);
    let inferred = checkpoint.infer_vae_config().unwrap();
    let mut expected =
        ldm::models::vae::AutoencoderKLConfig::from_file(&tiny.join("vae/config.json")).unwrap();
    assert_eq!(inferred.sample_size, ldm::config::SampleSize::Square(512));
    expected.sample_size = inferred.sample_size;
    assert_eq!(inferred, expected);

    // Through the CLI: only the tokenizer and the text encoder's config.
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    common::copy_dir(&tiny.join("tokenizer"), &configs.join("tokenizer"));
    let configs = configs.to_str().unwrap().to_string();
    let message = quick(
        &common::fixture("single_file/sd1_ema.safetensors"),
        &["--config", &configs],
        dir.path(),
    );
    common::assert_clean_error(
        &message,
        &[
            "cannot infer the text_encoder config",
            "attention heads of a text encoder of 32 channels",
        ],
    );
    std::fs::create_dir(dir.path().join("configs/text_encoder")).unwrap();
    std::fs::copy(
        tiny.join("text_encoder/config.json"),
        dir.path().join("configs/text_encoder/config.json"),
    )
    .unwrap();
    check_case("single_file_sd1", &["--config", &configs]);
}

/// A file with SD-sized text-encoder tensors (zeros) and the least else `Checkpoint` needs.
fn text_encoder_only(dir: &Path, name: &str, tensors: &[(String, &[usize])]) -> PathBuf {
    let mut all: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape)| (name.clone(), zeros(shape)))
        .collect();
    all.insert(
        "model.diffusion_model.input_blocks.0.0.weight".into(),
        zeros(&[8, 4, 3, 3]),
    );
    all.insert("first_stage_model.quant_conv.bias".into(), zeros(&[8]));
    let path = dir.join(name);
    save(&path, &all);
    path
}

#[test]
fn text_encoder_configs_follow_sd_conventions() {
    use ldm::models::nn::Activation;
    use ldm::single_file::Checkpoint;
    let dir = tempfile::tempdir().unwrap();
    // SD 1.x: OpenAI CLIP, every layer used, quick GELU, 64-channel heads.
    let p = "cond_stage_model.transformer.text_model.";
    let mut clip = vec![
        (
            format!("{p}embeddings.token_embedding.weight"),
            &[49408, 128][..],
        ),
        (
            format!("{p}embeddings.position_embedding.weight"),
            &[77, 128][..],
        ),
    ];
    for i in 0..3 {
        clip.push((
            format!("{p}encoder.layers.{i}.mlp.fc1.weight"),
            &[512, 128][..],
        ));
    }
    let config = Checkpoint::open(&text_encoder_only(dir.path(), "clip.safetensors", &clip))
        .unwrap()
        .infer_text_encoder_config()
        .unwrap();
    assert_eq!(
        (
            config.vocab_size,
            config.hidden_size,
            config.num_attention_heads
        ),
        (49408, 128, 2)
    );
    assert_eq!(
        (config.num_hidden_layers, config.intermediate_size),
        (3, 512)
    );
    assert_eq!(config.max_position_embeddings, 77);
    assert_eq!(config.hidden_act, Activation::QuickGelu);

    // SD 2.x: OpenCLIP, the last resblock unused (as diffusers drops SD 2's 24th), GELU.
    let p = "cond_stage_model.model.";
    let mut open_clip = vec![
        (format!("{p}token_embedding.weight"), &[49408, 192][..]),
        (format!("{p}positional_embedding"), &[77, 192][..]),
    ];
    for i in 0..4 {
        let name = format!("{p}transformer.resblocks.{i}.mlp.c_fc.weight");
        open_clip.push((name, &[768, 192][..]));
    }
    let config = Checkpoint::open(&text_encoder_only(
        dir.path(),
        "open.safetensors",
        &open_clip,
    ))
    .unwrap()
    .infer_text_encoder_config()
    .unwrap();
    assert_eq!((config.hidden_size, config.num_attention_heads), (192, 3));
    assert_eq!(
        (config.num_hidden_layers, config.intermediate_size),
        (3, 768)
    );
    assert_eq!(config.hidden_act, Activation::Gelu);
}

/// A checkpoint lying in a diffusers folder takes its configs from there, and batch files
/// accept it as `--model` does.
#[test]
fn batch_runs_a_checkpoint_configured_by_its_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    common::copy_dir(&common::fixture("tiny-sd1"), &folder);
    let checkpoint = folder.join("my-model.safetensors");
    std::fs::copy(
        common::fixture("single_file/sd1_ema.safetensors"),
        &checkpoint,
    )
    .unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a photo of a cat\", \"seed\": 1800, \"steps\": 10}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = ldm()
        .arg("batch")
        .arg(&prompts)
        .arg("--model")
        .arg(&checkpoint)
        .args([
            "--sampler",
            "ddim",
            "--guidance-scale",
            "7.5",
            "-W",
            "64",
            "-H",
            "64",
        ])
        .args(["--device", "cpu", "--dtype", "f32", "--quiet"])
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pngs: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(pngs.len(), 1, "{pngs:?}");
    let expected = common::load_case("single_file_sd1");
    common::assert_png_matches(
        "batch single file",
        &pngs[0],
        &expected["image"].get(0).unwrap(),
        IMAGE_TOL,
    );
}

#[test]
fn img2img_reads_the_checkpoint_vae_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let output = ldm()
        .args([
            "img2img",
            "a photo of a cat",
            "--steps",
            "2",
            "--device",
            "cpu",
        ])
        .args(["--model", &fixture_str("single_file/sd1_ema.safetensors")])
        .args(["--config", &fixture_str("tiny-sd1")])
        .args(["--image", &fixture_str("cases/test_image_64.png")])
        .arg("--output")
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("x.png").is_file());
}

fn quick(model: &Path, extra: &[&str], cwd: &Path) -> Output {
    ldm()
        .args(["txt2img", "a cat", "--steps", "1", "--device", "cpu"])
        .arg("--model")
        .arg(model)
        .args(extra)
        .arg("--output")
        .arg(cwd.join("x.png"))
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn save(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn checkpoints_without_usable_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = common::fixture("single_file/sd1_ema.safetensors");
    // No --config and no diffusers folder around the file.
    let lonely = dir.path().join("lonely.safetensors");
    std::fs::copy(&sd1, &lonely).unwrap();
    common::assert_clean_error(
        &quick(&lonely, &[], dir.path()),
        &["single-file checkpoint", "--config", "tokenizer"],
    );
    // A config folder that lacks pieces names them.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    common::assert_clean_error(
        &quick(&sd1, &["--config", empty.to_str().unwrap()], dir.path()),
        &["has no tokenizer/ folder"],
    );
    // The configs of another model: SD 2.x tensors against SD 1.x configs.
    common::assert_clean_error(
        &quick(
            &common::fixture("single_file/sd2.ckpt"),
            &["--config", &fixture_str("tiny-sd1")],
            dir.path(),
        ),
        &["sd2.ckpt", "a config of another model?"],
    );
    // An inpainting checkpoint with a 4-channel U-Net config.
    common::assert_clean_error(
        &quick(
            &common::fixture("single_file/inpaint.safetensors"),
            &["--config", &fixture_str("tiny-sd1")],
            dir.path(),
        ),
        &["SD 1.x inpainting checkpoint", "9 input channels"],
    );
    // --extract-ema on a file without EMA weights; --config on a folder model.
    common::assert_clean_error(
        &quick(
            &common::fixture("single_file/inpaint.safetensors"),
            &["--config", &fixture_str("tiny-inpaint"), "--extract-ema"],
            dir.path(),
        ),
        &["no EMA weights"],
    );
    common::assert_clean_error(
        &quick(
            &common::fixture("tiny-sd1"),
            &["--config", &fixture_str("tiny-sd1")],
            dir.path(),
        ),
        &["single-file checkpoints only"],
    );
}

#[test]
fn files_that_are_not_sd_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = ["--config", &fixture_str("tiny-sd1")];
    let check = |path: &Path, needles: &[&str]| {
        common::assert_clean_error(&quick(path, &config, dir.path()), needles)
    };
    check(
        &common::fixture("lora/kohya_sd1.safetensors"),
        &["kohya_sd1.safetensors", "is a LoRA", "--lora"],
    );
    check(
        &common::fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
        &[
            "not an SD 1.x/2.x checkpoint",
            "no model.diffusion_model.* tensors",
        ],
    );
    let random = dir.path().join("random.safetensors");
    std::fs::write(&random, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    check(&random, &["random.safetensors", "safetensors header"]);
    let legacy = dir.path().join("legacy.ckpt");
    std::fs::write(&legacy, b"\x80\x02}q\x00.").unwrap();
    check(
        &legacy,
        &["not a zip-format PyTorch checkpoint", "never runs"],
    );

    let sdxl = dir.path().join("sdxl.safetensors");
    save(
        &sdxl,
        &HashMap::from([
            (
                "model.diffusion_model.input_blocks.0.0.weight".to_string(),
                zeros(&[8, 4, 3, 3]),
            ),
            (
                "conditioner.embedders.1.model.positional_embedding".to_string(),
                zeros(&[77, 8]),
            ),
        ]),
    );
    check(&sdxl, &["SDXL checkpoint", "not supported"]);
    let flux_like = dir.path().join("transformer.safetensors");
    save(
        &flux_like,
        &HashMap::from([(
            "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale".to_string(),
            zeros(&[8]),
        )]),
    );
    check(
        &flux_like,
        &["unknown architecture", "input_blocks.0.0.weight"],
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(
        common::fixture("single_file/sd1_ema.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors
        .remove("model.diffusion_model.output_blocks.1.0.in_layers.2.weight")
        .unwrap();
    let broken = dir.path().join("broken.safetensors");
    save(&broken, &tensors);
    common::assert_clean_error(
        &quick(&broken, &["--config", &fixture_str("tiny-sd1")], dir.path()),
        &[
            "broken.safetensors",
            "model.diffusion_model.",
            "up_blocks.0.resnets.1.conv1.weight",
        ],
    );
}

/// A pickle that calls `posix.system("touch ldm-pickle-ran")` when unpickled by Python: ldm
/// reads it as data, finds no tensors, and says so; the command never runs.
#[test]
fn a_pickle_that_calls_code_is_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let output = quick(
        &common::fixture("single_file/code.ckpt"),
        &["--config", &fixture_str("tiny-sd1")],
        dir.path(),
    );
    common::assert_clean_error(&output, &["code.ckpt", "holds no tensors"]);
    assert!(!dir.path().join("ldm-pickle-ran").exists());
}
