//! A1111 prompt syntax, long prompts and CLIP skip against scripts/make_prompt_fixtures.py:
//! parsed weights, token chunks and embeddings of its A1111-algorithm reference on the tiny text
//! encoders, and end-to-end CLI runs against diffusers' pipelines given those embeddings.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use ldm::conditioning::{syntax, PromptEncoder, PromptOptions};
use ldm::model_source::PipelineFolder;
use ldm::pipelines::StableDiffusion;

/// Embeddings [77·k, D], f32 against torch's f32. Unweighted rows differ by ~1e-6 (CLIP
/// alone); weights up to 1.6 and the mean rescale (values up to ~|10|) bring it to ~1e-5.
const EMBED_TOL: f32 = 5e-5;
/// Final latents, as in tests/cli_parity.rs.
const LATENT_TOL: f32 = 2e-4;

fn pipeline(name: &str) -> StableDiffusion {
    let folder = PipelineFolder::new(&common::fixture(&format!("tiny-{name}")), name);
    StableDiffusion::load(&folder, &Device::Cpu, DType::F32).unwrap()
}

fn encoder(pipe: &StableDiffusion) -> PromptEncoder<'_> {
    pipe.prompt_encoder()
}

fn floats(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(1.0)
}

#[test]
fn weights_parse_as_a1111_does() {
    let json = common::load_case_json("prompt_syntax");
    for row in json["rows"].as_array().unwrap() {
        let prompt = row["prompt"].as_str().unwrap();
        let got = syntax::parse(prompt).unwrap();
        let expected = row["pieces"].as_array().unwrap();
        assert_eq!(got.len(), expected.len(), "{prompt:?}: {got:?}");
        for (piece, want) in got.iter().zip(expected) {
            assert_eq!(piece.text, want[0].as_str().unwrap(), "{prompt:?}");
            let weight = want[1].as_f64().unwrap();
            assert!(close(piece.weight, weight), "{prompt:?}: {got:?}");
        }
    }
    for row in json["errors"].as_array().unwrap() {
        let prompt = row["prompt"].as_str().unwrap();
        assert!(syntax::parse(prompt).is_err(), "{prompt:?} must be refused");
    }
}

fn check_embeddings(name: &str) {
    let pipe = pipeline(name);
    let encoder = encoder(&pipe);
    let case = common::load_case(&format!("prompt_embeddings_{name}"));
    let json = common::load_case_json(&format!("prompt_embeddings_{name}"));
    for row in json["rows"].as_array().unwrap() {
        let key = row["key"].as_str().unwrap();
        let prompt = row["prompt"].as_str().unwrap();
        let options = PromptOptions {
            syntax: row["syntax"].as_bool().unwrap(),
            clip_skip: row["clip_skip"].as_u64().unwrap() as usize,
        };
        let chunks = encoder.chunks(prompt, &options).unwrap();
        let expected = row["chunks"].as_array().unwrap();
        assert_eq!(chunks.len(), expected.len(), "{name} {key}: chunk count");
        for (chunk, want) in chunks.iter().zip(expected) {
            let ids: Vec<u32> = want["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(chunk.ids, ids, "{name} {key}: token ids");
            let weights = floats(&want["weights"]);
            assert!(
                chunk
                    .weights
                    .iter()
                    .zip(&weights)
                    .all(|(a, b)| close(*a, *b)),
                "{name} {key}: weights {:?} vs {weights:?}",
                chunk.weights
            );
        }
        let embeddings = encoder.encode(&[prompt], &options).unwrap().hidden;
        common::assert_close(
            &format!("{name} {key} embeddings"),
            &embeddings.squeeze(0).unwrap(),
            &case[key],
            EMBED_TOL,
        );
    }
}

#[test]
fn sd1_chunks_and_embeddings_match_the_a1111_reference() {
    check_embeddings("sd1");
}

#[test]
fn sd2_chunks_and_embeddings_match_the_a1111_reference() {
    check_embeddings("sd2");
}

/// A plain prompt under 76 tokens is encoded exactly as before prompt syntax existed: one
/// diffusers-tokenized row through the text encoder, bit for bit.
#[test]
fn plain_short_prompts_keep_their_exact_embeddings() {
    for name in ["sd1", "sd2"] {
        let pipe = pipeline(name);
        let prompts = ["blurry, low quality", "a photo of a cat"];
        let ids = pipe.text_encoders[0]
            .tokenizer
            .encode_batch(&prompts, &Device::Cpu)
            .unwrap();
        let before = pipe.text_encoders[0].model.forward(&ids).unwrap();
        let now = pipe.encode_prompts(&prompts).unwrap();
        assert_eq!(common::max_abs_diff(&now, &before), 0.0, "{name}");
    }
}

/// The negative prompt (and any shorter prompt of a batch) is padded with the empty prompt's
/// chunk to the longest prompt's chunk count.
#[test]
fn shorter_prompts_are_padded_with_the_empty_chunk() {
    let pipe = pipeline("sd1");
    let long = vec!["cat"; 100].join(" ");
    let both = pipe.encode_prompts(&["a cat", &long]).unwrap();
    assert_eq!(both.dims(), &[2, 154, 32]);
    let short = pipe.encode_prompts(&["a cat"]).unwrap().get(0).unwrap();
    let empty = pipe.encode_prompts(&[""]).unwrap().get(0).unwrap();
    let padded = Tensor::cat(&[&short, &empty], 0).unwrap();
    assert_eq!(common::max_abs_diff(&both.get(0).unwrap(), &padded), 0.0);
}

// ---- through the CLI --------------------------------------------------------------------

fn ldm_command(case: &serde_json::Value, out: &Path) -> Command {
    let ldm = &case["ldm"];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.arg(ldm["command"].as_str().unwrap())
        .args(["--prompt", ldm["prompt"].as_str().unwrap()])
        .args([
            "--negative-prompt",
            ldm["negative_prompt"].as_str().unwrap(),
        ])
        .args([
            "--model",
            common::fixture(ldm["model"].as_str().unwrap())
                .to_str()
                .unwrap(),
        ])
        .args(["--seed", &case["seed"].to_string()])
        .args(["--width", "64", "--height", "64"])
        .args(["--device", "cpu", "--dtype", "f32", "--quiet"])
        .arg("--output")
        .arg(out.join("image.png"))
        .arg("--save-latents")
        .arg(out.join("latents.safetensors"));
    for arg in ldm["args"].as_array().unwrap() {
        cmd.arg(arg.as_str().unwrap());
    }
    if let Some(image) = ldm.get("image") {
        cmd.arg("--image")
            .arg(common::fixture(image.as_str().unwrap()));
    }
    cmd
}

fn run_ok(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "ldm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn saved_latents(out: &Path) -> Tensor {
    candle_core::safetensors::load(out.join("latents.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("latents")
        .unwrap()
}

fn check_cli_case(name: &str) -> PathBuf {
    let json = common::load_case_json(name);
    let expected = common::load_case(name);
    let out = tempfile::tempdir().unwrap().keep();
    run_ok(&mut ldm_command(&json, &out));
    common::assert_close(
        &format!("{name} final latents"),
        &saved_latents(&out),
        &expected["latents_final"],
        LATENT_TOL,
    );
    let png = image::open(out.join("image.png")).unwrap().to_rgb8();
    let ours = Tensor::from_vec(png.into_raw(), (64, 64, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let theirs = expected["image_u8"].get(0).unwrap();
    let diff = common::max_abs_diff(&ours, &theirs);
    assert!(diff <= 1.0, "{name}: 8-bit pixels differ by {diff}");
    out
}

fn infotext(png: &Path) -> String {
    ldm::image_io::read_png_parameters(png).unwrap().unwrap()
}

#[test]
fn long_weighted_prompts_match_diffusers_through_txt2img_and_img2img() {
    let out = check_cli_case("prompt_a1111_sd1_txt2img");
    let json = common::load_case_json("prompt_a1111_sd1_txt2img");
    let text = infotext(&out.join("image.png"));
    let prompt = json["ldm"]["prompt"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("{prompt}\nNegative prompt: (blurry:1.2)")),
        "{text}"
    );
    std::fs::remove_dir_all(out).unwrap();
    let out = check_cli_case("prompt_a1111_sd2_img2img");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn clip_skip_matches_diffusers_and_is_recorded_in_a1111_numbering() {
    for name in ["prompt_clip_skip_sd1_cfg1", "prompt_clip_skip_sd2_cfg"] {
        let out = check_cli_case(name);
        let text = infotext(&out.join("image.png"));
        assert!(text.contains(", Clip skip: 2, "), "{text}");
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn a_bad_weight_fails_with_its_position() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "txt2img",
            "a (cat:1.2.3)",
            "--steps",
            "1",
            "--device",
            "cpu",
        ])
        .args(["--model", common::fixture("tiny-sd1").to_str().unwrap()])
        .arg("--output")
        .arg(out.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("\"1.2.3\" at character 7"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    assert!(!out.path().join("x.png").exists());

    // In a prompt file every line is checked before the first image is made.
    let file = out.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"a cat\"}\n{\"prompt\": \"a dog\", \"clip_skip\": 9}\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .arg("batch")
        .arg(&file)
        .args(["--steps", "1", "--device", "cpu"])
        .args(["--model", common::fixture("tiny-sd1").to_str().unwrap()])
        .arg("--output-dir")
        .arg(out.path().join("batch"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("line 2"), "{message}");
    assert!(message.contains("clip skip 9 is out of range"), "{message}");
    let made = std::fs::read_dir(out.path().join("batch"))
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert!(made <= 1, "only the manifest may exist");
}

/// `--no-prompt-syntax` reads brackets as words; `--clip-skip` past the encoder's depth is an
/// error, not a panic.
#[test]
fn syntax_can_be_turned_off_and_clip_skip_is_checked() {
    let pipe = pipeline("sd1");
    let literal = PromptOptions {
        syntax: false,
        clip_skip: 1,
    };
    let encoder = encoder(&pipe);
    let chunks = encoder.chunks("a (cat:1.5)", &literal).unwrap();
    assert!(chunks[0].is_unweighted());
    let weighted = encoder
        .chunks("a (cat:1.5)", &PromptOptions::default())
        .unwrap();
    assert!(!weighted[0].is_unweighted());
    assert_ne!(chunks[0].ids, weighted[0].ids);
    let too_deep = PromptOptions {
        syntax: true,
        clip_skip: 5,
    };
    let err = encoder.encode(&["a cat"], &too_deep).unwrap_err();
    assert!(
        format!("{err:#}").contains("has 4 layers (1 to 4)"),
        "{err:#}"
    );
}

/// A prompt-file line with syntax, a long prompt and `clip_skip` makes the image txt2img makes.
#[test]
fn batch_lines_read_prompts_as_txt2img_does() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = format!(
        "a (red:1.3) apple BREAK [dark] {}",
        vec!["cat"; 80].join(", ")
    );
    let line = serde_json::json!({"prompt": prompt, "negative_prompt": "(blurry)", "seed": 7,
                                  "clip_skip": 2});
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let model = common::fixture("tiny-sd1");
    let common_args = ["--steps", "3", "--device", "cpu", "--dtype", "f32"];
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_ldm"))
            .arg("batch")
            .arg(&file)
            .arg("--model")
            .arg(&model)
            .arg("--output-dir")
            .arg(dir.path().join("batch"))
            .args(common_args),
    );
    let single = dir.path().join("single.png");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_ldm"))
            .args([
                "txt2img",
                &prompt,
                "-n",
                "(blurry)",
                "--seed",
                "7",
                "--clip-skip",
                "2",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--output")
            .arg(&single)
            .args(common_args),
    );
    let batch_png = std::fs::read_dir(dir.path().join("batch"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let a = image::open(&batch_png).unwrap().to_rgb8();
    let b = image::open(&single).unwrap().to_rgb8();
    assert!(a == b, "batch and txt2img images differ");
    assert_eq!(infotext(&batch_png), infotext(&single));
    assert!(infotext(&single).starts_with(&prompt));
}

/// SDXL reads long prompts as A1111 does: 75-token chunks through both encoders (hidden states
/// joined along the channels), shorter prompts padded with the empty prompt's chunk, and the
/// pooled embedding taken from each prompt's first chunk.
#[test]
fn sdxl_long_prompts_chunk_both_encoders_and_pool_the_first_chunk() {
    let pipe = pipeline("sdxl");
    let options = PromptOptions::default();
    let long = vec!["cat"; 100].join(" ");
    let first_chunk = vec!["cat"; 75].join(" ");
    let encode = |prompts: &[&str]| pipe.encode_prompts_with(prompts, &options).unwrap();
    let both = encode(&[&long, "a cat"]);
    assert_eq!(both.hidden.dims(), [2, 154, 32 + 16]);
    let pooled = both.pooled.expect("SDXL pools");
    assert_eq!(pooled.dims(), [2, 24]);

    let alone = encode(&[&first_chunk]);
    let row = |t: &Tensor, i: usize| t.get(i).unwrap();
    let start = |t: &Tensor| t.narrow(0, 0, 77).unwrap();
    let end = |t: &Tensor| t.narrow(0, 77, 77).unwrap();
    assert_eq!(
        common::max_abs_diff(&start(&row(&both.hidden, 0)), &row(&alone.hidden, 0)),
        0.0
    );
    assert_eq!(
        common::max_abs_diff(&row(&pooled, 0), &row(&alone.pooled.unwrap(), 0)),
        0.0
    );
    let short = encode(&["a cat"]);
    let empty = encode(&[""]);
    assert_eq!(
        common::max_abs_diff(&start(&row(&both.hidden, 1)), &row(&short.hidden, 0)),
        0.0
    );
    assert_eq!(
        common::max_abs_diff(&end(&row(&both.hidden, 1)), &row(&empty.hidden, 0)),
        0.0
    );
    assert_eq!(
        common::max_abs_diff(&row(&pooled, 1), &row(&short.pooled.unwrap(), 0)),
        0.0
    );
}
