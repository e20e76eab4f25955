//! SDXL end-to-end parity through the CLI: `ldm txt2img|img2img|inpaint` on the tiny SDXL
//! fixture pipelines (two text encoders, text_time conditioning, per-block and nested
//! transformer depths), from the seed alone, against diffusers' `StableDiffusionXL*Pipeline`
//! runs recorded by scripts/make_sdxl_fixtures.py.

mod common;

/// Final latents, f32 end to end: the suite's tolerance (see tests/cli_parity.rs). These
/// latents reach |16| to |58|; the measured differences are 1e-5 to 4e-5.
const LATENT_TOL: f32 = 2e-4;
/// Image in [0, 1] before 8-bit rounding.
const IMAGE_TOL: f32 = 1e-4;

fn check_case(name: &str, model: &str) {
    let json = common::load_case_json(name);
    let expected = common::load_case(name);
    let out = tempfile::tempdir().unwrap();
    let output = common::parity_command(model, &json, out.path())
        .output()
        .unwrap();
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
    sdxl_txt2img_ddim_clip_skip: "tiny-sdxl",
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
