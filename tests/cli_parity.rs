//! End-to-end parity through the CLI: `ldm txt2img|img2img|inpaint` on the tiny fixture
//! pipelines, from the seed alone, against diffusers' own runs recorded by
//! scripts/make_fixtures.py (same prompts, seeds, steps, guidance, schedulers).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Final latents: f32 end to end. torch's own f32-vs-f64 drift on these is up to 5.9e-5 (values
/// up to |35|, random weights do not denoise), so 2e-4 absolute is about 1e-4 of the scale.
const LATENT_TOL: f32 = 2e-4;
/// Image in [0, 1] before 8-bit rounding.
const IMAGE_TOL: f32 = 1e-4;

struct Case {
    name: &'static str,
    model: &'static str,
}

/// One test per recorded diffusers run, so each failure is reported on its own; `CASES` lists
/// them all for the completeness check.
macro_rules! parity_cases {
    ($($name:ident: $model:literal,)*) => {
        const CASES: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                check_case(&Case {
                    name: stringify!($name),
                    model: $model,
                });
            }
        )*
    };
}

parity_cases! {
    txt2img_sd1_ddim: "tiny-sd1",
    txt2img_sd1_ddpm: "tiny-sd1",
    txt2img_sd1_ddim_eta: "tiny-sd1",
    txt2img_sd1_cfg1: "tiny-sd1",
    txt2img_sd1_batch2: "tiny-sd1",
    txt2img_sd2_ddim: "tiny-sd2",
    txt2img_sd2_ddpm: "tiny-sd2",
    txt2img_sd2_ddim_rescale: "tiny-sd2",
    txt2img_sd1_euler_a: "tiny-sd1",
    txt2img_sd2_euler: "tiny-sd2",
    txt2img_sd1_dpmpp_2m: "tiny-sd1",
    txt2img_sd2_dpmpp_2m_sde: "tiny-sd2",
    img2img_sd1_ddim: "tiny-sd1",
    inpaint_9ch_ddim: "tiny-inpaint",
    inpaint_4ch_ddim: "tiny-sd1",
}

fn output_pngs(out: &Path, count: usize) -> Vec<std::path::PathBuf> {
    if count == 1 {
        vec![out.join("image.png")]
    } else {
        (1..=count)
            .map(|i| out.join(format!("image-{i}.png")))
            .collect()
    }
}

fn check_case(case: &Case) {
    let json = common::load_case_json(case.name);
    let expected = common::load_case(case.name);
    let out = tempfile::tempdir().unwrap();
    let output = common::parity_command(case.model, &json, out.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}: ldm failed: {}",
        case.name,
        String::from_utf8_lossy(&output.stderr)
    );

    let latents = common::saved_latents(&out.path().join("latents.safetensors"));
    common::assert_close(
        &format!("{} final latents", case.name),
        &latents,
        &expected["latents_final"],
        LATENT_TOL,
    );

    // The PNGs hold diffusers' 8-bit image: compare the [0,1] image and count rounding flips.
    let expected_image = &expected["image"];
    let expected_u8 = &expected["image_u8"];
    let batch = expected_image.dim(0).unwrap();
    for (i, path) in output_pngs(out.path(), batch).iter().enumerate() {
        let png = image::open(path).unwrap().to_rgb8();
        let (w, h) = png.dimensions();
        let ours = Tensor::from_vec(png.into_raw(), (h as usize, w as usize, 3), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let theirs = expected_u8.get(i).unwrap().to_dtype(DType::F32).unwrap();
        let diff = common::max_abs_diff(&ours, &theirs);
        assert!(
            diff <= 1.0,
            "{} image {i}: 8-bit pixels differ by {diff}",
            case.name
        );
        let ours01 = (ours / 255.0).unwrap();
        // Pixels may only differ where the [0,1] values are within IMAGE_TOL of a rounding edge.
        let theirs01 = expected_image.get(i).unwrap().to_dtype(DType::F32).unwrap();
        let err = common::max_abs_diff(&ours01, &theirs01);
        assert!(
            err <= 0.5 / 255.0 + IMAGE_TOL,
            "{} image {i}: {err}",
            case.name
        );
        eprintln!("{} image {i}: 8-bit max diff {diff}", case.name);
    }
}

/// Every recorded pipeline run has its test above.
#[test]
fn every_pipeline_fixture_has_a_case() {
    let fixtures: Vec<String> = std::fs::read_dir(common::fixture("cases"))
        .unwrap()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let case = name.strip_suffix(".json")?;
            ["txt2img_", "img2img_", "inpaint_"]
                .iter()
                .any(|prefix| case.starts_with(prefix))
                .then(|| case.to_string())
        })
        .collect();
    assert_eq!(fixtures.len(), CASES.len(), "{fixtures:?}");
    for fixture in &fixtures {
        assert!(CASES.contains(&fixture.as_str()), "no test for {fixture}");
    }
}
