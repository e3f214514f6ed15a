//! Surf (`kiln surf`): web crawls by the Chromium of a `desktop` sandbox, driven over
//! DevTools through Kiln's CDP route and visible live in the sandbox's noVNC view. A
//! client of the Kiln API with the operator's key, on a listener of its own (default
//! 127.0.0.1:3080): `POST /api/surf`, `GET /api/sessions`, `GET /api/sessions/{id}`,
//! `DELETE /api/sessions/{id}`, `GET /api/health`, and a page at `/` that lists the
//! sessions with their live desktops and results (`docs/surf.md`).

#![forbid(unsafe_code)]

mod agent;
mod crawl;
pub mod session;
mod target;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_api::desktop::Resolution;
use serde::Deserialize;
use serde_json::json;

pub use agent::{ModelConfig, MAX_ACTIONS};
pub use crawl::{MAX_PAGES, TEMPLATE};
use session::{Session, Sessions, Status};

/// The deepest crawl Surf starts (links followed from the first page).
pub const MAX_DEPTH: u32 = 3;

/// How Surf runs.
#[derive(Debug, Clone)]
pub struct SurfConfig {
    /// The Kiln API (`E2B_API_URL`), over plain HTTP (DevTools WebSockets go there).
    pub api_url: String,
    /// The key Surf acts with (`E2B_API_KEY`).
    pub api_key: String,
    /// Sessions crawling at once (`E2B_SURF_CONCURRENT`).
    pub concurrent: usize,
    /// The longest one session's crawl may take (`E2B_SURF_TIMEOUT`).
    pub timeout: Duration,
    /// How long a session's sandbox lives (made or borrowed): past the crawl, so its
    /// live view and results can be looked at; within `E2B_DESKTOP_MAX_DURATION`.
    pub sandbox_lifetime: Duration,
    /// Where live views are served: `https://{port}-{id}.{domain}` (Kiln's TLS sandbox
    /// hosts); without one, `http://{port}-{id}.localhost:{api port}`.
    pub domain: Option<String>,
    /// The screen of the desktops Surf starts (`E2B_DESKTOP_RESOLUTION`).
    pub resolution: Resolution,
    /// What live views want from a browser when the sandbox's ports are public
    /// (`E2B_DESKTOP_AUTH_TOKEN`, as the server has it); private sandboxes' views want
    /// their traffic token. Surf's page URLs carry it.
    pub view_token: Option<kiln_api::desktop::ViewToken>,
    /// Computer-use mode's model; `None`: the mode is off.
    pub model: Option<ModelConfig>,
}

impl SurfConfig {
    /// The origin a browser opens port `port` of sandbox `id` at.
    pub fn sandbox_origin(&self, id: &str, port: u16) -> String {
        match &self.domain {
            Some(d) => format!("https://{port}-{id}.{d}"),
            None => {
                let api_port = reqwest::Url::parse(&self.api_url)
                    .ok()
                    .and_then(|u| u.port_or_known_default())
                    .unwrap_or(80);
                format!("http://{port}-{id}.localhost:{api_port}")
            }
        }
    }
}

/// Surf's state: its API client, sessions and their running crawls.
pub struct Surf {
    config: SurfConfig,
    client: kiln_client::Client,
    sessions: Sessions,
    crawls: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

/// What a request to Surf did wrong, or why it cannot be served; mapped to HTTP here.
#[derive(Debug, thiserror::Error)]
pub enum SurfError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no surf session {0:?}")]
    NotFound(String),
    #[error("{running} sessions are crawling, as many as E2B_SURF_CONCURRENT allows; try again when one ends")]
    Busy { running: usize },
}

impl IntoResponse for SurfError {
    fn into_response(self) -> Response {
        let status = match self {
            SurfError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SurfError::NotFound(_) => StatusCode::NOT_FOUND,
            SurfError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
        };
        let code = status.as_u16();
        (
            status,
            Json(json!({"code": code, "message": self.to_string()})),
        )
            .into_response()
    }
}

/// `POST /api/surf` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurfRequest {
    /// Where to start: the crawl's first page, or (with `task`) the page the model
    /// starts on, if any.
    #[serde(default)]
    pub url: String,
    /// Computer-use mode: what the configured model is to do on the desktop.
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default = "one")]
    pub depth: u32,
    #[serde(default = "yes")]
    pub extract_content: bool,
    /// Crawl in this running desktop sandbox of the key's team instead of a new one (as
    /// E2B Surf's `sandboxId`).
    #[serde(default)]
    pub sandbox_id: Option<String>,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// Checks a request's URL, depth and task against what this Surf can do.
fn check(req: &SurfRequest, agent: bool) -> Result<(), SurfError> {
    if let Some(task) = &req.task {
        if !agent {
            return Err(SurfError::BadRequest(
                "computer-use mode (task) is off: the operator sets E2B_SURF_MODEL_URL to a \
                 model's OpenAI-compatible API"
                    .into(),
            ));
        }
        if task.trim().is_empty() || task.len() > 10_000 {
            return Err(SurfError::BadRequest(
                "task must be 1 to 10000 bytes".into(),
            ));
        }
        if req.url.trim().is_empty() {
            return check_sandbox_id(req);
        }
    }
    let url = req.url.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            SurfError::BadRequest(format!(
                "url must start with http:// or https://, got {url:?}"
            ))
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty()
        || url.len() > 2048
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(SurfError::BadRequest(format!(
            "url {url:?} is not an http(s) URL with a host (at most 2048 characters, no spaces)"
        )));
    }
    if req.depth > MAX_DEPTH {
        return Err(SurfError::BadRequest(format!(
            "depth is at most {MAX_DEPTH} (links followed from the first page), got {}",
            req.depth
        )));
    }
    check_sandbox_id(req)
}

fn check_sandbox_id(req: &SurfRequest) -> Result<(), SurfError> {
    if let Some(id) = &req.sandbox_id {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(SurfError::BadRequest(format!("invalid sandbox_id {id:?}")));
        }
    }
    Ok(())
}

impl Surf {
    pub fn new(config: SurfConfig) -> Arc<Surf> {
        let client = kiln_client::Client::new(&config.api_url, &config.api_key);
        Arc::new(Surf {
            config,
            client,
            sessions: Sessions::default(),
            crawls: Mutex::new(HashMap::new()),
        })
    }

    fn start(self: &Arc<Self>, req: SurfRequest) -> Result<Session, SurfError> {
        check(&req, self.config.model.is_some())?;
        let session = Session {
            id: uuid::Uuid::new_v4().simple().to_string(),
            url: req.url.trim().to_string(),
            depth: req.depth,
            extract_content: req.extract_content,
            status: Status::Starting,
            created_at: chrono::Utc::now(),
            finished_at: None,
            sandbox_id: req.sandbox_id,
            owns_sandbox: false,
            vnc_url: None,
            pages: Vec::new(),
            error: None,
            task: req.task,
            steps: Vec::new(),
            answer: None,
        };
        self.sessions
            .insert_within(session.clone(), self.config.concurrent)
            .map_err(|running| SurfError::Busy { running })?;
        let task = tokio::spawn(crawl::crawl(self.clone(), session.id.clone()));
        self.crawls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.id.clone(), task.abort_handle());
        tracing::info!(session = %session.id, url = %session.url, depth = session.depth, "surf session started");
        Ok(session)
    }

    /// Ends session `id`: its crawl stopped, its sandbox killed.
    async fn end(&self, id: &str) -> Result<(), SurfError> {
        let session = self
            .sessions
            .remove(id)
            .ok_or_else(|| SurfError::NotFound(id.to_string()))?;
        if let Some(task) = self
            .crawls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
        {
            task.abort();
        }
        if let Some(sandbox) = &session.sandbox_id {
            if let Err(e) = self.client.kill(sandbox).await {
                tracing::warn!(session = %id, %sandbox, error = %e, "killing a surf session's sandbox failed");
            }
        }
        Ok(())
    }
}

async fn index() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(surf): State<Arc<Surf>>) -> Response {
    match surf.client.list_templates().await {
        Ok(templates) => {
            let desktop = templates.iter().any(|t| {
                t["aliases"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n == TEMPLATE))
                    || t["templateID"] == TEMPLATE
            });
            Json(json!({"status": "ok", "desktop_template": desktop})).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": format!("the Kiln API: {e}")})),
        )
            .into_response(),
    }
}

async fn surf_start(
    State(surf): State<Arc<Surf>>,
    body: Result<Json<SurfRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, SurfError> {
    let Json(req) = body.map_err(|e| SurfError::BadRequest(e.body_text()))?;
    let session = surf.start(req)?;
    Ok((StatusCode::ACCEPTED, Json(session.detail())).into_response())
}

async fn sessions(State(surf): State<Arc<Surf>>) -> Response {
    let all: Vec<_> = surf.sessions.all().iter().map(Session::summary).collect();
    Json(all).into_response()
}

async fn session(
    State(surf): State<Arc<Surf>>,
    Path(id): Path<String>,
) -> Result<Response, SurfError> {
    match surf.sessions.get(&id) {
        Some(s) => Ok(Json(s.detail()).into_response()),
        None => Err(SurfError::NotFound(id)),
    }
}

async fn screenshot(
    State(surf): State<Arc<Surf>>,
    Path((id, n)): Path<(String, usize)>,
) -> Result<Response, SurfError> {
    let s = surf
        .sessions
        .get(&id)
        .ok_or_else(|| SurfError::NotFound(id.clone()))?;
    let png = s
        .pages
        .get(n)
        .and_then(|p| p.screenshot.clone())
        .ok_or_else(|| SurfError::NotFound(format!("{id}/pages/{n}/screenshot")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png.as_ref().clone()).into_response())
}

async fn end(
    State(surf): State<Arc<Surf>>,
    Path(id): Path<String>,
) -> Result<StatusCode, SurfError> {
    surf.end(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn no_route() -> SurfError {
    SurfError::NotFound("route".into())
}

/// On a loopback listener, only requests addressed to loopback: a page elsewhere whose
/// name its owner re-points at 127.0.0.1 (DNS rebinding) would otherwise reach Surf as
/// if it were the operator's own page.
async fn loopback_hosts_only(
    State(loopback): State<bool>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if loopback && !matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
        let status = StatusCode::FORBIDDEN;
        let message = format!(
            "Surf on a loopback address answers requests for 127.0.0.1 or localhost only, not {host:?}"
        );
        return (status, Json(json!({"code": 403, "message": message}))).into_response();
    }
    next.run(req).await
}

/// Surf's routes; `loopback`: whether it listens on a loopback address only.
pub fn router(surf: Arc<Surf>, loopback: bool) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/health", get(health))
        .route("/api/surf", post(surf_start))
        .route("/api/sessions", get(sessions))
        .route("/api/sessions/{id}", get(session).delete(end))
        .route("/api/sessions/{id}/pages/{n}/screenshot", get(screenshot))
        .fallback(no_route)
        .with_state(surf)
        .layer(axum::middleware::from_fn_with_state(
            loopback,
            loopback_hosts_only,
        ))
}

/// SIGINT or SIGTERM.
async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves Surf on `listen` until the process is stopped (SIGINT, SIGTERM); every session's sandbox is
/// killed on the way out.
pub async fn serve(config: SurfConfig, listen: SocketAddr) -> std::io::Result<()> {
    let surf = Surf::new(config);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "surf listens beyond loopback: whoever reaches it crawls with its API key");
    }
    println!("surf: http://{}", listener.local_addr()?);
    let app = router(surf.clone(), listen.ip().is_loopback());
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped())
        .await?;
    for s in surf.sessions.all() {
        let _ = surf.end(&s.id).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose API nothing answers (port 9).
    fn test_config() -> SurfConfig {
        SurfConfig {
            api_url: "http://127.0.0.1:9".into(),
            api_key: "k".into(),
            concurrent: 1,
            timeout: Duration::from_secs(60),
            sandbox_lifetime: Duration::from_secs(360),
            domain: None,
            resolution: Resolution::default(),
            view_token: None,
            model: None,
        }
    }

    fn req(url: &str, depth: u32) -> SurfRequest {
        SurfRequest {
            url: url.into(),
            depth,
            extract_content: true,
            sandbox_id: None,
            task: None,
        }
    }

    #[test]
    fn requests_are_checked_before_any_sandbox() {
        assert!(check(&req("http://127.0.0.1:8000/", 1), false).is_ok());
        assert!(check(&req("https://example.org", 3), false).is_ok());
        for bad in [
            "ftp://x",
            "example.org",
            "http://",
            "http:///path",
            "http://a b",
            "javascript:alert(1)",
        ] {
            let e = check(&req(bad, 1), false).unwrap_err();
            assert!(matches!(e, SurfError::BadRequest(_)), "{bad}");
        }
        let e = check(&req("http://a.test", 4), false).unwrap_err();
        assert!(e.to_string().contains("at most 3"), "{e}");
        let mut r = req("http://a.test", 1);
        r.sandbox_id = Some("../x".into());
        assert!(check(&r, false).is_err());
        let mut task = req("", 1);
        task.task = Some("open the menu".into());
        let off = check(&task, false).unwrap_err();
        assert!(off.to_string().contains("E2B_SURF_MODEL_URL"), "{off}");
        assert!(check(&task, true).is_ok());
    }

    #[test]
    fn live_views_point_at_the_sandbox_hosts() {
        let mut c = test_config();
        c.api_url = "http://127.0.0.1:3000".into();
        assert_eq!(
            c.sandbox_origin("abc", 6080),
            "http://6080-abc.localhost:3000"
        );
        // A path after the port, or no port at all (the scheme's).
        c.api_url = "http://[::1]:3000/api".into();
        assert_eq!(
            c.sandbox_origin("abc", 6080),
            "http://6080-abc.localhost:3000"
        );
        c.api_url = "http://kiln.internal".into();
        assert_eq!(
            c.sandbox_origin("abc", 6080),
            "http://6080-abc.localhost:80"
        );
        c.domain = Some("kiln.test".into());
        assert_eq!(c.sandbox_origin("abc", 6080), "https://6080-abc.kiln.test");
    }

    #[tokio::test]
    async fn a_loopback_surf_refuses_other_host_names() {
        let surf = Surf::new(test_config());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(surf, true)).await });
        let http = reqwest::Client::new();
        let get = |host: &'static str| {
            http.get(format!("http://{addr}/api/sessions"))
                .header("host", host)
                .send()
        };
        assert_eq!(get("127.0.0.1:3080").await.unwrap().status(), 200);
        assert_eq!(get("localhost").await.unwrap().status(), 200);
        let rebound = get("evil.example:3080").await.unwrap();
        assert_eq!(rebound.status(), 403);
        assert!(rebound.text().await.unwrap().contains("evil.example"));
    }

    #[tokio::test]
    async fn unknown_sessions_are_404_and_ended_ones_are_gone() {
        // Nothing listens at the API: the crawl fails, which is not what is tested (the
        // cap on running sessions is `session::tests`).
        let surf = Surf::new(test_config());
        let first = surf.start(req("http://a.test/", 1)).unwrap();
        assert!(matches!(
            surf.end("nope").await,
            Err(SurfError::NotFound(_))
        ));
        surf.end(&first.id).await.unwrap();
        assert!(surf.sessions.get(&first.id).is_none());
    }
}
