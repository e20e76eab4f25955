//! Batch prompt files (both kinds, line-numbered errors, job expansion, output names, keys,
//! batching) and the batch manifest (resume after an interruption).

use std::path::{Component, Path, PathBuf};

use ldm::batch_manifest::{Manifest, ManifestEntry, MANIFEST_FILE};
use ldm::pipelines::batch::{expand_jobs, group_for_batching, job_key, Job, JobDefaults};
use ldm::pipelines::Mode;
use ldm::prompt_file::{
    line_errors_report, parse_prompt_file, parse_prompt_text, LineError, ParsedPromptFile,
    PromptFileKind,
};

fn defaults() -> JobDefaults {
    JobDefaults {
        negative_prompt: "blurry".to_string(),
        base_seed: 100,
        steps: 50,
        guidance_scale: 7.5,
        guidance_rescale: 0.0,
        eta: 0.0,
        width: 512,
        height: 512,
        scheduler: "ddim".to_string(),
        model: "sd15".to_string(),
        num_images: 1,
        image: None,
        mask: None,
        strength: 0.8,
        clip_skip: 1,
        loras: Vec::new(),
    }
}

fn jsonl(text: &str) -> ParsedPromptFile {
    parse_prompt_text(text, Path::new("/data/prompts"), PromptFileKind::JsonLines)
}

fn plain(text: &str) -> ParsedPromptFile {
    parse_prompt_text(text, Path::new("/data/prompts"), PromptFileKind::PlainText)
}

fn prompts(parsed: &ParsedPromptFile) -> Vec<(usize, &str)> {
    parsed
        .entries
        .iter()
        .map(|e| (e.line, e.prompt.as_str()))
        .collect()
}

/// The one error reported for `line`, failing when there is none.
fn error_on(parsed: &ParsedPromptFile, line: usize) -> &str {
    let found: Vec<&LineError> = parsed.errors.iter().filter(|e| e.line == line).collect();
    assert_eq!(found.len(), 1, "errors on line {line}: {:?}", parsed.errors);
    &found[0].message
}

// ---- plain text -------------------------------------------------------------------------

#[test]
fn plain_text_skips_comments_and_blank_lines_and_keeps_line_numbers() {
    let text = "\u{feff}# emoji prompts\n\na red apple\n   \n  a black cat  \r\n# a commented cat\na smiling sun # with a hash\n";
    let parsed = plain(text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(
        prompts(&parsed),
        [
            (3, "a red apple"),
            (5, "a black cat"),
            (7, "a smiling sun # with a hash")
        ]
    );
    assert!(parsed
        .entries
        .iter()
        .all(|e| e.overrides == Default::default()));
}

#[test]
fn plain_text_line_starting_with_brace_is_just_a_prompt() {
    let parsed = plain("{curly} apple\n");
    assert_eq!(prompts(&parsed), [(1, "{curly} apple")]);
}

#[test]
fn kind_is_detected_from_extension_or_first_prompt_line() {
    let object = "# comment\n\n{\"prompt\": \"a red apple\"}\n";
    let text = "a red apple\n{\"prompt\": \"not first\"}\n";
    assert_eq!(
        PromptFileKind::detect(Path::new("p.txt"), object),
        PromptFileKind::JsonLines
    );
    assert_eq!(
        PromptFileKind::detect(Path::new("p.txt"), text),
        PromptFileKind::PlainText
    );
    assert_eq!(
        PromptFileKind::detect(Path::new("p"), text),
        PromptFileKind::PlainText
    );
    for name in ["p.jsonl", "p.json", "P.JSONL"] {
        assert_eq!(
            PromptFileKind::detect(Path::new(name), text),
            PromptFileKind::JsonLines,
            "{name}"
        );
    }
    assert_eq!(
        PromptFileKind::detect(Path::new("p.txt"), ""),
        PromptFileKind::PlainText
    );
}

// ---- JSON Lines -------------------------------------------------------------------------

#[test]
fn json_lines_read_every_override_and_its_aliases() {
    let text = r#"# overrides
{"prompt": "a red apple"}

{"prompt": " a black cat ", "negative_prompt": "dog", "seed": 18446744073709551615, "steps": 20, "guidance_scale": 3, "width": 640, "height": 384, "scheduler": "ddpm", "num_images": 2, "image": "in/cat.png", "mask": "/abs/mask.png", "strength": 0.5}
{"prompt": "a smiling sun", "cfg_scale": 9.5, "guidance_rescale": 0.7, "sampler": "euler_a", "strength": 0, "image": "sun.png"}
"#;
    let parsed = jsonl(text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(
        prompts(&parsed),
        [(2, "a red apple"), (4, "a black cat"), (5, "a smiling sun")]
    );
    assert_eq!(parsed.entries[0].overrides, Default::default());

    let cat = &parsed.entries[1].overrides;
    assert_eq!(cat.negative_prompt.as_deref(), Some("dog"));
    assert_eq!(cat.seed, Some(u64::MAX));
    assert_eq!(cat.steps, Some(20));
    assert_eq!(cat.guidance_scale, Some(3.0));
    assert_eq!((cat.width, cat.height), (Some(640), Some(384)));
    assert_eq!(cat.scheduler.as_deref(), Some("ddpm"));
    assert_eq!(cat.num_images, Some(2));
    // Relative paths resolve against the prompt file's folder; absolute ones stay.
    assert_eq!(
        cat.image.as_deref(),
        Some(Path::new("/data/prompts/in/cat.png"))
    );
    assert_eq!(cat.mask.as_deref(), Some(Path::new("/abs/mask.png")));
    assert_eq!(cat.strength, Some(0.5));

    let sun = &parsed.entries[2].overrides;
    assert_eq!(sun.guidance_scale, Some(9.5));
    assert_eq!(sun.guidance_rescale, Some(0.7));
    assert_eq!(sun.scheduler.as_deref(), Some("euler_a"));
    assert_eq!(sun.strength, Some(0.0));
}

#[test]
fn json_lines_bad_lines_are_reported_with_their_line_numbers() {
    let text = [
        r#"{"prompt": "a red apple"}"#,            // 1 good
        r#"{"prompt": "a black cat""#,             // 2 unterminated
        r#"{"negative_prompt": "blurry"}"#,        // 3 no prompt
        r#"{"prompt": 42}"#,                       // 4 prompt not a string
        r#"{"prompt": "a sun", "seed": "7"}"#,     // 5 wrong type
        r#"{"prompt": "a sun", "sed": 7}"#,        // 6 typo'd key
        r#"{"prompt": "   "}"#,                    // 7 empty prompt
        r#"{"prompt": "a sun", "steps": 0}"#,      // 8 out of range
        r#"{"prompt": "a sun", "strength": 1.5}"#, // 9 out of range
        r#"{"prompt": "a sun", "seed": -1}"#,      // 10 negative seed
        r#""a plain string""#,                     // 11 not an object
        r#"{"prompt": "a sun", "num_images": 0}"#, // 12 out of range
        r#"{"prompt": "a sun", "cfg_scale": 5, "guidance_scale": 6}"#, // 13 given twice
        "",                                        // 14 blank
        "# {\"prompt\": \"commented out\"}",       // 15 comment
        r#"{"prompt": "a sun", "width": 0}"#,      // 16 out of range
        r#"{"prompt": "a sun", "image": ""}"#,     // 17 empty path
        r#"{"prompt": "a sun", "steps": 2.5}"#,    // 18 float for an integer
        r#"{"prompt": "a yellow star", "seed": 7}"#, // 19 good
        r#"{"prompt": "a sun", "guidance_rescale": 2}"#, // 20 out of range
    ]
    .join("\n");
    let parsed = jsonl(&text);
    assert_eq!(
        prompts(&parsed),
        [(1, "a red apple"), (19, "a yellow star")]
    );
    let bad_lines: Vec<usize> = parsed.errors.iter().map(|e| e.line).collect();
    assert_eq!(
        bad_lines,
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 20]
    );

    assert!(error_on(&parsed, 2).starts_with("invalid JSON: EOF while parsing an object (column "));
    assert!(
        !error_on(&parsed, 2).contains("line 1"),
        "serde's own line number must not leak"
    );
    assert_eq!(error_on(&parsed, 3), "missing \"prompt\"");
    assert_eq!(error_on(&parsed, 4), "\"prompt\" must be a string, got 42");
    assert!(error_on(&parsed, 5).contains("invalid type: string \"7\", expected u64"));
    assert!(
        error_on(&parsed, 6).contains("unknown field `sed`"),
        "{}",
        error_on(&parsed, 6)
    );
    assert_eq!(error_on(&parsed, 7), "empty prompt");
    assert_eq!(error_on(&parsed, 8), "\"steps\" must be at least 1");
    assert_eq!(
        error_on(&parsed, 9),
        "\"strength\" must be between 0 and 1, got 1.5"
    );
    assert_eq!(
        error_on(&parsed, 20),
        "\"guidance_rescale\" must be between 0 and 1, got 2"
    );
    assert!(
        error_on(&parsed, 10).contains("invalid value: integer `-1`"),
        "{}",
        error_on(&parsed, 10)
    );
    assert!(error_on(&parsed, 11).starts_with("expected a JSON object"));
    assert_eq!(error_on(&parsed, 12), "\"num_images\" must be at least 1");
    assert!(
        error_on(&parsed, 13).contains("duplicate field `guidance_scale`"),
        "{}",
        error_on(&parsed, 13)
    );
    assert_eq!(error_on(&parsed, 16), "\"width\" must be at least 1");
    assert_eq!(error_on(&parsed, 17), "\"image\" is an empty path");
    assert!(error_on(&parsed, 18).contains("invalid type: floating point `2.5`"));
}

// ---- keep-going and reporting -----------------------------------------------------------

#[test]
fn bad_lines_fail_the_file_unless_keep_going() {
    let text = "{\"prompt\": \"a red apple\"}\n{\"prompt\": \"a cat\", \"stpes\": 5}\n\n{oops\n{\"prompt\": \"a smiling sun\"}\n";
    let file = Path::new("prompts/batch.jsonl");

    let report = jsonl(text)
        .into_entries(file, false)
        .unwrap_err()
        .to_string();
    assert!(
        report.contains("2 bad line(s) in prompts/batch.jsonl"),
        "{report}"
    );
    assert!(report.contains("--keep-going"), "{report}");
    assert!(
        report.contains("\nprompts/batch.jsonl:2: unknown field `stpes`"),
        "{report}"
    );
    assert!(
        report.contains("\nprompts/batch.jsonl:4: invalid JSON: "),
        "{report}"
    );

    let (kept, skipped) = jsonl(text).into_entries(file, true).unwrap();
    let kept: Vec<(usize, &str)> = kept.iter().map(|e| (e.line, e.prompt.as_str())).collect();
    assert_eq!(kept, [(1, "a red apple"), (5, "a smiling sun")]);
    let skipped: Vec<usize> = skipped.iter().map(|e| e.line).collect();
    assert_eq!(
        skipped,
        [2, 4],
        "the skipped lines are returned for the caller to report"
    );
}

#[test]
fn a_file_without_usable_prompts_is_an_error_even_with_keep_going() {
    let file = Path::new("p.txt");
    let empty = plain("# only comments\n\n")
        .into_entries(file, true)
        .unwrap_err();
    assert_eq!(empty.to_string(), "p.txt: no prompts to run");
    let all_bad = jsonl("{\"seed\": 1}\n")
        .into_entries(file, true)
        .unwrap_err();
    assert_eq!(all_bad.to_string(), "p.txt: no prompts to run");
}

#[test]
fn line_errors_report_lists_file_and_line_for_each() {
    let errors = [
        LineError {
            line: 3,
            message: "empty prompt".into(),
        },
        LineError {
            line: 10,
            message: "missing \"prompt\"".into(),
        },
    ];
    let report = line_errors_report(Path::new("a.jsonl"), &errors).to_string();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines[1..],
        ["a.jsonl:3: empty prompt", "a.jsonl:10: missing \"prompt\""]
    );
}

// ---- files on disk -----------------------------------------------------------------------

#[test]
fn prompt_file_paths_resolve_against_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sets");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("fruit.txt"); // .txt, but its first prompt line is an object
    std::fs::write(&path, "# fruit\n{\"prompt\": \"a red apple\", \"image\": \"apple.png\", \"mask\": \"../masks/m.png\"}\n").unwrap();
    let parsed = parse_prompt_file(&path).unwrap();
    assert_eq!(parsed.kind, PromptFileKind::JsonLines);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let overrides = &parsed.entries[0].overrides;
    assert_eq!(parsed.entries[0].line, 2);
    assert_eq!(
        overrides.image.as_deref(),
        Some(sub.join("apple.png").as_path())
    );
    assert_eq!(
        overrides.mask.as_deref(),
        Some(sub.join("../masks/m.png").as_path())
    );
}

#[test]
fn unreadable_prompt_file_error_names_the_path() {
    let error = parse_prompt_file(Path::new("/nonexistent/prompts.txt")).unwrap_err();
    assert!(
        format!("{error:#}").contains("cannot read prompt file /nonexistent/prompts.txt"),
        "{error:#}"
    );
}

#[test]
fn example_prompt_files_parse_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
    let text = parse_prompt_file(&root.join("example.txt")).unwrap();
    assert_eq!(text.kind, PromptFileKind::PlainText);
    assert!(
        text.errors.is_empty() && text.entries.len() >= 3,
        "{text:?}"
    );
    let json = parse_prompt_file(&root.join("example.jsonl")).unwrap();
    assert_eq!(json.kind, PromptFileKind::JsonLines);
    assert!(
        json.errors.is_empty() && json.entries.len() >= 3,
        "{json:?}"
    );
    assert!(json
        .entries
        .iter()
        .any(|e| e.overrides != Default::default()));
}

// ---- checks that need the command line --------------------------------------------------

#[test]
fn mask_or_strength_without_any_image_is_a_line_error() {
    let text = r#"{"prompt": "a red apple", "mask": "m.png"}
{"prompt": "a black cat", "strength": 0.3}
{"prompt": "a smiling sun", "mask": "m.png", "image": "i.png"}
{"prompt": "a yellow star"}
"#;
    let mut parsed = jsonl(text);
    defaults().check(&mut parsed);
    assert_eq!(
        prompts(&parsed),
        [(3, "a smiling sun"), (4, "a yellow star")]
    );
    assert!(error_on(&parsed, 1).starts_with("a mask needs an image"));
    assert!(error_on(&parsed, 2).starts_with("\"strength\" needs an image"));

    // With --image on the command line every line has an image.
    let mut parsed = jsonl(text);
    JobDefaults {
        image: Some("cli.png".into()),
        ..defaults()
    }
    .check(&mut parsed);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.entries.len(), 4);

    // A command-line mask without an image fails every line; errors stay sorted by line.
    let mut parsed = jsonl("{\"prompt\": \"a\"}\n{oops\n{\"prompt\": \"b\"}\n");
    JobDefaults {
        mask: Some("m.png".into()),
        ..defaults()
    }
    .check(&mut parsed);
    assert!(parsed.entries.is_empty());
    assert_eq!(
        parsed.errors.iter().map(|e| e.line).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

// ---- job expansion ----------------------------------------------------------------------

#[test]
fn implicit_seeds_count_up_from_the_base_over_all_images() {
    let parsed = plain("a red apple\na black cat\na smiling sun\n");
    let jobs = expand_jobs(
        &parsed.entries,
        &JobDefaults {
            num_images: 2,
            ..defaults()
        },
    );
    let summary: Vec<(usize, usize, usize, u64)> = jobs
        .iter()
        .map(|j| (j.index, j.line, j.image_in_line, j.seed))
        .collect();
    assert_eq!(
        summary,
        [
            (0, 1, 0, 100),
            (1, 1, 1, 101),
            (2, 2, 0, 102),
            (3, 2, 1, 103),
            (4, 3, 0, 104),
            (5, 3, 1, 105)
        ]
    );
}

#[test]
fn explicit_seeds_count_up_within_their_line_only() {
    let text = r#"{"prompt": "a red apple", "num_images": 2}
{"prompt": "a black cat", "seed": 7, "num_images": 3}
{"prompt": "a smiling sun"}
{"prompt": "a yellow star", "seed": 18446744073709551615, "num_images": 2}
"#;
    let jobs = expand_jobs(&jsonl(text).entries, &defaults());
    let seeds: Vec<(usize, u64)> = jobs.iter().map(|j| (j.line, j.seed)).collect();
    assert_eq!(
        seeds,
        [
            (1, 100),
            (1, 101),
            (2, 7),
            (2, 8),
            (2, 9),
            (3, 105),
            (4, u64::MAX),
            (4, 0)
        ]
    );
    assert_eq!(
        jobs.iter().map(|j| j.index).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
}

#[test]
fn overrides_replace_defaults_per_line() {
    let text = r#"{"prompt": "a red apple"}
{"prompt": "a black cat", "negative_prompt": "", "steps": 20, "cfg_scale": 4, "guidance_rescale": 0.7, "width": 640, "height": 384, "sampler": "ddpm"}
{"prompt": "a smiling sun", "image": "sun.png"}
{"prompt": "a green frog", "image": "frog.png", "mask": "frog-mask.png", "strength": 0.25}
"#;
    let jobs = expand_jobs(&jsonl(text).entries, &defaults());
    let apple = &jobs[0];
    assert_eq!(
        (
            apple.negative_prompt.as_str(),
            apple.steps,
            apple.guidance_scale,
            apple.eta
        ),
        ("blurry", 50, 7.5, 0.0)
    );
    assert_eq!(
        (
            apple.width,
            apple.height,
            apple.scheduler.as_str(),
            apple.model.as_str()
        ),
        (512, 512, "ddim", "sd15")
    );
    assert_eq!((apple.mode(), apple.strength), (Mode::Txt2Img, None));
    assert_eq!(apple.guidance_rescale, 0.0);

    let cat = &jobs[1];
    assert_eq!(
        (
            cat.negative_prompt.as_str(),
            cat.steps,
            cat.guidance_scale,
            cat.guidance_rescale
        ),
        ("", 20, 4.0, 0.7)
    );
    assert_eq!(
        (cat.width, cat.height, cat.scheduler.as_str()),
        (640, 384, "ddpm")
    );

    let sun = &jobs[2];
    assert_eq!(
        sun.image.as_deref(),
        Some(Path::new("/data/prompts/sun.png"))
    );
    assert_eq!((sun.mode(), sun.strength), (Mode::Img2Img, Some(0.8)));

    let frog = &jobs[3];
    assert_eq!(
        frog.mask.as_deref(),
        Some(Path::new("/data/prompts/frog-mask.png"))
    );
    assert_eq!((frog.mode(), frog.strength), (Mode::Inpaint, Some(0.25)));
}

#[test]
fn command_line_image_and_mask_apply_to_lines_without_their_own() {
    let text = "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"image\": \"b.png\"}\n";
    let defaults = JobDefaults {
        image: Some("cli.png".into()),
        mask: Some("cli-mask.png".into()),
        ..defaults()
    };
    let jobs = expand_jobs(&jsonl(text).entries, &defaults);
    assert_eq!(jobs[0].image.as_deref(), Some(Path::new("cli.png")));
    assert_eq!(
        jobs[1].image.as_deref(),
        Some(Path::new("/data/prompts/b.png"))
    );
    assert!(jobs
        .iter()
        .all(|j| j.mask.as_deref() == Some(Path::new("cli-mask.png"))));
    assert!(jobs.iter().all(|j| j.mode() == Mode::Inpaint));
}

// ---- output file names ------------------------------------------------------------------

/// A name that, joined to the output folder, stays a plain file directly inside it.
fn assert_safe_file_name(name: &str) {
    assert!(name.ends_with(".png"), "{name}");
    assert!(!name.starts_with('.'), "{name}");
    assert!(!name.contains(['/', '\\', '\0', ':']), "{name}");
    assert!(!name.contains(".."), "{name}");
    assert!(name.len() <= 5 + 1 + 40 + 4, "{name} is too long");
    let components: Vec<Component> = Path::new(name).components().collect();
    assert!(matches!(components[..], [Component::Normal(_)]), "{name}");
}

#[test]
fn file_names_are_safe_whatever_the_prompt() {
    let text = [
        "../../etc/passwd",
        "/absolute/path/apple",
        "C:\\Windows\\cat",
        "...",
        "猫と太陽 🌞",
        "Café crème brûlée",
        "a \0 nul",
        &"a very long prompt about a smiling sun ".repeat(20),
        ".hidden",
        "-- leading dashes --",
    ]
    .join("\n");
    let jobs = expand_jobs(&plain(&text).entries, &defaults());
    let names: Vec<String> = jobs.iter().map(Job::file_name).collect();
    for name in &names {
        assert_safe_file_name(name);
    }
    assert_eq!(names[0], "00000-etc-passwd.png");
    assert_eq!(names[1], "00001-absolute-path-apple.png");
    assert_eq!(names[3], "00003-image.png");
    assert_eq!(names[4], "00004-image.png");
    assert_eq!(names[5], "00005-caf-cr-me-br-l-e.png");
    assert_eq!(
        names[7],
        "00007-a-very-long-prompt-about-a-smiling-sun-a.png"
    );
    assert_eq!(names[8], "00008-hidden.png");
    assert_eq!(names[9], "00009-leading-dashes.png");
}

#[test]
fn file_names_are_unique_and_stable_with_duplicate_prompts() {
    let text = "a red apple\na red apple\nA RED APPLE!\na red apple\n";
    let defaults = JobDefaults {
        num_images: 3,
        ..defaults()
    };
    let jobs = expand_jobs(&plain(text).entries, &defaults);
    let names: Vec<String> = jobs.iter().map(Job::file_name).collect();
    let unique: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), 12, "{names:?}");
    assert_eq!(names[0], "00000-a-red-apple.png");
    assert_eq!(names[11], "00011-a-red-apple.png");
    let again: Vec<String> = expand_jobs(&plain(text).entries, &defaults)
        .iter()
        .map(Job::file_name)
        .collect();
    assert_eq!(names, again);
}

// ---- job keys ---------------------------------------------------------------------------

fn apple_job() -> Job {
    expand_jobs(&plain("a red apple").entries, &defaults()).remove(0)
}

#[test]
fn job_key_is_a_sha256_hex_pinned_across_versions() {
    let key = job_key(&apple_job());
    assert_eq!(key.len(), 64);
    assert!(key
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    // Pinned (Python: sha256 of the compact JSON {"version":1,"prompt":"a red apple",
    // "negative_prompt":"blurry","seed":100,...,"strength":null}); a change here makes every
    // existing manifest's work look undone.
    assert_eq!(
        key,
        "f428d5133cccdcda53bc2fed59a2dec2d187d518c259b6de0cb25de7ead9e510"
    );
}

#[test]
fn job_key_ignores_position_and_tracks_every_image_setting() {
    let base = apple_job();
    let moved = Job {
        index: 9,
        line: 30,
        image_in_line: 2,
        ..base.clone()
    };
    assert_eq!(
        job_key(&moved),
        job_key(&base),
        "where a job sits does not change its image"
    );

    let variants = [
        Job {
            prompt: "a green apple".into(),
            ..base.clone()
        },
        Job {
            negative_prompt: String::new(),
            ..base.clone()
        },
        Job {
            seed: 101,
            ..base.clone()
        },
        Job {
            steps: 49,
            ..base.clone()
        },
        Job {
            guidance_scale: 7.0,
            ..base.clone()
        },
        Job {
            eta: 1.0,
            ..base.clone()
        },
        Job {
            guidance_rescale: 0.7,
            ..base.clone()
        },
        Job {
            clip_skip: 2,
            ..base.clone()
        },
        Job {
            loras: vec!["style.safetensors:0.5".into()],
            ..base.clone()
        },
        Job {
            width: 640,
            ..base.clone()
        },
        Job {
            height: 640,
            ..base.clone()
        },
        Job {
            scheduler: "ddpm".into(),
            ..base.clone()
        },
        Job {
            model: "sd21".into(),
            ..base.clone()
        },
        Job {
            image: Some("a.png".into()),
            strength: Some(0.8),
            ..base.clone()
        },
        Job {
            image: Some("b.png".into()),
            strength: Some(0.8),
            ..base.clone()
        },
        Job {
            image: Some("a.png".into()),
            strength: Some(0.7),
            ..base.clone()
        },
        Job {
            image: Some("a.png".into()),
            mask: Some("m.png".into()),
            strength: Some(0.8),
            ..base.clone()
        },
    ];
    let mut keys: Vec<String> = variants.iter().map(job_key).collect();
    keys.push(job_key(&base));
    let unique: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(
        unique.len(),
        keys.len(),
        "every setting must change the key"
    );
}

// ---- batching ---------------------------------------------------------------------------

#[test]
fn batches_share_one_shape_respect_the_size_and_keep_file_order() {
    let text = r#"{"prompt": "a red apple", "seed": 1}
{"prompt": "a black cat", "width": 640}
{"prompt": "a smiling sun", "negative_prompt": "rain"}
{"prompt": "a green frog", "width": 640, "seed": 5}
{"prompt": "a yellow star"}
{"prompt": "a blue whale", "steps": 20}
{"prompt": "a pink flower"}
{"prompt": "a rain cloud", "image": "cloud.png"}
{"prompt": "a snowman", "image": "snow.png"}
{"prompt": "a tree", "image": "tree.png", "mask": "tree-mask.png"}
{"prompt": "a fox", "image": "fox.png", "strength": 0.5}
{"prompt": "a moon", "cfg_scale": 5}
{"prompt": "a boat", "sampler": "ddpm"}
"#;
    let jobs = expand_jobs(&jsonl(text).entries, &defaults());
    assert_eq!(
        group_for_batching(&jobs, 2).unwrap(),
        vec![
            vec![0, 2], // 512x512, 50 steps, txt2img: prompts, seeds and negatives may differ
            vec![1, 3], // 640 wide
            vec![4, 6],
            vec![5],    // 20 steps
            vec![7, 8], // img2img at the default strength, different input images
            vec![9],    // inpaint
            vec![10],   // img2img at strength 0.5
            vec![11],   // other guidance
            vec![12],   // other sampler
        ]
    );
    let all: Vec<usize> = group_for_batching(&jobs, 3)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..jobs.len()).collect::<Vec<_>>(),
        "every job exactly once"
    );
}

#[test]
fn batch_size_splits_a_large_group_in_file_order() {
    let jobs = expand_jobs(
        &plain("a red apple\na black cat").entries,
        &JobDefaults {
            num_images: 4,
            ..defaults()
        },
    );
    assert_eq!(
        group_for_batching(&jobs, 3).unwrap(),
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]
    );
    assert_eq!(group_for_batching(&jobs, 1).unwrap().len(), 8);
    assert_eq!(
        group_for_batching(&jobs, 100).unwrap(),
        vec![(0..8).collect::<Vec<_>>()]
    );
}

#[test]
fn batch_size_zero_is_an_error_not_a_panic() {
    let jobs = expand_jobs(&plain("a red apple").entries, &defaults());
    let error = group_for_batching(&jobs, 0).unwrap_err().to_string();
    assert!(error.contains("at least 1"), "{error}");
}

#[test]
fn batches_are_positions_in_the_given_slice() {
    // After skipping finished work the pending jobs no longer start at index 0.
    let jobs = expand_jobs(&plain("a\nb\nc\nd").entries, &defaults());
    let pending: Vec<Job> = jobs.into_iter().filter(|j| j.index % 2 == 1).collect();
    let batches = group_for_batching(&pending, 4).unwrap();
    assert_eq!(batches, vec![vec![0, 1]]);
    assert_eq!(
        batches[0]
            .iter()
            .map(|&p| pending[p].index)
            .collect::<Vec<_>>(),
        [1, 3]
    );
}

// ---- manifest ---------------------------------------------------------------------------

fn three_jobs() -> Vec<Job> {
    expand_jobs(
        &plain("a red apple\na black cat\na smiling sun").entries,
        &defaults(),
    )
}

/// Writes the job's image file (any bytes do: the manifest only checks it exists).
fn write_image(dir: &Path, job: &Job) {
    std::fs::write(dir.join(job.file_name()), b"png").unwrap();
}

#[test]
fn recorded_jobs_are_done_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out/nested");
    let jobs = three_jobs();
    {
        let mut manifest = Manifest::open(&out).unwrap();
        assert!(manifest.entries().is_empty());
        assert!(out.is_dir(), "open creates the output folder");
        for job in &jobs[..2] {
            write_image(&out, job);
            manifest
                .record(ManifestEntry::new(
                    job,
                    Some(format!("{}\nSteps: 50", job.prompt)),
                ))
                .unwrap();
            assert!(manifest.is_done(&job_key(job)));
        }
        assert!(!manifest.is_done(&job_key(&jobs[2])));
    }
    let manifest = Manifest::open(&out).unwrap();
    assert!(manifest.is_done(&job_key(&jobs[0])));
    assert!(manifest.is_done(&job_key(&jobs[1])));
    assert!(!manifest.is_done(&job_key(&jobs[2])));
    let entry = &manifest.entries()[1];
    assert_eq!(entry.job, jobs[1]);
    assert_eq!(entry.file, "00001-a-black-cat.png");
    assert_eq!(entry.job_key, job_key(&jobs[1]));
    assert_eq!(entry.parameters.as_deref(), Some("a black cat\nSteps: 50"));

    // One line per image, each a full record; no temporary files left behind.
    let text = std::fs::read_to_string(out.join(MANIFEST_FILE)).unwrap();
    assert_eq!(text.lines().count(), 2);
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for key in [
        "job_key",
        "file",
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "guidance_scale",
        "width",
        "height",
        "scheduler",
        "model",
        "parameters",
    ] {
        assert!(line.get(key).is_some(), "manifest line lacks {key}: {line}");
    }
    let files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
}

#[test]
fn a_recorded_job_whose_image_is_gone_is_not_done() {
    let dir = tempfile::tempdir().unwrap();
    let job = &three_jobs()[0];
    let mut manifest = Manifest::open(dir.path()).unwrap();
    manifest.record(ManifestEntry::new(job, None)).unwrap();
    assert!(
        !manifest.is_done(&job_key(job)),
        "recorded but never written"
    );
    write_image(dir.path(), job);
    assert!(manifest.is_done(&job_key(job)));
    std::fs::remove_file(dir.path().join(job.file_name())).unwrap();
    assert!(!Manifest::open(dir.path()).unwrap().is_done(&job_key(job)));
}

#[test]
fn recording_a_job_again_replaces_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let job = &three_jobs()[0];
    let mut manifest = Manifest::open(dir.path()).unwrap();
    manifest
        .record(ManifestEntry::new(job, Some("first".into())))
        .unwrap();
    manifest
        .record(ManifestEntry::new(job, Some("second".into())))
        .unwrap();
    let reopened = Manifest::open(dir.path()).unwrap();
    assert_eq!(reopened.entries().len(), 1);
    assert_eq!(reopened.entries()[0].parameters.as_deref(), Some("second"));
}

#[test]
fn a_truncated_last_line_is_dropped_and_the_file_rewritten_clean() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = three_jobs();
    let mut manifest = Manifest::open(dir.path()).unwrap();
    for job in &jobs[..2] {
        write_image(dir.path(), job);
        manifest.record(ManifestEntry::new(job, None)).unwrap();
    }
    let path = dir.path().join(MANIFEST_FILE);
    let full = std::fs::read_to_string(&path).unwrap();
    let second_line_start = full.find('\n').unwrap() + 1;
    let cut = &full[..second_line_start + 40]; // a crash mid-way through line 2
    std::fs::write(&path, cut).unwrap();

    let reopened = Manifest::open(dir.path()).unwrap();
    assert_eq!(reopened.entries().len(), 1);
    assert!(reopened.is_done(&job_key(&jobs[0])));
    assert!(
        !reopened.is_done(&job_key(&jobs[1])),
        "its record was lost, so it is made again"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        full[..second_line_start]
    );
}

#[test]
fn a_corrupt_line_before_the_last_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = three_jobs();
    let mut manifest = Manifest::open(dir.path()).unwrap();
    for job in &jobs {
        manifest.record(ManifestEntry::new(job, None)).unwrap();
    }
    let path = dir.path().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1] = "{garbage";
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let error = Manifest::open(dir.path()).unwrap_err().to_string();
    assert!(
        error.contains(&format!("{}:2: unreadable manifest line", path.display())),
        "{error}"
    );
}

#[test]
fn lora_and_clip_skip_keys_apply_per_line() {
    let text = concat!(
        "{\"prompt\": \"a\", \"lora\": \"styles/ink.safetensors:0.5\", \"clip_skip\": 2}\n",
        "{\"prompt\": \"b\", \"lora\": [\"/abs/x.safetensors\", \"y.safetensors:-1\"]}\n",
        "{\"prompt\": \"c\", \"lora\": \"\"}\n",
        "{\"prompt\": \"d\", \"clip_skip\": 0}\n",
        "{\"prompt\": \"e\"}\n",
    );
    let parsed = jsonl(text);
    assert!(
        error_on(&parsed, 3).contains("\"lora\""),
        "{:?}",
        parsed.errors
    );
    assert!(
        error_on(&parsed, 4).contains("clip_skip"),
        "{:?}",
        parsed.errors
    );
    let jobs = expand_jobs(
        &parsed.entries,
        &JobDefaults {
            loras: vec!["cli.safetensors:1".into()],
            ..defaults()
        },
    );
    assert_eq!(
        jobs[0].loras,
        [
            "cli.safetensors:1",
            "/data/prompts/styles/ink.safetensors:0.5"
        ]
    );
    assert_eq!(jobs[0].clip_skip, 2);
    assert_eq!(
        jobs[1].loras,
        [
            "cli.safetensors:1",
            "/abs/x.safetensors:1",
            "/data/prompts/y.safetensors:-1"
        ]
    );
    assert_eq!(jobs[2].loras, ["cli.safetensors:1"]);
    assert_eq!(jobs[2].clip_skip, 1);
    // Different LoRA sets or clip skips never share a batched pass.
    assert_eq!(group_for_batching(&jobs, 8).unwrap().len(), 3);
}
