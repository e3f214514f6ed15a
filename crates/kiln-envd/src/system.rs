//! `GET /health`, `POST /init`, `GET /envs`, `GET /metrics` (spec §3.3, §3.6).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_proto::envd::{InitRequest, ENVD_VERSION, HEADER_ENVD_VERSION};
use serde::Serialize;

use crate::error::HttpError;
use crate::state::Sandbox;

pub fn routes(sandbox: Sandbox) -> Router {
    Router::new()
        .route(kiln_proto::envd::PATH_HEALTH, get(health))
        .route(
            kiln_proto::envd::PATH_INIT,
            post(init).layer(DefaultBodyLimit::max(INIT_BODY_LIMIT)),
        )
        .route(kiln_proto::envd::PATH_ENVS, get(envs))
        .route(kiln_proto::envd::PATH_METRICS, get(metrics))
        .with_state(sandbox)
}

async fn health() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(header::CACHE_CONTROL, "no-store")],
    )
        .into_response()
}

/// The largest `/init` body envd reads (environment variables included).
const INIT_BODY_LIMIT: usize = 1 << 20;

/// Once an access token is set, `/init` is the token holder's alone: a caller who
/// does not present the current token in `X-Access-Token` gets 409 and changes
/// nothing (E2B's envd answers 409 to a change of a set token). Without this, anyone
/// who reached `/init` could clear the token and take the sandbox over.
fn check_init_allowed(current: Option<&str>, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(current) = current else {
        return Ok(());
    };
    let given = headers
        .get(kiln_proto::envd::HEADER_ACCESS_TOKEN)
        .map(|v| v.as_bytes());
    if given.is_some_and(|g| crate::auth::constant_time_eq(g, current.as_bytes())) {
        return Ok(());
    }
    Err(HttpError::new(
        StatusCode::CONFLICT,
        "the sandbox is already initialized with an access token; /init needs the current token in X-Access-Token",
    ))
}

async fn init(
    State(sandbox): State<Sandbox>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    check_init_allowed(sandbox.defaults().access_token.as_deref(), &headers)?;
    let req: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| HttpError::bad_request(format!("invalid /init body: {e}")))?
    };
    if let Some(timestamp) = &req.timestamp {
        // The sandbox clock is the host's (shared kernel or synced by the runtime).
        tracing::debug!(%timestamp, "init timestamp received");
    }
    let mut refused = None;
    sandbox.update_defaults(|d| {
        // Checked again under the lock: two racing /init calls cannot both pass the
        // check above with the first one setting a token.
        if let Err(e) = check_init_allowed(d.access_token.as_deref(), &headers) {
            refused = Some(e);
            return;
        }
        if let Some(env) = req.env_vars {
            d.env_vars = env;
        }
        match req.access_token {
            None => {}
            Some(Some(token)) if !token.is_empty() => d.access_token = Some(token),
            Some(_) => d.access_token = None,
        }
        if let Some(user) = req.default_user.filter(|u| !u.is_empty()) {
            d.user = user;
        }
        if let Some(workdir) = req.default_workdir {
            d.workdir = (!workdir.is_empty()).then_some(workdir);
        }
    });
    if let Some(e) = refused {
        return Err(e);
    }
    let d = sandbox.defaults();
    tracing::info!(user = %d.user, env_vars = d.env_vars.len(), token = d.access_token.is_some(), "initialized");
    Ok((
        StatusCode::NO_CONTENT,
        [(HEADER_ENVD_VERSION, ENVD_VERSION)],
    )
        .into_response())
}

async fn envs(State(sandbox): State<Sandbox>) -> Json<BTreeMap<String, String>> {
    Json(sandbox.defaults().env_vars)
}

#[derive(Serialize)]
struct Metrics {
    ts: i64,
    cpu_count: usize,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    mem_cache: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    disk_used: u64,
    disk_total: u64,
}

/// (busy, total) jiffies from the first line of /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn meminfo() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.to_owned(), kib * 1024))
        })
        .collect()
}

async fn metrics() -> Json<Metrics> {
    let before = cpu_jiffies();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let after = cpu_jiffies();
    let cpu_used_pct = match (before, after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            ((b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64 * 10000.0).round() / 100.0
        }
        _ => 0.0,
    };
    let mem = meminfo();
    let mem_total = mem.get("MemTotal").copied().unwrap_or(0);
    let mem_available = mem.get("MemAvailable").copied().unwrap_or(0);
    let mem_used = mem_total.saturating_sub(mem_available);
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(s) => {
            let block = s.fragment_size();
            let total = s.blocks() * block;
            (total, total.saturating_sub(s.blocks_free() * block))
        }
        Err(_) => (0, 0),
    };
    Json(Metrics {
        ts: chrono::Utc::now().timestamp(),
        cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_used_pct,
        mem_total,
        mem_used,
        mem_cache: mem.get("Cached").copied().unwrap_or(0),
        mem_total_mib: mem_total >> 20,
        mem_used_mib: mem_used >> 20,
        disk_used,
        disk_total,
    })
}
