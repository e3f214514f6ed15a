//! The one place where control-plane errors become HTTP answers: a status and E2B's
//! JSON error body `{"code": status, "message": ...}`. The client gets a clear, safe
//! message; the log gets the whole chain.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::ErrorBody;

use crate::report::chain;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    PayloadTooLarge(String),
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
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Gone(_) => StatusCode::GONE,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        code: status.as_u16(),
        message: message.into(),
    };
    (status, Json(body)).into_response()
}

tokio::task_local! {
    /// The id of the API request being served (see [`with_request_id`]).
    static REQUEST_ID: String;
}

/// The response header that carries a request's id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Serve one API request under a fresh request id: every response carries it in
/// `X-Request-Id`, an internal error's message names it, and the server log's line for
/// that error (with the whole error chain, which the client never sees) carries it
/// too, so an operator can find the cause from what the client was told.
pub async fn with_request_id(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    resp
}

fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let request_id = current_request_id();
        let rid = request_id.as_deref().unwrap_or("-");
        if matches!(self, AppError::Internal { .. }) {
            tracing::error!(request_id = rid, error = %chain(&self), "request failed");
            // The message is written for clients (no source chain, no host paths, no
            // sandbox logs); the id leads an operator to the log line above.
            let message = match &request_id {
                Some(id) => format!("{self} (request id {id}; the server log has the details)"),
                None => self.to_string(),
            };
            return json_error(status, message);
        }
        tracing::debug!(request_id = rid, error = %self, %status, "request rejected");
        json_error(status, self.to_string())
    }
}

impl From<crate::manager::SandboxError> for AppError {
    fn from(e: crate::manager::SandboxError) -> Self {
        use crate::manager::SandboxError as E;
        use crate::templates::LookupError;
        let message = e.to_string();
        match e {
            E::NotFound(_)
            | E::Template(LookupError::NotFound { .. })
            | E::Template(LookupError::BuiltinNotBuilt(_)) => AppError::NotFound(message),
            E::Template(LookupError::Building(_))
            | E::StartTimedOut(_)
            | E::RuntimeTimedOut { .. } => AppError::Unavailable(message),
            E::TimeoutNotPositive(_)
            | E::TimeoutOverCap { .. }
            | E::DesktopOverCap { .. }
            | E::BadLifecycle(_)
            | E::Unsupported { .. }
            | E::DurationOutOfRange(_)
            | E::BadEnvName(_)
            | E::ZeroSize
            | E::OverServerCap { .. }
            | E::BadQuery(_)
            | E::BadNetwork(_)
            | E::PauseUnsupported(_) => AppError::BadRequest(message),
            E::HostFull { .. } | E::OverQuota { .. } => AppError::TooManyRequests(message),
            E::AlreadyPaused(_) | E::Lost(_) => AppError::Conflict(message),
            // The message is the safe summary; the log gets the details where they
            // were found.
            E::GuestNotReady { .. } => AppError::Internal {
                message,
                source: None,
            },
            E::Runtime { .. }
            | E::Firewall { .. }
            | E::EgressProxy { .. }
            | E::EgressCa { .. }
            | E::Store(_)
            | E::Task(_) => AppError::Internal {
                message,
                source: Some(anyhow::Error::new(e)),
            },
        }
    }
}

impl From<crate::spells::SpellError> for AppError {
    fn from(e: crate::spells::SpellError) -> Self {
        use crate::spells::SpellError as E;
        match e {
            E::NotFound(_) => AppError::NotFound(e.to_string()),
            E::Invalid { .. } | E::BadArgs { .. } | E::NameMismatch { .. } | E::Install { .. } => {
                AppError::BadRequest(e.to_string())
            }
            E::NotYours(_) => AppError::Forbidden(e.to_string()),
            E::Sandbox(source) => source.into(),
            E::SandboxGone(_) | E::Guest { .. } => AppError::Internal {
                message: e.to_string(),
                source: Some(anyhow::Error::new(e)),
            },
            E::Store(source) => AppError::internal("the spell store failed", source),
        }
    }
}

impl From<crate::secrets::SecretError> for AppError {
    fn from(e: crate::secrets::SecretError) -> Self {
        use crate::secrets::SecretError as E;
        match e {
            E::NotFound(_) => AppError::NotFound(e.to_string()),
            E::InvalidName { .. }
            | E::InvalidValue(_)
            | E::InvalidMetadata(_)
            | E::InvalidQuery(_) => AppError::BadRequest(e.to_string()),
            E::Exists(_) | E::Contended { .. } => AppError::Conflict(e.to_string()),
            E::Undecryptable { .. } | E::Seal { .. } => AppError::Internal {
                message: e.to_string(),
                source: None,
            },
            // The message names a host path: the log gets it, the client does not.
            E::KeyMissing { .. } | E::Key(_) => {
                AppError::internal("the server's secrets key cannot be used", e)
            }
            E::Store(source) => AppError::internal("the secret store failed", source),
        }
    }
}

impl From<crate::templates::LookupError> for AppError {
    fn from(e: crate::templates::LookupError) -> Self {
        crate::manager::SandboxError::from(e).into()
    }
}

impl From<crate::builds::BuildServiceError> for AppError {
    fn from(e: crate::builds::BuildServiceError) -> Self {
        use crate::builds::BuildServiceError as E;
        match e {
            E::InvalidName { .. }
            | E::InvalidTag { .. }
            | E::InvalidTarget { .. }
            | E::MissingName
            | E::NoTags
            | E::DefaultTag
            | E::BaseNotBuildable
            | E::BaseNotDeletable
            | E::Resources { .. }
            | E::FilesHash { .. }
            | E::Recipe(_)
            | E::BuildNotFound { .. }
            | E::WrongTemplate { .. }
            | E::NotWaiting
            | E::UploadInterrupted { .. }
            | E::GcPolicy(_)
            | E::BuildFailed { .. } => AppError::BadRequest(e.to_string()),
            E::TemplateNotFound { .. }
            | E::TagNotFound { .. }
            | E::NoBuildToCancel { .. }
            | E::UnknownUpload => AppError::NotFound(e.to_string()),
            E::AlreadyFinished { .. } | E::NameTaken { .. } => AppError::Conflict(e.to_string()),
            E::BuiltIn { .. } => AppError::Forbidden(e.to_string()),
            E::OverDiskQuota { .. } => AppError::TooManyRequests(e.to_string()),
            E::Owners(source) => source.into(),
            E::UploadExpired { .. } => AppError::Gone(e.to_string()),
            E::UploadTooLarge { .. } => AppError::PayloadTooLarge(e.to_string()),
            // Only the server's own projects are parsed from JSON here.
            E::Spec(source) => AppError::internal("the recipe is not a build spec", source),
            E::UploadStore(source) => {
                AppError::internal("storing the uploaded files failed", source)
            }
            E::Tags(source) => AppError::internal("saving the template tags failed", source),
            E::Log(source) => AppError::internal("reading the build log failed", source),
            E::Store(source) => AppError::internal("the template store failed", source),
        }
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

    #[tokio::test]
    async fn internal_errors_show_the_safe_message_and_request_id_not_the_chain() {
        let err = AppError::internal(
            "failed to start sandbox",
            std::io::Error::other("/var/lib/kiln/sandboxes/abc/run/envd.sock: sandbox log: secret"),
        );
        let resp = REQUEST_ID
            .scope("rid42".to_string(), async move { err.into_response() })
            .await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let message = v["message"].as_str().unwrap();
        assert!(
            message.starts_with("failed to start sandbox (request id rid42"),
            "{message}"
        );
        assert!(
            !message.contains("/var/lib") && !message.contains("secret"),
            "{message}"
        );
    }

    #[test]
    fn chain_includes_sources() {
        let e = AppError::internal("outer", std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
