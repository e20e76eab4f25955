//! `ldm serve`'s A1111 API over real HTTP on the default model: the same PNG bytes as the CLI,
//! A1111's response shapes, bad input refused with the field named, options and model switching,
//! progress, interrupt, health checks during a job, API keys and a full queue.

mod serve_common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::*;

/// 4 DDIM steps at the default model's 64x64: fast, and enough to differ from noise.
fn txt2img_body(seed: i64) -> Value {
    json!({
        "prompt": "a red apple",
        "negative_prompt": "blurry",
        "seed": seed,
        "steps": 4,
        "cfg_scale": 7.5,
        "sampler_name": "DDIM",
        "width": 64,
        "height": 64,
    })
}

#[test]
fn txt2img_gives_the_cli_bytes_and_a1111_shapes() {
    let server = start_default();
    let mut body = txt2img_body(11);
    body["n_iter"] = json!(2);
    // Fields clients such as webuiapi send and ldm ignores.
    body["enable_hr"] = json!(false);
    body["styles"] = json!([]);
    body["alwayson_scripts"] = json!({});
    body["override_settings"] = json!({});
    body["denoising_strength"] = json!(0.7);
    body["restore_faces"] = json!(false);
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let cli_args = [
        "txt2img",
        "a red apple",
        "-n",
        "blurry",
        "--steps",
        "4",
        "-g",
        "7.5",
        "--sampler",
        "ddim",
        "-W",
        "64",
        "-H",
        "64",
        "-N",
        "1",
    ];
    for (i, seed) in ["11", "12"].iter().enumerate() {
        let mut args = cli_args.to_vec();
        args.extend(["--seed", seed]);
        let expected = cli(&args, &dir.path().join(format!("s{seed}.png")), 1);
        assert!(
            unb64(&images[i]) == expected[0],
            "image {i} differs from `ldm txt2img --seed {seed}`"
        );
    }

    assert_eq!(answer["parameters"]["steps"], json!(4));
    assert_eq!(answer["parameters"]["enable_hr"], json!(false));
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], json!(11));
    assert_eq!(info["all_seeds"], json!([11, 12]));
    assert_eq!(info["sampler_name"], json!("DDIM"));
    assert_eq!(info["sd_model_name"], json!(server.server.model()));
    let infotexts = info["infotexts"].as_array().unwrap();
    assert!(
        infotexts[1].as_str().unwrap().contains("Seed: 12,"),
        "{info}"
    );
    assert!(infotexts[0]
        .as_str()
        .unwrap()
        .starts_with("a red apple\nNegative prompt: blurry\n"));

    // batch_size 2 is one batch of two, as `ldm txt2img -N 2 --batch-size 2`.
    let mut body = txt2img_body(21);
    body["batch_size"] = json!(2);
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    let mut args = cli_args.to_vec();
    args.extend(["--seed", "21"]);
    let n = args.iter().position(|a| *a == "-N").unwrap() + 1;
    args[n] = "2";
    args.extend(["--batch-size", "2"]);
    let expected = cli(&args, &dir.path().join("batch.png"), 2);
    let images: Vec<Vec<u8>> = answer["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(unb64)
        .collect();
    assert!(
        images == expected,
        "a batch of 2 differs from `ldm txt2img -N 2 --batch-size 2`"
    );

    // send_images false: no images, the record still comes.
    let mut body = txt2img_body(3);
    body["send_images"] = json!(false);
    body["steps"] = json!(1);
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["images"], json!([]));
    assert!(answer["info"]
        .as_str()
        .unwrap()
        .contains("\"all_seeds\":[3]"));
}

#[test]
fn img2img_and_inpainting_give_the_cli_bytes() {
    let server = start_default();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.png");
    std::fs::write(&source, gradient_png()).unwrap();
    let mask_path = dir.path().join("mask.png");
    left_half_mask().save(&mask_path).unwrap();
    let mask_png = std::fs::read(&mask_path).unwrap();
    let source_arg = source.to_str().unwrap();

    let body = json!({
        "prompt": "a black cat", "seed": 5, "steps": 4, "sampler_name": "DDIM", "cfg_scale": 7.5,
        "init_images": [b64(&gradient_png())], "denoising_strength": 0.6,
    });
    let (status, answer) = server.post_json("/sdapi/v1/img2img", &body);
    assert_eq!(status, 200, "{answer}");
    let expected = cli(
        &[
            "img2img",
            "a black cat",
            "--image",
            source_arg,
            "--strength",
            "0.6",
            "--seed",
            "5",
            "--steps",
            "4",
            "--sampler",
            "ddim",
            "-g",
            "7.5",
        ],
        &dir.path().join("img2img.png"),
        1,
    );
    assert!(
        unb64(&answer["images"][0]) == expected[0],
        "img2img differs from the CLI"
    );
    assert_eq!(
        answer["parameters"]["init_images"],
        Value::Null,
        "not echoed back by default"
    );
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], json!(0.6));

    let mut body = body;
    body["mask"] = json!(format!("data:image/png;base64,{}", b64(&mask_png)));
    body["denoising_strength"] = json!(1.0);
    let (status, answer) = server.post_json("/sdapi/v1/img2img", &body);
    assert_eq!(status, 200, "{answer}");
    let expected = cli(
        &[
            "inpaint",
            "a black cat",
            "--image",
            source_arg,
            "--mask",
            mask_path.to_str().unwrap(),
            "--strength",
            "1.0",
            "--seed",
            "5",
            "--steps",
            "4",
            "--sampler",
            "ddim",
            "-g",
            "7.5",
        ],
        &dir.path().join("inpaint.png"),
        1,
    );
    let inpainted = unb64(&answer["images"][0]);
    assert!(inpainted == expected[0], "inpainting differs from the CLI");
    // The kept (black) half is the source's; the repainted half is not.
    let inpainted = image::load_from_memory(&inpainted).unwrap().to_rgb8();
    let original = image::load_from_memory(&gradient_png()).unwrap().to_rgb8();
    let diff = |x0: u32, x1: u32| -> f64 {
        let mut total = 0.0;
        for y in 0..64 {
            for x in x0..x1 {
                for c in 0..3 {
                    total += (inpainted.get_pixel(x, y)[c] as f64
                        - original.get_pixel(x, y)[c] as f64)
                        .abs();
                }
            }
        }
        total / (64.0 * (x1 - x0) as f64 * 3.0)
    };
    assert!(
        diff(0, 32) > 2.0 * diff(40, 64),
        "{} vs {}",
        diff(0, 32),
        diff(40, 64)
    );

    // inpainting_mask_invert repaints the other half: a different image.
    body["inpainting_mask_invert"] = json!(1);
    let (status, answer) = server.post_json("/sdapi/v1/img2img", &body);
    assert_eq!(status, 200, "{answer}");
    assert!(unb64(&answer["images"][0]) != expected[0]);
}

/// Every bad request: a 4xx whose message (and `field`) names what is wrong; never a 500.
#[test]
fn bad_input_is_refused_naming_the_field() {
    let server = start_default();
    let (status, answer) = server.post_raw("/sdapi/v1/txt2img", "{\"prompt\": \"x\",");
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("not a valid JSON"),
        "{answer}"
    );

    let image = b64(&gradient_png());
    let garbage = b64(b"this is not an image");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/sdapi/v1/txt2img", json!({"steps": "many"}), "steps"),
        ("/sdapi/v1/txt2img", json!({"width": -64}), "width"),
        ("/sdapi/v1/txt2img", json!({"width": 65}), "width"),
        ("/sdapi/v1/txt2img", json!({"height": 1_000_000}), "height"),
        ("/sdapi/v1/txt2img", json!({"steps": 0}), "steps"),
        (
            "/sdapi/v1/txt2img",
            json!({"sampler_name": "Heun"}),
            "sampler_name",
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"scheduler": "Exponential"}),
            "scheduler",
        ),
        ("/sdapi/v1/txt2img", json!({"seed": -5}), "seed"),
        ("/sdapi/v1/txt2img", json!({"cfg_scale": -1}), "cfg_scale"),
        ("/sdapi/v1/txt2img", json!({"n_iter": 0}), "n_iter"),
        (
            "/sdapi/v1/txt2img",
            json!({"n_iter": 10, "batch_size": 10}),
            "n_iter",
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"override_settings": {"sd_model_checkpoint": "nope"}}),
            "override_settings.sd_model_checkpoint",
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"prompt": "a cat <lora:x:1>", "steps": 1}),
            "prompt",
        ),
        ("/sdapi/v1/img2img", json!({"prompt": "x"}), "init_images"),
        (
            "/sdapi/v1/img2img",
            json!({"init_images": ["%%%"]}),
            "init_images[0]",
        ),
        (
            "/sdapi/v1/img2img",
            json!({"init_images": [garbage]}),
            "init_images[0]",
        ),
        (
            "/sdapi/v1/img2img",
            json!({"init_images": [image], "mask": "@@"}),
            "mask",
        ),
        (
            "/sdapi/v1/img2img",
            json!({"init_images": [image], "denoising_strength": 2}),
            "denoising_strength",
        ),
        (
            "/sdapi/v1/options",
            json!({"sd_model_checkpoint": "nope"}),
            "sd_model_checkpoint",
        ),
    ];
    for (path, body, field) in cases {
        let (status, answer) = server.post_json(path, &body);
        assert_eq!(status, 422, "{path} {body}: {answer}");
        assert_eq!(answer["field"], json!(field), "{path} {body}: {answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!("{field}: ")),
            "{path} {body}: {detail}"
        );
    }
    // Euler a has no Karras sigmas: refused when the sampler is built, naming it.
    let (status, answer) = server.post_json(
        "/sdapi/v1/txt2img",
        &json!({"sampler_name": "Euler a", "scheduler": "Karras", "steps": 2}),
    );
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], json!("sampler_name"));
    // The server is unharmed.
    let (status, _) = server.get_json("/health");
    assert_eq!(status, 200);
}

#[test]
fn lists_options_and_switching_models() {
    let models = tempfile::tempdir().unwrap();
    let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    std::os::unix::fs::symlink(&weights, models.path().join("other")).unwrap();
    let mut config = config();
    config.models_dir = Some(models.path().to_path_buf());
    let server = start(config);
    let first = server.server.model().to_string();

    let (_, samplers) = server.get_json("/sdapi/v1/samplers");
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for name in ["Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M Karras"] {
        assert!(names.contains(&name), "{names:?}");
    }
    let (_, models_list) = server.get_json("/sdapi/v1/sd-models");
    let titles: Vec<&str> = models_list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, [first.as_str(), "other"]);
    let (_, options) = server.get_json("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], json!(first));

    // An empty sampler_name falls back to sampler_index, as in A1111.
    let body = json!({"steps": 1, "sampler_name": "", "sampler_index": "DPM++ 2M Karras"});
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sampler_name"], json!("DPM++ 2M Karras"));
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Schedule type: Karras"));

    // A request can run on another model without switching the server to it.
    let mut body = txt2img_body(1);
    body["steps"] = json!(1);
    body["override_settings"] = json!({"sd_model_checkpoint": "other"});
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], json!("other"));
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Model: other,"));
    let (_, options) = server.get_json("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], json!(first));

    let (status, answer) = server.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 1}),
    );
    assert_eq!(status, 200, "{answer}");
    let (_, options) = server.get_json("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], json!("other"));
    assert_eq!(options["CLIP_stop_at_last_layers"], json!(1));
    body["override_settings"] = json!({});
    let (_, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert!(answer["info"]
        .as_str()
        .unwrap()
        .contains("\"sd_model_name\":\"other\""));
}

#[test]
fn progress_health_and_interrupt_during_a_job() {
    let server = start_default();
    let (_, idle) = server.get_json("/sdapi/v1/progress");
    assert_eq!(idle["progress"], json!(0.0));
    assert_eq!(idle["state"]["job_count"], json!(0));

    let url = server.url("/sdapi/v1/txt2img");
    let long_job = std::thread::spawn(move || {
        let started = Instant::now();
        let body = json!({"prompt": "a cat", "seed": 2, "steps": 1000, "sampler_name": "DDIM", "width": 256, "height": 256});
        let response = ureq::post(&url).send_json(&body).unwrap();
        (response.into_json::<Value>().unwrap(), started.elapsed())
    });
    let progress = wait_for_steps(&server, 2);
    assert_eq!(progress["state"]["job"], json!("txt2img"));
    assert_eq!(progress["state"]["job_count"], json!(1));
    assert_eq!(progress["state"]["sampling_steps"], json!(1000));
    let fraction = progress["progress"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction < 0.5, "{progress}");
    assert!(progress["eta_relative"].as_f64().unwrap() > 0.0);

    let asked = Instant::now();
    let (status, health) = server.get_json("/health");
    assert_eq!(status, 200);
    assert_eq!(health["busy"], json!(true));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "health took {:?}",
        asked.elapsed()
    );

    let (status, _) = server.post_json("/sdapi/v1/interrupt", &json!({}));
    assert_eq!(status, 200);
    let (answer, took) = long_job.join().unwrap();
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], json!(true));
    assert_eq!(
        answer["images"].as_array().unwrap().len(),
        1,
        "the partial image comes back"
    );
    // 1000 steps at 256x256 take minutes here; interrupted, the job ends long before.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let (_, idle) = server.get_json("/sdapi/v1/progress");
    assert_eq!(idle["state"]["job"], json!(""));
}

/// Polls progress until the running job has done `steps` steps.
fn wait_for_steps(server: &TestServer, steps: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, progress) = server.get_json("/sdapi/v1/progress");
        if progress["state"]["sampling_step"].as_u64().unwrap_or(0) >= steps {
            return progress;
        }
        assert!(
            Instant::now() < deadline,
            "the job never started: {progress}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run by `a_killed_client_does_not_hurt_the_server` as a separate process (ignored otherwise):
/// asks for a long job and waits for it, until it is killed.
#[test]
#[ignore = "helper process for a_killed_client_does_not_hurt_the_server"]
fn client_process_that_gets_killed() {
    let url = std::env::var("LDM_SERVE_TEST_URL").expect("run by the killed-client test");
    let body = json!({"prompt": "a cat", "steps": 1000, "sampler_name": "DDIM", "width": 256, "height": 256});
    let _ = ureq::post(&url).send_json(&body);
}

#[test]
fn a_killed_client_does_not_hurt_the_server() {
    let server = start_default();
    let mut client = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "client_process_that_gets_killed",
            "--ignored",
            "--quiet",
        ])
        .env("LDM_SERVE_TEST_URL", server.url("/sdapi/v1/txt2img"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_steps(&server, 1);
    client.kill().unwrap(); // SIGKILL
    client.wait().unwrap();
    // The worker notices the closed connection at its next step and drops the job.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, health) = server.get_json("/health");
        assert_eq!(status, 200);
        if health["busy"] == json!(false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned job still runs: {health}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut body = txt2img_body(4);
    body["steps"] = json!(1);
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn api_key_and_full_queue() {
    let mut config = config();
    config.api_key = Some("s3cret".into());
    config.max_queue = 1;
    let server = start(config);
    let (status, answer) = server.post_with_key("/sdapi/v1/txt2img", None, &json!({}));
    assert_eq!(status, 401);
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{answer}"
    );
    let (status, answer) =
        server.post_with_key("/v1/images/generations", Some("wrong"), &json!({}));
    assert_eq!(status, 401);
    assert_eq!(
        answer["error"]["code"],
        json!("invalid_api_key"),
        "{answer}"
    );
    let (status, _) = server.get_json("/health");
    assert_eq!(status, 200, "health checks need no key");

    // One job runs, one waits (--max-queue 1): the next is refused with 429.
    let body = json!({"prompt": "a cat", "steps": 1000, "sampler_name": "DDIM", "width": 256, "height": 256});
    let spawn = |body: Value| {
        let url = server.url("/sdapi/v1/txt2img");
        std::thread::spawn(move || {
            let response = ureq::post(&url)
                .set("Authorization", "Bearer s3cret")
                .send_json(&body);
            response.map(|r| r.status()).unwrap_or_else(|e| match e {
                ureq::Error::Status(code, _) => code,
                e => panic!("{e}"),
            })
        })
    };
    let running = spawn(body.clone());
    wait_for_steps_with_key(&server);
    let waiting = spawn(body.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while get_with_key(&server, "/health")["queued"] != json!(1) {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, answer) = server.post_with_key("/sdapi/v1/txt2img", Some("s3cret"), &body);
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("--max-queue 1"),
        "{answer}"
    );
    let (status, answer) = server.post_with_key(
        "/v1/images/generations",
        Some("s3cret"),
        &json!({"prompt": "a cat"}),
    );
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], json!("rate_limit_exceeded"));
    // Interrupt the running job (the waiting one then runs and is interrupted too).
    server.post_with_key("/sdapi/v1/interrupt", Some("s3cret"), &json!({}));
    assert_eq!(running.join().unwrap(), 200);
    wait_for_steps_with_key(&server);
    server.post_with_key("/sdapi/v1/interrupt", Some("s3cret"), &json!({}));
    assert_eq!(waiting.join().unwrap(), 200);
}

/// A GET through the API key of `api_key_and_full_queue`.
fn get_with_key(server: &TestServer, path: &str) -> Value {
    ureq::get(&server.url(path))
        .set("Authorization", "Bearer s3cret")
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

fn wait_for_steps_with_key(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_with_key(server, "/sdapi/v1/progress")["state"]["sampling_step"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}
