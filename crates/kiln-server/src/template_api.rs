//! The HTTP face of [`TemplateBuilds`]: the E2B template routes as the Template SDK
//! drives them — `POST /v3/templates` → per COPY `GET /templates/{id}/files/{hash}`
//! (+ `PUT` of the archive to the upload link) → `POST /v2/templates/{id}/builds/{buildID}`
//! → polling `GET /templates/{id}/builds/{buildID}/status`; list, get, delete, alias,
//! tags — and Kiln's own: the NDJSON log stream, cancel, gc. Each handler reads the
//! request, calls the service and shapes its answer.

use std::sync::Arc;

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_template::recipe::BuildSpec;
use kiln_template::Template;
use serde::Deserialize;

use crate::authz::Caller;
use crate::builds::{BuildServiceError, BuildStatus, TemplateBuilds, MAX_LOG_PAGE, UPLOAD_PREFIX};
use crate::endpoint::{Access, Endpoint};
use crate::error::AppError;
use crate::extract::{Body, OptionalBody, QueryParams};
use crate::state::AppState;

/// The template endpoints. Upload links carry no API key: the token in the link is
/// the credential (it is `UPLOAD_PREFIX` + token).
pub fn endpoints() -> Vec<Endpoint> {
    use Access::{Admin, Member, Public};
    vec![
        Endpoint::new(
            Method::POST,
            "/v3/templates",
            Member,
            "Create a template build (E2B Template SDK)",
            create,
        ),
        Endpoint::new(
            Method::GET,
            "/templates",
            Member,
            "List the templates the caller may use",
            list,
        ),
        Endpoint::new(
            Method::GET,
            "/templates/{id}",
            Member,
            "Get a template",
            detail,
        ),
        Endpoint::new(
            Method::DELETE,
            "/templates/{id}",
            Member,
            "Delete a template",
            remove,
        ),
        Endpoint::new(
            Method::GET,
            "/templates/aliases/{alias}",
            Member,
            "Resolve a template alias",
            alias,
        ),
        Endpoint::new(
            Method::GET,
            "/templates/{id}/files/{hash}",
            Member,
            "An upload link for a COPY context",
            files_link,
        ),
        Endpoint::new(
            Method::PUT,
            "/_kiln/uploads/{token}",
            Public,
            "Upload a COPY context (the link's token is the credential)",
            upload,
        ),
        Endpoint::new(
            Method::POST,
            "/v2/templates/{id}/builds/{build}",
            Member,
            "Start a build with its recipe",
            start,
        ),
        Endpoint::new(
            Method::DELETE,
            "/templates/{id}/builds/{build}",
            Member,
            "Cancel a waiting or running build",
            cancel,
        ),
        Endpoint::new(
            Method::GET,
            "/templates/{id}/builds/{build}/status",
            Member,
            "A build's status and a page of its log",
            status,
        ),
        Endpoint::new(
            Method::GET,
            "/templates/{id}/builds/{build}/logs/stream",
            Member,
            "A build's log as NDJSON, as it runs",
            log_stream,
        ),
        Endpoint::new(
            Method::POST,
            "/templates/tags",
            Member,
            "Tag a template version",
            assign_tags,
        ),
        Endpoint::new(
            Method::DELETE,
            "/templates/tags",
            Member,
            "Remove tags",
            remove_tags,
        ),
        Endpoint::new(
            Method::GET,
            "/templates/{id}/tags",
            Member,
            "A template's tags",
            get_tags,
        ),
        Endpoint::new(
            Method::POST,
            "/templates/gc",
            Admin,
            "Collect the template caches (every team's)",
            gc,
        ),
    ]
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
    Extension(caller): Extension<Caller>,
    Body(req): Body<NewTemplate>,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let name = req
        .name
        .or(req.alias)
        .ok_or(BuildServiceError::MissingName)?;
    let new = b.create_build(&caller, &name, req.tags, req.cpu_count, req.memory_mb)?;
    let body = serde_json::json!({
        "templateID": new.template_id, "buildID": new.build_id, "public": false,
        "names": [new.template_id], "tags": new.tags, "aliases": [new.template_id],
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `GET /templates/{id}/files/{hash}`: 201 `{"present", "url"}`.
async fn files_link(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
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
    let (present, token) = b.files_link(&caller, &hash)?;
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
    Extension(caller): Extension<Caller>,
    Path((id, build_id)): Path<(String, String)>,
    Body(spec): Body<BuildSpec>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.start_build(&caller, &id, &build_id, spec)?;
    Ok(StatusCode::ACCEPTED)
}

/// `DELETE /templates/{id}/builds/{buildID}` (Kiln's own): cancels a waiting or
/// running build, 204; 404 for an unknown build, 409 for a finished one.
async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((id, build_id)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.cancel_build(&caller, &id, &build_id)?;
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
    Extension(caller): Extension<Caller>,
    Path((id, build_id)): Path<(String, String)>,
    QueryParams(q): QueryParams<StatusQuery>,
) -> Result<Response, AppError> {
    let limit = q.limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
    let s = builds(&state)?
        .build_status(&caller, &id, &build_id, q.logs_offset.unwrap_or(0), limit)
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
    Extension(caller): Extension<Caller>,
    Path((id, build_id)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let b = builds(&state)?.clone();
    // An unknown build is refused before the stream starts.
    b.build_status(&caller, &id, &build_id, 0, 0).await?;
    let lines = futures::stream::unfold(Some(0usize), move |offset| {
        let (b, id, build_id) = (b.clone(), id.clone(), build_id.clone());
        async move {
            let offset = offset?;
            loop {
                let s: BuildStatus = match b
                    .build_status(&caller, &id, &build_id, offset, MAX_LOG_PAGE)
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
    Extension(caller): Extension<Caller>,
    Body(req): Body<AssignTags>,
) -> Result<Response, AppError> {
    let t = builds(&state)?.assign_tags(&caller, &req.target, &req.tags)?;
    let body = serde_json::json!({"tags": req.tags, "buildID": build_uuid(&t.meta.build_hash)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /templates/tags` (`Template.remove_tags`): 204.
async fn remove_tags(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Body(req): Body<RemoveTags>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.remove_tags(&caller, &req.name, &req.tags)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{id}/tags` (`Template.get_tags`): `[{"tag", "buildID", "createdAt"}]`.
async fn get_tags(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let (t, tags) = builds(&state)?.tags_of(&caller, &id)?;
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

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, AppError> {
    let list = builds(&state)?.list(&caller)?;
    Ok(Json(list.iter().map(template_json).collect::<Vec<_>>()).into_response())
}

async fn detail(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let t = builds(&state)?.template(&caller, &id)?;
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
    Extension(caller): Extension<Caller>,
    Path(alias): Path<String>,
) -> Result<Response, AppError> {
    let t = builds(&state)?.template(&caller, &alias)?;
    Ok(Json(serde_json::json!({"templateID": t.name, "public": false})).into_response())
}

/// `DELETE /templates/{id}`: 204, once the builds of that template are done.
async fn remove(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    builds(&state)?.remove_template(&caller, &id).await?;
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
