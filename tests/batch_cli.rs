//! `ldm batch` / `--from-file`: malformed lines, resuming after a kill, and batching that does
//! not change the images.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ldm_batch(file: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.arg("batch")
        .arg(file)
        .args(["--model", common::fixture("tiny-sd1").to_str().unwrap()])
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .env_remove("RUST_BACKTRACE");
    cmd
}

fn pngs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".png"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn manifest_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn malformed_lines_stop_everything_unless_keep_going() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"a red apple\"}\n{\"prompt\": \"a cat\", \"stepz\": 3}\n{\"prompt\": \"a sun\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = ldm_batch(&file, &out, &["--steps", "2"]).output().unwrap();
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("prompts.jsonl:2:"), "{message}");
    assert!(message.contains("stepz"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    assert!(
        pngs(&out).is_empty(),
        "nothing may start when a line is bad"
    );

    let output = ldm_batch(&file, &out, &["--steps", "2", "--keep-going"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("warning: ")
            && message.contains("prompts.jsonl:2: ")
            && message.contains("(line skipped)"),
        "the skipped line is reported: {message}"
    );
    assert_eq!(pngs(&out).len(), 2);
    assert_eq!(manifest_lines(&out), 2);
}

#[test]
fn a_killed_batch_resumes_without_losing_or_repeating_images() {
    let dir = tempfile::tempdir().unwrap();
    let write_prompts = |name: &str, count: usize| {
        let file = dir.path().join(name);
        let prompts: Vec<String> = (0..count).map(|i| format!("a shape number {i}")).collect();
        std::fs::write(&file, format!("# prompts\n{}\n", prompts.join("\n"))).unwrap();
        file
    };
    // A thousand prompts cannot finish before the kill, which comes once two images are
    // recorded: the kill always lands mid-run.
    let long_file = write_prompts("long.txt", 1000);
    let out = dir.path().join("out");
    let args = ["--steps", "12", "--seed", "5"];
    let mut child = ldm_batch(&long_file, &out, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while manifest_lines(&out) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "batch made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the batch ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_before = manifest_lines(&out);
    assert!(
        (2..1000).contains(&done_before),
        "the kill lands mid-run ({done_before} done)"
    );
    let first_image = out.join(&pngs(&out)[0]);
    let first_bytes = std::fs::read(&first_image).unwrap();

    // The same file cut after three more prompts holds the same first jobs (same positions,
    // seeds and keys): a resume skips exactly what was recorded and makes the rest.
    let total = done_before + 3;
    let file = write_prompts("prompts.txt", total);
    let output = ldm_batch(&file, &out, &args).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("3 image(s) generated, {done_before} already done")),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        pngs(&out).len(),
        total,
        "every prompt has exactly one image"
    );
    assert_eq!(manifest_lines(&out), total, "one manifest line per image");
    assert_eq!(
        std::fs::read(&first_image).unwrap(),
        first_bytes,
        "done images are not remade"
    );

    // The same images as an uninterrupted run.
    let fresh = dir.path().join("fresh");
    assert!(ldm_batch(&file, &fresh, &args)
        .output()
        .unwrap()
        .status
        .success());
    assert_eq!(pngs(&fresh), pngs(&out));
    for name in pngs(&fresh) {
        let a = image::open(out.join(&name)).unwrap().to_rgb8();
        let b = image::open(fresh.join(&name)).unwrap().to_rgb8();
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn batching_prompts_together_gives_the_same_images() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"prompt": "a red apple", "seed": 1}"#,
            r#"{"prompt": "a black cat", "negative_prompt": "blurry", "seed": 2}"#,
            r#"{"prompt": "a smiling sun", "num_images": 2}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let one_by_one = dir.path().join("single");
    let batched = dir.path().join("batched");
    let args = ["--steps", "3", "--sampler", "ddpm"];
    assert!(ldm_batch(&file, &one_by_one, &args)
        .output()
        .unwrap()
        .status
        .success());
    let mut batched_args = args.to_vec();
    batched_args.extend(["--batch-size", "4"]);
    let output = ldm_batch(&file, &batched, &batched_args).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let names = pngs(&one_by_one);
    assert_eq!(names.len(), 4);
    assert_eq!(names, pngs(&batched));
    for name in names {
        let a = image::open(one_by_one.join(&name)).unwrap().to_rgb8();
        let b = image::open(batched.join(&name)).unwrap().to_rgb8();
        let max_diff = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        // Batched matrix products round differently in the last bits; 8-bit pixels may flip by 1.
        assert!(max_diff <= 1, "{name}: batched differs by {max_diff}");
    }
}

#[test]
fn txt2img_from_file_uses_the_same_machinery() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.txt");
    std::fs::write(&file, "a red apple\n\n# comment\na black cat\n").unwrap();
    let out = dir.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "txt2img",
            "--model",
            common::fixture("tiny-sd1").to_str().unwrap(),
        ])
        .args(["--steps", "2", "--from-file"])
        .arg(&file)
        .arg("--output-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        pngs(&out),
        ["00000-a-red-apple.png", "00001-a-black-cat.png"]
    );
    let params = ldm::image_io::read_png_parameters(&out.join("00001-a-black-cat.png"))
        .unwrap()
        .unwrap();
    assert!(params.starts_with("a black cat\n"), "{params}");
}
