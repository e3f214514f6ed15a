//! REST handlers: validate, authorize, hand off to the [`SandboxManager`]. They never
//! orchestrate.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::Method;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use kiln_api::{
    ConnectRequest, NewSandbox, RefreshRequest, SandboxDetail, TimeoutRequest, NEXT_TOKEN_HEADER,
};
use serde::de::DeserializeOwned;

use crate::app::AppState;
use crate::authz::{Access, Caller};
use crate::error::AppError;
use crate::manager::ListQuery;

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

/// One route of the REST API: what it is, who may call it, and its handler. The router
/// is built from [`endpoints`] alone, so the authorization test and the OpenAPI
/// document, which walk the same list, cover every route the server serves.
pub struct Endpoint {
    pub method: Method,
    /// axum's path syntax (`/sandboxes/{id}`), which is OpenAPI's too.
    pub path: &'static str,
    pub access: Access,
    /// One line for the OpenAPI document.
    pub summary: &'static str,
    pub handler: MethodRouter<Arc<AppState>>,
}

impl Endpoint {
    pub fn new<H, T>(
        method: Method,
        path: &'static str,
        access: Access,
        summary: &'static str,
        handler: H,
    ) -> Self
    where
        H: axum::handler::Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("{method} is not a routable method"));
        Endpoint {
            method,
            path,
            access,
            summary,
            handler: on(filter, handler),
        }
    }
}

/// Every endpoint of the REST API.
pub fn endpoints() -> Vec<Endpoint> {
    use Access::{Member, Public};
    let mut all = vec![
        Endpoint::new(
            Method::GET,
            "/healthz",
            Public,
            "Liveness and template-build progress",
            crate::app::healthz,
        ),
        Endpoint::new(
            Method::POST,
            "/sandboxes",
            Member,
            "Create a sandbox",
            create,
        ),
        Endpoint::new(
            Method::GET,
            "/sandboxes",
            Member,
            "List running sandboxes (v1)",
            list_v1,
        ),
        Endpoint::new(
            Method::GET,
            "/v2/sandboxes",
            Member,
            "List sandboxes, paginated",
            list_v2,
        ),
        Endpoint::new(
            Method::GET,
            "/sandboxes/{id}",
            Member,
            "Get a sandbox",
            detail,
        ),
        Endpoint::new(
            Method::DELETE,
            "/sandboxes/{id}",
            Member,
            "Kill a sandbox",
            kill,
        ),
        Endpoint::new(
            Method::POST,
            "/sandboxes/{id}/timeout",
            Member,
            "Set a sandbox's timeout",
            set_timeout,
        ),
        Endpoint::new(
            Method::POST,
            "/sandboxes/{id}/connect",
            Member,
            "Connect to a sandbox, resuming it if paused",
            connect,
        ),
        Endpoint::new(
            Method::POST,
            "/sandboxes/{id}/pause",
            Member,
            "Pause a sandbox",
            pause,
        ),
        Endpoint::new(
            Method::POST,
            "/sandboxes/{id}/resume",
            Member,
            "Resume a paused sandbox (deprecated)",
            resume,
        ),
        Endpoint::new(
            Method::POST,
            "/sandboxes/{id}/refreshes",
            Member,
            "Keep a sandbox alive longer",
            refresh,
        ),
        Endpoint::new(
            Method::GET,
            "/sandboxes/{id}/metrics",
            Member,
            "A sandbox's resource usage",
            metrics,
        ),
    ];
    all.extend(crate::admin_api::endpoints());
    all
}

/// The template routes, not yet in [`endpoints`]: served with [`Access::Member`].
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().merge(crate::builds::routes())
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<NewSandbox>,
) -> Result<Response, AppError> {
    if req.template_id.trim().is_empty() {
        return Err(AppError::BadRequest("templateID must not be empty".into()));
    }
    let sandbox = state.manager.clone().create_detached(req, caller).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

async fn list_v2(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Response, AppError> {
    let page = state.manager.list(&caller, &query)?;
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
    Extension(caller): Extension<Caller>,
    QueryParams(mut query): QueryParams<ListQuery>,
) -> Result<Json<Vec<SandboxDetail>>, AppError> {
    query.limit = None;
    query.next_token = None;
    let mut items = Vec::new();
    loop {
        let page = state.manager.list(&caller, &query)?;
        items.extend(page.items);
        match page.next_token {
            Some(t) => query.next_token = Some(t),
            None => return Ok(Json(items)),
        }
    }
}

async fn detail(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, AppError> {
    Ok(Json(state.manager.detail(&caller, &id)?))
}

async fn kill(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    state.manager.kill(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<TimeoutRequest>,
) -> Result<StatusCode, AppError> {
    state.manager.set_timeout(&caller, &id, req.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 200 when the sandbox was running, 201 when this call resumed it.
async fn connect(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<ConnectRequest>,
) -> Result<Response, AppError> {
    let (sandbox, resumed) = state.manager.connect(&caller, &id, req.timeout).await?;
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
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<ConnectRequest>,
) -> Result<Response, AppError> {
    let (sandbox, _) = state.manager.connect(&caller, &id, req.timeout).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

/// `POST /sandboxes/{id}/pause` (body `{"memory": bool}` ignored: the pause always
/// keeps memory). 409 when already paused.
async fn pause(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    state.manager.pause(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<RefreshRequest>,
) -> Result<StatusCode, AppError> {
    state.manager.refresh(&caller, &id, req.duration).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<kiln_api::SandboxMetric>>, AppError> {
    Ok(Json(state.manager.metrics(&caller, &id).await?))
}
