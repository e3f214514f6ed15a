//! The seed's REST bridge: plain JSON routes for callers without an MCP client, each a
//! thin mapping onto the same tool functions (`ops`) as MCP. A request is a session of
//! its own: a sandbox made only to serve it is killed at its end, while
//! `/sandbox/create` (and `create_sandbox`) sandboxes live to their timeout or a DELETE.

use axum::extract::{Path, State};
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::args::{CreateSandboxArgs, KillSandboxArgs, Language, RunCodeArgs};
use crate::error::ToolError;
use crate::ops;
use crate::server::CallerKey;
use crate::session::{Lifetime, Session, Shared};
use crate::shape::ToolOutput;

pub fn routes(shared: Shared) -> Router {
    Router::new()
        .route("/mcp/tools/list", post(tools_list))
        .route("/mcp/tools/call", post(tools_call))
        .route("/sandbox/create", post(sandbox_create))
        .route("/sandbox/execute", post(sandbox_execute))
        .route("/sandbox/{id}", delete(sandbox_delete))
        .with_state(shared)
}

/// Runs `f` in a request-long session, which ends (killing what it owns) after it.
async fn in_session<F, T>(shared: Shared, f: impl FnOnce(std::sync::Arc<Session>) -> F) -> T
where
    F: std::future::Future<Output = T>,
{
    let session = std::sync::Arc::new(Session::new(shared, Lifetime::Request));
    let out = f(session.clone()).await;
    session.close().await;
    out
}

/// `POST /mcp/tools/call` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub tool: String,
    #[serde(default)]
    pub arguments: Option<Value>,
}

/// `POST /mcp/tools/call` answer: the tool's structured content under `content`
/// (for run_code and run_command `content.stdout` is the stdout text), its text, and
/// whether what it ran failed.
#[derive(Debug, Serialize)]
pub struct ToolCallAnswer {
    pub content: Value,
    pub text: String,
    pub is_error: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Value>,
}

impl From<ToolOutput> for ToolCallAnswer {
    fn from(out: ToolOutput) -> Self {
        ToolCallAnswer {
            content: out.structured,
            text: out.text,
            is_error: out.is_error,
            images: out
                .images
                .into_iter()
                .map(|i| json!({"mime_type": i.mime, "data": i.data}))
                .collect(),
        }
    }
}

async fn tools_list(
    State(shared): State<Shared>,
    Extension(CallerKey(key)): Extension<CallerKey>,
) -> Json<Value> {
    let tools = in_session(shared, |s| async move { ops::list_tools(&s, &key).await }).await;
    Json(json!({ "tools": tools }))
}

async fn tools_call(
    State(shared): State<Shared>,
    Extension(CallerKey(key)): Extension<CallerKey>,
    body: Result<Json<ToolCall>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ToolCallAnswer>, ToolError> {
    let Json(call) = body.map_err(|e| bad_body("/mcp/tools/call", e))?;
    let out = in_session(shared, |s| async move {
        ops::call(&s, &key, &call.tool, call.arguments).await
    })
    .await?;
    Ok(Json(out.into()))
}

fn bad_body(route: &str, e: axum::extract::rejection::JsonRejection) -> ToolError {
    ToolError::invalid(route, e.body_text())
}

/// `POST /sandbox/create` body (the seed's names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Lifetime in seconds.
    #[serde(default)]
    pub duration: Option<u64>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPUs; a fraction rounds up.
    #[serde(default)]
    pub cpu_limit: Option<f64>,
    #[serde(default)]
    pub template: Option<String>,
}

impl CreateBody {
    pub fn into_args(self) -> Result<CreateSandboxArgs, ToolError> {
        let cpu_count = match self.cpu_limit {
            None => None,
            Some(c) if c.is_finite() && c > 0.0 && c <= 1024.0 => Some(c.ceil() as u32),
            Some(c) => {
                return Err(ToolError::invalid(
                    "/sandbox/create",
                    format!("cpu_limit must be a positive number of CPUs, got {c}"),
                ))
            }
        };
        Ok(CreateSandboxArgs {
            template: self.template,
            timeout: self.duration,
            memory_mb: self.memory_mb,
            cpu_count,
            keep: true,
            ..CreateSandboxArgs::default()
        })
    }
}

async fn sandbox_create(
    State(shared): State<Shared>,
    Extension(CallerKey(key)): Extension<CallerKey>,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ToolError> {
    let Json(body) = body.map_err(|e| bad_body("/sandbox/create", e))?;
    let args = body.into_args()?;
    let out = in_session(shared, |s| async move {
        ops::create_sandbox(&s, &key, args).await
    })
    .await?;
    Ok(Json(out.structured))
}

/// `POST /sandbox/execute` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    pub sandbox_id: String,
    #[serde(default)]
    pub language: Language,
    pub code: String,
    #[serde(default)]
    pub timeout: Option<f64>,
}

async fn sandbox_execute(
    State(shared): State<Shared>,
    Extension(CallerKey(key)): Extension<CallerKey>,
    body: Result<Json<ExecuteBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ToolError> {
    let Json(b) = body.map_err(|e| bad_body("/sandbox/execute", e))?;
    let args = RunCodeArgs {
        code: b.code,
        language: b.language,
        sandbox_id: Some(b.sandbox_id),
        timeout: b.timeout,
        env: Default::default(),
        keep: false,
    };
    let out = in_session(
        shared,
        |s| async move { ops::run_code(&s, &key, args).await },
    )
    .await?;
    Ok(Json(out.structured))
}

async fn sandbox_delete(
    State(shared): State<Shared>,
    Extension(CallerKey(key)): Extension<CallerKey>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ToolError> {
    let args = KillSandboxArgs { sandbox_id: id };
    let out = in_session(shared, |s| async move {
        ops::kill_sandbox(&s, &key, args).await
    })
    .await?;
    Ok(Json(out.structured))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_map_to_create_sandbox() {
        let b: CreateBody =
            serde_json::from_value(json!({"duration": 120, "memory_mb": 512, "cpu_limit": 1.5}))
                .unwrap();
        let a = b.into_args().unwrap();
        assert_eq!(a.timeout, Some(120));
        assert_eq!(a.memory_mb, Some(512));
        assert_eq!(a.cpu_count, Some(2));
        assert!(a.keep);
        let b: CreateBody = serde_json::from_value(json!({"cpu_limit": -1})).unwrap();
        assert!(b.into_args().is_err());
        assert!(serde_json::from_value::<CreateBody>(json!({"durationn": 1})).is_err());
    }

    #[test]
    fn tool_call_answers_carry_content_stdout() {
        let out = ToolOutput {
            text: "hi\n".into(),
            structured: json!({"stdout": "hi\n", "stderr": "", "results": [], "error": null}),
            images: vec![],
            is_error: false,
        };
        let v = serde_json::to_value(ToolCallAnswer::from(out)).unwrap();
        assert_eq!(v["content"]["stdout"], "hi\n");
        assert_eq!(v["is_error"], false);
        assert!(v.get("images").is_none());
        let call: ToolCall =
            serde_json::from_value(json!({"tool": "run_code", "arguments": {"code": "1"}}))
                .unwrap();
        assert_eq!(call.tool, "run_code");
    }
}
