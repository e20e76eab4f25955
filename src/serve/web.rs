//! The web page at `/`: plain HTML and JavaScript built into the binary (no build step) that
//! drives the A1111 API: txt2img, img2img and inpainting with a painted mask, a progress bar fed
//! by the progress endpoint, and a gallery of results with their parameters.

use axum::response::Html;

const PAGE: &str = include_str!("page.html");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}
