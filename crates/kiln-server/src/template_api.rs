//! The E2B template build API, as the Template SDK drives it (spec part C):
//! `POST /v3/templates` → per COPY `GET /templates/{id}/files/{hash}` (+ `PUT` of the
//! archive to the upload link, served here at `/_kiln/uploads/{token}`) →
//! `POST /v2/templates/{id}/builds/{buildID}` → polling
//! `GET /templates/{id}/builds/{buildID}/status`. Plus list, get, delete, alias.
//!
//! The template id is the template's name (its alias). Builds run one at a time in a
//! background task ([`kiln_template::TemplateStore::build`]). Their state and logs live
//! in memory and are written to `templates/.builds/<buildID>.json` whenever the status
//! changes, so a build's outcome survives a restart (a build cut short by one is
//! reported as failed, with that reason). A finished build is registered in
//! [`Templates`] at once. Besides the SDK's polling, `GET
//! /templates/{id}/builds/{buildID}/logs/stream` streams a build's log as NDJSON.
//! After each successful build and each delete, and on `POST /templates/gc`, the
//! template caches are garbage-collected ([`kiln_template::gc`]).

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use kiln_template::build::{BuildError, BuildLog, BuildRequest, LogLevel, StepRunner};
use kiln_template::recipe::{is_files_hash, BuildSpec};
use kiln_template::{GcPolicy, Template, TemplateStore};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::api::{Body, OptionalBody, QueryParams};
use crate::app::AppState;
use crate::error::{chain, AppError};
use crate::manager::SandboxManager;
use crate::templates::{TemplateDefaults, TemplateInfo, Templates};

/// Path prefix of upload links (no API key: the token in the link is the credential).
pub const UPLOAD_PREFIX: &str = "/_kiln/uploads/";
const MAX_LOG_PAGE: usize = 100;
/// Build records kept on disk across restarts.
const KEPT_RECORDS: usize = 200;

/// Builds in progress and done, and the upload links handed out.
pub struct TemplateBuilds {
    store: TemplateStore,
    files_dir: PathBuf,
    runner: Arc<dyn StepRunner>,
    templates: Arc<Templates>,
    builds: Mutex<HashMap<String, BuildRecord>>,
    /// Upload token → files hash.
    uploads: Mutex<HashMap<String, String>>,
    /// One build at a time.
    queue: tokio::sync::Mutex<()>,
    tags: Mutex<TagMap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Waiting,
    Building,
    Ready,
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogEntry {
    timestamp: DateTime<Utc>,
    level: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reason {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildRecord {
    template_id: String,
    status: Status,
    logs: Vec<LogEntry>,
    reason: Option<Reason>,
    cpu_count: u32,
    memory_mb: u64,
    /// Tags the build was created with (besides `default`), given to the template
    /// when the build succeeds.
    #[serde(default)]
    tags: Vec<String>,
}

/// When a tag was given to a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TagInfo {
    #[serde(rename = "createdAt")]
    created_at: DateTime<Utc>,
}

/// Tags by template name, kept in `templates/.tags.json`. Kiln keeps one version per
/// template, so every tag names that version (the SDK's `name:tag` resolves to it).
type TagMap = std::collections::BTreeMap<String, std::collections::BTreeMap<String, TagInfo>>;

impl TemplateBuilds {
    /// Build service over the store in `data_dir`; commands run through `runner`.
    pub fn open(
        data_dir: &FsPath,
        runner: Arc<dyn StepRunner>,
        templates: Arc<Templates>,
    ) -> Result<Self, kiln_template::TemplateError> {
        let store = TemplateStore::open(data_dir)?;
        let files_dir = store.templates_dir().join(".files");
        std::fs::create_dir_all(&files_dir).map_err(|source| kiln_template::TemplateError::Io {
            path: files_dir.clone(),
            source,
        })?;
        let this = Self {
            store,
            files_dir,
            runner,
            templates,
            builds: Mutex::default(),
            uploads: Mutex::default(),
            queue: tokio::sync::Mutex::new(()),
            tags: Mutex::default(),
        };
        this.load_records();
        *this.tags.lock().unwrap_or_else(|e| e.into_inner()) = this.load_tags();
        Ok(this)
    }

    fn tags_path(&self) -> PathBuf {
        self.store.templates_dir().join(".tags.json")
    }

    fn load_tags(&self) -> TagMap {
        std::fs::read(self.tags_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Changes the tags of `name` under the lock and writes them out.
    fn update_tags<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut std::collections::BTreeMap<String, TagInfo>) -> T,
    ) -> Result<T, AppError> {
        let mut all = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(all.entry(name.to_string()).or_default());
        all.retain(|_, t| !t.is_empty());
        let json = serde_json::to_vec(&*all).map_err(|e| AppError::internal("saving tags", e))?;
        let tmp = self.tags_path().with_extension("json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, self.tags_path()))
            .map_err(|e| AppError::internal("saving tags", e))?;
        Ok(out)
    }

    /// The tags of `name`, `default` first.
    fn tags_of(&self, name: &str) -> Vec<(String, TagInfo)> {
        let all = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, TagInfo)> = all
            .get(name)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        out.sort_by_key(|(t, _)| (t != "default", t.clone()));
        out
    }

    fn records_dir(&self) -> PathBuf {
        self.store.templates_dir().join(".builds")
    }

    /// Writes build `build_id`'s record (status, reason, logs) to disk; a failure is
    /// logged, the build goes on.
    fn persist(&self, build_id: &str) {
        let Ok(record) = self.with_build(build_id, |r| r.clone()) else {
            return;
        };
        let dir = self.records_dir();
        let path = dir.join(format!("{build_id}.json"));
        let tmp = dir.join(format!(".{build_id}.json.tmp"));
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
                std::fs::write(&tmp, json)
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(build = %build_id, error = %e, "saving the build record failed");
        }
    }

    /// Reads the records of earlier runs (newest [`KEPT_RECORDS`]; older ones are
    /// removed). A build that was waiting or running when the server stopped failed.
    fn load_records(&self) {
        let Ok(entries) = std::fs::read_dir(self.records_dir()) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| {
                let mtime = e.metadata().and_then(|m| m.modified());
                (mtime.unwrap_or(std::time::UNIX_EPOCH), e.path())
            })
            .collect();
        files.sort();
        let old = files.len().saturating_sub(KEPT_RECORDS);
        for (_, path) in files.drain(..old) {
            let _ = std::fs::remove_file(path);
        }
        for (_, path) in files {
            let Some(build_id) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            let record = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<BuildRecord>(&b).ok());
            let Some(mut record) = record else {
                tracing::warn!(path = %path.display(), "unreadable build record; ignored");
                continue;
            };
            let interrupted = matches!(record.status, Status::Waiting | Status::Building);
            if interrupted {
                let message = "the build was interrupted: kiln serve stopped before it \
                               finished; start the build again"
                    .to_string();
                record.status = Status::Error;
                record.logs.push(LogEntry {
                    timestamp: Utc::now(),
                    level: "error".into(),
                    message: format!("Build failed: {message}"),
                    step: None,
                });
                record.reason = Some(Reason {
                    message,
                    step: None,
                });
            }
            self.builds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(build_id.clone(), record);
            if interrupted {
                self.persist(&build_id);
            }
        }
    }

    /// Registers every built template of the store (not `base`, which the server
    /// builds and registers itself).
    pub fn register_all(&self) {
        match self.store.list() {
            Ok(list) => {
                for t in list.iter().filter(|t| t.name != kiln_template::BASE) {
                    self.templates.insert(info_of(t));
                }
            }
            Err(e) => tracing::warn!(error = %chain(&e), "listing templates failed"),
        }
    }

    fn with_build<T>(
        &self,
        build_id: &str,
        f: impl FnOnce(&mut BuildRecord) -> T,
    ) -> Result<T, AppError> {
        let mut builds = self.builds.lock().unwrap_or_else(|e| e.into_inner());
        builds
            .get_mut(build_id)
            .map(f)
            .ok_or_else(|| AppError::BadRequest(format!("Build '{build_id}' not found")))
    }

    fn push_log(&self, build_id: &str, l: BuildLog) {
        let level = match l.level {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        let _ = self.with_build(build_id, |b| {
            b.logs.push(LogEntry {
                timestamp: Utc::now(),
                level: level.to_string(),
                message: l.message,
                step: l.step,
            })
        });
    }

    async fn run_build(self: Arc<Self>, req: BuildRequest, manager: Arc<SandboxManager>) {
        let _one_at_a_time = self.queue.lock().await;
        let id = req.build_id.clone();
        let this = self.clone();
        let mut on_log = move |l: BuildLog| this.push_log(&id, l);
        let result = self
            .store
            .build(&req, self.runner.as_ref(), &mut on_log)
            .await;
        let id = req.build_id.clone();
        match result {
            Ok(t) => {
                let tags = self.with_build(&id, |b| b.tags.clone()).unwrap_or_default();
                let tagged = self.update_tags(&t.name, |map| {
                    for tag in std::iter::once("default".to_string()).chain(tags) {
                        map.entry(tag).or_insert(TagInfo {
                            created_at: Utc::now(),
                        });
                    }
                });
                if let Err(e) = tagged {
                    tracing::warn!(template = %t.name, error = %e, "tagging the build failed");
                }
                self.templates.insert(info_of(&t));
                manager.discard_pool(&t.name).await;
                let _ = self.with_build(&id, |b| b.status = Status::Ready);
                self.persist(&id);
                tracing::info!(template = %t.name, build = %id, "template built");
                self.collect_garbage("build").await;
            }
            Err(e) => {
                let message = failure_message(&e);
                tracing::warn!(template = %req.name, build = %id, error = %message, "template build failed");
                self.push_log(
                    &id,
                    BuildLog {
                        level: LogLevel::Error,
                        step: e.step(),
                        message: format!("Build failed: {message}"),
                    },
                );
                let _ = self.with_build(&id, |b| {
                    b.status = Status::Error;
                    b.reason = Some(Reason {
                        message,
                        step: e.step(),
                    });
                });
                self.persist(&id);
            }
        }
    }
}

impl TemplateBuilds {
    /// Builds a Dockerfile project in-process (the server's built-in templates): the
    /// same build as one started through the API, its log lines also going to the
    /// server's log. Returns the template as served, or the failure's message.
    pub async fn build_project(
        self: &Arc<Self>,
        project: kiln_template::dockerfile::Project,
        manager: Arc<SandboxManager>,
    ) -> Result<TemplateInfo, String> {
        for up in &project.uploads {
            let path = self.files_dir.join(&up.files_hash);
            if path.is_file() {
                continue;
            }
            let tmp = self
                .files_dir
                .join(format!(".{}.builtin.part", up.files_hash));
            std::fs::write(&tmp, &up.archive)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("storing the files of {}: {e}", path.display()))?;
        }
        let spec: BuildSpec = serde_json::from_value(project.recipe.spec)
            .map_err(|e| format!("the recipe is not a build spec: {e}"))?;
        spec.base().map_err(|e| e.to_string())?;
        spec.runtime().map_err(|e| e.to_string())?;
        spec.parse_steps().map_err(|e| e.to_string())?;
        let build_id = uuid::Uuid::new_v4().to_string();
        self.builds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                build_id.clone(),
                BuildRecord {
                    template_id: project.name.clone(),
                    status: Status::Building,
                    logs: Vec::new(),
                    reason: None,
                    cpu_count: project.cpu_count,
                    memory_mb: project.memory_mb,
                    tags: Vec::new(),
                },
            );
        self.persist(&build_id);
        let req = BuildRequest {
            name: project.name.clone(),
            build_id: build_id.clone(),
            spec,
            files_dir: self.files_dir.clone(),
            cpu_count: project.cpu_count,
            memory_mb: project.memory_mb,
        };
        let mut build = tokio::spawn(self.clone().run_build(req, manager));
        let mut printed = 0;
        loop {
            let done = tokio::time::timeout(std::time::Duration::from_millis(500), &mut build)
                .await
                .is_ok();
            let (status, reason, lines) = self
                .with_build(&build_id, |r| {
                    let lines: Vec<String> = r.logs[printed.min(r.logs.len())..]
                        .iter()
                        .map(|l| l.message.clone())
                        .collect();
                    (r.status, r.reason.clone(), lines)
                })
                .map_err(|e| e.to_string())?;
            printed += lines.len();
            for line in lines {
                tracing::info!(template = %project.name, "{line}");
            }
            if !done {
                continue;
            }
            return match status {
                Status::Ready => self
                    .store
                    .get(&project.name)
                    .ok()
                    .flatten()
                    .map(|t| info_of(&t))
                    .ok_or_else(|| format!("{} was built but is not in the store", project.name)),
                _ => Err(reason
                    .map(|r| match r.step {
                        Some(step) => format!("step {step}: {}", r.message),
                        None => r.message,
                    })
                    .unwrap_or_else(|| "the build ended without a result".into())),
            };
        }
    }
}

impl TemplateBuilds {
    /// Removes the layers, uploads, images and bases no template needs any more
    /// ([`TemplateStore::gc`], policy from `KILN_TEMPLATE_CACHE_DAYS`); failures are
    /// only logged.
    async fn collect_garbage(&self, after: &str) {
        match self.store.gc(&gc_policy()).await {
            Ok(r) => tracing::info!(
                after,
                removed_layers = r.removed_layers,
                removed_uploads = r.removed_uploads,
                removed_images = r.removed_images,
                removed_bases = r.removed_bases,
                freed_bytes = r.freed_bytes,
                "template cache collected"
            ),
            Err(e) => {
                tracing::warn!(after, error = %chain(&e), "collecting the template cache failed")
            }
        }
    }
}

/// The configured garbage-collection policy (the default when the setting is bad).
fn gc_policy() -> GcPolicy {
    GcPolicy::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "{}: using the default", kiln_template::gc::KEEP_DAYS_ENV);
        GcPolicy::default()
    })
}

/// The client's message for a failed build: the step, the cause, the output's tail.
fn failure_message(e: &BuildError) -> String {
    match e {
        BuildError::Step { tail, .. } if !tail.is_empty() => {
            format!("{e}\nlast output:\n{}", tail.join("\n"))
        }
        BuildError::Store(_) | BuildError::Layer(_) => format!("internal error: {}", chain(e)),
        _ => chain(e),
    }
}

/// What a create needs to know about a built template.
pub fn info_of(t: &Template) -> TemplateInfo {
    TemplateInfo {
        name: t.name.clone(),
        // The resolved layer, so a later build does not move a running sandbox's lower.
        rootfs: std::fs::canonicalize(&t.rootfs).unwrap_or_else(|_| t.rootfs.clone()),
        meta: TemplateDefaults {
            default_user: Some(t.meta.default_user.clone()),
            default_workdir: Some(t.meta.default_workdir.clone()),
            cpu_count: Some(t.meta.cpu_count),
            memory_mb: Some(t.meta.memory_mb),
            start_cmd: t.meta.start_cmd.clone(),
            ready_cmd: t.meta.ready_cmd.clone(),
            envs: t.meta.envs.clone(),
            runtime: t
                .meta
                .runtime
                .as_deref()
                .and_then(kiln_runtime::RuntimeKind::parse),
        },
    }
}

/// Routes behind the API key.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v3/templates", post(create))
        .route("/templates", get(list))
        .route("/templates/{id}", get(detail).delete(remove))
        .route("/templates/aliases/{alias}", get(alias))
        .route("/templates/{id}/files/{hash}", get(files_link))
        .route("/v2/templates/{id}/builds/{build}", post(start))
        .route("/templates/{id}/builds/{build}/status", get(status))
        .route(
            "/templates/{id}/builds/{build}/logs/stream",
            get(log_stream),
        )
        .route("/templates/tags", post(assign_tags).delete(remove_tags))
        .route("/templates/{id}/tags", get(get_tags))
        .route("/templates/gc", post(gc))
}

/// Routes without the API key: the upload links.
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

/// `alias`, `alias:tag` or `namespace/alias:tag` → (alias, tags).
fn parse_name(name: &str) -> Result<(String, Vec<String>), AppError> {
    let name = name.trim().to_ascii_lowercase();
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) => (p.to_string(), Some(t.to_string())),
        None => (name.clone(), None),
    };
    let alias = path.rsplit('/').next().unwrap_or("").to_string();
    let ok = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b"-_".contains(&b)
                    || extra.contains(&b)
            })
    };
    if !ok(&alias, b"") || alias.len() > 64 || !alias.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(AppError::BadRequest(format!(
            "invalid template name {name:?}: use alias, alias:tag or namespace/alias:tag, \
             with an alias of 1-64 of a-z, 0-9, '-' and '_'"
        )));
    }
    let tags = match tag {
        Some(t) if !ok(&t, b".") => {
            return Err(AppError::BadRequest(format!(
                "invalid tag {t:?}: use a-z, 0-9, '-', '_' and '.'"
            )))
        }
        Some(t) if t != "default" => vec![t],
        _ => vec![],
    };
    Ok((alias, tags))
}

async fn create(
    State(state): State<Arc<AppState>>,
    Body(req): Body<NewTemplate>,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let raw = req.name.or(req.alias).ok_or_else(|| {
        AppError::BadRequest("give the template a name (\"name\": \"alias[:tag]\")".into())
    })?;
    let (alias, mut tags) = parse_name(&raw)?;
    if alias == kiln_template::BASE {
        return Err(AppError::BadRequest(
            "\"base\" is Kiln's built-in template; build yours under another name".into(),
        ));
    }
    tags.extend(req.tags.into_iter().filter(|t| t != "default"));
    if tags.is_empty() {
        tags.push("default".into());
    }
    let cpu_count = req.cpu_count.unwrap_or(2);
    let memory_mb = req.memory_mb.unwrap_or(1024);
    if !(1..=64).contains(&cpu_count) || !(128..=65536).contains(&memory_mb) {
        return Err(AppError::BadRequest(
            "cpuCount must be 1-64 and memoryMB 128-65536".into(),
        ));
    }
    let build_id = uuid::Uuid::new_v4().to_string();
    b.builds.lock().unwrap_or_else(|e| e.into_inner()).insert(
        build_id.clone(),
        BuildRecord {
            template_id: alias.clone(),
            status: Status::Waiting,
            logs: Vec::new(),
            reason: None,
            cpu_count,
            memory_mb,
            tags: tags.iter().filter(|t| *t != "default").cloned().collect(),
        },
    );
    b.persist(&build_id);
    let body = serde_json::json!({
        "templateID": alias, "buildID": build_id, "public": false,
        "names": [alias], "tags": tags, "aliases": [alias],
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

async fn files_link(
    State(state): State<Arc<AppState>>,
    Path((_id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    if !is_files_hash(&hash) {
        return Err(AppError::BadRequest(format!(
            "files hash {hash:?} must be 64 lower-case hex digits"
        )));
    }
    let present = b.files_dir.join(&hash).is_file();
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| AppError::BadRequest("missing Host header".into()))?;
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("http");
    let token = hex::encode(rand::random::<[u8; 16]>());
    b.uploads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token.clone(), hash);
    let url = format!("{proto}://{host}{UPLOAD_PREFIX}{token}");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"present": present, "url": url})),
    )
        .into_response())
}

/// Largest uploaded COPY context accepted, in bytes as sent (1 GiB).
pub const MAX_UPLOAD_BYTES: u64 = 1 << 30;

async fn upload(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: RawBody,
) -> Result<StatusCode, AppError> {
    let b = builds(&state)?;
    let hash = b
        .uploads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&token)
        .ok_or_else(|| AppError::NotFound("unknown or used upload link".into()))?;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES) {
        return Err(too_large(MAX_UPLOAD_BYTES));
    }
    let stream = body.into_data_stream();
    store_upload(&b.files_dir, &hash, &token, stream, MAX_UPLOAD_BYTES).await?;
    Ok(StatusCode::OK)
}

fn too_large(limit: u64) -> AppError {
    AppError::PayloadTooLarge(format!(
        "the uploaded files are larger than {limit} bytes, the limit for one COPY context"
    ))
}

/// Stores an uploaded COPY context as `<files_dir>/<hash>`: write once (a context
/// already stored under `hash` is kept, as E2B's `present: true` says, and the upload is
/// discarded), at most `limit` bytes ([`MAX_UPLOAD_BYTES`]), written to a temporary file that is then
/// linked into place (`link(2)` never replaces, so two concurrent uploads for one hash
/// cannot both land).
async fn store_upload<S, B, E>(
    files_dir: &FsPath,
    hash: &str,
    token: &str,
    mut stream: S,
    limit: u64,
) -> Result<(), AppError>
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    // The hash names a file: only what `files_link` accepted gets here; checked again.
    if !is_files_hash(hash) {
        return Err(AppError::BadRequest(format!(
            "files hash {hash:?} must be 64 lower-case hex digits"
        )));
    }
    let path = files_dir.join(hash);
    if tokio::fs::symlink_metadata(&path).await.is_ok() {
        return Ok(());
    }
    let tmp = files_dir.join(format!(".{hash}.{token}.part"));
    let io = |e: std::io::Error| AppError::internal("storing the uploaded files failed", e);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .await
        .map_err(io)?;
    let written = async {
        let mut size: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| AppError::BadRequest(format!("upload interrupted: {e}")))?;
            let chunk = chunk.as_ref();
            size += chunk.len() as u64;
            if size > limit {
                return Err(too_large(limit));
            }
            file.write_all(chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        match tokio::fs::hard_link(&tmp, &path).await {
            // Another upload for this hash landed first: it is kept.
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io(e)),
        }
    }
    .await;
    let _ = tokio::fs::remove_file(&tmp).await;
    written
}

async fn start(
    State(state): State<Arc<AppState>>,
    Path((id, build_id)): Path<(String, String)>,
    Body(spec): Body<BuildSpec>,
) -> Result<StatusCode, AppError> {
    let b = builds(&state)?;
    // Reject a recipe Kiln cannot build before accepting it.
    spec.base()
        .map_err(|e| AppError::BadRequest(e.to_string()))?;
    spec.parse_steps()
        .map_err(|e| AppError::BadRequest(e.to_string()))?;
    let (name, cpu_count, memory_mb) = b.with_build(&build_id, |r| {
        if r.template_id != id {
            return Err(AppError::BadRequest(format!(
                "build {build_id} belongs to template {}, not {id}",
                r.template_id
            )));
        }
        if r.status != Status::Waiting {
            return Err(AppError::BadRequest("build is not in waiting state".into()));
        }
        r.status = Status::Building;
        Ok((r.template_id.clone(), r.cpu_count, r.memory_mb))
    })??;
    b.persist(&build_id);
    let req = BuildRequest {
        name,
        build_id,
        spec,
        files_dir: b.files_dir.clone(),
        cpu_count,
        memory_mb,
    };
    tokio::spawn(b.clone().run_build(req, state.manager.clone()));
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    #[serde(default)]
    logs_offset: Option<usize>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn status(
    State(state): State<Arc<AppState>>,
    Path((id, build_id)): Path<(String, String)>,
    QueryParams(q): QueryParams<StatusQuery>,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let record = b.with_build(&build_id, |r| r.clone())?;
    if record.template_id != id {
        return Err(AppError::BadRequest(format!(
            "Build '{build_id}' not found"
        )));
    }
    let offset = q.logs_offset.unwrap_or(0).min(record.logs.len());
    let limit = q.limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
    let entries: Vec<&LogEntry> = record.logs[offset..].iter().take(limit).collect();
    let logs: Vec<String> = entries
        .iter()
        .map(|e| format!("[{}] {}", e.timestamp.to_rfc3339(), e.message))
        .collect();
    let mut body = serde_json::json!({
        "templateID": id, "buildID": build_id, "status": record.status,
        "logs": logs, "logEntries": entries,
    });
    if let Some(r) = &record.reason {
        body["reason"] = serde_json::to_value(r).unwrap_or_default();
    }
    Ok((StatusCode::OK, Json(body)).into_response())
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

/// The template behind `name[:tag]` and the tag, checked to exist.
fn tagged_template(b: &TemplateBuilds, target: &str) -> Result<(Template, String), AppError> {
    let (name, tags) = parse_name(target)?;
    if target.trim_end().ends_with(':') {
        return Err(AppError::BadRequest(format!(
            "invalid target {target:?}: give name or name:tag"
        )));
    }
    let t = find(b, &name)?;
    let tag = tags.into_iter().next().unwrap_or_else(|| "default".into());
    if tag != "default" && !b.tags_of(&name).iter().any(|(t, _)| *t == tag) {
        return Err(AppError::NotFound(format!(
            "template {name:?} has no tag {tag:?}"
        )));
    }
    Ok((t, tag))
}

fn check_tag(tag: &str) -> Result<(), AppError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "invalid tag {tag:?}: use 1-128 of a-z, 0-9, '-', '_' and '.'"
        )))
    }
}

/// `POST /templates/tags` (`Template.assign_tags`): 201 `{"tags", "buildID"}`.
async fn assign_tags(
    State(state): State<Arc<AppState>>,
    Body(req): Body<AssignTags>,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let (t, _) = tagged_template(b, &req.target)?;
    if req.tags.is_empty() {
        return Err(AppError::BadRequest("give at least one tag".into()));
    }
    for tag in &req.tags {
        check_tag(tag)?;
    }
    b.update_tags(&t.name, |map| {
        for tag in &req.tags {
            map.insert(
                tag.clone(),
                TagInfo {
                    created_at: Utc::now(),
                },
            );
        }
    })?;
    let body = serde_json::json!({"tags": req.tags, "buildID": build_uuid(&t.meta.build_hash)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /templates/tags` (`Template.remove_tags`): 204.
async fn remove_tags(
    State(state): State<Arc<AppState>>,
    Body(req): Body<RemoveTags>,
) -> Result<StatusCode, AppError> {
    let b = builds(&state)?;
    let t = find(b, &req.name)?;
    if req.tags.iter().any(|t| t == "default") {
        return Err(AppError::BadRequest(
            "the default tag cannot be removed; delete the template instead".into(),
        ));
    }
    let have: Vec<String> = b.tags_of(&t.name).into_iter().map(|(t, _)| t).collect();
    if let Some(missing) = req.tags.iter().find(|t| !have.contains(t)) {
        return Err(AppError::NotFound(format!(
            "template {:?} has no tag {missing:?}",
            t.name
        )));
    }
    b.update_tags(&t.name, |map| {
        for tag in &req.tags {
            map.remove(tag);
        }
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{id}/tags` (`Template.get_tags`): `[{"tag", "buildID", "createdAt"}]`.
async fn get_tags(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let t = find(b, &id)?;
    let build_id = build_uuid(&t.meta.build_hash);
    let mut tags = b.tags_of(&t.name);
    if !tags.iter().any(|(tag, _)| tag == "default") {
        // Built before tags were kept (or `base`): its version is the default.
        tags.insert(
            0,
            (
                "default".into(),
                TagInfo {
                    created_at: t.meta.created_at,
                },
            ),
        );
    }
    let body: Vec<serde_json::Value> = tags
        .into_iter()
        .map(|(tag, info)| {
            serde_json::json!({"tag": tag, "buildID": build_id, "createdAt": info.created_at})
        })
        .collect();
    Ok(Json(body).into_response())
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
    let owner = b.with_build(&build_id, |r| r.template_id.clone())?;
    if owner != id {
        return Err(AppError::BadRequest(format!(
            "Build '{build_id}' not found"
        )));
    }
    let lines = futures::stream::unfold(Some((b, build_id, 0usize)), |st| async move {
        let (b, build_id, offset) = st?;
        loop {
            let snapshot = b.with_build(&build_id, |r| {
                let new: Vec<LogEntry> = r.logs[offset.min(r.logs.len())..].to_vec();
                (r.status, r.reason.clone(), new)
            });
            let Ok((status, reason, new)) = snapshot else {
                return None;
            };
            if !new.is_empty() {
                let mut chunk = Vec::new();
                for e in &new {
                    if serde_json::to_writer(&mut chunk, e).is_ok() {
                        chunk.push(b'\n');
                    }
                }
                let next = Some((b, build_id, offset + new.len()));
                return Some((
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk)),
                    next,
                ));
            }
            if matches!(status, Status::Ready | Status::Error) {
                let mut end = serde_json::json!({ "status": status });
                if let Some(r) = reason {
                    end["reason"] = serde_json::to_value(r).unwrap_or_default();
                }
                let line = format!("{end}\n");
                return Some((Ok(axum::body::Bytes::from(line)), None));
            }
            tokio::time::sleep(STREAM_POLL).await;
        }
    });
    Ok((
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        RawBody::from_stream(lines),
    )
        .into_response())
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

fn store_err(e: kiln_template::TemplateError) -> AppError {
    match e {
        kiln_template::TemplateError::InvalidName { .. } => AppError::BadRequest(e.to_string()),
        e => AppError::internal("the template store failed", e),
    }
}

async fn list(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    let b = builds(&state)?;
    let list = b.store.list().map_err(store_err)?;
    Ok(Json(list.iter().map(template_json).collect::<Vec<_>>()).into_response())
}

fn find(b: &TemplateBuilds, id: &str) -> Result<Template, AppError> {
    let (name, _) = parse_name(id)?;
    b.store
        .get(&name)
        .map_err(store_err)?
        .ok_or_else(|| AppError::NotFound(format!("template {id:?} not found")))
}

async fn detail(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let t = find(builds(&state)?, &id)?;
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
    let t = find(builds(&state)?, &alias)?;
    Ok(Json(serde_json::json!({"templateID": t.name, "public": false})).into_response())
}

async fn remove(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let b = builds(&state)?;
    let (name, _) = parse_name(&id)?;
    if name == kiln_template::BASE {
        return Err(AppError::BadRequest(
            "\"base\" is Kiln's built-in template and cannot be deleted".into(),
        ));
    }
    let _building = b.queue.lock().await;
    if !b.store.remove(&name).map_err(store_err)? {
        return Err(AppError::NotFound(format!("template {id:?} not found")));
    }
    b.templates.remove(&name);
    b.update_tags(&name, |t| t.clear())?;
    state.manager.discard_pool(&name).await;
    let builds = Arc::clone(b);
    tokio::spawn(async move { builds.collect_garbage("delete").await });
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
    let b = builds(&state)?;
    let policy = match req.keep_unused_days {
        Some(days) => GcPolicy::days(days).map_err(|e| AppError::BadRequest(e.to_string()))?,
        None => gc_policy(),
    };
    let report = b.store.gc(&policy).await.map_err(store_err)?;
    Ok(Json(report).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("my-tmpl").unwrap(), ("my-tmpl".into(), vec![]));
        assert_eq!(
            parse_name("Team/My_T:v1.2").unwrap(),
            ("my_t".into(), vec!["v1.2".into()])
        );
        assert_eq!(parse_name("a:default").unwrap(), ("a".into(), vec![]));
        assert!(parse_name("").is_err());
        assert!(parse_name("a b").is_err());
        assert!(parse_name("a:b/c").is_err());
    }

    fn chunks(
        parts: &[&'static [u8]],
    ) -> futures::stream::Iter<std::vec::IntoIter<Result<&'static [u8], std::io::Error>>> {
        futures::stream::iter(parts.iter().map(|p| Ok(*p)).collect::<Vec<_>>())
    }

    /// Privilege tier: none.
    #[tokio::test]
    async fn upload_second_upload_does_not_replace_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let hash = "ab".repeat(32);
        store_upload(dir.path(), &hash, "t1", chunks(&[b"first", b" upload"]), 64)
            .await
            .unwrap();
        store_upload(dir.path(), &hash, "t2", chunks(&[b"second"]), 64)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(&hash)).unwrap(),
            b"first upload"
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Privilege tier: none.
    #[tokio::test]
    async fn upload_refuses_a_hash_that_is_not_hex_sha256() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../../etc/passwd", "AB", &"AB".repeat(32), &"g".repeat(64)] {
            let e = store_upload(dir.path(), bad, "t", chunks(&[b"x"]), 64)
                .await
                .unwrap_err();
            assert!(matches!(e, AppError::BadRequest(_)), "{bad}: {e}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Privilege tier: none.
    #[tokio::test]
    async fn upload_over_the_size_cap_is_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let hash = "cd".repeat(32);
        // A stream that declares no length and goes past the cap (a small one here;
        // the handler passes MAX_UPLOAD_BYTES).
        let stream = chunks(&[b"0123456789", b"0123456789"]);
        let e = store_upload(dir.path(), &hash, "t", stream, 15)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than 15 bytes"), "{e}");
        assert_eq!(e.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn build_uuids_are_uuid_shaped() {
        let u = build_uuid(&"ab".repeat(32));
        assert!(uuid::Uuid::parse_str(&u).is_ok(), "{u}");
    }
}
