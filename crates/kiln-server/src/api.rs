//! REST handlers: validate, authorize, hand off to the [`SandboxManager`]. They never
//! orchestrate.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_api::{
    ConnectRequest, NetworkUpdate, NewSandbox, RefreshRequest, SandboxDetail, TimeoutRequest,
    NEXT_TOKEN_HEADER,
};

use crate::authz::Caller;
use crate::endpoint::{Access, Endpoint};
use crate::error::{json_error, AppError};
use crate::extract::{Body, OptionalBody, QueryParams};
use crate::manager::ListQuery;
use crate::state::AppState;

/// The sandbox endpoints (E2B's `/sandboxes` API) and health.
pub fn endpoints() -> Vec<Endpoint> {
    use Access::{Member, Public};
    vec![
        Endpoint::new(
            Method::GET,
            "/healthz",
            Public,
            "Liveness and template-build progress",
            healthz,
        ),
        Endpoint::new(
            Method::GET,
            "/health",
            Public,
            "Liveness (the same answer as /healthz)",
            healthz,
        ),
        Endpoint::new(
            Method::GET,
            "/metrics",
            Public,
            "Prometheus metrics: loopback clients only, or with KILN_METRICS_TOKEN as a Bearer token",
            prometheus,
        ),
        Endpoint::new(
            Method::GET,
            "/events",
            Member,
            "Lifecycle events of the caller's team, as server-sent events",
            events,
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
            Method::PUT,
            "/sandboxes/{id}/network",
            Member,
            "Replace a sandbox's egress rules (allowOut, denyOut)",
            update_network,
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
            "/sandboxes/{id}/logs",
            Member,
            "A sandbox's console logs (E2B's deprecated form)",
            logs_v1,
        ),
        Endpoint::new(
            Method::GET,
            "/v2/sandboxes/{id}/logs",
            Member,
            "A sandbox's console logs, paged by time, filtered by level and text",
            logs_v2,
        ),
        Endpoint::new(
            Method::GET,
            "/sandboxes/metrics",
            Member,
            "The latest resource sample of several sandboxes",
            batch_metrics,
        ),
        Endpoint::new(
            Method::GET,
            "/sandboxes/{id}/metrics",
            Member,
            "A sandbox's resource usage",
            metrics,
        ),
    ]
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({
                "status": "ok",
                "building": state.templates.building(),
            })),
        )
            .into_response()
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "kiln is starting (building templates)",
        )
    }
}

/// `GET /metrics`. Not behind an API key (Prometheus has none): loopback clients only,
/// or, when the operator set `KILN_METRICS_TOKEN`, any client with that token.
async fn prometheus(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let allowed = match &state.metrics_token {
        Some(token) => req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| crate::keys::same_secret(given, token)),
        None => peer.is_some_and(|p| p.ip().is_loopback()),
    };
    if !allowed {
        return json_error(
            StatusCode::FORBIDDEN,
            "GET /metrics answers loopback clients only, or clients with the token in \
             KILN_METRICS_TOKEN (Authorization: Bearer TOKEN)",
        );
    }
    state.manager.observe().await;
    (
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.manager.meters().encode(),
    )
        .into_response()
}

/// `GET /events`: the team's lifecycle events as they happen (server-sent events, one
/// `event: <type>` with the JSON payload NATS gets); admins get every team's.
async fn events(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = state.manager.events().subscribe();
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let visible = match e.team_id {
                        Some(team) => caller.sees(team),
                        None => caller.admin,
                    };
                    if !visible {
                        continue;
                    }
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    return Some((Ok(Event::default().event(e.kind).data(data)), rx));
                }
                // A reader that fell behind is told how many it missed.
                Err(RecvError::Lagged(n)) => {
                    let missed = Event::default().event("lagged").data(n.to_string());
                    return Some((Ok(missed), rx));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<NewSandbox>,
) -> Result<Response, AppError> {
    if req.template_id.trim().is_empty() {
        return Err(AppError::BadRequest("templateID must not be empty".into()));
    }
    let mut sandbox = state.manager.clone().create_detached(req, caller).await?;
    sandbox.domain = state.domain.clone();
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
    let mut detail = state.manager.detail(&caller, &id)?;
    detail.domain = state.domain.clone();
    Ok(Json(detail))
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

async fn update_network(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<NetworkUpdate>,
) -> Result<StatusCode, AppError> {
    state.manager.update_network(&caller, &id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 200 when the sandbox was running, 201 when this call resumed it.
async fn connect(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<ConnectRequest>,
) -> Result<Response, AppError> {
    let (mut sandbox, resumed) = state.manager.connect(&caller, &id, req.timeout).await?;
    sandbox.domain = state.domain.clone();
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
    let (mut sandbox, _) = state.manager.connect(&caller, &id, req.timeout).await?;
    sandbox.domain = state.domain.clone();
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

/// The most log entries one request answers.
const MAX_LOG_ENTRIES: usize = 1000;

#[derive(Debug, Default, serde::Deserialize)]
struct LogsV1Query {
    /// Milliseconds since the epoch: entries at or after it.
    start: Option<i64>,
    limit: Option<usize>,
}

/// `GET /sandboxes/{id}/logs` (E2B's deprecated form): `{logs: [{timestamp, line}],
/// logEntries: [...]}`, oldest first.
async fn logs_v1(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogsV1Query>,
) -> Result<Json<serde_json::Value>, AppError> {
    let limit = q.limit.unwrap_or(MAX_LOG_ENTRIES).min(MAX_LOG_ENTRIES);
    let entries: Vec<_> = state
        .manager
        .logs(&caller, &id)?
        .into_iter()
        .filter(|e| q.start.is_none_or(|s| e.timestamp.timestamp_millis() >= s))
        .take(limit)
        .collect();
    let lines: Vec<_> = entries
        .iter()
        .map(|e| {
            let t = e
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            serde_json::json!({"timestamp": t, "line": e.message})
        })
        .collect();
    Ok(Json(
        serde_json::json!({"logs": lines, "logEntries": entries}),
    ))
}

#[derive(Debug, Default, serde::Deserialize)]
struct LogsV2Query {
    /// Milliseconds since the epoch where the page starts.
    cursor: Option<i64>,
    limit: Option<usize>,
    /// `forward` (default: at or after the cursor, oldest first) or `backward` (at or
    /// before it, newest first).
    direction: Option<String>,
    /// The lowest level returned.
    level: Option<String>,
    /// Only entries whose message contains this.
    search: Option<String>,
}

/// `GET /v2/sandboxes/{id}/logs`: `{logs: [{timestamp, level, message, fields}]}`.
async fn logs_v2(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogsV2Query>,
) -> Result<Json<serde_json::Value>, AppError> {
    let limit = q.limit.unwrap_or(MAX_LOG_ENTRIES).min(MAX_LOG_ENTRIES);
    let backward = match q.direction.as_deref() {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(other) => {
            return Err(AppError::BadRequest(format!(
                "direction must be forward or backward, got {other:?}"
            )))
        }
    };
    let min_level = match q.level.as_deref() {
        None => None,
        Some(l) => Some(crate::manager::LogLevel::parse(l).ok_or_else(|| {
            AppError::BadRequest(format!(
                "level must be debug, info, warn or error, got {l:?}"
            ))
        })?),
    };
    let mut entries: Vec<_> = state
        .manager
        .logs(&caller, &id)?
        .into_iter()
        .filter(|e| min_level.is_none_or(|m| e.level >= m))
        .filter(|e| q.search.as_deref().is_none_or(|s| e.message.contains(s)))
        .filter(|e| {
            let t = e.timestamp.timestamp_millis();
            q.cursor
                .is_none_or(|c| if backward { t <= c } else { t >= c })
        })
        .collect();
    if backward {
        entries.reverse();
    }
    entries.truncate(limit);
    Ok(Json(serde_json::json!({ "logs": entries })))
}

/// `GET /sandboxes/{id}/metrics` query: a range in Unix seconds.
#[derive(Debug, Default, serde::Deserialize)]
struct MetricsRange {
    start: Option<i64>,
    end: Option<i64>,
}

async fn metrics(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    QueryParams(range): QueryParams<MetricsRange>,
) -> Result<Json<Vec<kiln_api::SandboxMetric>>, AppError> {
    Ok(Json(
        state
            .manager
            .metrics(&caller, &id, range.start, range.end)
            .await?,
    ))
}

#[derive(Debug, Default, serde::Deserialize)]
struct BatchMetricsQuery {
    /// Comma-separated sandbox ids.
    sandbox_ids: Option<String>,
}

/// `GET /sandboxes/metrics`: `{"sandboxes": {id: latest sample}}`.
async fn batch_metrics(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    QueryParams(query): QueryParams<BatchMetricsQuery>,
) -> Result<Json<serde_json::Value>, AppError> {
    let ids: Vec<String> = query
        .sandbox_ids
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err(AppError::BadRequest(
            "sandbox_ids is required: a comma-separated list of sandbox ids".into(),
        ));
    }
    let latest = state.manager.latest_metrics(&caller, &ids).await?;
    Ok(Json(serde_json::json!({ "sandboxes": latest })))
}
