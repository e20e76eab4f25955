//! `ldm serve`'s OpenAI Images API over real HTTP on the default model: generations and edits
//! give the CLI's bytes, `url` responses are served, errors come in OpenAI's error object.

mod serve_common;

use serde_json::{json, Value};
use serve_common::*;

/// A multipart part: name, file name, bytes.
type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

#[test]
fn generations_give_the_cli_bytes_as_b64_or_url() {
    let server = start_default();
    let dir = tempfile::tempdir().unwrap();
    let body = json!({
        "model": "dall-e-3", "prompt": "a red apple", "n": 2, "size": "64x64",
        "response_format": "b64_json", "seed": 9, "steps": 4, "quality": "hd", "user": "me",
    });
    let (status, answer) = server.post_json("/v1/images/generations", &body);
    assert_eq!(status, 200, "{answer}");
    assert!(answer["created"].as_u64().unwrap() > 1_600_000_000);
    let images: Vec<Vec<u8>> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| unb64(&d["b64_json"]))
        .collect();
    // The OpenAI defaults are the CLI's: DDIM, guidance 7.5; n images are one batch.
    let expected = cli(
        &[
            "txt2img",
            "a red apple",
            "--seed",
            "9",
            "--steps",
            "4",
            "-N",
            "2",
            "--batch-size",
            "2",
        ],
        &dir.path().join("gen.png"),
        2,
    );
    assert!(
        images == expected,
        "OpenAI generations differ from `ldm txt2img -N 2 --batch-size 2`"
    );

    let mut body = body;
    body["response_format"] = json!("url");
    let (status, answer) = server.post_json("/v1/images/generations", &body);
    assert_eq!(status, 200, "{answer}");
    for (data, expected) in answer["data"].as_array().unwrap().iter().zip(&expected) {
        let url = data["url"].as_str().unwrap();
        assert!(url.starts_with(&server.base), "{url}");
        let (status, png) = server.get_bytes(url);
        assert_eq!(status, 200);
        assert!(&png == expected, "the served file is the image");
    }
    let (status, _) = server.get_bytes(&server.url("/v1/images/files/0123.png"));
    assert_eq!(status, 404);
}

#[test]
fn edits_with_a_transparent_mask_inpaint_like_the_cli() {
    let server = start_default();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.png");
    std::fs::write(&source, gradient_png()).unwrap();
    let mask_path = dir.path().join("mask.png");
    left_half_mask().save(&mask_path).unwrap();
    // OpenAI's mask: the transparent (left) half is edited.
    let rgba = image::RgbaImage::from_fn(64, 64, |x, _| {
        image::Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }])
    });
    let mut openai_mask = Vec::new();
    image::DynamicImage::ImageRgba8(rgba)
        .write_to(
            &mut std::io::Cursor::new(&mut openai_mask),
            image::ImageFormat::Png,
        )
        .unwrap();
    let image = gradient_png();
    let (status, answer) = server.post_multipart(
        "/v1/images/edits",
        &[
            ("image", Some("image.png"), &image),
            ("mask", Some("mask.png"), &openai_mask),
            ("prompt", None, b"a black cat"),
            ("seed", None, b"5"),
            ("steps", None, b"4"),
            ("response_format", None, b"b64_json"),
        ],
    );
    assert_eq!(status, 200, "{answer}");
    let expected = cli(
        &[
            "inpaint",
            "a black cat",
            "--image",
            source.to_str().unwrap(),
            "--mask",
            mask_path.to_str().unwrap(),
            "--seed",
            "5",
            "--steps",
            "4",
        ],
        &dir.path().join("inpaint.png"),
        1,
    );
    assert!(
        unb64(&answer["data"][0]["b64_json"]) == expected[0],
        "the edit differs from `ldm inpaint`"
    );
}

#[test]
fn bad_input_gets_openai_errors_naming_the_param() {
    let server = start_default();
    let (status, answer) = server.post_raw("/v1/images/generations", "{\"prompt\": ");
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["type"], json!("invalid_request_error"));

    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "prompt"),
        (json!({"prompt": "  "}), "prompt"),
        (json!({"prompt": "x", "size": "big"}), "size"),
        (json!({"prompt": "x", "size": "-64x64"}), "size"),
        (json!({"prompt": "x", "size": "64x60"}), "size"),
        (json!({"prompt": "x", "n": 11}), "n"),
        (json!({"prompt": "x", "n": "two"}), "n"),
        (
            json!({"prompt": "x", "response_format": "png"}),
            "response_format",
        ),
        (json!({"prompt": "x", "model": "sd-nope"}), "model"),
        (
            json!({"prompt": "x", "sampler_name": "LMS"}),
            "sampler_name",
        ),
    ];
    for (body, param) in cases {
        let (status, answer) = server.post_json("/v1/images/generations", &body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], json!(param), "{body}: {answer}");
        assert_eq!(answer["error"]["type"], json!("invalid_request_error"));
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{param}: ")), "{message}");
    }

    let image = gradient_png();
    let small = ldm::image_io::encode_png(&image::RgbImage::new(8, 8), "").unwrap();
    let opaque_mask = ldm::image_io::encode_png(&left_half_mask(), "").unwrap();
    let parts: Vec<(Vec<Part>, &str)> = vec![
        (vec![("prompt", None, b"x")], "image"),
        (
            vec![("image", Some("a.png"), b"garbage"), ("prompt", None, b"x")],
            "image",
        ),
        (
            vec![
                ("image", Some("a.png"), &image),
                ("mask", Some("m.png"), &small),
                ("prompt", None, b"x"),
            ],
            "mask",
        ),
        (
            vec![
                ("image", Some("a.png"), &image),
                ("mask", Some("m.png"), &opaque_mask),
                ("prompt", None, b"x"),
            ],
            "mask",
        ),
        (
            vec![
                ("image", Some("a.png"), &image),
                ("prompt", None, b"x"),
                ("strength", None, b"3"),
            ],
            "strength",
        ),
    ];
    for (form, param) in parts {
        let (status, answer) = server.post_multipart("/v1/images/edits", &form);
        assert_eq!(status, 400, "{param}: {answer}");
        assert_eq!(answer["error"]["param"], json!(param), "{answer}");
    }
    let (status, answer) = server.post_json("/v1/nope", &json!({}));
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["type"], json!("invalid_request_error"));
}
