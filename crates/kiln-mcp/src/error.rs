//! What can go wrong in a tool call, and the one place it becomes an MCP tool error
//! (`isError: true`) or an HTTP answer of the bridge.

use std::error::Error as _;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use kiln_client::ClientError;
use rmcp::model::{CallToolResult, ContentBlock};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool {name:?}; the tools are: {known}")]
    UnknownTool { name: String, known: String },
    #[error("invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: String, message: String },
    /// A call to the Kiln API (or through it to a sandbox) failed.
    #[error("{action}")]
    Api {
        action: String,
        #[source]
        source: ClientError,
    },
    #[error("this Kiln server has no spells (GET /spells answered 404: it is older than spells)")]
    SpellsUnsupported,
}

impl ToolError {
    pub(crate) fn invalid(tool: &str, message: impl Into<String>) -> Self {
        ToolError::InvalidArguments {
            tool: tool.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn api(action: impl Into<String>) -> impl FnOnce(ClientError) -> Self {
        let action = action.into();
        move |source| ToolError::Api { action, source }
    }

    /// The message with its causes, for the caller (nothing in it is secret: the
    /// causes are the API's own answers to this caller).
    pub fn message(&self) -> String {
        let mut out = self.to_string();
        let mut cause = self.source();
        while let Some(e) = cause {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cause = e.source();
        }
        out
    }

    /// The bridge's HTTP status: the API's own status passes through (a missing
    /// sandbox stays 404, a refused key 401), failures to reach it are 502.
    pub fn status(&self) -> StatusCode {
        match self {
            ToolError::UnknownTool { .. } | ToolError::SpellsUnsupported => StatusCode::NOT_FOUND,
            ToolError::InvalidArguments { .. } => StatusCode::BAD_REQUEST,
            ToolError::Api { source, .. } => match source {
                ClientError::Api { status, .. } if status.is_client_error() => {
                    StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                ClientError::Invalid(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The MCP answer: a tool error the model can read, never a protocol error.
    pub fn into_call_result(self) -> CallToolResult {
        let mut result = CallToolResult::error(vec![ContentBlock::text(self.message())]);
        result.structured_content = Some(serde_json::json!({"error": self.message()}));
        result
    }
}

/// The bridge's JSON error body: `{"error": message}` with the status above.
impl IntoResponse for ToolError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self.message(), "bridge call failed");
        }
        (
            status,
            axum::Json(serde_json::json!({"error": self.message()})),
        )
            .into_response()
    }
}

/// Why an HTTP request was refused before it reached a tool.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "authentication required: send your Kiln API key (X-API-Key: e2b_... or \
         Authorization: Bearer e2b_...) or the server token (Authorization: Bearer \
         $E2B_MCP_SERVER_TOKEN)"
    )]
    Missing,
    #[error("the Kiln API refused this API key")]
    Refused,
    #[error("cannot check the API key")]
    Unreachable {
        #[source]
        source: ClientError,
    },
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = match self {
            AuthError::Missing | AuthError::Refused => StatusCode::UNAUTHORIZED,
            AuthError::Unreachable { ref source } => {
                tracing::warn!(error = %source, "checking an API key against the Kiln API failed");
                StatusCode::BAD_GATEWAY
            }
        };
        let mut resp = (
            status,
            axum::Json(serde_json::json!({"error": self.to_string()})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_statuses_pass_through_and_the_chain_is_shown() {
        let e = ToolError::api("killing sandbox abc")(ClientError::Api {
            status: reqwest_status(404),
            message: "sandbox abc not found".into(),
        });
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.message(),
            "killing sandbox abc: 404 Not Found: sandbox abc not found"
        );
        let r = e.into_call_result();
        assert_eq!(r.is_error, Some(true));
        let e = ToolError::api("x")(ClientError::Api {
            status: reqwest_status(500),
            message: "boom".into(),
        });
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            ToolError::invalid("run_code", "bad").status(),
            StatusCode::BAD_REQUEST
        );
    }

    fn reqwest_status(code: u16) -> http::StatusCode {
        http::StatusCode::from_u16(code).unwrap()
    }
}
