//! The embedded default model in `weights/`: `ldm txt2img PROMPT` with no `--model` loads it,
//! generates the same image from the same seed, and follows the prompt (very different prompts
//! give very different images).

use std::path::Path;
use std::process::Command;

use image::RgbImage;

/// `ldm txt2img PROMPT --seed SEED` on the default model (no `--model`), 25 DDIM steps.
fn generate(prompt: &str, seed: u64, out: &Path) -> RgbImage {
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "txt2img",
            prompt,
            "--seed",
            &seed.to_string(),
            "--steps",
            "25",
        ])
        .arg("--output")
        .arg(out)
        .env_remove("LDM_DEFAULT_MODEL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ldm txt2img failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    image::open(out).unwrap().to_rgb8()
}

/// Mean absolute difference per channel value, in 8-bit levels.
fn mean_abs_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    total as f64 / a.as_raw().len() as f64
}

#[test]
fn default_model_is_deterministic_and_follows_the_prompt() {
    let temp = tempfile::tempdir().unwrap();
    let cat = generate(
        "a black cat, twemoji style",
        7,
        &temp.path().join("cat.png"),
    );
    assert_eq!(cat.dimensions(), (64, 64), "the default model's own size");

    let again = generate(
        "a black cat, twemoji style",
        7,
        &temp.path().join("again.png"),
    );
    assert!(cat == again, "same prompt and seed, same pixels");

    // Same seed (so the same starting noise): only the prompt differs.
    let apple = generate("a red apple, noto style", 7, &temp.path().join("apple.png"));
    let prompt_effect = mean_abs_difference(&cat, &apple);
    // Seed-to-seed variation of one prompt, for scale.
    let other_seed = generate(
        "a black cat, twemoji style",
        8,
        &temp.path().join("cat8.png"),
    );
    let seed_effect = mean_abs_difference(&cat, &other_seed);
    assert!(
        prompt_effect > 20.0,
        "two very different prompts differ by only {prompt_effect:.1} levels per value"
    );
    println!("prompt effect {prompt_effect:.1} levels, seed effect {seed_effect:.1} levels");
}
