//! The CLI as a user meets it: outputs and their metadata, seeds, hub-cache loading, and clear
//! one-line errors (non-zero exit, no panic, no backtrace) for bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn tiny_sd1() -> String {
    common::fixture("tiny-sd1").to_string_lossy().into_owned()
}

/// A small, fast run on the SD1 fixture.
fn quick(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "txt2img",
        "a red apple",
        "--model",
        &tiny_sd1(),
        "--steps",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The tensor `--save-latents` wrote to `path`.
fn saved_latents(path: &str) -> candle_core::Tensor {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()["latents"].clone()
}

fn run(args: &[String]) -> Output {
    ldm(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Asserts a clean failure whose message contains every `needle`.
use common::{assert_clean_error, copy_dir};

/// The guidance scale a run without `-g` uses: the model's recommendation (`_ldm` in its
/// model_index.json), else 7.5; `-g` always wins.
#[test]
fn guidance_defaults_to_the_models_recommendation_else_7_5() {
    let dir = tempfile::tempdir().unwrap();
    let recommending = dir.path().join("recommending");
    copy_dir(Path::new(&tiny_sd1()), &recommending);
    let index = recommending.join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["_ldm"] = serde_json::json!({"guidance_scale": 3.5});
    std::fs::write(&index, json.to_string()).unwrap();
    let cfg_scale = |model: &Path, extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args = quick(&["--seed", "1", "-o", out.to_str().unwrap()]);
        args[3] = model.to_str().unwrap().to_string();
        args.extend(extra.iter().map(|s| s.to_string()));
        let output = run(&args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = ldm::image_io::read_png_parameters(&out).unwrap().unwrap();
        let field = text.split(", ").find_map(|f| f.strip_prefix("CFG scale: "));
        field
            .unwrap_or_else(|| panic!("no CFG scale in {text:?}"))
            .to_string()
    };
    assert_eq!(cfg_scale(Path::new(&tiny_sd1()), &[], "plain.png"), "7.5");
    assert_eq!(cfg_scale(&recommending, &[], "recommended.png"), "3.5");
    assert_eq!(cfg_scale(&recommending, &["-g", "6"], "told.png"), "6.0");
}

#[test]
fn png_records_how_it_was_made() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("apple.png");
    let output = run(&quick(&[
        "--seed",
        "7",
        "-n",
        "blurry, dark",
        "--cfg-scale",
        "5",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = ldm::image_io::read_png_parameters(&out).unwrap().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "a red apple");
    assert_eq!(lines[1], "Negative prompt: blurry, dark");
    for field in [
        "Steps: 2",
        "Sampler: DDIM",
        "CFG scale: 5.0",
        "Seed: 7",
        "Size: 64x64",
        "Model: tiny-sd1",
    ] {
        assert!(lines[2].contains(field), "{field:?} missing from {text:?}");
    }
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 64));
}

#[test]
fn seeds_reproduce_and_count_up_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let latents = |name: &str| saved_latents(&path(name));
    let pair = quick(&[
        "--seed",
        "11",
        "-N",
        "2",
        "-o",
        &path("pair.png"),
        "--save-latents",
        &path("pair.st"),
    ]);
    assert!(run(&pair).status.success());
    let second = quick(&[
        "--seed",
        "12",
        "-o",
        &path("second.png"),
        "--save-latents",
        &path("second.st"),
    ]);
    assert!(run(&second).status.success());
    let again = quick(&[
        "--seed",
        "12",
        "-o",
        &path("again.png"),
        "--save-latents",
        &path("again.st"),
    ]);
    assert!(run(&again).status.success());
    // The same seed gives the same image, bit for bit.
    assert_eq!(
        common::max_abs_diff(&latents("second.st"), &latents("again.st")),
        0.0
    );
    assert_eq!(
        image::open(path("second.png")).unwrap().to_rgb8(),
        image::open(path("again.png")).unwrap().to_rgb8()
    );
    // Image 2 of a run from seed 11 is the seed-12 image (batched maths differs only in rounding).
    let pair_latents = latents("pair.st");
    let alone = latents("second.st");
    common::assert_close(
        "image 2 of seed 11 vs seed 12",
        &pair_latents.get(1).unwrap(),
        &alone.get(0).unwrap(),
        1e-4,
    );
    assert!(common::max_abs_diff(&pair_latents.get(0).unwrap(), &alone.get(0).unwrap()) > 0.1);
    let params = ldm::image_io::read_png_parameters(Path::new(&path("pair-2.png")))
        .unwrap()
        .unwrap();
    assert!(params.contains("Seed: 12"), "{params}");
}

#[test]
fn thread_count_changes_speed_not_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    for threads in ["1", "2"] {
        let mut args = vec!["--threads".to_string(), threads.to_string()];
        args.extend(quick(&[
            "--seed",
            "5",
            "-o",
            &path(&format!("t{threads}.png")),
            "--save-latents",
            &path(&format!("t{threads}.st")),
        ]));
        assert!(run(&args).status.success());
    }
    // With two threads the guidance pair runs as two forward passes side by side, so sums
    // round as in batches of one (batch tolerance, see num_images_run_batch_size_at_a_time);
    // the pixels agree within one level.
    common::assert_close(
        "1 vs 2 threads",
        &saved_latents(&path("t1.st")),
        &saved_latents(&path("t2.st")),
        1e-4,
    );
    let pixels = |name: &str| image::open(path(name)).unwrap().to_rgb8().into_raw();
    let levels = pixels("t1.png")
        .iter()
        .zip(pixels("t2.png"))
        .map(|(a, b)| a.abs_diff(b))
        .max();
    assert!(
        levels <= Some(1),
        "1 vs 2 threads: pixels differ by {levels:?}"
    );
    assert_clean_error(&ldm(&["--threads", "0", "txt2img", "x"]), &["--threads"]);
}

#[test]
fn random_seed_is_printed_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("random.png");
    let output = run(&quick(&["-o", out.to_str().unwrap()]));
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let seed = stderr
        .lines()
        .find_map(|l| l.strip_prefix("seed: "))
        .expect("the random seed is printed");
    let params = ldm::image_io::read_png_parameters(&out).unwrap().unwrap();
    assert!(params.contains(&format!("Seed: {seed},")), "{params}");
}

#[test]
fn existing_outputs_are_kept_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    std::fs::write(&out, b"keep me").unwrap();
    assert_clean_error(
        &run(&quick(&["--seed", "1", "-o", out.to_str().unwrap()])),
        &["already exists", "--overwrite"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    // Checked before the model loads (which takes a while for a real model): an empty folder
    // as the model still fails on the output.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_error(
        &ldm(&[
            "txt2img",
            "a red apple",
            "--model",
            empty.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]),
        &["already exists"],
    );
    let output = run(&quick(&[
        "--seed",
        "1",
        "--overwrite",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(output.status.success());
    assert!(image::open(&out).is_ok());
}

/// A copy of the hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
fn hub_cache_with_tiny_sd1(cache: &Path, repo: &str) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    copy_dir(&common::fixture("tiny-sd1"), &snapshot);
    snapshot
}

#[test]
fn hub_repo_ids_load_from_the_hub_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    hub_cache_with_tiny_sd1(&cache, "ldm-tests/tiny-sd1");
    let from_hub = dir.path().join("hub.png");
    let from_folder = dir.path().join("folder.png");
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "txt2img",
            "a red apple",
            "--model",
            "ldm-tests/tiny-sd1",
            "--steps",
            "2",
            "--seed",
            "3",
        ])
        .arg("-o")
        .arg(&from_hub)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(run(&quick(&[
        "--seed",
        "3",
        "-o",
        from_folder.to_str().unwrap()
    ]))
    .status
    .success());
    assert_eq!(
        image::open(&from_hub).unwrap().to_rgb8(),
        image::open(&from_folder).unwrap().to_rgb8()
    );
    let params = ldm::image_io::read_png_parameters(&from_hub)
        .unwrap()
        .unwrap();
    assert!(params.contains("Model: ldm-tests/tiny-sd1"), "{params}");

    // A preset that is not cached fails clearly, naming the repo, without touching the network.
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["txt2img", "x", "--model", "sd15"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_clean_error(
        &output,
        &[
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "model_index.json",
        ],
    );
}

#[test]
fn bad_sizes_steps_and_names_are_clear_errors() {
    assert_clean_error(
        &run(&quick(&["--width", "63"])),
        &["width 63", "multiple of 2"],
    );
    assert_clean_error(&run(&quick(&["--steps", "0"])), &["steps"]);
    assert_clean_error(
        &run(&quick(&["--device", "tpu"])),
        &["unknown device", "tpu"],
    );
    assert_clean_error(&run(&quick(&["--sampler", "plms"])), &["plms"]);
    assert_clean_error(&run(&quick(&["--num-images", "0"])), &["at least 1"]);
    assert_clean_error(
        &run(&quick(&["-o", "/nonexistent-dir/x.png"])),
        &["/nonexistent-dir", "does not exist"],
    );
    // A U-Net with mask channels cannot make a txt2img image.
    let inpainting = common::fixture("tiny-inpaint");
    let inpainting = inpainting.to_str().unwrap();
    assert_clean_error(
        &ldm(&["txt2img", "x", "--model", inpainting, "--steps", "1"]),
        &["inpainting model", "use `ldm inpaint`"],
    );
}

#[test]
fn missing_or_broken_model_files_are_named() {
    assert_clean_error(
        &ldm(&["txt2img", "x", "--model", "/no/such/model"]),
        &["/no/such/model"],
    );
    let dir = tempfile::tempdir().unwrap();

    let no_index = dir.path().join("no-index");
    copy_dir(&common::fixture("tiny-sd1"), &no_index);
    std::fs::remove_file(no_index.join("model_index.json")).unwrap();
    assert_clean_error(
        &ldm(&["txt2img", "x", "--model", no_index.to_str().unwrap()]),
        &["model_index.json"],
    );

    let bad_config = dir.path().join("bad-config");
    copy_dir(&common::fixture("tiny-sd1"), &bad_config);
    std::fs::write(bad_config.join("unet/config.json"), "{ not json").unwrap();
    assert_clean_error(
        &ldm(&["txt2img", "x", "--model", bad_config.to_str().unwrap()]),
        &["malformed config file", "unet/config.json"],
    );

    let no_weights = dir.path().join("no-weights");
    copy_dir(&common::fixture("tiny-sd1"), &no_weights);
    std::fs::remove_file(no_weights.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_clean_error(
        &ldm(&["txt2img", "x", "--model", no_weights.to_str().unwrap()]),
        &["vae/diffusion_pytorch_model.safetensors"],
    );

    let missing_tensor = dir.path().join("missing-tensor");
    copy_dir(&common::fixture("tiny-sd1"), &missing_tensor);
    let weights = missing_tensor.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    tensors.remove("conv_out.weight").unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    assert_clean_error(
        &ldm(&["txt2img", "x", "--model", missing_tensor.to_str().unwrap()]),
        &["conv_out.weight", "unet"],
    );
}

#[test]
fn unreadable_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"this is text").unwrap();
    let args = [
        "img2img",
        "x",
        "--model",
        &tiny_sd1(),
        "--image",
        not_an_image.to_str().unwrap(),
    ];
    assert_clean_error(&ldm(&args), &["notes.png"]);
    let args = [
        "img2img",
        "x",
        "--model",
        &tiny_sd1(),
        "--image",
        "/no/such.png",
    ];
    assert_clean_error(&ldm(&args), &["/no/such.png"]);
}

#[test]
fn seeds_below_minus_one_are_refused() {
    assert_clean_error(&run(&quick(&["--seed", "-2"])), &["-2", "-1", "seed"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, "a red apple\n").unwrap();
    let out = dir.path().join("out");
    let batch = [
        "batch",
        file.to_str().unwrap(),
        "--model",
        &tiny_sd1(),
        "--output-dir",
        out.to_str().unwrap(),
        "--seed",
        "-7",
    ];
    assert_clean_error(&ldm(&batch), &["-7", "seed"]);
    assert!(!out.exists(), "nothing starts on a bad seed");
}

/// `-N` images run `--batch-size` at a time: the same images as one batch up to rounding,
/// and, one at a time (the default), bit for bit the images of single runs.
#[test]
fn num_images_run_batch_size_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let latents = |name: &str| saved_latents(&path(name));
    let three = |name: &str, batch_size: &str| {
        let args = quick(&[
            "--seed",
            "20",
            "-N",
            "3",
            "--batch-size",
            batch_size,
            "-o",
            &path(&format!("{name}.png")),
            "--save-latents",
            &path(&format!("{name}.st")),
        ]);
        let output = run(&args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        latents(&format!("{name}.st"))
    };
    let one_by_one = three("single", "1");
    let in_twos = three("twos", "2");
    let all = three("all", "3");
    assert_eq!(one_by_one.dim(0).unwrap(), 3);
    common::assert_close("batches of 2 vs 1", &in_twos, &one_by_one, 1e-4);
    common::assert_close("one batch of 3 vs 1", &all, &one_by_one, 1e-4);
    let alone = quick(&[
        "--seed",
        "22",
        "-o",
        &path("alone.png"),
        "--save-latents",
        &path("alone.st"),
    ]);
    assert!(run(&alone).status.success());
    assert_eq!(
        common::max_abs_diff(
            &one_by_one.get(2).unwrap(),
            &latents("alone.st").get(0).unwrap()
        ),
        0.0,
        "image 3 of seed 20, made alone, is the seed-22 image"
    );
    assert_eq!(
        image::open(path("single-3.png")).unwrap().to_rgb8(),
        image::open(path("alone.png")).unwrap().to_rgb8()
    );
    assert_clean_error(
        &run(&quick(&["--batch-size", "0"])),
        &["--batch-size", "at least 1"],
    );
}

/// Written files get the mode a plain create gives (0666 less the umask), not a temporary
/// file's 0600.
#[cfg(unix)]
#[test]
fn outputs_are_readable_as_the_umask_allows() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (umask, mode) in [("022", 0o644), ("077", 0o600), ("002", 0o664)] {
        let out = dir.path().join(format!("umask-{umask}.png"));
        let latents = dir.path().join(format!("umask-{umask}.st"));
        let args = quick(&[
            "--seed",
            "1",
            "-o",
            out.to_str().unwrap(),
            "--save-latents",
            latents.to_str().unwrap(),
        ]);
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_ldm"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for path in [&out, &latents] {
            let actual = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(actual, mode, "{} under umask {umask}", path.display());
        }
    }
}

/// img2img and inpaint in half precision (the image and mask arrive in f32): they run, and
/// their latents stay near the f32 run's (measured on the CPU: f16 up to 0.05 and bf16 up to
/// 0.36 on latents up to |18|; the bounds allow about twice that).
#[test]
fn image_pipelines_run_in_half_precision() {
    let temp = tempfile::tempdir().unwrap();
    let image = common::fixture("cases/test_image_64.png");
    let mask = common::fixture("cases/test_mask_64.png");
    for (command, tolerance) in [("img2img", [0.05, 0.4]), ("inpaint", [0.1, 0.7])] {
        let latents = |dtype: &str| {
            let out = temp.path().join(format!("{command}-{dtype}.png"));
            let saved = temp.path().join(format!("{command}-{dtype}.safetensors"));
            let mut args = quick(&["--seed", "3", "--dtype", dtype, "--device", "cpu"]);
            args[0] = command.to_string();
            args.extend(["--image".into(), image.to_string_lossy().into_owned()]);
            if command == "inpaint" {
                args.extend(["--mask".into(), mask.to_string_lossy().into_owned()]);
            }
            args.extend(["-o".into(), out.to_string_lossy().into_owned()]);
            args.extend([
                "--save-latents".into(),
                saved.to_string_lossy().into_owned(),
            ]);
            let output = run(&args);
            assert!(
                output.status.success(),
                "{command} --dtype {dtype}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            saved_latents(saved.to_str().unwrap())
        };
        let full = latents("f32");
        for (dtype, tolerance) in ["f16", "bf16"].into_iter().zip(tolerance) {
            let diff = common::max_abs_diff(&full, &latents(dtype));
            assert!(diff < tolerance, "{command} {dtype}: {diff}");
        }
    }
}
