//! Helpers for the `ldm serve` tests: an in-process server on the default model, a blocking
//! HTTP client, and the CLI run with the same settings for byte comparisons.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use candle_core::{DType, Device};
use ldm::serve::{ServeConfig, Server};
use serde_json::Value;

/// A server on a free loopback port, default model, CPU.
pub struct TestServer {
    pub server: Server,
    pub base: String,
}

pub fn config() -> ServeConfig {
    ServeConfig {
        model: None,
        model_options: Default::default(),
        models_dir: None,
        device: Device::Cpu,
        dtype: DType::F32,
        quantization: None,
        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        api_key: None,
        max_queue: 64,
        loras: Vec::new(),
    }
}

pub fn start(config: ServeConfig) -> TestServer {
    let server = Server::start(&config).expect("the server starts");
    let base = format!("http://{}", server.addr());
    TestServer { server, base }
}

pub fn start_default() -> TestServer {
    start(config())
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build()
}

/// Status and JSON body of a response or an HTTP error.
fn answer(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("request failed: {error}"),
    };
    let status = response.status();
    let text = response.into_string().expect("a body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(agent().post(&self.url(path)).send_json(body))
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        answer(
            agent()
                .post(&self.url(path))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }

    pub fn post_with_key(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = agent().post(&self.url(path));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        answer(request.send_json(body))
    }

    pub fn get_json(&self, path: &str) -> (u16, Value) {
        answer(agent().get(&self.url(path)).call())
    }

    pub fn get_bytes(&self, url: &str) -> (u16, Vec<u8>) {
        let response = match agent().get(url).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(error) => panic!("request failed: {error}"),
        };
        let status = response.status();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
        (status, bytes)
    }

    /// A multipart/form-data POST: `(name, filename, bytes)` parts.
    pub fn post_multipart(
        &self,
        path: &str,
        parts: &[(&str, Option<&str>, &[u8])],
    ) -> (u16, Value) {
        let boundary = "ldm-test-boundary-7d3f";
        let mut body = Vec::new();
        for (name, filename, bytes) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match filename {
                Some(file) => body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                         Content-Type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        answer(
            agent()
                .post(&self.url(path))
                .set(
                    "Content-Type",
                    &format!("multipart/form-data; boundary={boundary}"),
                )
                .send_bytes(&body),
        )
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(value: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("a base64 string"))
        .expect("valid base64")
}

/// `ldm ARGS -o OUT` on the default model; the PNG files it wrote, in order.
pub fn cli(args: &[&str], out: &Path, count: usize) -> Vec<Vec<u8>> {
    let output = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .arg("--output")
        .arg(out)
        .env_remove("LDM_DEFAULT_MODEL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ldm {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let paths: Vec<PathBuf> = if count == 1 {
        vec![out.to_path_buf()]
    } else {
        (1..=count)
            .map(|i| {
                let stem = out.file_stem().unwrap().to_string_lossy();
                out.with_file_name(format!("{stem}-{i}.png"))
            })
            .collect()
    };
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// A 64x64 PNG: a diagonal gradient, and one with `alpha` as its alpha channel.
pub fn gradient_png() -> Vec<u8> {
    let image = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    ldm::image_io::encode_png(&image, "").unwrap()
}

/// A 64x64 mask: white (repaint) on the left half, black on the right.
pub fn left_half_mask() -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}
