//! HTTP errors of the interpreter API and their one mapping to a response. E2B's
//! interpreter answers errors with a **plain-text** body (spec A.1), which the SDK puts
//! into its exception message.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::context::ContextError;
use crate::report::chain;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("Context {0} not found")]
    ContextNotFound(String),
    /// A context could not be created; the text is the whole cause chain (missing
    /// kernel, bad cwd, launch failure): what the caller needs to fix it.
    #[error("{0}")]
    ContextFailed(String),
    #[error("Failed to restart context {id}")]
    Restart {
        id: String,
        #[source]
        source: Box<ContextError>,
    },
}

impl ApiError {
    pub fn context(source: ContextError) -> Self {
        ApiError::ContextFailed(chain(&source))
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ContextNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ContextFailed(_) | ApiError::Restart { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %chain(&self), "request failed");
        } else {
            tracing::debug!(error = %self, "request rejected");
        }
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.to_string(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies() {
        let e = ApiError::ContextNotFound("abc".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.to_string(), "Context abc not found");
        let e = ApiError::context(ContextError::Cwd("/nope".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            e.to_string(),
            "Failed to set working directory: /nope is not a directory"
        );
    }
}
