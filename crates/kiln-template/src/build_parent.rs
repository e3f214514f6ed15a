//! Where a build starts ([`Parent`]): a template of this store, a Debian base (built
//! here on first use for the internal ones, its progress in the `base` step's log), or
//! a pulled image.

use std::fs;
use std::path::{Path, PathBuf};

use super::{log, BuildError, BuildLog, LogLevel};
use crate::base::DebianBase;
use crate::oci::PullEvent;
use crate::recipe::{self, BuildState, ImageSource};
use crate::{BuildEvent, Template, TemplateError, TemplateStore, BASE};

impl TemplateStore {
    /// A template of this store as the base.
    pub(super) fn template_parent(&self, name: &str) -> Result<Parent, BuildError> {
        let t = self
            .get(name)
            .ok()
            .flatten()
            .ok_or_else(|| BuildError::NoBaseTemplate {
                name: name.to_string(),
            })?;
        parent_of(&t)
    }

    /// A Debian base: `base` (built at server start) or an internal one such as
    /// `base-trixie`, built here on first use with its progress in the `base` step's log.
    pub(super) async fn debian_parent(
        &self,
        d: &DebianBase,
        on_log: &mut (dyn FnMut(BuildLog) + Send),
    ) -> Result<Parent, BuildError> {
        if d.template == BASE {
            return self.template_parent(BASE);
        }
        let guest_bin_dir = self.guest_bin_dir.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf))
                .unwrap_or_default()
        });
        let mut on_event = |e: BuildEvent| on_log(debian_event_log(d, e));
        let t = self
            .ensure_debian(d, &guest_bin_dir, &mut on_event)
            .await
            .map_err(|source| BuildError::DebianBase {
                suite: d.suite,
                source,
            })?;
        let mut parent = parent_of(&t)?;
        parent.cache_entry = Some(t.dir.clone());
        parent.debian_base = Some(d.template.to_string());
        Ok(parent)
    }

    /// A pulled image as the base: its config's `User`, `WorkingDir` and `Env` start
    /// the build.
    pub(super) async fn image_parent(
        &self,
        src: &ImageSource,
        refresh: bool,
        on_log: &mut (dyn FnMut(BuildLog) + Send),
    ) -> Result<Parent, BuildError> {
        let mut on_event = |e: PullEvent| on_log(pull_event_log(e));
        let image = self.pull_image(src, refresh, &mut on_event).await?;
        let user = match image.config.start_user(&image.rootfs) {
            Ok(u) => u,
            Err(why) => {
                log(
                    on_log,
                    LogLevel::Warn,
                    Some("base"),
                    format!("[base] {why}; the build starts as root"),
                );
                "root".to_string()
            }
        };
        let image_dir = image.rootfs.parent().map(Path::to_path_buf);
        Ok(Parent {
            image_key: image_dir
                .as_deref()
                .and_then(Path::file_name)
                .and_then(|n| n.to_str())
                .map(str::to_string),
            cache_entry: image_dir,
            debian_base: None,
            hash: image.base_hash(),
            state: BuildState {
                user,
                workdir: image.config.workdir.clone(),
                env: image.config.env.clone(),
            },
            rootfs: image.rootfs,
            id_map_base: kiln_runtime::ID_MAP_BASE,
            disk_size_mb: crate::DEFAULT_DISK_SIZE_MB,
            rootfs_bytes: image.rootfs_bytes,
        })
    }
}

/// Where a build's steps start.
pub(super) struct Parent {
    /// The base's root filesystem (a resolved path: a later build of the base does not
    /// move it).
    pub(super) rootfs: PathBuf,
    /// The layer hash of the base, which every step's hash chains from.
    pub(super) hash: String,
    pub(super) state: BuildState,
    pub(super) id_map_base: u32,
    pub(super) disk_size_mb: u64,
    pub(super) rootfs_bytes: u64,
    /// The cache entry the base lives in (an image's or an internal Debian base's
    /// directory), marked used by the build.
    pub(super) cache_entry: Option<PathBuf>,
    /// For [`LayerChain::image`].
    pub(super) image_key: Option<String>,
    /// For [`LayerChain::base`].
    pub(super) debian_base: Option<String>,
}

/// The parent a template of this store (or a Debian base) gives a build.
fn parent_of(t: &Template) -> Result<Parent, BuildError> {
    let rootfs = fs::canonicalize(&t.rootfs).map_err(|source| TemplateError::Io {
        path: t.rootfs.clone(),
        source,
    })?;
    // The user's home counts as "no WORKDIR" (E2B's base), so that a relative
    // WORKDIR resolves against `/`.
    let workdir = Some(t.meta.default_workdir.clone())
        .filter(|w| *w != recipe::home_of(&t.meta.default_user));
    Ok(Parent {
        rootfs,
        hash: recipe::base_hash(&t.name, &t.meta.build_hash),
        state: BuildState {
            user: t.meta.default_user.clone(),
            workdir,
            env: t.meta.envs.clone(),
        },
        id_map_base: t.meta.id_map_base,
        disk_size_mb: t.meta.disk_size_mb,
        rootfs_bytes: t.meta.rootfs_bytes,
        cache_entry: None,
        image_key: None,
        debian_base: None,
    })
}

/// A pull's progress as lines of the `base` step's log.
fn pull_event_log(e: PullEvent) -> BuildLog {
    let (level, message) = match e {
        PullEvent::Log { line } => (LogLevel::Info, line),
        PullEvent::Warning { message } => (LogLevel::Warn, message),
    };
    BuildLog {
        level,
        step: Some("base".into()),
        message: format!("[base] {message}"),
    }
}

/// A Debian base's build progress as lines of the `base` step's log.
fn debian_event_log(d: &DebianBase, e: BuildEvent) -> BuildLog {
    let (level, message) = match e {
        BuildEvent::Started { reason, .. } => (
            LogLevel::Info,
            format!(
                "building the Debian {} ({}) base {} with mmdebstrap ({reason}); it is \
                 cached for later builds",
                d.version, d.suite, d.template
            ),
        ),
        BuildEvent::Step { index, total, name } => (
            LogLevel::Info,
            format!("[{}] {index}/{total} {name}", d.template),
        ),
        BuildEvent::Log { line } => (LogLevel::Info, line),
        BuildEvent::Warning { message } => (LogLevel::Warn, message),
        BuildEvent::Finished { secs } => (
            LogLevel::Info,
            format!("built the Debian {} base in {secs:.0}s", d.suite),
        ),
    };
    BuildLog {
        level,
        step: Some("base".into()),
        message: format!("[base] {message}"),
    }
}
