//! What goes wrong in a request, and how each API spells it: A1111's `{"error", "detail", ...}`
//! body (FastAPI's statuses: 422 for bad values) and OpenAI's `{"error": {"message", "type",
//! "param", "code"}}` (400 for bad values).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON, or a field has the wrong type.
    Malformed,
    /// A field has a value this server refuses (named in `ApiError::field`).
    Invalid,
    /// Missing or wrong `Authorization: Bearer` key.
    Unauthorized,
    NotFound,
    /// More requests are waiting than `--max-queue` allows.
    QueueFull,
    /// The server failed (a model that does not load, a generation error).
    Internal,
}

/// A failed request: what kind, which field (if one is to blame), and a message for people.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    /// A refused value: the message starts with the field's name.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Invalid,
            field: Some(field.to_string()),
            message: format!("{field}: {message}"),
        }
    }

    pub fn malformed(field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Malformed,
            field,
            message: message.into(),
        }
    }

    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            field: None,
            message: message.into(),
        }
    }

    pub fn internal(error: &anyhow::Error) -> Self {
        Self::new(ErrorKind::Internal, format!("{error:#}"))
    }

    /// The status A1111 (FastAPI) answers with.
    fn a1111_status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::Malformed | ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            kind => common_status(kind),
        }
    }

    /// The status OpenAI answers with.
    fn openai_status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::Malformed | ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            kind => common_status(kind),
        }
    }
}

fn common_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Malformed | ErrorKind::Invalid => StatusCode::BAD_REQUEST,
    }
}

/// An error answered in A1111's shape.
#[derive(Debug)]
pub struct A1111Error(pub ApiError);

impl From<ApiError> for A1111Error {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        let error = self.0;
        let name = match error.kind {
            ErrorKind::Malformed | ErrorKind::Invalid => "RequestValidationError",
            ErrorKind::Internal => "RuntimeError",
            _ => "HTTPException",
        };
        let body = json!({
            "error": name,
            "detail": error.message,
            "body": "",
            "errors": error.message,
            "field": error.field,
        });
        (error.a1111_status(), Json(body)).into_response()
    }
}

/// An error answered in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let error = self.0;
        let (kind, code) = match error.kind {
            ErrorKind::Malformed | ErrorKind::Invalid | ErrorKind::NotFound => {
                ("invalid_request_error", None)
            }
            ErrorKind::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ErrorKind::QueueFull => ("requests", Some("rate_limit_exceeded")),
            ErrorKind::Internal => ("server_error", None),
        };
        let body = json!({
            "error": {
                "message": error.message,
                "type": kind,
                "param": error.field,
                "code": code,
            }
        });
        (error.openai_status(), Json(body)).into_response()
    }
}

/// Parses a JSON body into `T`, naming the field whose value has the wrong type.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            ApiError::malformed(
                None,
                format!("the body is not a valid JSON object: {inner}"),
            )
        } else {
            ApiError::malformed(Some(path.clone()), format!("{path}: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        steps: Option<i64>,
    }

    #[test]
    fn parse_errors_name_the_field() {
        let error = parse_json::<Body>(br#"{"steps": "many"}"#).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Malformed);
        assert_eq!(error.field.as_deref(), Some("steps"));
        assert!(
            error.message.starts_with("steps: invalid type"),
            "{error:?}"
        );
        let error = parse_json::<Body>(b"{\"steps\": 3").unwrap_err();
        assert_eq!(error.field, None);
        assert!(error.message.contains("not a valid JSON"), "{error:?}");
    }
}
