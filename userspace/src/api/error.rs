//! The API's errors: the CLI's `--json` error object (`error`, `code`, `exit_code`,
//! `schema_version`) with an HTTP status that fits the code.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::exit_codes::{ErrorCode, SCHEMA_VERSION};

/// One failed request, as the client sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub schema_version: u32,
    /// The message with each cause.
    pub error: String,
    /// The CLI's code where one applies, else an API-only one (`unauthenticated`,
    /// `rate_limited`, `body_too_large`, `no_route`, `method_not_allowed`).
    pub code: String,
    /// The exit code the CLI would have ended with (`null` for API-only codes).
    pub exit_code: Option<u8>,
}

impl ApiError {
    /// An error the CLI knows, with its code's status.
    pub fn coded(message: impl Into<String>, code: ErrorCode) -> Self {
        Self {
            status: status_of(code).as_u16(),
            schema_version: SCHEMA_VERSION,
            error: message.into(),
            code: code.as_str().to_owned(),
            exit_code: Some(code.exit()),
        }
    }

    /// An error of a library call: its code is found along its source chain.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        Self::coded(
            berth_runtime::error_chain::ErrorChain(e).to_string(),
            ErrorCode::of(e),
        )
    }

    /// An API-only failure (no CLI equivalent, so no exit code).
    pub fn api(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status: status.as_u16(),
            schema_version: SCHEMA_VERSION,
            error: message.into(),
            code: code.to_owned(),
            exit_code: None,
        }
    }

    /// A request body or query that does not parse or holds a bad value.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::coded(message, ErrorCode::InvalidValue)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::coded(message, ErrorCode::Failed)
    }

    pub fn http_status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The HTTP status of a CLI code: the caller's mistake (4xx) or the host's failure (5xx).
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode as C;
    match code {
        C::NotFound => StatusCode::NOT_FOUND,
        C::InvalidSyntax | C::InvalidValue | C::NoTemplate => StatusCode::BAD_REQUEST,
        C::Locked
        | C::NotRunning
        | C::Running
        | C::AlreadyRunning
        | C::Exists
        | C::AddressInUse
        | C::NameTaken
        | C::Suspended
        | C::NeedSave
        | C::TemplateInUse
        | C::TemplateExists => StatusCode::CONFLICT,
        C::Failed | C::System | C::StartFailed => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let mut body = serde_json::to_vec(&self).unwrap_or_default();
        body.push(b'\n');
        let mut r = (status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_statuses() {
        for (code, ..) in crate::exit_codes::TABLE {
            let e = ApiError::coded("x", *code);
            assert!(e.status >= 400, "{code:?}");
            assert_eq!(e.exit_code, Some(code.exit()));
        }
        assert_eq!(ApiError::coded("x", ErrorCode::NotFound).status, 404);
        assert_eq!(ApiError::coded("x", ErrorCode::Running).status, 409);
        let v = serde_json::to_value(ApiError::api(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "no token",
        ))
        .unwrap();
        assert_eq!(v["code"], "unauthenticated");
        assert!(v["exit_code"].is_null());
        assert!(v.get("status").is_none());
    }
}
