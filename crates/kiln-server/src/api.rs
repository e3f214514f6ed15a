//! REST handlers: validate, authorize, hand off to the [`SandboxManager`]. They never
//! orchestrate.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kiln_api::{
    ConnectRequest, NewSandbox, RefreshRequest, SandboxDetail, TimeoutRequest, NEXT_TOKEN_HEADER,
};
use serde::de::DeserializeOwned;

use crate::app::AppState;
use crate::error::AppError;
use crate::manager::ListQuery;

/// The authenticated caller, put in the request by the auth middleware.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub key_id: i64,
}

/// `Json<T>` whose rejections are E2B-shaped JSON errors that say what was wrong.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(AppError::BadRequest(
                "request body must be JSON with Content-Type: application/json".into(),
            )),
            Err(e) => Err(AppError::BadRequest(format!(
                "invalid request body: {}",
                e.body_text()
            ))),
        }
    }
}

/// Like [`Body`], but an empty body means the type's default.
pub struct OptionalBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| AppError::BadRequest(format!("unreadable request body: {e}")))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalBody(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(OptionalBody)
            .map_err(|e| AppError::BadRequest(format!("invalid request body: {e}")))
    }
}

/// `Query<T>` whose rejections are E2B-shaped JSON errors.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| QueryParams(v))
            .map_err(|e| AppError::BadRequest(format!("invalid query: {}", e.body_text())))
    }
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", get(list_v2))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .merge(crate::builds::routes())
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<NewSandbox>,
) -> Result<Response, AppError> {
    if req.template_id.trim().is_empty() {
        return Err(AppError::BadRequest("templateID must not be empty".into()));
    }
    let sandbox = state.manager.create(req, caller.key_id).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

async fn list_v2(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Response, AppError> {
    let page = state.manager.list(&query)?;
    let mut resp = Json(page.items).into_response();
    if let Some(token) = page.next_token {
        if let Ok(v) = HeaderValue::from_str(&token) {
            resp.headers_mut().insert(NEXT_TOKEN_HEADER, v);
        }
    }
    Ok(resp)
}

/// The deprecated v1 list: running sandboxes, metadata filter, no pagination.
async fn list_v1(
    State(state): State<Arc<AppState>>,
    QueryParams(mut query): QueryParams<ListQuery>,
) -> Result<Json<Vec<SandboxDetail>>, AppError> {
    query.limit = None;
    query.next_token = None;
    let mut items = Vec::new();
    loop {
        let page = state.manager.list(&query)?;
        items.extend(page.items);
        match page.next_token {
            Some(t) => query.next_token = Some(t),
            None => return Ok(Json(items)),
        }
    }
}

async fn detail(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, AppError> {
    state.manager.detail(&id).map(Json)
}

async fn kill(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    state.manager.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(req): Body<TimeoutRequest>,
) -> Result<StatusCode, AppError> {
    state.manager.set_timeout(&id, req.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 200 when the sandbox was running, 201 when this call resumed it.
async fn connect(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<ConnectRequest>,
) -> Result<Response, AppError> {
    let (sandbox, resumed) = state.manager.connect(&id, req.timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sandbox)).into_response())
}

/// Deprecated E2B route: resume a paused sandbox (201), as `connect` does.
async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<ConnectRequest>,
) -> Result<Response, AppError> {
    let (sandbox, _) = state.manager.connect(&id, req.timeout).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

/// `POST /sandboxes/{id}/pause` (body `{"memory": bool}` ignored: the pause always
/// keeps memory). 409 when already paused.
async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    state.manager.pause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<RefreshRequest>,
) -> Result<StatusCode, AppError> {
    state.manager.refresh(&id, req.duration).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<kiln_api::SandboxMetric>>, AppError> {
    state.manager.metrics(&id).await.map(Json)
}
