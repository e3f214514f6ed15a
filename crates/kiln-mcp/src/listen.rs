//! `kiln mcp --listen`: Streamable HTTP MCP at `/mcp` and the REST bridge on one
//! listener, behind one authentication layer.
//!
//! Who may call: a holder of a Kiln API key (`X-API-Key`, or `Authorization: Bearer
//! e2b_...`), acting with that key; or a holder of `E2B_MCP_SERVER_TOKEN` (Bearer),
//! acting with the key the server was started with. Everything else is 401. The server
//! is a client of the Kiln API: a caller gets that key's team rights and nothing more.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::HeaderMap;
use kiln_client::{Client, ClientError};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::bridge;
use crate::error::AuthError;
use crate::server::{CallerKey, KilnMcp, Transport};
use crate::session::Shared;

/// Where `kiln mcp --listen` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7073";
/// A key the API accepted is trusted this long before it is asked again.
const KEY_CACHE_TTL: Duration = Duration::from_secs(60);
/// Largest request body (a 10 MiB file as base64 fits).
const MAX_BODY: usize = 16 << 20;
/// How long a shutdown waits for open connections before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// An HTTP session without requests this long is closed (and its sandboxes killed):
/// rmcp's 5 min default would end an agent's session while it thinks.
const SESSION_IDLE: Duration = Duration::from_secs(3600);

/// How HTTP callers authenticate.
pub struct Auth {
    shared: Shared,
    /// `E2B_MCP_SERVER_TOKEN`: stands for `shared.default_key`.
    server_token: Option<String>,
    accepted: Mutex<HashMap<String, Instant>>,
}

impl Auth {
    /// `server_token` needs the server's own key (`shared.default_key`) to act with.
    pub fn new(shared: Shared, server_token: Option<String>) -> Result<Self, std::io::Error> {
        let server_token = server_token.filter(|t| !t.is_empty());
        if server_token.is_some() && shared.default_key.is_none() {
            return Err(std::io::Error::other(
                "E2B_MCP_SERVER_TOKEN is set but no API key was given (--api-key or \
                 E2B_API_KEY): the token acts with that key",
            ));
        }
        Ok(Auth {
            shared,
            server_token,
            accepted: Mutex::default(),
        })
    }

    /// The API key a request acts with.
    pub async fn resolve(&self, headers: &HeaderMap) -> Result<String, AuthError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let bearer = header("authorization").and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        if let (Some(given), Some(token)) = (bearer, &self.server_token) {
            if kiln_api::constant_time_eq(given.as_bytes(), token.as_bytes()) {
                return self.shared.default_key.clone().ok_or(AuthError::Missing);
            }
        }
        let key = header(kiln_api::API_KEY_HEADER)
            .or(bearer.filter(|b| b.starts_with("e2b_")))
            .ok_or(AuthError::Missing)?;
        self.check_key(key).await?;
        Ok(key.to_string())
    }

    /// Asks the API whether it takes `key` (cached for a minute).
    async fn check_key(&self, key: &str) -> Result<(), AuthError> {
        {
            let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
            accepted.retain(|_, at| at.elapsed() < KEY_CACHE_TTL);
            if accepted.contains_key(key) {
                return Ok(());
            }
        }
        match Client::new(&self.shared.api_url, key)
            .list_templates()
            .await
        {
            Ok(_) => {}
            Err(ClientError::Api { status, .. }) if matches!(status.as_u16(), 401 | 403) => {
                return Err(AuthError::Refused)
            }
            Err(source) => return Err(AuthError::Unreachable { source }),
        }
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), Instant::now());
        Ok(())
    }
}

async fn authenticate(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    match auth.resolve(req.headers()).await {
        Ok(key) => {
            req.extensions_mut().insert(CallerKey(key));
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The whole HTTP app: `/mcp`, the bridge, `/healthz` (the one open route).
pub fn router(auth: Arc<Auth>, listen: SocketAddr, cancel: CancellationToken) -> Router {
    let shared = auth.shared.clone();
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(cancel)
        .with_max_request_body_bytes(MAX_BODY);
    // rmcp checks Host against loopback names (DNS rebinding). Listening elsewhere,
    // every request is authenticated anyway, so any Host the network routes is taken.
    if !listen.ip().is_loopback() {
        config = config.disable_allowed_hosts();
    }
    let factory_shared = shared.clone();
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(SESSION_IDLE);
    let mcp = StreamableHttpService::new(
        move || Ok(KilnMcp::new(factory_shared.clone(), Transport::Http)),
        Arc::new(sessions),
        config,
    );
    Router::new()
        .route_service("/mcp", mcp)
        .merge(bridge::routes(shared))
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .route("/healthz", get(healthz))
}

/// Serves until SIGINT/SIGTERM, then ends every session and kills their sandboxes.
pub async fn serve_http(
    shared: Shared,
    listen: SocketAddr,
    server_token: Option<String>,
) -> Result<(), std::io::Error> {
    let auth = Arc::new(Auth::new(shared.clone(), server_token)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    let local = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let app = router(auth, local, cancel.clone());
    eprintln!("kiln mcp: Streamable HTTP on http://{local}/mcp, REST bridge on http://{local}/");
    let stop = cancel.clone();
    tokio::spawn(async move {
        crate::signal::shutdown_signal().await;
        stop.cancel();
    });
    // The token ends every rmcp session (and its streams); a connection still open
    // after the grace period does not hold the sandboxes' kills back.
    let server =
        axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned());
    tokio::select! {
        r = server => r?,
        _ = async {
            cancel.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after the shutdown began; closing them"),
    }
    shared.reaper.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::Reaper;

    fn auth(token: Option<&str>, key: Option<&str>) -> Auth {
        let shared = Shared {
            // Nothing listens there: a key that needs checking fails as unreachable.
            api_url: "http://127.0.0.1:9".into(),
            default_key: key.map(str::to_string),
            reaper: Reaper::default(),
            desktop_resolution: Default::default(),
        };
        Auth::new(shared, token.map(str::to_string)).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn the_server_token_maps_to_the_servers_key() {
        let a = auth(Some("s3cret"), Some("e2b_server"));
        let key = a
            .resolve(&headers(&[("authorization", "Bearer s3cret")]))
            .await
            .unwrap();
        assert_eq!(key, "e2b_server");
        for bad in [
            headers(&[]),
            headers(&[("authorization", "Bearer wrong")]),
            headers(&[("authorization", "Basic s3cret")]),
        ] {
            assert!(matches!(a.resolve(&bad).await, Err(AuthError::Missing)));
        }
        // A key is checked with the API (unreachable here).
        let r = a.resolve(&headers(&[("x-api-key", "e2b_other")])).await;
        assert!(matches!(r, Err(AuthError::Unreachable { .. })));
        let r = a
            .resolve(&headers(&[("authorization", "Bearer e2b_other")]))
            .await;
        assert!(matches!(r, Err(AuthError::Unreachable { .. })));
    }

    #[test]
    fn a_token_without_a_key_is_refused_at_start() {
        let shared = Shared {
            api_url: "http://127.0.0.1:9".into(),
            default_key: None,
            reaper: Reaper::default(),
            desktop_resolution: Default::default(),
        };
        assert!(Auth::new(shared, Some("t".into())).is_err());
    }
}
