//! Garbage collection of the template caches: step layers (`.layers/`), uploaded COPY
//! contexts (`.files/`), pulled images (`.images/`) and internal Debian bases
//! (`.bases/`).
//!
//! **Reachable** is what an installed template needs or names: the entry its `rootfs`
//! symlink points into (the final layer, or an image or base when no step made a
//! layer), and everything its metadata's [`crate::LayerChain`] lists (all its step layers,
//! uploads, its image and its Debian base, so that rebuilding it hits the cache). A
//! template built before chains were recorded keeps only its final layer. Reachable
//! entries are never removed.
//!
//! **Policy** for the rest: an unreachable entry is kept while it was used within
//! [`GcPolicy::keep_unused`] (default [`DEFAULT_KEEP_UNUSED_DAYS`] days, set with
//! [`KEEP_DAYS_ENV`]). "Used" is the entry's mtime, which builds set when they create or
//! reuse it, and which replacing or deleting a template sets on its old final layer
//! (sandboxes of that version may still run on it). Whatever is mounted as the lower
//! layer of an overlay anywhere on the host (a running or paused sandbox, in any mount
//! namespace) is kept regardless.
//! Uploads are kept at least [`UPLOAD_GRACE`], since the SDK uploads before it starts
//! the build that uses them. Leftovers of interrupted builds and pulls (`.tmp-*`,
//! `*.ctx`) go at once; partial uploads after [`PARTIAL_UPLOAD_AGE`].
//!
//! A collection holds the store lock (`templates/.store.lock`) exclusively; every
//! build holds it shared, so nothing a build in progress uses is ever removed.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::build::LAYERS_DIR;
use crate::oci::IMAGES_DIR;
use crate::{fsutil, ErrorChain, TemplateError, TemplateMeta, TemplateStore, BASES_DIR};

/// Days an unreachable cache entry is kept after its last use, by default.
pub const DEFAULT_KEEP_UNUSED_DAYS: u64 = 7;
/// Environment variable the server reads [`GcPolicy::keep_unused`] from, in days
/// (a decimal number; `0` removes every unreachable entry).
pub const KEEP_DAYS_ENV: &str = "KILN_TEMPLATE_CACHE_DAYS";
/// Uploads younger than this are kept whatever the policy.
pub const UPLOAD_GRACE: Duration = Duration::from_secs(3600);
/// A partial upload (`.<hash>.<token>.part`) older than this was abandoned.
pub const PARTIAL_UPLOAD_AGE: Duration = Duration::from_secs(24 * 3600);
/// Directory of uploaded COPY contexts inside the templates directory.
pub const FILES_DIR: &str = ".files";

/// How long unreachable cache entries are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// Unreachable entries last used longer ago than this are removed.
    pub keep_unused: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self::days(DEFAULT_KEEP_UNUSED_DAYS as f64).unwrap_or(Self {
            keep_unused: Duration::ZERO,
        })
    }
}

/// A keep period that is not a number of days.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a number of days (a decimal number from 0 to 36500, e.g. 7 or 0.5)")]
pub struct BadDays {
    pub value: String,
}

impl GcPolicy {
    /// Keeps unreachable entries used within the last `days` days.
    pub fn days(days: f64) -> Result<Self, BadDays> {
        if !(0.0..=36500.0).contains(&days) {
            return Err(BadDays {
                value: days.to_string(),
            });
        }
        Ok(Self {
            keep_unused: Duration::from_secs_f64(days * 86400.0),
        })
    }

    /// The policy [`KEEP_DAYS_ENV`] gives, the default when it is unset or empty.
    pub fn from_env() -> Result<Self, BadDays> {
        match std::env::var(KEEP_DAYS_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let days = v
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| BadDays { value: v.clone() })?;
                Self::days(days)
            }
            _ => Ok(Self::default()),
        }
    }
}

/// What a collection removed and kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub removed_layers: usize,
    pub removed_uploads: usize,
    pub removed_images: usize,
    pub removed_bases: usize,
    /// Leftovers of interrupted builds, pulls and uploads.
    pub removed_temporary: usize,
    /// Disk space given back: blocks of the removed inodes that had no other link.
    pub freed_bytes: u64,
    /// Layers an installed template needs.
    pub kept_layers: usize,
    /// Unreachable layers, uploads, images and bases kept because they were used
    /// within the policy's period.
    pub kept_recent: usize,
    /// Entries whose removal failed (each is logged).
    pub failed: usize,
}

impl TemplateStore {
    /// Removes the cache entries no installed template needs and nobody used within
    /// `policy` (see the [module docs](self)). Waits for builds in progress (in this
    /// or another process) to finish first.
    pub async fn gc(&self, policy: &GcPolicy) -> Result<GcReport, TemplateError> {
        let _exclusive = self.lock_store(true).await?;
        let dir = self.templates_dir.clone();
        let policy = *policy;
        let report = tokio::task::spawn_blocking(move || collect(&dir, &policy, SystemTime::now()))
            .await??;
        Ok(report)
    }
}

/// What installed templates need, by cache.
#[derive(Debug, Default)]
struct Reachable {
    layers: HashSet<String>,
    files: HashSet<String>,
    images: HashSet<String>,
    bases: HashSet<String>,
}

impl Reachable {
    /// Records the cache entry `path` lies in (if it lies in one).
    fn add_path(&mut self, templates_dir: &Path, path: &Path) {
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let canonical_dir =
            fs::canonicalize(templates_dir).unwrap_or_else(|_| templates_dir.to_path_buf());
        let rel = canonical
            .strip_prefix(&canonical_dir)
            .or_else(|_| path.strip_prefix(templates_dir));
        let Ok(rel) = rel else {
            return;
        };
        let mut parts = rel.components().filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        });
        let (Some(cache), Some(entry)) = (parts.next(), parts.next()) else {
            return;
        };
        let set = match cache {
            LAYERS_DIR => &mut self.layers,
            IMAGES_DIR => &mut self.images,
            BASES_DIR => &mut self.bases,
            _ => return,
        };
        set.insert(entry.to_string());
    }
}

/// What the templates in `templates_dir` need. Unreadable metadata only loses the
/// chain: the `rootfs` symlink still counts.
fn reachable(templates_dir: &Path) -> Result<Reachable, TemplateError> {
    let io_err = |source| TemplateError::Io {
        path: templates_dir.to_path_buf(),
        source,
    };
    let mut r = Reachable::default();
    // Whatever a live sandbox (running, paused, or a build step) has as its overlay's
    // lower layer stays, whatever its age or template.
    for lower in mounted_lower_dirs() {
        r.add_path(templates_dir, &lower);
    }
    for entry in fs::read_dir(templates_dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let dir = entry.path();
        if crate::validate_name(&name).is_err() || !dir.is_dir() {
            continue;
        }
        let rootfs = dir.join(crate::ROOTFS_DIR);
        if let Ok(target) = fs::read_link(&rootfs) {
            r.add_path(templates_dir, &target);
        }
        match TemplateMeta::read(&dir) {
            Ok(Some(meta)) => {
                if let Some(chain) = meta.chain {
                    r.layers.extend(chain.layers);
                    r.files.extend(chain.files);
                    r.images.extend(chain.image);
                    r.bases.extend(chain.base);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(template = %name, error = %ErrorChain(&e), "gc: unreadable metadata; keeping only the template's final layer")
            }
        }
    }
    Ok(r)
}

/// The lower directories of every overlay mounted on this host, in any mount namespace
/// (a jail sandbox mounts its root in its own; gVisor's is in the host's): read from
/// `/proc/<pid>/mountinfo`, one process per mount namespace.
fn mounted_lower_dirs() -> HashSet<PathBuf> {
    let mut seen_ns = HashSet::new();
    let mut out = HashSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(ns) = fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if !seen_ns.insert(ns) {
            continue;
        }
        if let Ok(text) = fs::read_to_string(p.path().join("mountinfo")) {
            out.extend(overlay_lower_dirs(&text));
        }
    }
    out
}

/// The `lowerdir=` paths of the overlay mounts in a `mountinfo` text.
fn overlay_lower_dirs(mountinfo: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // `... - <fstype> <source> <super options>`
        let Some((_, tail)) = line.split_once(" - ") else {
            continue;
        };
        let mut fields = tail.split(' ');
        if fields.next() != Some("overlay") {
            continue;
        }
        let Some(options) = fields.nth(1) else {
            continue;
        };
        for opt in options.split(',') {
            if let Some(dirs) = opt.strip_prefix("lowerdir=") {
                // mountinfo escapes space, tab, newline and backslash as octal.
                out.extend(dirs.split(':').map(|d| PathBuf::from(unescape_octal(d))));
            }
        }
    }
    out
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // `\ooo` with a first digit of 0-3 (one byte).
        let octal = b.get(i + 1..i + 4).filter(|d| {
            (b'0'..=b'3').contains(&d[0]) && d.iter().all(|c| (b'0'..=b'7').contains(c))
        });
        if let (b'\\', Some(d)) = (b[i], octal) {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One collection over `templates_dir` at time `now` (the store lock is held).
pub(crate) fn collect(
    templates_dir: &Path,
    policy: &GcPolicy,
    now: SystemTime,
) -> Result<GcReport, TemplateError> {
    let reach = reachable(templates_dir)?;
    let mut report = GcReport::default();
    let mut sweep = Sweep {
        report: &mut report,
        now,
    };
    let age_of = |meta: &fs::Metadata| {
        meta.modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or(Duration::ZERO)
    };

    // No build runs: no layer is being made, so none of their locks is held.
    let locks = templates_dir.join(crate::build::LAYER_LOCKS_DIR);
    if let Err(e) = fs::remove_dir_all(&locks) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %locks.display(), error = %e, "gc: removing the layer locks failed");
        }
    }

    for (name, path, meta) in entries(&templates_dir.join(LAYERS_DIR))? {
        // `.old-*`: a real rootfs directory moved aside by an install (sandboxes may
        // run on it).
        if (is_hash(&name) && meta.is_dir()) || name.starts_with(".old-") {
            if reach.layers.contains(&name) {
                sweep.report.kept_layers += 1;
            } else if sweep.expired(&meta, policy.keep_unused) {
                sweep.remove(&path, Kind::Layer);
            } else {
                sweep.report.kept_recent += 1;
            }
        } else if name.starts_with(".tmp-") || name.ends_with(".ctx") {
            sweep.remove(&path, Kind::Temporary);
        }
    }

    let upload_keep = policy.keep_unused.max(UPLOAD_GRACE);
    for (name, path, meta) in entries(&templates_dir.join(FILES_DIR))? {
        if is_hash(&name) && meta.is_file() {
            if reach.files.contains(&name) {
                continue;
            } else if sweep.expired(&meta, upload_keep) {
                sweep.remove(&path, Kind::Upload);
            } else {
                sweep.report.kept_recent += 1;
            }
        } else if name.starts_with('.')
            && name.ends_with(".part")
            && age_of(&meta) > PARTIAL_UPLOAD_AGE
        {
            sweep.remove(&path, Kind::Temporary);
        }
    }

    let images = templates_dir.join(IMAGES_DIR);
    for (name, path, meta) in entries(&images)? {
        if name.starts_with(".tmp-") {
            sweep.remove(&path, Kind::Temporary);
        } else if name == "refs"
            || name.starts_with('.')
            || !meta.is_dir()
            || reach.images.contains(&name)
        {
            continue;
        } else if sweep.expired(&meta, policy.keep_unused) {
            sweep.remove(&path, Kind::Image);
        } else {
            sweep.report.kept_recent += 1;
        }
    }
    forget_removed_images(&images);

    for (name, path, meta) in entries(&templates_dir.join(BASES_DIR))? {
        if !meta.is_dir() || reach.bases.contains(&name) {
            continue;
        }
        if sweep.expired(&meta, policy.keep_unused) {
            sweep.remove(&path, Kind::Base);
        } else {
            sweep.report.kept_recent += 1;
        }
    }
    Ok(report)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Layer,
    Upload,
    Image,
    Base,
    Temporary,
}

struct Sweep<'a> {
    report: &'a mut GcReport,
    now: SystemTime,
}

impl Sweep<'_> {
    /// Whether an entry with `meta` was last used longer than `keep` ago.
    fn expired(&self, meta: &fs::Metadata, keep: Duration) -> bool {
        let age = meta
            .modified()
            .ok()
            .and_then(|m| self.now.duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        keep.is_zero() || age > keep
    }

    fn remove(&mut self, path: &Path, kind: Kind) {
        let freed = freed_by_removing(path);
        match fsutil::remove_tree(path) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), ?kind, freed, "gc: removed");
                self.report.freed_bytes += freed;
                let n = match kind {
                    Kind::Layer => &mut self.report.removed_layers,
                    Kind::Upload => &mut self.report.removed_uploads,
                    Kind::Image => &mut self.report.removed_images,
                    Kind::Base => &mut self.report.removed_bases,
                    Kind::Temporary => &mut self.report.removed_temporary,
                };
                *n += 1;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %ErrorChain(&e), "gc: removing failed");
                self.report.failed += 1;
            }
        }
    }
}

/// The entries of `dir` (none when it does not exist), with their metadata (not
/// following symlinks).
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf, fs::Metadata)>, TemplateError> {
    let io_err = |source| TemplateError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let list = match fs::read_dir(dir) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(e)),
    };
    let mut out = Vec::new();
    for entry in list {
        let entry = entry.map_err(io_err)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = entry.path();
        if let Ok(meta) = fs::symlink_metadata(&path) {
            out.push((name, path, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Drops `refs/*.json` records whose image is gone (the offline fallback of a pull
/// must not point at a removed image; a later pull records it again).
fn forget_removed_images(images: &Path) {
    #[derive(serde::Deserialize)]
    struct RefRecord {
        key: String,
    }
    let Ok(list) = fs::read_dir(images.join("refs")) else {
        return;
    };
    for entry in list.flatten() {
        let path = entry.path();
        let key = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<RefRecord>(&b).ok())
            .map(|r| r.key);
        let gone = key.is_none_or(|k| !images.join(k).is_dir());
        if gone && path.extension().is_some_and(|e| e == "json") {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Bytes given back when the tree at `path` is removed now: the blocks of every
/// directory and of every other inode whose last link is in the tree. Layers are
/// hard-link farms, so a file shared with a layer that stays frees nothing. Other
/// filesystems mounted inside are not entered.
fn freed_by_removing(path: &Path) -> u64 {
    let Ok(top) = fs::symlink_metadata(path) else {
        return 0;
    };
    let dev = top.dev();
    let mut total = 0;
    let mut stack = vec![(path.to_path_buf(), top)];
    while let Some((p, meta)) = stack.pop() {
        if meta.is_dir() {
            total += meta.blocks() * 512;
            if meta.dev() != dev {
                continue;
            }
            if let Ok(list) = fs::read_dir(&p) {
                for e in list.flatten() {
                    if let Ok(m) = fs::symlink_metadata(e.path()) {
                        stack.push((e.path(), m));
                    }
                }
            }
        } else if meta.nlink() <= 1 {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// A layer or upload name: 64 lower-case hex digits.
fn is_hash(name: &str) -> bool {
    crate::recipe::is_files_hash(name)
}

#[cfg(test)]
#[path = "gc_tests.rs"]
mod tests;
