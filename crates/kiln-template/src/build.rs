//! Building a template from a recipe ([`BuildSpec`]): each step produces a layer, a
//! complete root filesystem under `templates/.layers/<hash>/` (see [`crate::layer`]),
//! where `hash` chains the parent's hash with the step (type, args, files hash).
//! A layer that exists is reused (`CACHED`); `force` on a step or on the build
//! rebuilds that step and every later one into fresh layers (their hash also covers
//! the build id, so a forced rebuild never replaces a layer a template still serves).
//!
//! The base is a template of this store (its rootfs and metadata start the build) or an
//! image pulled from an OCI registry ([`crate::oci`]: its config's `User`, `WorkingDir`
//! and `Env` start the build, its manifest digest starts the hash chain).
//!
//! RUN, USER and WORKDIR run in a sandbox through a [`StepRunner`] (the server's
//! runtime and envd), whose overlay upper directory becomes the new layer; COPY is
//! done on the host ([`crate::copy`]); ENV only changes the build state.
//!
//! The finished template is installed by pointing `templates/<name>/rootfs` (a
//! symlink, replaced atomically) at the last layer and writing `template.json`.
//! Nothing is touched in `templates/<name>/` before every step succeeded, so a failed
//! build leaves the previous version served. The template's metadata records the
//! layers, uploads and base it was made from ([`crate::LayerChain`]); what no installed
//! template records is removed by [`crate::gc`] once unused for a while. Every cache
//! entry a build uses gets its mtime set to now ("last used"), and so does the layer a
//! new version replaces, so that sandboxes of the older version keep their lower layer
//! for the whole grace period. Builds hold the store lock shared, so `gc` never removes
//! a layer under one.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::copy::{self, CopyJob};
use crate::layer::{self, LayerError};
use crate::recipe::{self, Base, BuildSpec, BuildState, RecipeError, Step};
use crate::{
    fsutil, LayerChain, Template, TemplateError, TemplateMeta, TemplateStore, META_FORMAT,
};

/// Directory of the layer cache inside the templates directory.
pub const LAYERS_DIR: &str = ".layers";

/// Directory of the locks of layers being made, inside the templates directory.
pub const LAYER_LOCKS_DIR: &str = ".layer-locks";

/// What a build step asks of a sandbox.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// The layer the sandbox starts from (its overlay's lower directory).
    pub lower: &'a Path,
    /// Where the new layer is to be materialized when the command succeeds.
    pub out: &'a Path,
    /// Run as `<shell> -l -c cmd`.
    pub cmd: &'a str,
    /// `/bin/bash` when the layer has it, else `/bin/sh` (an image such as Alpine's);
    /// see [`shell_of`].
    pub shell: &'a str,
    pub user: &'a str,
    /// `None`: the user's home.
    pub cwd: Option<&'a str>,
    pub env: &'a BTreeMap<String, String>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    /// The runtime the template asks for (`jail`, `gvisor`); `None`: the server's.
    pub runtime: Option<&'a str>,
}

/// A command in a build sandbox did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("exit status {code}")]
    Exit { code: i32 },
    /// The sandbox or envd refused (e.g. an unknown user); the text is envd's.
    #[error("command failed: {0}")]
    Failed(String),
}

/// Runs build commands in sandboxes. Implemented by the server with its runtime.
#[async_trait::async_trait]
pub trait StepRunner: Send + Sync {
    /// Starts a sandbox on `req.lower`, runs the command (each output line goes to
    /// `on_line`) and, when it exits 0, materializes the new layer at `req.out`
    /// ([`layer::link_tree`] + [`layer::apply_upper`]). The sandbox is always removed.
    async fn run(
        &self,
        req: RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError>;

    /// Starts a sandbox on `check.lower` set up as the template's sandboxes will be,
    /// runs the start command in the background and retries the ready command until it
    /// exits 0 or `check.timeout` passes. Nothing is saved. The default does nothing.
    async fn check_ready(
        &self,
        check: ReadyCheck<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        let _ = (check, on_line);
        Ok(())
    }
}

/// The finalize phase's check of a template's start and ready commands.
#[derive(Debug, Clone)]
pub struct ReadyCheck<'a> {
    pub lower: &'a Path,
    /// As [`RunRequest::shell`].
    pub shell: &'a str,
    pub start_cmd: Option<&'a str>,
    pub ready_cmd: &'a str,
    pub user: &'a str,
    pub cwd: &'a str,
    pub env: &'a BTreeMap<String, String>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub timeout: std::time::Duration,
    /// As [`RunRequest::runtime`].
    pub runtime: Option<&'a str>,
}

/// How long the finalize phase waits for the ready command.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Severity of a build log line (E2B's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// One build log line, tagged with the step it belongs to (`base`, `1`..`N`,
/// `finalize`), as E2B reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLog {
    pub level: LogLevel,
    pub step: Option<String>,
    pub message: String,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Template name to install as.
    pub name: String,
    /// Unique id of this build (goes into forced layers' hashes).
    pub build_id: String,
    pub spec: BuildSpec,
    /// Where uploaded contexts live: `<files_dir>/<upload_name(scope, filesHash)>`.
    pub files_dir: PathBuf,
    /// Whose build this is: empty for the server's own (the built-ins), else a
    /// tenant's name (a team). Layers and uploaded contexts belong to their scope: a
    /// build never uses another scope's cached layer or upload, so no tenant can
    /// plant content (a context uploaded first under a hash, a layer made from it)
    /// that another tenant's build would pick up.
    pub scope: String,
    pub cpu_count: u32,
    pub memory_mb: u64,
}

/// A build failed. [`BuildError::step`] says where, in E2B's terms.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("template {name:?} cannot be built over: it is built in")]
    BuiltIn { name: String },
    #[error("base template {name:?} does not exist")]
    NoBaseTemplate { name: String },
    #[error("building the Debian {suite} base")]
    DebianBase {
        suite: &'static str,
        #[source]
        source: TemplateError,
    },
    #[error(transparent)]
    Pull(#[from] crate::oci::PullError),
    #[error("step {index}: {message}")]
    Step {
        index: usize,
        message: String,
        /// The last lines of the step's output.
        tail: Vec<String>,
    },
    #[error("template store")]
    Store(#[from] TemplateError),
    #[error("materializing a layer")]
    Layer(#[from] LayerError),
    #[error("{message}")]
    Finalize { message: String },
}

impl BuildError {
    /// The failing step as E2B's `reason.step`: `base`, or `N` (from 1).
    pub fn step(&self) -> Option<String> {
        match self {
            BuildError::Recipe(RecipeError::Step { index, .. })
            | BuildError::Step { index, .. } => Some(index.to_string()),
            BuildError::Recipe(_)
            | BuildError::NoBaseTemplate { .. }
            | BuildError::DebianBase { .. }
            | BuildError::Pull(_) => Some("base".into()),
            BuildError::Finalize { .. } => Some("finalize".into()),
            _ => None,
        }
    }
}

const TAIL_LINES: usize = 20;

impl TemplateStore {
    fn layers_dir(&self) -> PathBuf {
        self.templates_dir.join(LAYERS_DIR)
    }

    /// The lock of the layer `hash` while it is made. The lock file stays (removed
    /// while held, a waiter could lock a file no one else sees); `gc`, which runs
    /// when no build does, removes them.
    async fn lock_layer(&self, hash: &str) -> Result<nix::fcntl::Flock<fs::File>, TemplateError> {
        let dir = self.templates_dir.join(LAYER_LOCKS_DIR);
        fs::create_dir_all(&dir).map_err(|source| TemplateError::Io {
            path: dir.clone(),
            source,
        })?;
        crate::lock_path(dir.join(format!("{hash}.lock"))).await
    }

    /// Builds `req` and installs it as template `req.name`. Log lines (with their
    /// step) go to `on_log`.
    pub async fn build(
        &self,
        req: &BuildRequest,
        runner: &dyn StepRunner,
        on_log: &mut (dyn FnMut(BuildLog) + Send),
    ) -> Result<Template, BuildError> {
        let started = Instant::now();
        crate::validate_name(&req.name)?;
        if crate::base::debian_base(&req.name).is_some() {
            return Err(BuildError::BuiltIn {
                name: req.name.clone(),
            });
        }
        let base = req.spec.base()?;
        req.spec.runtime()?;
        req.spec.cdp_port()?;
        let steps = req.spec.parse_steps()?;
        // Held until the build is installed: `gc` waits for it.
        let _store = self.lock_store(false).await?;
        let _lock = self.lock(&req.name).await?;
        let parent = match &base {
            Base::Template(name) => self.template_parent(name)?,
            Base::Debian(d) => self.debian_parent(d, on_log).await?,
            Base::Image(src) => match self.image_parent(src, req.spec.force, on_log).await {
                Ok(p) => p,
                Err(e) => {
                    if src.reference.repository() == "library/ubuntu" {
                        log(
                            on_log,
                            LogLevel::Warn,
                            Some("base"),
                            "[base] Kiln builds Debian bases (debian:bookworm, debian:trixie) \
                             from Debian's packages; Ubuntu images are pulled from their \
                             registry, which must be reachable"
                                .into(),
                        );
                    }
                    return Err(e);
                }
            },
        };
        if let Some(entry) = &parent.cache_entry {
            touch(entry);
        }
        let mut rootfs = parent.rootfs.clone();
        let mut hash = parent.hash.clone();
        let from = match (&req.spec.from_image, &base) {
            (Some(image), _) => image.clone(),
            (None, Base::Template(name)) => name.clone(),
            (None, Base::Debian(d)) => format!("debian:{}", d.suite),
            (None, Base::Image(src)) => src.reference.whole(),
        };
        log(
            on_log,
            LogLevel::Info,
            Some("base"),
            format!("[base] FROM {from} [{hash}]"),
        );
        // The steps of a template pinned to a runtime run on it, so its layers are its
        // own: a command can tell runtimes apart (`uname -r` says gVisor's 4.4.0).
        if let Some(rt) = req.spec.runtime()? {
            hash = mixed(&hash, &format!("runtime {rt}"));
        }
        if !req.scope.is_empty() {
            hash = mixed(&hash, &format!("scope {}", req.scope));
        }
        let mut state = parent.state.clone();
        let layers = self.layers_dir();
        fs::create_dir_all(&layers).map_err(|source| TemplateError::Io {
            path: layers.clone(),
            source,
        })?;
        let total = steps.len();
        let mut forced = req.spec.force;
        // Layers of forced steps are never a cache hit again (their hash covers this
        // build's id): all but the last are removed once the build is installed.
        let mut one_off: Vec<PathBuf> = Vec::new();
        // Every step layer and upload the template is made of, for its metadata.
        let mut chain_layers: Vec<PathBuf> = Vec::new();
        let mut chain_files: Vec<String> = Vec::new();
        for (i, (spec, step)) in req.spec.steps.iter().zip(&steps).enumerate() {
            let index = i + 1;
            let tag = index.to_string();
            forced |= spec.force;
            hash = recipe::layer_hash(&hash, spec);
            if forced {
                hash = salted(&hash, &req.build_id);
            }
            let title = format!(
                "[builder {index}/{total}] {} {}",
                spec.kind.to_ascii_uppercase(),
                spec.args.join(" ")
            );
            if let Step::Env(pairs) = step {
                for (k, v) in pairs {
                    let v = recipe::expand_env(v, &state.env, &state.user);
                    state.env.insert(k.clone(), v);
                }
                log(
                    on_log,
                    LogLevel::Info,
                    Some(&tag),
                    format!("CACHED {title}"),
                );
                continue;
            }
            if let Step::Copy { files_hash, .. } = step {
                let name = upload_name(&req.scope, files_hash);
                if !chain_files.contains(&name) {
                    chain_files.push(name);
                }
            }
            let dir = layers.join(&hash);
            // Builds of other templates may run at once and reach the same layer: one
            // makes it, the others wait and find it cached.
            let _layer_lock = if dir.is_dir() {
                None
            } else {
                Some(self.lock_layer(&hash).await?)
            };
            if dir.is_dir() {
                touch(&dir);
                log(
                    on_log,
                    LogLevel::Info,
                    Some(&tag),
                    format!("CACHED {title} [{hash}]"),
                );
            } else {
                log(
                    on_log,
                    LogLevel::Info,
                    Some(&tag),
                    format!("{title} [{hash}]"),
                );
                let tmp = layers.join(format!(".tmp-{hash}"));
                remove_tree(&tmp).await?;
                let result = self
                    .run_step(
                        req,
                        step,
                        &state,
                        &rootfs,
                        &tmp,
                        index,
                        &tag,
                        runner,
                        on_log,
                        parent.id_map_base,
                    )
                    .await;
                if let Err(e) = result {
                    remove_tree(&tmp).await?;
                    return Err(e);
                }
                fs::rename(&tmp, &dir).map_err(|source| TemplateError::Io {
                    path: dir.clone(),
                    source,
                })?;
            }
            if forced {
                one_off.push(dir.clone());
            }
            chain_layers.push(dir.clone());
            rootfs = dir;
            match step {
                Step::User(u) => state.user = u.clone(),
                Step::Workdir(w) => state.workdir = Some(state.resolve_workdir(w)),
                _ => {}
            }
        }

        // The start and ready commands are checked on a new version (not when every
        // step was cached and the template already is this version).
        let unchanged = self
            .get(&req.name)
            .ok()
            .flatten()
            .is_some_and(|t| t.meta.build_hash == hash);
        if let (Some(ready), false) = (req.spec.ready_cmd.as_deref(), unchanged) {
            let fin = |m: String| BuildLog {
                level: LogLevel::Info,
                step: Some("finalize".into()),
                message: m,
            };
            if let Some(start) = &req.spec.start_cmd {
                on_log(fin(format!("Running start command: {start}")));
            }
            on_log(fin(format!("Waiting for template to be ready: {ready}")));
            let cwd = state.cwd();
            let shell = shell_of(&rootfs).ok_or_else(|| BuildError::Finalize {
                message: format!("cannot run the ready command: {NO_SHELL}"),
            })?;
            let check = ReadyCheck {
                lower: &rootfs,
                shell,
                start_cmd: req.spec.start_cmd.as_deref(),
                ready_cmd: ready,
                user: &state.user,
                cwd: &cwd,
                env: &state.env,
                cpu_count: req.cpu_count,
                memory_mb: req.memory_mb,
                timeout: READY_TIMEOUT,
                runtime: req.spec.runtime.as_deref(),
            };
            let mut on_line = |line: String| on_log(fin(line));
            runner
                .check_ready(check, &mut on_line)
                .await
                .map_err(|e| BuildError::Finalize {
                    message: format!("the start or ready command failed: {e}"),
                })?;
            on_log(fin("Template is ready".into()));
        }
        log(
            on_log,
            LogLevel::Info,
            Some("finalize"),
            "installing the template".into(),
        );
        let meta = TemplateMeta {
            format: META_FORMAT,
            name: req.name.clone(),
            created_at: chrono::Utc::now(),
            default_user: state.user.clone(),
            default_workdir: state.cwd(),
            cpu_count: req.cpu_count,
            memory_mb: req.memory_mb,
            disk_size_mb: parent.disk_size_mb,
            envd_version: crate::ENVD_VERSION.to_string(),
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            build_hash: hash,
            id_map_base: parent.id_map_base,
            rootfs_bytes: parent.rootfs_bytes,
            start_cmd: req.spec.start_cmd.clone(),
            ready_cmd: req.spec.ready_cmd.clone(),
            runtime: req.spec.runtime()?.map(str::to_owned),
            cdp_port: req.spec.cdp_port()?,
            envs: state.env.clone(),
            chain: Some(LayerChain {
                layers: chain_layers
                    .iter()
                    .filter(|l| !one_off.contains(l) || **l == rootfs)
                    .filter_map(|l| l.file_name()?.to_str().map(str::to_string))
                    .collect(),
                files: chain_files,
                image: parent.image_key.clone(),
                base: parent.debian_base.clone(),
            }),
        };
        let template = self.install_layer(&req.name, &req.build_id, &rootfs, meta)?;
        for layer in one_off.iter().filter(|l| **l != rootfs) {
            if let Err(e) = remove_tree(layer).await {
                tracing::warn!(layer = %layer.display(), error = %crate::ErrorChain(&e), "removing a one-off layer failed");
            }
        }
        log(
            on_log,
            LogLevel::Info,
            None,
            format!(
                "Build finished, took {:.1}s",
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(template)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        req: &BuildRequest,
        step: &Step,
        state: &BuildState,
        lower: &Path,
        out: &Path,
        index: usize,
        tag: &str,
        runner: &dyn StepRunner,
        on_log: &mut (dyn FnMut(BuildLog) + Send),
        id_map_base: u32,
    ) -> Result<(), BuildError> {
        let (cmd, user, cwd, what) = match step {
            Step::Run { cmd, user } => (
                cmd.clone(),
                user.clone().unwrap_or_else(|| state.user.clone()),
                state.workdir.clone(),
                format!("failed to run command '{cmd}'"),
            ),
            Step::User(u) => (
                format!(
                    "id -u {q} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash {q}",
                    q = recipe::shell_quote(u)
                ),
                "root".to_string(),
                None,
                "failed to create user".to_string(),
            ),
            Step::Workdir(w) => {
                let dir = recipe::shell_quote(&state.resolve_workdir(w));
                (
                    format!(
                        "[ -d {dir} ] || {{ mkdir -p {dir} && chown {u}: {dir}; }}",
                        u = recipe::shell_quote(&state.user)
                    ),
                    "root".to_string(),
                    None,
                    "failed to create workdir".to_string(),
                )
            }
            Step::Copy {
                src,
                dest,
                owner,
                mode,
                files_hash,
            } => {
                let dest = if dest.starts_with('/') {
                    dest.clone()
                } else {
                    format!("{}/{dest}", state.cwd())
                };
                let job = (
                    lower.to_path_buf(),
                    out.to_path_buf(),
                    req.files_dir.join(upload_name(&req.scope, files_hash)),
                    src.clone(),
                    dest,
                    owner.clone().unwrap_or_else(|| state.user.clone()),
                    *mode,
                );
                let id_base = id_map_base;
                touch(req.files_dir.join(upload_name(&req.scope, files_hash)));
                let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
                    let (lower, out, archive, src, dest, owner, mode) = job;
                    if !archive.is_file() {
                        return Err(format!(
                            "the files of COPY {src} were not uploaded ({} is missing)",
                            archive.display()
                        ));
                    }
                    layer::link_tree(&lower, &out)
                        .map_err(|e| crate::ErrorChain(&e).to_string())?;
                    let staging = tempfile_dir(&out)?;
                    let r = copy::copy(&CopyJob {
                        layer: &out,
                        archive: &archive,
                        staging: &staging,
                        src: &src,
                        dest: &dest,
                        owner: &owner,
                        mode,
                        id_base,
                    });
                    let _ = fs::remove_dir_all(&staging);
                    r.map_err(|e| crate::ErrorChain(&e).to_string())
                })
                .await
                .map_err(TemplateError::from)?;
                return result.map_err(|message| BuildError::Step {
                    index,
                    message: format!("failed to copy files: {message}"),
                    tail: Vec::new(),
                });
            }
            Step::Env(_) => return Ok(()),
        };
        let shell = shell_of(lower).ok_or_else(|| BuildError::Step {
            index,
            message: format!("{what}: {NO_SHELL}"),
            tail: Vec::new(),
        })?;
        let mut tail: Vec<String> = Vec::new();
        let mut on_line = |line: String| {
            if tail.len() == TAIL_LINES {
                tail.remove(0);
            }
            tail.push(line.clone());
            on_log(BuildLog {
                level: LogLevel::Info,
                step: Some(tag.to_string()),
                message: format!("[builder {index}] {line}"),
            });
        };
        let run = RunRequest {
            lower,
            out,
            cmd: &cmd,
            shell,
            user: &user,
            cwd: cwd.as_deref(),
            env: &state.env,
            cpu_count: req.cpu_count,
            memory_mb: req.memory_mb,
            runtime: req.spec.runtime.as_deref(),
        };
        runner
            .run(run, &mut on_line)
            .await
            .map_err(|e| BuildError::Step {
                index,
                message: format!("{what}: {e}"),
                tail,
            })
    }

    /// Points `templates/<name>/rootfs` at `layer` (atomically) and writes the
    /// metadata.
    fn install_layer(
        &self,
        name: &str,
        build_id: &str,
        layer: &Path,
        meta: TemplateMeta,
    ) -> Result<Template, TemplateError> {
        let dir = self.templates_dir.join(name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TemplateError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let rootfs = dir.join(crate::ROOTFS_DIR);
        // The version being replaced may still serve sandboxes: its layer's grace
        // period in `gc` starts now.
        if let Ok(old) = fs::read_link(&rootfs) {
            touch_rootfs_target(&old);
        }
        // A real directory (not one of our symlinks) is moved aside, not deleted: a
        // sandbox may run on it.
        if fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
            let aside = self.layers_dir().join(format!(".old-{name}-{build_id}"));
            fs::rename(&rootfs, &aside).map_err(io(&aside))?;
        }
        let tmp = dir.join(".rootfs.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(layer, &tmp).map_err(io(&tmp))?;
        fs::rename(&tmp, &rootfs).map_err(io(&rootfs))?;
        crate::install(&dir, &meta)?;
        Ok(Template {
            name: name.to_string(),
            dir,
            rootfs: layer.to_path_buf(),
            meta,
        })
    }

    /// Removes template `name` (its metadata first, so it stops being served, then its
    /// directory). Its layers stay in the cache.
    pub fn remove(&self, name: &str) -> Result<bool, TemplateError> {
        crate::validate_name(name)?;
        let dir = self.templates_dir.join(name);
        // The caller makes sure no build of `name` runs (the server holds its build
        // queue), so the lock file can go too.
        let _ = fs::remove_file(self.templates_dir.join(format!(".{name}.lock")));
        if !dir.exists() {
            return Ok(false);
        }
        TemplateMeta::remove(&dir)?;
        let rootfs = dir.join(crate::ROOTFS_DIR);
        if fs::symlink_metadata(&rootfs).is_ok_and(|m| m.file_type().is_symlink()) {
            // Sandboxes of the template may still run on its layer (see `gc`).
            if let Ok(layer) = fs::read_link(&rootfs) {
                touch_rootfs_target(&layer);
            }
            let _ = fs::remove_file(&rootfs);
        }
        fsutil::remove_tree(&dir)?;
        Ok(true)
    }
}

/// Why a command cannot run in a layer without a shell.
const NO_SHELL: &str = "the image has neither /bin/bash nor /bin/sh, and Kiln runs RUN, \
                        USER and WORKDIR steps and the start and ready commands with a shell";

/// The shell build commands run with in the root filesystem `rootfs`: `/bin/bash` when
/// it has one (as E2B), else `/bin/sh`; `None` when it has neither.
pub fn shell_of(rootfs: &Path) -> Option<&'static str> {
    ["/bin/bash", "/bin/sh"].into_iter().find(|sh| {
        fsutil::resolve_file(rootfs, Path::new(sh))
            .ok()
            .flatten()
            .is_some_and(|p| p.is_file())
    })
}

fn salted(hash: &str, salt: &str) -> String {
    mixed(hash, &format!("force {salt}"))
}

/// A layer-chain hash with something else the layers depend on.
/// The file name of an uploaded context of `scope` (see [`BuildRequest::scope`]).
pub fn upload_name(scope: &str, files_hash: &str) -> String {
    if scope.is_empty() {
        files_hash.to_string()
    } else {
        format!("{scope}-{files_hash}")
    }
}

fn mixed(hash: &str, what: &str) -> String {
    hex::encode(Sha256::digest(format!("{hash}\n{what}")))
}

fn log(
    on_log: &mut (dyn FnMut(BuildLog) + Send),
    level: LogLevel,
    step: Option<&str>,
    message: String,
) {
    on_log(BuildLog {
        level,
        step: step.map(str::to_string),
        message,
    });
}

async fn remove_tree(path: &Path) -> Result<(), TemplateError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || fsutil::remove_tree(&p)).await??;
    Ok(())
}

/// Marks a cache entry (layer, upload, image or base directory) used now: [`crate::gc`]
/// keeps unreferenced entries by this mtime. Best effort: a failure only shortens the
/// entry's life in the cache.
fn touch(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let now = std::time::SystemTime::now();
    if let Err(e) = fs::File::open(path).and_then(|f| f.set_modified(now)) {
        tracing::debug!(path = %path.display(), error = %e, "marking a cache entry used failed");
    }
}

/// [`touch`] for what a template's `rootfs` symlink points at: a layer, or the
/// `rootfs` inside an image's or a Debian base's directory (then that directory, which
/// is what [`crate::gc`] ages).
fn touch_rootfs_target(target: &Path) {
    touch(target);
    if target.file_name().is_some_and(|n| n == crate::ROOTFS_DIR) {
        if let Some(entry) = target.parent() {
            touch(entry);
        }
    }
}

/// A scratch directory next to `layer` (same filesystem).
fn tempfile_dir(layer: &Path) -> Result<PathBuf, String> {
    let mut name = layer.as_os_str().to_owned();
    name.push(".ctx");
    let dir = PathBuf::from(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

#[path = "build_parent.rs"]
mod parent;

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
