//! Template builds as a service: the E2B template build API ([`handlers`], as the
//! Template SDK drives it, spec part C) over typed operations of [`TemplateBuilds`].
//!
//! A started build runs in a background task ([`kiln_template::TemplateStore::build`]).
//! Builds of one template run one after the other; builds of different templates run
//! at once up to `KILN_MAX_CONCURRENT_BUILDS`. A step gets at most
//! `KILN_BUILD_STEP_TIMEOUT_SEC` ([`timeout`]), a build `KILN_BUILD_TIMEOUT_SEC`, and a
//! waiting or running build can be cancelled; a build cut short any of these ways has
//! its build sandbox removed and changes nothing served (the store installs a template
//! only after its last step). Records and logs: [`records`], [`logs`]. A finished build
//! is registered in [`Templates`] at once. After each successful build and each
//! delete, and on `POST /templates/gc`, the template caches are garbage-collected
//! ([`kiln_template::gc`]).
//!
//! Every operation that creates or looks up a build, upload or template takes the
//! caller's team: a team sees and changes only its own (and uses the built-ins, which
//! only admins change); another team's answers as missing. Template names are one
//! namespace: the first team to build a name owns it (`Store::claim_template`).
//! Each team's builds have a cache scope of their own (`BuildRequest::scope`): its
//! uploads and layers are never another team's.

mod error;
pub mod logs;
mod names;
mod records;
mod tags;
mod timeout;
mod uploads;

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_template::build::{upload_name, BuildError, BuildLog, BuildRequest, LogLevel, StepRunner};
use kiln_template::recipe::{is_files_hash, BuildSpec};
use kiln_template::{GcPolicy, GcReport, Template, TemplateStore};
use tokio::sync::{OwnedMutexGuard, Semaphore};

use crate::authz::Caller;
use crate::config::BuildConfig;
use crate::manager::SandboxManager;
use crate::report::chain;
use crate::store::Store;
use crate::templates::{TemplateDefaults, TemplateInfo, Templates};

pub use error::BuildServiceError;
pub use logs::{LogEntry, LogLimits};
pub use names::parse_name;
pub use records::{Reason, Status};
pub use tags::TagInfo;
pub use uploads::{MAX_UPLOAD_BYTES, UPLOAD_LINK_TTL, UPLOAD_PREFIX};

use logs::{LogBuffer, Page};
use records::{BuildHandle, BuildRecord, RecordDir, Registry};
use tags::Tags;
use uploads::UploadLinks;

/// The most log entries one status poll returns.
pub const MAX_LOG_PAGE: usize = 100;

/// Builds in progress and done, upload links, tags.
pub struct TemplateBuilds {
    store: TemplateStore,
    files_dir: PathBuf,
    runner: Arc<dyn StepRunner>,
    templates: Arc<Templates>,
    manager: Arc<SandboxManager>,
    /// The control plane's store: who owns each template.
    owners: Arc<dyn Store>,
    config: BuildConfig,
    log_limits: LogLimits,
    records: RecordDir,
    builds: Mutex<Registry>,
    uploads: UploadLinks,
    /// One permit per build that may run at once.
    slots: Semaphore,
    /// Held by the build of a template that runs (or its delete).
    template_locks: TemplateLocks,
    tags: Tags,
}

/// A build just created: what `POST /v3/templates` answers.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub template_id: String,
    pub build_id: String,
    /// The tags asked for (`default` when none).
    pub tags: Vec<String>,
}

/// A build's status with a page of its log.
#[derive(Debug, Clone)]
pub struct BuildStatus {
    pub status: Status,
    pub reason: Option<Reason>,
    pub entries: Vec<LogEntry>,
}

impl TemplateBuilds {
    /// Build service over the store in `data_dir`; commands run through `runner`,
    /// build sandboxes count against `manager`'s limits.
    pub fn open(
        data_dir: &FsPath,
        runner: Arc<dyn StepRunner>,
        templates: Arc<Templates>,
        manager: Arc<SandboxManager>,
        owners: Arc<dyn Store>,
        config: BuildConfig,
    ) -> Result<Self, kiln_template::TemplateError> {
        let store = TemplateStore::open(data_dir)?;
        let files_dir = store.templates_dir().join(".files");
        std::fs::create_dir_all(&files_dir).map_err(|source| kiln_template::TemplateError::Io {
            path: files_dir.clone(),
            source,
        })?;
        let records = RecordDir::new(store.templates_dir().join(".builds"));
        records.create();
        let tags = Tags::load(store.templates_dir().join(".tags.json"));
        let mut registry = Registry::default();
        for (id, record) in records.load_all() {
            let log = records.log_path(&id);
            registry.insert(Arc::new(BuildHandle::finished(id, record, &log)));
        }
        Ok(Self {
            store,
            files_dir,
            runner,
            templates,
            manager,
            owners,
            config,
            log_limits: LogLimits::default(),
            records,
            builds: Mutex::new(registry),
            uploads: UploadLinks::new(UPLOAD_LINK_TTL),
            slots: Semaphore::new(config.max_concurrent.max(1)),
            template_locks: TemplateLocks::default(),
            tags,
        })
    }

    /// Upload links valid for `ttl` instead of [`UPLOAD_LINK_TTL`].
    pub fn with_upload_ttl(mut self, ttl: Duration) -> Self {
        self.uploads = UploadLinks::new(ttl);
        self
    }

    /// Build logs kept within `limits` instead of the defaults.
    pub fn with_log_limits(mut self, limits: LogLimits) -> Self {
        self.log_limits = limits;
        self
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

    /// The build `build_id` of template `template_id`: in memory, or read back from
    /// its record.
    fn build(
        &self,
        caller: &Caller,
        template_id: &str,
        build_id: &str,
    ) -> Result<Arc<BuildHandle>, BuildServiceError> {
        let not_found = || BuildServiceError::BuildNotFound {
            build_id: build_id.to_string(),
        };
        let handle = match self.registry().get(build_id) {
            Some(h) => h,
            None => {
                let record = self.records.load(build_id).ok_or_else(not_found)?;
                let log = self.records.log_path(build_id);
                Arc::new(BuildHandle::finished(build_id.to_string(), record, &log))
            }
        };
        if handle.template_id != template_id || !sees_build(caller, handle.owner) {
            return Err(not_found());
        }
        Ok(handle)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.builds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new build of `name` (`alias[:tag]`), waiting for its recipe.
    pub fn create_build(
        &self,
        caller: &Caller,
        name: &str,
        extra_tags: Vec<String>,
        cpu_count: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<NewBuild, BuildServiceError> {
        let (alias, mut tags) = parse_name(name)?;
        if alias == kiln_template::BASE {
            return Err(BuildServiceError::BaseNotBuildable);
        }
        tags.extend(extra_tags.into_iter().filter(|t| t != "default"));
        for tag in &tags {
            names::check_tag(tag)?;
        }
        let cpu_count = cpu_count.unwrap_or(2);
        let memory_mb = memory_mb.unwrap_or(1024);
        if !(1..=64).contains(&cpu_count) || !(128..=65536).contains(&memory_mb) {
            return Err(BuildServiceError::Resources {
                cpu_count,
                memory_mb,
            });
        }
        let owner = team_of(caller);
        if let Some(team) = owner {
            self.check_disk_quota(team)?;
        }
        self.claim(caller, &alias)?;
        let record = BuildRecord {
            template_id: alias.clone(),
            status: Status::Waiting,
            reason: None,
            cpu_count,
            memory_mb,
            tags: tags.clone(),
            owner,
            logs: Vec::new(),
        };
        let build_id = self.add_build(record);
        if tags.is_empty() {
            tags.push("default".into());
        }
        Ok(NewBuild {
            template_id: alias,
            build_id,
            tags,
        })
    }

    /// Records a new build and opens its log; returns its id.
    fn add_build(&self, record: BuildRecord) -> String {
        let build_id = uuid::Uuid::new_v4().to_string();
        self.records.save(&build_id, &record);
        let log = LogBuffer::create(self.records.log_path(&build_id), self.log_limits);
        let handle = BuildHandle::new(build_id.clone(), record, log);
        self.registry().insert(Arc::new(handle));
        build_id
    }

    /// Starts build `build_id` of `template_id` with its recipe: it runs in the
    /// background once it is its turn.
    pub fn start_build(
        self: &Arc<Self>,
        caller: &Caller,
        template_id: &str,
        build_id: &str,
        spec: BuildSpec,
    ) -> Result<(), BuildServiceError> {
        // Reject a recipe Kiln cannot build before accepting it.
        spec.base()?;
        spec.runtime()?;
        spec.parse_steps()?;
        let handle = self
            .registry()
            .get(build_id)
            .filter(|h| sees_build(caller, h.owner))
            .ok_or_else(|| BuildServiceError::BuildNotFound {
                build_id: build_id.to_string(),
            })?;
        let (started, record) = handle.update(|r| {
            if r.template_id != template_id {
                return Err(BuildServiceError::WrongTemplate {
                    build_id: build_id.to_string(),
                    owner: r.template_id.clone(),
                    template: template_id.to_string(),
                });
            }
            if r.status != Status::Waiting {
                return Err(BuildServiceError::NotWaiting);
            }
            r.status = Status::Building;
            Ok(())
        });
        started?;
        self.records.save(build_id, &record);
        let req = BuildRequest {
            name: record.template_id,
            build_id: build_id.to_string(),
            spec,
            files_dir: self.files_dir.clone(),
            scope: scope_of(record.owner),
            cpu_count: record.cpu_count,
            memory_mb: record.memory_mb,
        };
        tokio::spawn(self.clone().run(handle, req));
        Ok(())
    }

    /// Cancels a waiting or running build: it ends as failed ("cancelled"), its build
    /// sandbox removed, the template as it was.
    pub fn cancel_build(
        &self,
        caller: &Caller,
        template_id: &str,
        build_id: &str,
    ) -> Result<(), BuildServiceError> {
        let handle = self.build(caller, template_id, build_id).map_err(|_| {
            BuildServiceError::NoBuildToCancel {
                build_id: build_id.to_string(),
            }
        })?;
        handle
            .cancel()
            .map_err(|status| BuildServiceError::AlreadyFinished {
                build_id: build_id.to_string(),
                status: status.as_str(),
            })
    }

    /// The status of a build with at most `limit` log entries from `offset` on.
    pub async fn build_status(
        &self,
        caller: &Caller,
        template_id: &str,
        build_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<BuildStatus, BuildServiceError> {
        let handle = self.build(caller, template_id, build_id)?;
        let snapshot = handle.snapshot(offset, limit);
        let entries = match snapshot.page {
            Page::Memory(entries) => entries,
            Page::File(read) => tokio::task::spawn_blocking(move || read.read())
                .await
                .map_err(|e| BuildServiceError::Log(std::io::Error::other(e)))?
                .map_err(BuildServiceError::Log)?,
        };
        Ok(BuildStatus {
            status: snapshot.status,
            reason: snapshot.reason,
            entries,
        })
    }

    /// Log entries and message bytes the build holds in memory (`None`: not in memory).
    pub fn log_in_memory(&self, build_id: &str) -> Option<(usize, usize)> {
        self.registry().get(build_id).map(|h| h.log_in_memory())
    }

    /// Whether the files of `hash` are stored, and a new upload link's token for them.
    /// Uploads are the caller's team's own: another team's upload of the same hash
    /// is neither "present" nor used by this team's builds.
    pub fn files_link(
        &self,
        caller: &Caller,
        hash: &str,
    ) -> Result<(bool, String), BuildServiceError> {
        if !is_files_hash(hash) {
            return Err(BuildServiceError::FilesHash {
                hash: hash.to_string(),
            });
        }
        let owner = team_of(caller);
        let present = self
            .files_dir
            .join(upload_name(&scope_of(owner), hash))
            .is_file();
        Ok((present, self.uploads.issue(hash.to_string(), owner)))
    }

    /// Stores what is sent to the upload link of `token` (`declared`: the request's
    /// length, if it gave one).
    pub async fn upload<S, B, E>(
        &self,
        token: &str,
        declared: Option<u64>,
        stream: S,
    ) -> Result<(), BuildServiceError>
    where
        S: futures::Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let link = self.uploads.redeem(token)?;
        tracing::debug!(files = %link.files_hash, owner = ?link.owner, "upload");
        if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES) {
            return Err(BuildServiceError::UploadTooLarge {
                limit: MAX_UPLOAD_BYTES,
            });
        }
        uploads::store_upload(
            &self.files_dir,
            &scope_of(link.owner),
            &link.files_hash,
            token,
            stream,
            MAX_UPLOAD_BYTES,
        )
        .await
    }

    /// Every template of the store.
    /// The templates `caller` may see: its team's and the built-ins (all for admins).
    pub fn list(&self, caller: &Caller) -> Result<Vec<Template>, BuildServiceError> {
        let mut all = self.store.list()?;
        all.retain(|t| self.visible(caller, &t.name));
        Ok(all)
    }

    /// Whether `caller` may see (and start sandboxes from) template `name`. One the
    /// owner table does not name is the operator's alone.
    fn visible(&self, caller: &Caller, name: &str) -> bool {
        match self.owners.template_owner(name) {
            Ok(Some(owner)) => caller.sees_template(owner),
            Ok(None) => caller.admin,
            Err(e) => {
                tracing::error!(template = name, error = %chain(&e), "reading a template's owner failed");
                false
            }
        }
    }

    /// Template `name` may be changed (rebuilt, tagged, deleted) by `caller`; a
    /// built-in by admins only (403), another team's is missing (404).
    fn changeable(&self, caller: &Caller, name: &str) -> Result<(), BuildServiceError> {
        let owner = self.owners.template_owner(name)?;
        match owner {
            Some(owner) if caller.may_change_template(owner) => Ok(()),
            Some(None) => Err(BuildServiceError::BuiltIn {
                name: name.to_string(),
            }),
            None if caller.admin => Ok(()),
            _ => Err(BuildServiceError::TemplateNotFound {
                name: name.to_string(),
            }),
        }
    }

    /// A team whose templates already fill its `maxTemplateDiskMB` starts no build (the
    /// size of a build's result is known only once it is built, so this is checked
    /// before each build, against what the team's templates take now).
    fn check_disk_quota(&self, team: i64) -> Result<(), BuildServiceError> {
        let Some(max_mb) = self
            .owners
            .team(team)?
            .and_then(|t| t.quotas.max_template_disk_mb)
        else {
            return Ok(());
        };
        let mut used = 0u64;
        for t in self.store.list()? {
            if self.owners.template_owner(&t.name)? == Some(Some(team)) {
                used = used.saturating_add(t.meta.rootfs_bytes);
            }
        }
        let used_mb = used.div_ceil(1 << 20);
        if used_mb >= max_mb {
            return Err(BuildServiceError::OverDiskQuota { used_mb, max_mb });
        }
        Ok(())
    }

    /// Makes `caller`'s team the owner of the new name `name`, or checks that it may
    /// build over the one who has it.
    fn claim(&self, caller: &Caller, name: &str) -> Result<(), BuildServiceError> {
        match self.owners.template_owner(name)? {
            Some(owner) if caller.may_change_template(owner) => Ok(()),
            Some(None) => Err(BuildServiceError::BuiltIn {
                name: name.to_string(),
            }),
            Some(Some(_)) => Err(BuildServiceError::NameTaken {
                name: name.to_string(),
            }),
            None => match self.owners.claim_template(name, caller.team_id)? {
                Some(owner) if caller.sees(owner) => Ok(()),
                _ => Err(BuildServiceError::NameTaken {
                    name: name.to_string(),
                }),
            },
        }
    }

    /// The template `id` names (`alias[:tag]`).
    pub fn template(&self, caller: &Caller, id: &str) -> Result<Template, BuildServiceError> {
        let (name, _) = parse_name(id)?;
        if !self.visible(caller, &name) {
            return Err(BuildServiceError::TemplateNotFound {
                name: id.to_string(),
            });
        }
        self.store
            .get(&name)?
            .ok_or_else(|| BuildServiceError::TemplateNotFound {
                name: id.to_string(),
            })
    }

    /// The template behind `name[:tag]` and the tag, checked to exist.
    fn tagged(
        &self,
        caller: &Caller,
        target: &str,
    ) -> Result<(Template, String), BuildServiceError> {
        let (name, tags) = parse_name(target)?;
        if target.trim_end().ends_with(':') {
            return Err(BuildServiceError::InvalidTarget {
                target: target.to_string(),
            });
        }
        let t = self.template(caller, &name)?;
        let tag = tags.into_iter().next().unwrap_or_else(|| "default".into());
        if tag != "default" && !self.tags.of(&name).iter().any(|(t, _)| *t == tag) {
            return Err(BuildServiceError::TagNotFound { name, tag });
        }
        Ok((t, tag))
    }

    /// Gives the version `target` (`name[:tag]`) names the tags `tags`; returns it.
    pub fn assign_tags(
        &self,
        caller: &Caller,
        target: &str,
        tags: &[String],
    ) -> Result<Template, BuildServiceError> {
        let (t, _) = self.tagged(caller, target)?;
        self.changeable(caller, &t.name)?;
        if tags.is_empty() {
            return Err(BuildServiceError::NoTags);
        }
        for tag in tags {
            names::check_tag(tag)?;
        }
        self.tags.update(&t.name, |map| {
            for tag in tags {
                map.insert(tag.clone(), TagInfo::now());
            }
        })?;
        Ok(t)
    }

    /// Takes `tags` (never `default`) from template `name`.
    pub fn remove_tags(
        &self,
        caller: &Caller,
        name: &str,
        tags: &[String],
    ) -> Result<(), BuildServiceError> {
        let t = self.template(caller, name)?;
        self.changeable(caller, &t.name)?;
        if tags.iter().any(|t| t == "default") {
            return Err(BuildServiceError::DefaultTag);
        }
        let have: Vec<String> = self.tags.of(&t.name).into_iter().map(|(t, _)| t).collect();
        if let Some(missing) = tags.iter().find(|t| !have.contains(t)) {
            return Err(BuildServiceError::TagNotFound {
                name: t.name,
                tag: missing.clone(),
            });
        }
        self.tags.update(&t.name, |map| {
            for tag in tags {
                map.remove(tag);
            }
        })
    }

    /// Template `id` and its tags, `default` first (a template built before tags were
    /// kept, or `base`, has its version as the default).
    pub fn tags_of(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(Template, Vec<(String, TagInfo)>), BuildServiceError> {
        let t = self.template(caller, id)?;
        let mut tags = self.tags.of(&t.name);
        if !tags.iter().any(|(tag, _)| tag == "default") {
            let info = TagInfo {
                created_at: t.meta.created_at,
            };
            tags.insert(0, ("default".into(), info));
        }
        Ok((t, tags))
    }

    /// Deletes template `id`, after the builds of it that run or wait (never others).
    pub async fn remove_template(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(), BuildServiceError> {
        let (name, _) = parse_name(id)?;
        if name == kiln_template::BASE {
            return Err(BuildServiceError::BaseNotDeletable);
        }
        if !self.visible(caller, &name) {
            return Err(BuildServiceError::TemplateNotFound {
                name: id.to_string(),
            });
        }
        self.changeable(caller, &name)?;
        let _building = self.template_locks.lock(&name).await;
        if !self.store.remove(&name)? {
            return Err(BuildServiceError::TemplateNotFound {
                name: id.to_string(),
            });
        }
        self.templates.remove(&name);
        self.owners.forget_template(&name)?;
        self.tags.update(&name, |t| t.clear())?;
        self.manager.discard_pool(&name).await;
        let this = Arc::clone(self);
        tokio::spawn(async move { this.collect_garbage("delete").await });
        Ok(())
    }

    /// Collects the template caches now (after the builds in progress) under `policy`
    /// (`None`: the configured one).
    pub async fn gc(&self, keep_unused_days: Option<f64>) -> Result<GcReport, BuildServiceError> {
        let policy = match keep_unused_days {
            Some(days) => GcPolicy::days(days)?,
            None => gc_policy(),
        };
        Ok(self.store.gc(&policy).await?)
    }
}

mod run;

/// The team a caller's builds and uploads belong to (`None`: the server's own).
fn team_of(caller: &Caller) -> Option<i64> {
    (*caller != Caller::OPERATOR).then_some(caller.team_id)
}

/// Whether `caller` may see a build (or upload) of `owner`.
fn sees_build(caller: &Caller, owner: Option<i64>) -> bool {
    match owner {
        Some(team) => caller.sees(team),
        None => caller.admin,
    }
}

/// The cache scope of builds of `owner` (see `BuildRequest::scope`).
fn scope_of(owner: Option<i64>) -> String {
    owner.map_or_else(String::new, |team| format!("team{team}"))
}

/// Locks by template name, held by the build of a template that runs (and by its
/// delete); an entry goes when nobody holds or waits for it.
#[derive(Default)]
struct TemplateLocks {
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

struct TemplateLock {
    name: String,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl TemplateLocks {
    /// Waits until nothing else holds `name` (first come, first served).
    async fn lock(&self, name: &str) -> TemplateLock {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(name.to_string()).or_default().clone()
        };
        TemplateLock {
            name: name.to_string(),
            locks: self.locks.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for TemplateLock {
    fn drop(&mut self) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        self.guard = None;
        // Every other reference is taken under `locks`: one left is the map's own.
        if locks
            .get(&self.name)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.name);
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

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

impl From<BuildLog> for LogEntry {
    fn from(l: BuildLog) -> Self {
        LogEntry::new(level_name(l.level), l.message, l.step)
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
            cdp_port: t.meta.cdp_port,
        },
    }
}
