//! The HTTP face of [`TemplateBuilds`]: the E2B template routes as the Template SDK
//! drives them — `POST /v3/templates` → per COPY `GET /templates/{id}/files/{hash}`
//! (+ `PUT` of the archive to the upload link) → `POST /v2/templates/{id}/builds/{buildID}`
//! → polling `GET /templates/{id}/builds/{buildID}/status`; list, get, delete, alias,
//! tags — and Kiln's own: the NDJSON log stream, cancel, gc. Each handler reads the
//! request, calls the service and shapes its answer.

use std::sync::Arc;

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use kiln_template::recipe::BuildSpec;
use kiln_template::Template;
use serde::Deserialize;

use super::{BuildStatus, TemplateBuilds, MAX_LOG_PAGE, UPLOAD_PREFIX};
use crate::api::{Body, OptionalBody, QueryParams};
use crate::app::AppState;
use crate::error::AppError;

/// The caller's team. Teams are not wired in yet: every caller is nobody's.
const NO_OWNER: Option<i64> = None;

/// Routes behind the API key.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v3/templates", post(create))
        .route("/templates", get(list))
        .route("/templates/{id}", get(detail).delete(remove))
        .route("/templates/aliases/{alias}", get(alias))
        .route("/templates/{id}/files/{hash}", get(files_link))
        .route("/v2/templates/{id}/builds/{build}", post(start))
        .route("/templates/{id}/builds/{build}", delete(cancel))
        .route("/templates/{id}/builds/{build}/status", get(status))
        .route(
            "/templates/{id}/builds/{build}/logs/stream",
            get(log_stream),
        )
        .route("/templates/tags", post(assign_tags).delete(remove_tags))
        .route("/templates/{id}/tags", get(get_tags))
        .route("/templates/gc", post(gc))
}

/// Routes without the API key: the upload links (the token is the credential).
pub fn public_routes() -> Router<Arc<AppState>> {
    Router::new().route(&format!("{UPLOAD_PREFIX}{{token}}"), put(upload))
}

fn builds(state: &AppState) -> Result<&Arc<TemplateBuilds>, AppError> {
    state.builds.as_ref().ok_or_else(|| {
        AppError::Unavailable("template builds are not available on this server".into())
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewTemplate {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default, rename = "cpuCount")]
    cpu_count: Option<u32>,
    #[serde(default, rename = "memoryMB")]
    memory_mb: Option<u64>,
}

/// `POST /v3/templates`: 202 with the new build's ids.
async fn create(
    State(state): State<Arc<AppState>>,
    Body(req): Body<NewTemplate>,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let name = req
        .name
        .or(req.alias)
        .ok_or(super::BuildServiceError::MissingName)?;
    let new = b.create_build(NO_OWNER, &name, req.tags, req.cpu_count, req.memory_mb)?;
    let body = serde_json::json!({
        "templateID": new.template_id, "buildID": new.build_id, "public": false,
        "names": [new.template_id], "tags": new.tags, "aliases": [new.template_id],
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `GET /templates/{id}/files/{hash}`: 201 `{"present", "url"}`.
async fn files_link(
    State(state): State<Arc<AppState>>,
    Path((_id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| AppError::BadRequest("missing Host header".into()))?;
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("http");
    let (present, token) = b.files_link(NO_OWNER, &hash)?;
    let url = format!("{proto}://{host}{UPLOAD_PREFIX}{token}");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"present": present, "url": url})),
    )
        .into_response())
}

/// `PUT /_kiln/uploads/{token}`: the COPY context's archive.
async fn upload(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: RawBody,
) -> Result<StatusCode, AppError> {
    let b = builds(&state)?;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    b.upload(&token, declared, body.into_data_stream()).await?;
    Ok(StatusCode::OK)
}

/// `POST /v2/templates/{id}/builds/{buildID}`: 202; the build runs in the background.
async fn start(
    State(state): State<Arc<AppState>>,
    Path((id, build_id)): Path<(String, String)>,
    Body(spec): Body<BuildSpec>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.start_build(NO_OWNER, &id, &build_id, spec)?;
    Ok(StatusCode::ACCEPTED)
}

/// `DELETE /templates/{id}/builds/{buildID}` (Kiln's own): cancels a waiting or
/// running build, 204; 404 for an unknown build, 409 for a finished one.
async fn cancel(
    State(state): State<Arc<AppState>>,
    Path((id, build_id)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.cancel_build(NO_OWNER, &id, &build_id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    #[serde(default)]
    logs_offset: Option<usize>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /templates/{id}/builds/{buildID}/status?logsOffset=N&limit=M`.
async fn status(
    State(state): State<Arc<AppState>>,
    Path((id, build_id)): Path<(String, String)>,
    QueryParams(q): QueryParams<StatusQuery>,
) -> Result<Response, AppError> {
    let limit = q.limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
    let s = builds(&state)?
        .build_status(NO_OWNER, &id, &build_id, q.logs_offset.unwrap_or(0), limit)
        .await?;
    let logs: Vec<String> = s
        .entries
        .iter()
        .map(|e| format!("[{}] {}", e.timestamp.to_rfc3339(), e.message))
        .collect();
    let mut body = serde_json::json!({
        "templateID": id, "buildID": build_id, "status": s.status,
        "logs": logs, "logEntries": s.entries,
    });
    if let Some(r) = &s.reason {
        body["reason"] = serde_json::to_value(r).unwrap_or_default();
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// How often a log stream looks for new lines.
const STREAM_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// `GET /templates/{id}/builds/{buildID}/logs/stream` (Kiln's own): the build's log
/// from the start, one JSON object per line (`timestamp`, `level`, `message`, `step`)
/// as lines arrive, then one `{"status": "ready"|"error", "reason"?: {...}}` line, and
/// the end of the response.
async fn log_stream(
    State(state): State<Arc<AppState>>,
    Path((id, build_id)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let b = builds(&state)?.clone();
    // An unknown build is refused before the stream starts.
    b.build_status(NO_OWNER, &id, &build_id, 0, 0).await?;
    let lines = futures::stream::unfold(Some(0usize), move |offset| {
        let (b, id, build_id) = (b.clone(), id.clone(), build_id.clone());
        async move {
            let offset = offset?;
            loop {
                let s: BuildStatus = match b
                    .build_status(NO_OWNER, &id, &build_id, offset, MAX_LOG_PAGE)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return Some((Err(std::io::Error::other(e)), None)),
                };
                if !s.entries.is_empty() {
                    let mut chunk = Vec::new();
                    for e in &s.entries {
                        if serde_json::to_writer(&mut chunk, e).is_ok() {
                            chunk.push(b'\n');
                        }
                    }
                    let next = Some(offset + s.entries.len());
                    return Some((Ok(axum::body::Bytes::from(chunk)), next));
                }
                if s.status.is_final() {
                    let mut end = serde_json::json!({ "status": s.status });
                    if let Some(r) = s.reason {
                        end["reason"] = serde_json::to_value(r).unwrap_or_default();
                    }
                    let line = format!("{end}\n");
                    return Some((Ok(axum::body::Bytes::from(line)), None));
                }
                tokio::time::sleep(STREAM_POLL).await;
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        RawBody::from_stream(lines),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct AssignTags {
    target: String,
    tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RemoveTags {
    name: String,
    tags: Vec<String>,
}

/// `POST /templates/tags` (`Template.assign_tags`): 201 `{"tags", "buildID"}`.
async fn assign_tags(
    State(state): State<Arc<AppState>>,
    Body(req): Body<AssignTags>,
) -> Result<Response, AppError> {
    let t = builds(&state)?.assign_tags(NO_OWNER, &req.target, &req.tags)?;
    let body = serde_json::json!({"tags": req.tags, "buildID": build_uuid(&t.meta.build_hash)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /templates/tags` (`Template.remove_tags`): 204.
async fn remove_tags(
    State(state): State<Arc<AppState>>,
    Body(req): Body<RemoveTags>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.remove_tags(NO_OWNER, &req.name, &req.tags)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{id}/tags` (`Template.get_tags`): `[{"tag", "buildID", "createdAt"}]`.
async fn get_tags(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let (t, tags) = builds(&state)?.tags_of(NO_OWNER, &id)?;
    let build_id = build_uuid(&t.meta.build_hash);
    let body: Vec<serde_json::Value> = tags
        .into_iter()
        .map(|(tag, info)| {
            serde_json::json!({"tag": tag, "buildID": build_id, "createdAt": info.created_at})
        })
        .collect();
    Ok(Json(body).into_response())
}

fn template_json(t: &Template) -> serde_json::Value {
    serde_json::json!({
        "templateID": t.name, "buildID": build_uuid(&t.meta.build_hash),
        "cpuCount": t.meta.cpu_count, "memoryMB": t.meta.memory_mb,
        "diskSizeMB": t.meta.disk_size_mb, "public": false,
        "aliases": [t.name], "names": [t.name],
        "createdAt": t.meta.created_at, "updatedAt": t.meta.created_at,
        "createdBy": null, "lastSpawnedAt": null, "spawnCount": 0, "buildCount": 1,
        "buildStatus": "ready", "envdVersion": t.meta.envd_version,
    })
}

/// A stable UUID-shaped id for a template version (its build hash).
fn build_uuid(hash: &str) -> String {
    let h: String = hash
        .chars()
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

async fn list(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    let list = builds(&state)?.list(NO_OWNER)?;
    Ok(Json(list.iter().map(template_json).collect::<Vec<_>>()).into_response())
}

async fn detail(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let t = builds(&state)?.template(NO_OWNER, &id)?;
    let mut v = template_json(&t);
    v["builds"] = serde_json::json!([{
        "buildID": build_uuid(&t.meta.build_hash), "status": "ready",
        "createdAt": t.meta.created_at, "updatedAt": t.meta.created_at,
        "finishedAt": t.meta.created_at, "cpuCount": t.meta.cpu_count,
        "memoryMB": t.meta.memory_mb, "envdVersion": t.meta.envd_version,
    }]);
    Ok(Json(v).into_response())
}

async fn alias(
    State(state): State<Arc<AppState>>,
    Path(alias): Path<String>,
) -> Result<Response, AppError> {
    let t = builds(&state)?.template(NO_OWNER, &alias)?;
    Ok(Json(serde_json::json!({"templateID": t.name, "public": false})).into_response())
}

/// `DELETE /templates/{id}`: 204, once the builds of that template are done.
async fn remove(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.remove_template(NO_OWNER, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /templates/gc` body (Kiln's own endpoint; empty: the configured policy).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GcRequest {
    /// Keep unreachable cache entries used within this many days.
    #[serde(default)]
    keep_unused_days: Option<f64>,
}

/// Collects the template caches now (after builds in progress finish) and answers
/// what was removed and freed.
async fn gc(
    State(state): State<Arc<AppState>>,
    OptionalBody(req): OptionalBody<GcRequest>,
) -> Result<Response, AppError> {
    let report = builds(&state)?.gc(req.keep_unused_days).await?;
    Ok(Json(report).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_uuids_are_uuid_shaped() {
        let u = build_uuid(&"ab".repeat(32));
        assert!(uuid::Uuid::parse_str(&u).is_ok(), "{u}");
    }
}
