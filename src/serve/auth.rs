//! `--api-key`: every API request must carry `Authorization: Bearer KEY`. The health check, the
//! web page and generated files (served under unguessable names, like signed URLs) stay open.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{A1111Error, ApiError, ErrorKind, OpenAiError};
use super::state::AppState;

/// Paths answered without a key.
fn is_open(path: &str) -> bool {
    path == "/" || path == "/health" || path.starts_with("/v1/images/files/")
}

pub async fn require_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if is_open(path) {
        return next.run(request).await;
    }
    let sent = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if sent.is_some_and(|sent| same_secret(sent.trim().as_bytes(), key.as_bytes())) {
        return next.run(request).await;
    }
    let error = ApiError::new(
        ErrorKind::Unauthorized,
        match sent {
            None => "this server needs an API key: send the header 'Authorization: Bearer KEY'",
            Some(_) => "wrong API key",
        },
    );
    if path.starts_with("/v1/") {
        OpenAiError(error).into_response()
    } else {
        A1111Error(error).into_response()
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"key", b"key"));
        assert!(!same_secret(b"key", b"kez"));
        assert!(!same_secret(b"key", b"key2"));
        assert!(is_open("/health") && !is_open("/sdapi/v1/txt2img"));
    }
}
