//! SDXL end-to-end parity through the CLI: `ldm txt2img|img2img|inpaint` on the tiny SDXL
//! fixture pipelines (two text encoders, text_time conditioning, per-block and nested
//! transformer depths), from the seed alone, against diffusers' `StableDiffusionXL*Pipeline`
//! runs recorded by scripts/make_sdxl_fixtures.py.

mod common;

use std::path::Path;
use std::process::Command;

/// Final latents, f32 end to end: the suite's tolerance (see tests/cli_parity.rs). These
/// latents reach |16| to |58|; the measured differences are 1e-5 to 4e-5.
const LATENT_TOL: f32 = 2e-4;
/// Image in [0, 1] before 8-bit rounding.
const IMAGE_TOL: f32 = 1e-4;

/// The `ldm` command line that reproduces a recorded diffusers call.
fn command_for(model: &str, json: &serde_json::Value, out: &Path) -> Command {
    let call = &json["call"];
    let subcommand = match json["pipeline"].as_str().unwrap() {
        "StableDiffusionXLPipeline" => "txt2img",
        "StableDiffusionXLImg2ImgPipeline" => "img2img",
        "StableDiffusionXLInpaintPipeline" => "inpaint",
        other => panic!("unknown pipeline {other}"),
    };
    let sampler = match json["scheduler_class"].as_str().unwrap() {
        "DDIMScheduler" => "ddim",
        "EulerAncestralDiscreteScheduler" => "euler_a",
        "DPMSolverMultistepScheduler" => "dpmpp_2m",
        other => panic!("unknown scheduler {other}"),
    };
    let seeds = json["seeds"].as_array().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.arg(subcommand)
        .arg(call["prompt"].as_str().unwrap())
        .args(["--model", common::fixture(model).to_str().unwrap()])
        .args(["--sampler", sampler])
        .args(["--steps", &call["num_inference_steps"].to_string()])
        .args(["--guidance-scale", &call["guidance_scale"].to_string()])
        .args(["--seed", &seeds[0].to_string()])
        .args(["--num-images", &seeds.len().to_string()])
        .args(["--batch-size", &seeds.len().to_string()])
        .args(["--width", &call["width"].to_string()])
        .args(["--height", &call["height"].to_string()])
        .args(["--device", "cpu", "--dtype", "f32", "--quiet"])
        .arg("--output")
        .arg(out.join("image.png"))
        .arg("--save-latents")
        .arg(out.join("latents.safetensors"));
    // No negative prompt in the call: ldm's default empty one (zeros, force_zeros_for_empty_prompt).
    if let Some(negative) = call["negative_prompt"].as_str() {
        cmd.args(["--negative-prompt", negative]);
    }
    for (key, flag) in [
        ("guidance_rescale", "--guidance-rescale"),
        ("strength", "--strength"),
    ] {
        if let Some(value) = call.get(key) {
            cmd.args([flag, &value.to_string()]);
        }
    }
    // diffusers' (height, width) sizes as WIDTHxHEIGHT, its (top, left) crop as TOP,LEFT.
    for (key, flag) in [
        ("original_size", "--original-size"),
        ("target_size", "--target-size"),
    ] {
        if let Some(size) = call.get(key) {
            cmd.args([flag, &format!("{}x{}", size[1], size[0])]);
        }
    }
    if let Some(crop) = call.get("crops_coords_top_left") {
        cmd.args([
            "--crops-coords-top-left",
            &format!("{},{}", crop[0], crop[1]),
        ]);
    }
    for (key, flag) in [("image_path", "--image"), ("mask_path", "--mask")] {
        if let Some(path) = json.get(key) {
            cmd.arg(flag).arg(common::fixture(path.as_str().unwrap()));
        }
    }
    cmd
}

fn check_case(name: &str, model: &str) {
    let json = common::load_case_json(name);
    let expected = common::load_case(name);
    let out = tempfile::tempdir().unwrap();
    let output = command_for(model, &json, out.path()).output().unwrap();
    assert!(
        output.status.success(),
        "{name}: ldm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let latents = common::saved_latents(&out.path().join("latents.safetensors"));
    common::assert_close(
        &format!("{name} final latents"),
        &latents,
        &expected["latents_final"],
        LATENT_TOL,
    );
    let images = &expected["image"];
    let count = images.dim(0).unwrap();
    for i in 0..count {
        let png = if count == 1 {
            out.path().join("image.png")
        } else {
            out.path().join(format!("image-{}.png", i + 1))
        };
        let what = format!("{name} image {i}");
        common::assert_png_matches(&what, &png, &images.get(i).unwrap(), IMAGE_TOL);
    }
}

/// One test per recorded diffusers run, so each failure is reported on its own.
macro_rules! sdxl_cases {
    ($($name:ident: $model:literal,)*) => {
        const CASES: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                check_case(stringify!($name), $model);
            }
        )*
    };
}

sdxl_cases! {
    sdxl_txt2img_ddim: "tiny-sdxl",
    sdxl_txt2img_euler_a: "tiny-sdxl",
    sdxl_txt2img_dpmpp_2m_microcond: "tiny-sdxl",
    sdxl_img2img_ddim: "tiny-sdxl",
    sdxl_inpaint_ddim: "tiny-sdxl",
    sdxl_inpaint_9ch_ddim: "tiny-sdxl-inpaint",
    sdxl_turbo_1step: "tiny-sdxl-turbo",
}

#[test]
fn every_sdxl_fixture_has_a_case() {
    let fixtures: Vec<String> = std::fs::read_dir(common::fixture("cases"))
        .unwrap()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let case = name.strip_suffix(".json")?;
            case.starts_with("sdxl_").then(|| case.to_string())
        })
        .collect();
    assert_eq!(fixtures.len(), CASES.len(), "{fixtures:?}");
    for fixture in &fixtures {
        assert!(CASES.contains(&fixture.as_str()), "no test for {fixture}");
    }
}
