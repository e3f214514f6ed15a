//! Routes (spec A.1): `/health`, `/execute`, `/contexts…`, with wide-open CORS.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;

use crate::context::{ContextInfo, Registry};
use crate::error::ApiError;
use crate::execute::{self, ExecSettings, Job};
use crate::language::{check_env_name, Language};

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub settings: Arc<ExecSettings>,
}

const MAX_BODY: usize = 64 << 20;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}/restart", post(restart_context))
        .route("/contexts/{id}", delete(remove_context))
        .layer(middleware::from_fn(cors))
        // Code cells can be large (generated code, embedded data); axum's default is 2 MB.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn health() -> Json<&'static str> {
    Json("OK")
}

/// `POST /execute` body. The Python SDK always sends every key, unset ones as `null`.
#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid {what} body: {e}")))
}

async fn execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ExecuteRequest = parse_json(&body, "/execute")?;
    let env_vars = request.env_vars.unwrap_or_default();
    for name in env_vars.keys() {
        check_env_name(name).map_err(ApiError::BadRequest)?;
    }
    let context = match (request.context_id, request.language) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "Only one of context_id or language can be provided".to_owned(),
            ))
        }
        (Some(id), None) => state
            .registry
            .get(&id)
            .ok_or(ApiError::ContextNotFound(id))?,
        (None, language) => {
            let language = Language::normalize(language.as_deref());
            state
                .registry
                .default_for(&language)
                .await
                .map_err(ApiError::context)?
        }
    };
    let access_token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let job = Job {
        code: request.code,
        env_vars,
        access_token,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    // The run goes on if the client leaves: it must interrupt the kernel and restore env
    // vars, with the context's lock held.
    tokio::spawn(execute::run(context, job, state.settings.clone(), tx));
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok(Response::new(Body::from_stream(stream)))
}

#[derive(Debug, Default, Deserialize)]
struct CreateContextRequest {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

async fn create_context(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<ContextInfo>, ApiError> {
    let request: CreateContextRequest = parse_json(&body, "/contexts")?;
    let language = Language::normalize(request.language.as_deref());
    let context = state
        .registry
        .create(language, request.cwd)
        .await
        .map_err(ApiError::context)?;
    Ok(Json(context.info()))
}

async fn list_contexts(State(state): State<AppState>) -> Json<Vec<ContextInfo>> {
    Json(state.registry.list_settled().await)
}

async fn restart_context(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<()>, ApiError> {
    let context = state
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::ContextNotFound(id.clone()))?;
    context
        .restart()
        .await
        .map_err(|source| ApiError::Restart {
            id,
            source: Box::new(source),
        })?;
    Ok(Json(()))
}

async fn remove_context(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<()>, ApiError> {
    state
        .registry
        .remove(&id)
        .await
        .ok_or(ApiError::ContextNotFound(id))?;
    Ok(Json(()))
}

/// All origins, methods and headers (the reference server's CORS policy).
async fn cors(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    let star = HeaderValue::from_static("*");
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, star.clone());
    if preflight {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, star.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, star);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}
