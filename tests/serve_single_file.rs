//! `ldm serve --model FILE --config DIR`: a single-file checkpoint served over the A1111 route
//! gives the CLI's PNG bytes, and the model list names the checkpoint.

mod common;
mod serve_common;

use serde_json::json;
use serve_common::*;

#[test]
fn a_single_file_checkpoint_is_served_as_the_cli_runs_it() {
    let checkpoint = common::fixture("single_file/sd1_ema.safetensors");
    let config_dir = common::fixture("tiny-sd1");
    let server = start(ldm::serve::ServeConfig {
        model: Some(checkpoint.to_str().unwrap().to_string()),
        model_options: ldm::model_source::ModelOptions {
            config: Some(config_dir.clone()),
            ..Default::default()
        },
        ..config()
    });
    let (status, models) = server.get_json("/sdapi/v1/sd-models");
    assert_eq!(status, 200, "{models}");
    assert_eq!(models[0]["model_name"], "sd1_ema", "{models}");
    assert_eq!(
        models[0]["filename"],
        checkpoint.to_str().unwrap(),
        "{models}"
    );

    let body = json!({
        "prompt": "a photo of a cat",
        "seed": 5,
        "steps": 3,
        "cfg_scale": 7.5,
        "sampler_name": "DDIM",
        "width": 64,
        "height": 64,
    });
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "txt2img",
        "a photo of a cat",
        "--model",
        checkpoint.to_str().unwrap(),
        "--config",
        config_dir.to_str().unwrap(),
        "--seed",
        "5",
        "--steps",
        "3",
        "--sampler",
        "ddim",
        "-W",
        "64",
        "-H",
        "64",
        "--device",
        "cpu",
    ];
    let expected = cli(&args, &dir.path().join("cat.png"), 1);
    assert!(
        unb64(&answer["images"][0]) == expected[0],
        "the served image differs from `ldm txt2img`"
    );
}
