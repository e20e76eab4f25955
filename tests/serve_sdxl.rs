//! `ldm serve` on an SDXL pipeline: the A1111 txt2img route gives the CLI's PNG bytes (two text
//! encoders, pooled embeddings and micro-conditioning through the server's worker).

mod common;
mod serve_common;

use serde_json::json;
use serve_common::*;

#[test]
fn sdxl_txt2img_over_a1111_gives_the_cli_bytes() {
    let model = common::fixture("tiny-sdxl");
    let server = start(ldm::serve::ServeConfig {
        model: Some(model.to_str().unwrap().to_string()),
        ..config()
    });
    let body = json!({
        "prompt": "a photo of a cat",
        "negative_prompt": "blurry",
        "seed": 7,
        "steps": 3,
        "cfg_scale": 5.0,
        "sampler_name": "Euler a",
        "width": 64,
        "height": 64,
    });
    let (status, answer) = server.post_json("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{answer}");
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "txt2img",
        "a photo of a cat",
        "--model",
        model.to_str().unwrap(),
        "-n",
        "blurry",
        "--seed",
        "7",
        "--steps",
        "3",
        "-g",
        "5",
        "--sampler",
        "euler_a",
        "-W",
        "64",
        "-H",
        "64",
        "--device",
        "cpu",
    ];
    let expected = cli(&args, &dir.path().join("cat.png"), 1);
    assert!(
        unb64(&images[0]) == expected[0],
        "the served image differs from `ldm txt2img`"
    );
}
