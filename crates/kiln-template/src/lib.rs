//! Kiln templates: building and storing the root filesystems sandboxes start from.
//!
//! Layout under the data directory:
//!
//! ```text
//! templates/<name>/rootfs/          the root filesystem, owned by the sandbox id range
//! templates/<name>/template.json    metadata; written last, so it marks a complete build
//! templates/<name>/.rootfs.build/   a build in progress (removed on the next build)
//! templates/.<name>.lock            held while <name> is being built
//! templates/.layers/<hash>/         build-step layers (see [`build`])
//! templates/.images/<key>/rootfs/   base images pulled from OCI registries (see [`oci`])
//! templates/.bases/<name>/          internal Debian bases other than `base` (e.g.
//!                                   `base-trixie`), laid out like a template
//! templates/.files/<hash>           uploaded COPY contexts
//! templates/.store.lock             shared by builds, exclusive for [`gc`]
//! ```
//!
//! The built-in `base` is built by [`TemplateStore::ensure_base`], the other Debian
//! bases ([`base::DEBIAN_BASES`]) by [`TemplateStore::ensure_debian`] when a build
//! first asks for one; other templates by [`TemplateStore::build`] from a recipe.
//! [`TemplateStore::gc`] removes what no installed template needs. Progress is reported
//! as typed [`BuildEvent`]s and [`build::BuildLog`]s; drawing them is the caller's job.
//!
//! Code map (a module uses only those listed before it):
//! - [`fsutil`] (paths inside a root), [`shift`] (the uid shift), [`layer`] (hard-link
//!   farms, overlay uppers), [`meta`] (`template.json`), [`image`] (ext4 images).
//! - [`unpack`]: the tar walker of image layers and COPY contexts, with its limits.
//! - [`base`]: the Debian bases; [`recipe`]: the E2B recipe, its hashes, its image source.
//! - [`oci`]: images pulled from registries; [`copy`]: COPY steps; [`dockerfile`]:
//!   Dockerfile projects turned into recipes.
//! - [`build`]: the step executor and layer cache (a build's parent in `build_parent.rs`).
//! - [`gc`]: garbage collection of every cache the modules above fill.

#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};

pub mod base;
pub mod build;
pub mod copy;
pub mod dockerfile;
pub mod fsutil;
pub mod gc;
pub mod image;
pub mod layer;
pub mod meta;
pub mod oci;
pub mod recipe;
pub mod shift;
pub mod unpack;

pub use gc::{GcPolicy, GcReport};
pub use meta::{LayerChain, MetaError, TemplateMeta, META_FILE, META_FORMAT};

/// Name of the built-in template every sandbox starts from unless told otherwise.
pub const BASE: &str = "base";
/// The envd protocol version Kiln's envd speaks (what the SDK gates features on).
pub const ENVD_VERSION: &str = "0.6.13";
/// Default CPU count of a base sandbox (as E2B's default sandbox).
pub const DEFAULT_CPU_COUNT: u32 = 2;
/// Default memory of a base sandbox, in MiB (as E2B's default sandbox).
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Disk size reported for a base sandbox, in MiB.
pub const DEFAULT_DISK_SIZE_MB: u64 = 4096;

pub(crate) const ROOTFS_DIR: &str = "rootfs";
const BUILD_DIR: &str = ".rootfs.build";
/// Directory of the internal Debian bases (all but `base`) in the templates directory.
pub const BASES_DIR: &str = ".bases";
/// Lock file held shared by every build and exclusively by [`TemplateStore::gc`].
const STORE_LOCK: &str = ".store.lock";

/// A complete, servable template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Template name, e.g. `base`.
    pub name: String,
    /// The template's directory (`<data_dir>/templates/<name>`).
    pub dir: PathBuf,
    /// The root filesystem (`<dir>/rootfs`), owned by the sandbox id range.
    pub rootfs: PathBuf,
    /// What `template.json` says.
    pub meta: TemplateMeta,
}

/// Progress of a template build.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BuildEvent {
    /// A build starts (nothing usable was cached).
    Started {
        template: String,
        build_hash: String,
        /// Why a build is needed, e.g. "not built yet".
        reason: String,
    },
    /// A build step starts; `index` counts from 1 up to `total`.
    Step {
        index: u32,
        total: u32,
        name: String,
    },
    /// One line of output of a build tool.
    Log { line: String },
    /// Something is off but the build goes on.
    Warning { message: String },
    /// The template is installed and servable.
    Finished { secs: f64 },
}

/// A template operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid template name {name:?}: use 1-64 of a-z, 0-9, '-' and '_', starting with a letter or digit")]
    InvalidName { name: String },
    #[error("cannot create or open {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path} (another build of this template?)")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("template metadata")]
    Meta(#[from] MetaError),
    #[error("removing an old or half-built template")]
    Remove(#[from] fsutil::RemoveError),
    #[error("building the {template} root filesystem with mmdebstrap")]
    Mmdebstrap {
        template: String,
        #[source]
        source: base::MmdebstrapError,
    },
    #[error("injecting the guest binaries")]
    Inject(#[from] base::InjectError),
    #[error("shifting file ownership into the sandbox id range")]
    Shift(#[from] shift::ShiftError),
    #[error("a build task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Where templates live and how they are built.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    templates_dir: PathBuf,
    /// Where the guest binaries copied into a Debian base built during a template build
    /// come from; `None`: the running binary's directory (`kiln serve`'s default).
    guest_bin_dir: Option<PathBuf>,
    /// mmdebstrap to run instead of the one on `PATH` (tests use a fake one).
    mmdebstrap: Option<PathBuf>,
}

impl TemplateStore {
    /// Opens (creating if needed) the template store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, TemplateError> {
        let templates_dir = data_dir.join("templates");
        fs::create_dir_all(&templates_dir).map_err(|source| TemplateError::Io {
            path: templates_dir.clone(),
            source,
        })?;
        Ok(Self {
            templates_dir,
            guest_bin_dir: None,
            mmdebstrap: None,
        })
    }

    /// Copies the guest binaries from `dir` into Debian bases built during template
    /// builds (the runtime binds the current ones at start in any case).
    pub fn with_guest_bin_dir(mut self, dir: PathBuf) -> Self {
        self.guest_bin_dir = Some(dir);
        self
    }

    /// The directory holding all templates (`<data_dir>/templates`).
    pub fn templates_dir(&self) -> &Path {
        &self.templates_dir
    }

    /// The complete template `name`, or `None` when it is missing or half-built.
    pub fn get(&self, name: &str) -> Result<Option<Template>, TemplateError> {
        validate_name(name)?;
        read_template(self.templates_dir.join(name), name)
    }

    /// Where the Debian base `b` lives: `templates/base` for the built-in one, else
    /// `templates/.bases/<name>` (internal: not listed, not a sandbox template).
    pub fn debian_dir(&self, b: &base::DebianBase) -> PathBuf {
        if b.template == BASE {
            self.templates_dir.join(BASE)
        } else {
            self.templates_dir.join(BASES_DIR).join(b.template)
        }
    }

    /// Every complete template, sorted by name. Entries that are half-built or whose
    /// metadata is unreadable are left out (and logged).
    pub fn list(&self) -> Result<Vec<Template>, TemplateError> {
        let io_err = |source| TemplateError::Io {
            path: self.templates_dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.templates_dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            match self.get(&name) {
                Ok(Some(t)) => out.push(t),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(template = %name, error = %ErrorChain(&e), "skipping template")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Returns the `base` template, building it first if it is missing, half-built or
    /// from another recipe. Returns at once when it is complete. Concurrent callers (in
    /// this or another process) wait for one build.
    ///
    /// `guest_bin_dir` holds `kiln-init` and `kiln-envd`, copied into `/opt/kiln/bin`;
    /// missing ones are reported as [`BuildEvent::Warning`].
    ///
    /// A rebuild replaces the old root filesystem in place, so call this before any
    /// sandbox of the template runs (at server start). Needs root: mmdebstrap runs in
    /// root mode and the ownership shift chowns to other ids.
    pub async fn ensure_base(
        &self,
        guest_bin_dir: &Path,
        on_event: impl FnMut(BuildEvent) + Send,
    ) -> Result<Template, TemplateError> {
        self.ensure_base_with(self.mmdebstrap.as_deref(), guest_bin_dir, on_event)
            .await
    }

    /// [`Self::ensure_base`] with an explicit mmdebstrap program (tests use a fake one).
    pub(crate) async fn ensure_base_with(
        &self,
        mmdebstrap: Option<&Path>,
        guest_bin_dir: &Path,
        on_event: impl FnMut(BuildEvent) + Send,
    ) -> Result<Template, TemplateError> {
        self.ensure_debian_with(&base::BOOKWORM, mmdebstrap, guest_bin_dir, on_event)
            .await
    }

    /// [`Self::ensure_base`] for any of [`base::DEBIAN_BASES`]: returns the Debian base
    /// `b`, building it first (one build at a time per base, across processes) if it is
    /// missing or from another recipe. A rebuild replaces its root filesystem in place:
    /// templates built on it do not notice (their layers are hard-link farms), and
    /// builds in progress hold the store lock.
    pub async fn ensure_debian(
        &self,
        b: &base::DebianBase,
        guest_bin_dir: &Path,
        on_event: impl FnMut(BuildEvent) + Send,
    ) -> Result<Template, TemplateError> {
        self.ensure_debian_with(b, self.mmdebstrap.as_deref(), guest_bin_dir, on_event)
            .await
    }

    async fn ensure_debian_with(
        &self,
        b: &base::DebianBase,
        mmdebstrap: Option<&Path>,
        guest_bin_dir: &Path,
        mut on_event: impl FnMut(BuildEvent) + Send,
    ) -> Result<Template, TemplateError> {
        let hash = b.recipe_hash();
        let dir = self.debian_dir(b);
        if let Some(t) = current(&dir, b.template, &hash)? {
            return Ok(t);
        }
        let _lock = self.lock(b.template).await?;
        // Someone else may have built it while we waited for the lock.
        let reason = match read_template(dir.clone(), b.template) {
            Ok(Some(t)) if t.meta.build_hash == hash => return Ok(t),
            Ok(Some(_)) => "the base recipe changed".to_string(),
            Ok(None) => "not built yet".to_string(),
            Err(e) => format!("unreadable metadata ({})", ErrorChain(&e)),
        };
        on_event(BuildEvent::Started {
            template: b.template.to_string(),
            build_hash: hash.clone(),
            reason,
        });
        let started = Instant::now();
        let template = self
            .build_base(b, mmdebstrap, guest_bin_dir, &hash, &mut on_event)
            .await?;
        on_event(BuildEvent::Finished {
            secs: started.elapsed().as_secs_f64(),
        });
        Ok(template)
    }

    async fn lock(&self, name: &str) -> Result<Flock<fs::File>, TemplateError> {
        lock_path(self.templates_dir.join(format!(".{name}.lock"))).await
    }

    /// The store lock: shared while a build runs, exclusive while [`Self::gc`] runs.
    pub(crate) async fn lock_store(
        &self,
        exclusive: bool,
    ) -> Result<Flock<fs::File>, TemplateError> {
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        lock_path_as(self.templates_dir.join(STORE_LOCK), arg).await
    }

    async fn build_base(
        &self,
        b: &base::DebianBase,
        mmdebstrap: Option<&Path>,
        guest_bin_dir: &Path,
        hash: &str,
        on_event: &mut (dyn FnMut(BuildEvent) + Send),
    ) -> Result<Template, TemplateError> {
        let dir = self.debian_dir(b);
        let build = dir.join(BUILD_DIR);
        let rootfs = dir.join(ROOTFS_DIR);

        let mmdebstrap_err = |source| TemplateError::Mmdebstrap {
            template: b.template.to_string(),
            source,
        };
        let program = match mmdebstrap {
            Some(p) => p.to_path_buf(),
            None => base::find_program("mmdebstrap")
                .ok_or(base::MmdebstrapError::Missing)
                .map_err(mmdebstrap_err)?,
        };

        step(on_event, 1, "remove stale build");
        fs::create_dir_all(&dir).map_err(|source| TemplateError::Io {
            path: dir.clone(),
            source,
        })?;
        // Metadata goes first: from here until the end the template is incomplete.
        TemplateMeta::remove(&dir)?;
        let (stale_build, stale_rootfs) = (build.clone(), rootfs.clone());
        tokio::task::spawn_blocking(move || {
            fsutil::remove_tree(&stale_build)?;
            fsutil::remove_tree(&stale_rootfs)
        })
        .await??;

        step(
            on_event,
            2,
            &format!("mmdebstrap (Debian {} {}, minbase)", b.version, b.suite),
        );
        let mirrors = b.configured_mirrors();
        for m in &mirrors {
            on_event(BuildEvent::Log {
                line: format!("apt source: {m}"),
            });
        }
        let mut on_line = |line: String| on_event(BuildEvent::Log { line });
        base::run_mmdebstrap(&program, b, &build, &mirrors, &mut on_line)
            .await
            .map_err(mmdebstrap_err)?;

        step(on_event, 3, "Kiln mount points and guest binaries");
        base::finalize_rootfs(&build)?;
        for missing in base::inject_guest_binaries(&build, guest_bin_dir)? {
            on_event(BuildEvent::Warning {
                message: format!(
                    "guest binary {} not found; not copied into the template (the runtime \
                     binds the current binaries at start)",
                    missing.path.display()
                ),
            });
        }

        step(on_event, 4, "shift ownership into the sandbox id range");
        let tree = build.clone();
        let stats = tokio::task::spawn_blocking(move || {
            shift::shift_ids(
                &tree,
                kiln_runtime::ID_MAP_BASE,
                kiln_runtime::ID_MAP_LEN,
                &mut shift::HostChown,
            )
        })
        .await??;
        on_event(BuildEvent::Log {
            line: format!(
                "shifted {} inodes ({} MiB), restored {} setuid/setgid/sticky modes",
                stats.inodes,
                stats.bytes >> 20,
                stats.special_modes_restored
            ),
        });

        step(on_event, 5, "install");
        fs::rename(&build, &rootfs).map_err(|source| TemplateError::Io {
            path: rootfs.clone(),
            source,
        })?;
        let meta = TemplateMeta {
            format: META_FORMAT,
            name: b.template.to_string(),
            created_at: chrono::Utc::now(),
            default_user: base::USER.to_string(),
            default_workdir: base::USER_HOME.to_string(),
            cpu_count: DEFAULT_CPU_COUNT,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_size_mb: DEFAULT_DISK_SIZE_MB,
            envd_version: ENVD_VERSION.to_string(),
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            build_hash: hash.to_string(),
            id_map_base: kiln_runtime::ID_MAP_BASE,
            rootfs_bytes: stats.bytes,
            start_cmd: None,
            ready_cmd: None,
            runtime: None,
            cdp_port: None,
            envs: Default::default(),
            chain: None,
        };
        install(&dir, &meta)?;
        Ok(Template {
            name: b.template.to_string(),
            dir,
            rootfs,
            meta,
        })
    }
}

/// The complete template in `dir` (named `name`), or `None` when it is missing or
/// half-built.
fn read_template(dir: PathBuf, name: &str) -> Result<Option<Template>, TemplateError> {
    let Some(meta) = TemplateMeta::read(&dir)? else {
        return Ok(None);
    };
    let rootfs = dir.join(ROOTFS_DIR);
    if !rootfs.is_dir() {
        return Ok(None);
    }
    Ok(Some(Template {
        name: name.to_string(),
        dir,
        rootfs,
        meta,
    }))
}

/// The template in `dir` if it is complete and built from the recipe with `hash`.
fn current(dir: &Path, name: &str, hash: &str) -> Result<Option<Template>, TemplateError> {
    match read_template(dir.to_path_buf(), name) {
        Ok(Some(t)) if t.meta.build_hash == hash => Ok(Some(t)),
        Ok(_) => Ok(None),
        // Corrupt metadata is rebuilt, not fatal.
        Err(TemplateError::Meta(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting for it in a
/// blocking task; released when the returned guard drops.
pub(crate) async fn lock_path(path: PathBuf) -> Result<Flock<fs::File>, TemplateError> {
    lock_path_as(path, FlockArg::LockExclusive).await
}

/// [`lock_path`] with the lock's kind (shared or exclusive).
async fn lock_path_as(path: PathBuf, arg: FlockArg) -> Result<Flock<fs::File>, TemplateError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| TemplateError::Io {
            path: path.clone(),
            source,
        })?;
    tokio::task::spawn_blocking(move || {
        Flock::lock(file, arg).map_err(|(_, source)| TemplateError::Lock { path, source })
    })
    .await?
}

/// Steps of a base build, for [`BuildEvent::Step`].
const BASE_STEPS: u32 = 5;

fn step(on_event: &mut (dyn FnMut(BuildEvent) + Send), index: u32, name: &str) {
    on_event(BuildEvent::Step {
        index,
        total: BASE_STEPS,
        name: name.to_string(),
    });
}

/// Marks the template in `dir` (whose `rootfs` is in place) complete: syncs the
/// directory so the rename is durable, then writes `template.json` atomically.
pub(crate) fn install(dir: &Path, meta: &TemplateMeta) -> Result<(), TemplateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| TemplateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    meta.write(dir)?;
    Ok(())
}

/// Template names are single path components from a small alphabet.
pub(crate) fn validate_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(TemplateError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Displays an error with its whole `source()` chain, `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
