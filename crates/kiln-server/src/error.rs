//! The one place where control-plane errors become HTTP answers: a status and E2B's
//! JSON error body `{"code": status, "message": ...}`. The client gets a clear, safe
//! message; the log gets the whole chain.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{message}")]
    Internal {
        message: String,
        #[source]
        source: Option<anyhow::Error>,
    },
}

impl AppError {
    pub fn internal(message: impl Into<String>, source: impl Into<anyhow::Error>) -> Self {
        AppError::Internal {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Render an error chain as one line: `outer: inner: root`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        code: status.as_u16(),
        message: message.into(),
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if matches!(self, AppError::Internal { .. }) {
            tracing::error!(error = %chain(&self), "request failed");
        } else {
            tracing::debug!(error = %self, %status, "request rejected");
        }
        json_error(status, self.to_string())
    }
}

impl From<crate::store::StoreError> for AppError {
    fn from(e: crate::store::StoreError) -> Self {
        AppError::internal("the control plane's database failed", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_render_as_e2b_json() {
        let resp = AppError::TooManyRequests("limit".into()).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], 429);
        assert_eq!(v["message"], "limit");
    }

    #[test]
    fn chain_includes_sources() {
        let e = AppError::internal("outer", std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
