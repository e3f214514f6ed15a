//! A build's life after its start: waiting for its turn, running under the timeouts
//! and the cancel switch, publishing the template, recording the outcome.

use std::sync::Arc;

use kiln_template::build::{BuildError, BuildRequest};
use kiln_template::Template;

use super::records::{BuildHandle, BuildRecord, Reason, Status};
use super::timeout::{Overrun, TimedRunner};
use super::{failure_message, info_of, BuildServiceError, LogEntry, TagInfo, TemplateBuilds};
use crate::authz::Caller;
use crate::report::chain;
use crate::templates::TemplateInfo;

/// Why a build did not produce its template.
struct Failure {
    message: String,
    step: Option<String>,
}

impl Failure {
    fn cancelled() -> Self {
        Failure {
            message: "cancelled".into(),
            step: None,
        }
    }
}

/// What identifies an installed version of a template.
type Version = Option<(String, chrono::DateTime<chrono::Utc>)>;

impl TemplateBuilds {
    pub(super) async fn run(self: Arc<Self>, handle: Arc<BuildHandle>, req: BuildRequest) {
        let began = std::time::Instant::now();
        let outcome = self.execute(&handle, &req).await;
        let metrics = self.manager.meters();
        let result = if outcome.is_ok() {
            crate::metrics::BuildOutcome::Ready
        } else {
            crate::metrics::BuildOutcome::Error
        };
        metrics
            .builds
            .get_or_create(&crate::metrics::BuildLabels { outcome: result })
            .inc();
        metrics
            .build_duration
            .observe(began.elapsed().as_secs_f64());
        let mut event = crate::audit::Event::new("template.built", outcome.is_ok())
            .subject(format!("template:{}", req.name))
            .duration(began.elapsed());
        if let Some(team) = handle.owner {
            event = event.user(team, 0);
        }
        self.manager.audit().record(event);
        let mut lifecycle = crate::events::LifecycleEvent::new(
            if outcome.is_ok() {
                "template.built"
            } else {
                "template.failed"
            },
            handle.owner,
        )
        .template(&req.name);
        if let Err(f) = &outcome {
            lifecycle = lifecycle.reason(f.message.clone());
        }
        self.manager.events().publish(lifecycle);
        let record = match outcome {
            Ok(t) => {
                tracing::info!(template = %t.name, build = %req.build_id, "template built");
                handle.finish(Status::Ready, None, None)
            }
            Err(f) => {
                tracing::warn!(template = %req.name, build = %req.build_id, error = %f.message, "template build failed");
                let closing = LogEntry::new(
                    "error",
                    format!("Build failed: {}", f.message),
                    f.step.clone(),
                );
                let reason = Reason {
                    message: f.message,
                    step: f.step,
                };
                handle.finish(Status::Error, Some(reason), Some(closing))
            }
        };
        self.records.save(&req.build_id, &record);
        self.registry().finished(req.build_id.clone());
        if record.status == Status::Ready {
            self.collect_garbage("build").await;
        }
    }

    /// Waits for the template's earlier builds and a free slot, then builds; publishes
    /// the template when it was built.
    async fn execute(&self, handle: &BuildHandle, req: &BuildRequest) -> Result<Template, Failure> {
        let turn = async {
            let template = self.template_locks.lock(&req.name).await;
            // The semaphore is never closed.
            let slot = self.slots.acquire().await.ok();
            (template, slot)
        };
        let _turn = tokio::select! {
            biased;
            () = handle.cancelled() => return Err(Failure::cancelled()),
            turn = turn => turn,
        };
        let before = self.version(&req.name);
        let runner = TimedRunner::new(self.runner.clone(), self.config.step_timeout);
        let mut on_log = |l| handle.log(LogEntry::from(l));
        let build = tokio::time::timeout(
            self.config.build_timeout,
            self.store.build(req, &runner, &mut on_log),
        );
        let built = tokio::select! {
            biased;
            () = handle.cancelled() => Err(Failure::cancelled()),
            r = build => match r {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(self.failure(&e, &runner, req)),
                Err(_) => Err(Failure {
                    message: format!(
                        "the build did not finish within {} s (KILN_BUILD_TIMEOUT_SEC)",
                        self.config.build_timeout.as_secs()
                    ),
                    step: None,
                }),
            },
        };
        let built = match built {
            Ok(t) => t,
            // Stopped as the store installed the template: too late, it is built.
            Err(f) => match self.installed_since(&req.name, &before) {
                Some(t) => t,
                None => return Err(f),
            },
        };
        self.publish(&built, handle).await;
        Ok(built)
    }

    /// The failure's message; a step over its time is named with the setting.
    fn failure(&self, e: &BuildError, runner: &TimedRunner, req: &BuildRequest) -> Failure {
        let secs = self.config.step_timeout.as_secs();
        let message = match (runner.overrun(), e) {
            (Some(Overrun::Step), BuildError::Step { index, .. }) => {
                let what = req
                    .spec
                    .steps
                    .get(index.saturating_sub(1))
                    .map(|s| {
                        let arg = s.args.first().map(String::as_str).unwrap_or("");
                        format!(" ({} {arg})", s.kind.to_ascii_uppercase())
                    })
                    .unwrap_or_default();
                format!(
                    "step {index}{what} did not finish within {secs} s \
                     (KILN_BUILD_STEP_TIMEOUT_SEC)"
                )
            }
            (Some(Overrun::ReadyCheck), BuildError::Finalize { .. }) => format!(
                "the start and ready commands did not finish within {secs} s \
                 (KILN_BUILD_STEP_TIMEOUT_SEC)"
            ),
            _ => failure_message(e),
        };
        Failure {
            message,
            step: e.step(),
        }
    }

    fn version(&self, name: &str) -> Version {
        let t = self.store.get(name).ok().flatten()?;
        Some((t.meta.build_hash, t.meta.created_at))
    }

    /// The template `name`, if a version other than `before` is installed.
    fn installed_since(&self, name: &str, before: &Version) -> Option<Template> {
        let t = self.store.get(name).ok().flatten()?;
        let now = Some((t.meta.build_hash.clone(), t.meta.created_at));
        (now != *before).then_some(t)
    }

    /// Serves a new version: its tags, the registry, a fresh pool.
    async fn publish(&self, t: &Template, handle: &BuildHandle) {
        let tags = handle.record().tags;
        let tagged = self.tags.update(&t.name, |map| {
            for tag in std::iter::once("default".to_string()).chain(tags) {
                map.entry(tag).or_insert_with(TagInfo::now);
            }
        });
        if let Err(e) = tagged {
            tracing::warn!(template = %t.name, error = %chain(&e), "tagging the build failed");
        }
        self.templates.insert(info_of(t));
        self.manager.discard_pool(&t.name).await;
    }

    /// Builds a Dockerfile project in-process (the server's built-in templates): the
    /// same build as one started through the API, its log lines also going to the
    /// server's log. Returns the template as served.
    pub async fn build_project(
        self: &Arc<Self>,
        project: kiln_template::dockerfile::Project,
    ) -> Result<TemplateInfo, BuildServiceError> {
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
                .map_err(BuildServiceError::UploadStore)?;
        }
        let spec = serde_json::from_value(project.recipe.spec).map_err(BuildServiceError::Spec)?;
        let record = BuildRecord {
            template_id: project.name.clone(),
            status: Status::Waiting,
            reason: None,
            cpu_count: project.cpu_count,
            memory_mb: project.memory_mb,
            tags: Vec::new(),
            owner: None,
            logs: Vec::new(),
        };
        let build_id = self.add_build(record);
        self.start_build(&Caller::OPERATOR, &project.name, &build_id, spec)?;
        let mut printed = 0;
        loop {
            let s = self
                .build_status(&Caller::OPERATOR, &project.name, &build_id, printed, 1000)
                .await?;
            printed += s.entries.len();
            for e in &s.entries {
                tracing::info!(template = %project.name, "{}", e.message);
            }
            match s.status {
                Status::Ready if s.entries.is_empty() => {
                    return self
                        .store
                        .get(&project.name)?
                        .map(|t| info_of(&t))
                        .ok_or(BuildServiceError::TemplateNotFound { name: project.name });
                }
                Status::Error if s.entries.is_empty() => {
                    let reason = s.reason.map(|r| match r.step {
                        Some(step) => format!("step {step}: {}", r.message),
                        None => r.message,
                    });
                    return Err(BuildServiceError::BuildFailed {
                        reason: reason.unwrap_or_else(|| "the build ended without a result".into()),
                    });
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    }

    /// Removes the layers, uploads, images and bases no template needs any more
    /// ([`kiln_template::TemplateStore::gc`], policy from `KILN_TEMPLATE_CACHE_DAYS`);
    /// failures are only logged.
    pub(super) async fn collect_garbage(&self, after: &str) {
        match self.store.gc(&super::gc_policy()).await {
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
