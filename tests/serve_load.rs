//! `ldm serve` under load: 24 clients at once, over both APIs, each gets its own correct image
//! (the CLI's bytes for its seed), queued FIFO behind one worker.

mod serve_common;

use serde_json::json;
use serve_common::*;

const CLIENTS: usize = 24;
const SEEDS: usize = 6;

#[test]
fn concurrent_clients_all_get_their_own_correct_images() {
    let server = start_default();
    let dir = tempfile::tempdir().unwrap();
    let expected: Vec<Vec<u8>> = (0..SEEDS)
        .map(|seed| {
            let seed = seed.to_string();
            let out = dir.path().join(format!("{seed}.png"));
            cli(
                &[
                    "txt2img",
                    "a red apple",
                    "--seed",
                    &seed,
                    "--steps",
                    "2",
                    "-g",
                    "7.5",
                ],
                &out,
                1,
            )
            .remove(0)
        })
        .collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let a1111 = server.url("/sdapi/v1/txt2img");
            let openai = server.url("/v1/images/generations");
            std::thread::spawn(move || {
                let seed = client % SEEDS;
                // Half the clients speak A1111, half OpenAI; the settings are the CLI's.
                let png = if client % 2 == 0 {
                    let body = json!({"prompt": "a red apple", "seed": seed, "steps": 2,
                                      "sampler_name": "DDIM", "cfg_scale": 7.5});
                    let answer: serde_json::Value = ureq::post(&a1111)
                        .send_json(&body)
                        .unwrap()
                        .into_json()
                        .unwrap();
                    unb64(&answer["images"][0])
                } else {
                    let body = json!({"prompt": "a red apple", "seed": seed, "steps": 2,
                                      "cfg_scale": 7.5, "response_format": "b64_json"});
                    let answer: serde_json::Value = ureq::post(&openai)
                        .send_json(&body)
                        .unwrap()
                        .into_json()
                        .unwrap();
                    unb64(&answer["data"][0]["b64_json"])
                };
                (seed, png)
            })
        })
        .collect();
    for client in clients {
        let (seed, png) = client.join().unwrap();
        assert!(
            png == expected[seed],
            "a client with seed {seed} got another image"
        );
    }
    let (_, health) = server.get_json("/health");
    assert_eq!(health["queued"], json!(0));
}
