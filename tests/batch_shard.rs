//! `ldm batch --shard I/N` (and Slurm / Kubernetes indices): N concurrent worker processes on one
//! output folder make every image exactly once, byte-identical to one worker's, and a later
//! plain run makes nothing new.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};

/// Seven images of two shapes (steps 2 and 3), default model.
const PROMPTS: &str = r#"{"prompt": "a red apple"}
{"prompt": "a black cat"}
{"prompt": "a yellow sun", "steps": 3}
{"prompt": "a green tree"}
{"prompt": "a blue car", "steps": 3}
{"prompt": "a pink flower", "num_images": 2}
"#;
const IMAGES: usize = 7;

/// Environment variables of one worker.
type Env = Vec<(&'static str, &'static str)>;

fn batch(file: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
    cmd.arg("batch")
        .arg(file)
        .args(["--steps", "2", "--batch-size", "2", "--seed", "3"])
        .arg("--output-dir")
        .arg(out)
        .args(extra)
        .env_remove("LDM_DEFAULT_MODEL")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("SLURM_ARRAY_TASK_MIN")
        .env_remove("JOB_COMPLETION_INDEX")
        .envs(env.iter().copied());
    cmd
}

fn succeeded(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "ldm batch failed: {stderr}");
    stderr
}

/// Runs the commands at the same time and waits for all.
fn concurrently(commands: Vec<Command>) {
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut cmd| {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        succeeded(child.wait_with_output().unwrap());
    }
}

/// The folder's PNGs by name.
fn pngs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Every manifest line's job key, over all manifests of the folder.
fn recorded_keys(dir: &Path) -> Vec<String> {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("manifest") && name.ends_with(".jsonl") {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let entry: serde_json::Value = serde_json::from_str(line).unwrap();
                keys.push(entry["job_key"].as_str().unwrap().to_string());
            }
        }
    }
    keys
}

#[test]
fn shards_make_every_image_once_with_one_workers_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(&file, PROMPTS).unwrap();
    let single = dir.path().join("single");
    succeeded(batch(&file, &single, &[], &[]).output().unwrap());
    let expected = pngs(&single);
    assert_eq!(expected.len(), IMAGES);

    let runs: Vec<(&str, Vec<Env>, &[&str])> = vec![
        ("flags", vec![vec![]; 3], &[]),
        (
            "slurm",
            vec![
                vec![
                    ("SLURM_ARRAY_TASK_ID", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "2"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                ],
                vec![
                    ("SLURM_ARRAY_TASK_ID", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "2"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                ],
            ],
            &[],
        ),
        (
            "kubernetes",
            vec![
                vec![("JOB_COMPLETION_INDEX", "0")],
                vec![("JOB_COMPLETION_INDEX", "1")],
            ],
            &["--shard-count", "2"],
        ),
    ];
    for (name, envs, extra) in runs {
        let out = dir.path().join(name);
        let count = envs.len().to_string();
        let commands = envs
            .iter()
            .enumerate()
            .map(|(i, env)| {
                let shard = format!("{i}/{count}");
                let mut args = extra.to_vec();
                if name == "flags" {
                    args.extend(["--shard", &shard]);
                }
                batch(&file, &out, &args, env)
            })
            .collect();
        concurrently(commands);
        assert!(
            pngs(&out) == expected,
            "{name}: the shards' images differ from one worker's"
        );
        let keys = recorded_keys(&out);
        assert_eq!(keys.len(), IMAGES, "{name}: each image recorded once");
        assert_eq!(keys.iter().collect::<HashSet<_>>().len(), IMAGES, "{name}");
        assert!(
            !out.join("manifest.jsonl").exists(),
            "{name}: shards write their own manifests"
        );

        let stderr = succeeded(batch(&file, &out, &[], &[]).output().unwrap());
        assert!(
            stderr.contains(&format!("0 image(s) generated, {IMAGES} already done")),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn bad_shards_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, "a red apple\n").unwrap();
    let out = dir.path().join("out");
    for (extra, env, message) in [
        (vec!["--shard", "3/3"], vec![], "out of range"),
        (vec!["--shard", "x"], vec![], "expected I/N"),
        (vec![], vec![("JOB_COMPLETION_INDEX", "1")], "--shard-count"),
        (vec!["--shard-count", "2"], vec![], "JOB_COMPLETION_INDEX"),
    ] {
        let output = batch(&file, &out, &extra, &env).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} {env:?}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!out.join("manifest.jsonl").exists());
}
