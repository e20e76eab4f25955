//! LoRA: `--lora` and `<lora:NAME:WEIGHT>` merged into tiny-sd1 against diffusers'
//! `load_lora_weights` + `fuse_lora(lora_scale=W)` (scripts/make_lora_fixtures.py), in the
//! kohya and the diffusers/PEFT formats, and the errors for files that do not fit.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// Final latents, as in tests/cli_parity.rs.
const LATENT_TOL: f32 = 2e-4;

fn ldm(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    cmd
}

fn fixture_str(rel: &str) -> String {
    common::fixture(rel).to_str().unwrap().to_string()
}

/// The recorded `ldm` arguments with fixture-relative LoRA paths made absolute.
fn lora_args(json: &serde_json::Value) -> Vec<String> {
    let mut args = Vec::new();
    let mut path_next = false;
    for arg in json["ldm_args"].as_array().unwrap() {
        let arg = arg.as_str().unwrap();
        args.push(if path_next {
            fixture_str(arg)
        } else {
            arg.to_string()
        });
        path_next = arg == "--lora" || arg == "--lora-dir";
    }
    args
}

fn succeeded(output: Output) -> Output {
    assert!(
        output.status.success(),
        "ldm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn check_case(name: &str) {
    let json = common::load_case_json(name);
    let expected = common::load_case(name);
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("image.png");
    let latents = out.path().join("latents.safetensors");
    succeeded(
        ldm(&["txt2img", json["ldm_prompt"].as_str().unwrap()])
            .args(["--model", &fixture_str("tiny-sd1")])
            .args(["--seed", &json["seed"].to_string()])
            .args([
                "--steps",
                "10",
                "--guidance-scale",
                "7.5",
                "--sampler",
                "ddim",
            ])
            .args(["-W", "64", "-H", "64", "--device", "cpu", "--dtype", "f32"])
            .args(lora_args(&json))
            .arg("--output")
            .arg(&png)
            .arg("--save-latents")
            .arg(&latents)
            .output()
            .unwrap(),
    );
    let ours = candle_core::safetensors::load(&latents, &Device::Cpu)
        .unwrap()
        .remove("latents")
        .unwrap();
    common::assert_close(
        &format!("{name} final latents"),
        &ours,
        &expected["latents_final"],
        LATENT_TOL,
    );
    let image = image::open(&png).unwrap().to_rgb8();
    let pixels = Tensor::from_vec(image.into_raw(), (64, 64, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = common::max_abs_diff(&pixels, &expected["image_u8"].get(0).unwrap());
    assert!(diff <= 1.0, "{name}: 8-bit pixels differ by {diff}");
}

#[test]
fn kohya_lora_matches_diffusers_fuse_lora() {
    check_case("lora_kohya_sd1");
}

#[test]
fn peft_lora_matches_diffusers_fuse_lora() {
    check_case("lora_peft_sd1");
}

#[test]
fn prompt_tag_and_flag_loras_stack_as_diffusers_fuses_them() {
    check_case("lora_both_sd1");
}

fn failure(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap();
    assert!(!output.status.success(), "ldm should have failed");
    let message = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!message.contains("panicked"), "{message}");
    message
}

fn quick_txt2img(model: &str, prompt: &str, out: &Path) -> Command {
    let mut cmd = ldm(&["txt2img", prompt, "--steps", "1", "--device", "cpu"]);
    cmd.args(["--model", &fixture_str(model)])
        .arg("--output")
        .arg(out.join("x.png"));
    cmd
}

#[test]
fn files_that_do_not_fit_are_clear_errors() {
    let out = tempfile::tempdir().unwrap();
    // A LoRA made for tiny-sd1 names modules tiny-sd2 does not have.
    let message = failure(
        quick_txt2img("tiny-sd2", "a cat", out.path())
            .args(["--lora", &fixture_str("lora/kohya_sd1.safetensors")]),
    );
    assert!(message.contains("match no weight of the"), "{message}");
    assert!(message.contains("lora_"), "{message}");

    // Not a LoRA: the U-Net's own weights.
    let message = failure(quick_txt2img("tiny-sd1", "a cat", out.path()).args([
        "--lora",
        &fixture_str("tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
    ]));
    assert!(message.contains("neither kohya"), "{message}");

    // A tag without --lora-dir, a tag naming a missing file, a malformed tag.
    let message = failure(&mut quick_txt2img(
        "tiny-sd1",
        "a cat <lora:kohya_sd1:0.5>",
        out.path(),
    ));
    assert!(message.contains("--lora-dir"), "{message}");
    let message = failure(
        quick_txt2img("tiny-sd1", "a cat <lora:missing>", out.path())
            .args(["--lora-dir", &fixture_str("lora")]),
    );
    assert!(message.contains("no missing.safetensors"), "{message}");
    let message = failure(&mut quick_txt2img(
        "tiny-sd1",
        "a cat <lora:x:strong>",
        out.path(),
    ));
    assert!(message.contains("\"strong\" is not a number"), "{message}");
    assert!(!out.path().join("x.png").exists());
}

/// A prompt-file line's `lora` (and its prompt's tags) give the image txt2img gives with them;
/// lines without LoRA in the same file use the plain model.
#[test]
fn batch_lines_choose_their_own_loras() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixture_str("lora/peft_sd1.safetensors");
    let file = dir.path().join("prompts.jsonl");
    let lines = [
        serde_json::json!({"prompt": "a cat", "seed": 3, "lora": format!("{lora}:0.5")}),
        serde_json::json!({"prompt": "a cat", "seed": 3}),
    ];
    std::fs::write(&file, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let common_args = ["--steps", "2", "--device", "cpu", "--dtype", "f32"];
    succeeded(
        ldm(&["batch", file.to_str().unwrap()])
            .args(["--model", &fixture_str("tiny-sd1")])
            .arg("--output-dir")
            .arg(dir.path().join("batch"))
            .args(common_args)
            .output()
            .unwrap(),
    );
    let single = |name: &str, extra: &[&str]| {
        let path = dir.path().join(name);
        succeeded(
            ldm(&["txt2img", "a cat", "--seed", "3"])
                .args(["--model", &fixture_str("tiny-sd1")])
                .args(common_args)
                .args(extra)
                .arg("--output")
                .arg(&path)
                .output()
                .unwrap(),
        );
        image::open(&path).unwrap().to_rgb8()
    };
    let with_lora = single("lora.png", &["--lora", &format!("{lora}:0.5")]);
    let plain = single("plain.png", &[]);
    let batch = |index: usize| {
        let name = format!("{index:05}-a-cat.png");
        image::open(dir.path().join("batch").join(name))
            .unwrap()
            .to_rgb8()
    };
    assert!(with_lora != plain, "the LoRA must change the image");
    assert!(batch(0) == with_lora, "line 1 must use its LoRA");
    assert!(batch(1) == plain, "line 2 must not");
}
