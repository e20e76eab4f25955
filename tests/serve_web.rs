//! The web page at `/`: served by the binary, open without the API key, and wired to the A1111
//! endpoints it drives. (Its behaviour in a browser is not tested here: see the README.)

mod serve_common;

use serve_common::*;

#[test]
fn the_page_is_served_without_a_key() {
    let mut config = config();
    config.api_key = Some("k".into());
    let server = start(config);
    let response = ureq::get(&server.url("/")).call().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.content_type().starts_with("text/html"));
    let page = response.into_string().unwrap();
    for wired in [
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/progress",
        "/sdapi/v1/samplers",
        "/sdapi/v1/interrupt",
        "Authorization",
    ] {
        assert!(page.contains(wired), "the page does not use {wired}");
    }
    let (status, _) = server.get_json("/sdapi/v1/samplers");
    assert_eq!(status, 401, "the API itself still needs the key");
}
