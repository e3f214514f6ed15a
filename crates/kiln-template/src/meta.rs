//! `template.json`: what a built template is, written last so that its presence marks a
//! complete template.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// File name of a template's metadata inside its directory.
pub const META_FILE: &str = "template.json";
/// Version of the `template.json` layout this crate writes and reads.
pub const META_FORMAT: u32 = 1;

/// Metadata of a built template, stored as `<template dir>/template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Layout version of this file ([`META_FORMAT`]).
    pub format: u32,
    /// Template name, e.g. `base`.
    pub name: String,
    /// When the build finished.
    pub created_at: DateTime<Utc>,
    /// User that envd runs commands as when the SDK names none.
    pub default_user: String,
    /// Working directory for commands and relative paths when none is given.
    pub default_workdir: String,
    /// Default CPU count of a sandbox from this template.
    pub cpu_count: u32,
    /// Default memory limit of a sandbox from this template, in MiB.
    pub memory_mb: u64,
    /// Disk size reported for a sandbox from this template, in MiB.
    pub disk_size_mb: u64,
    /// envd protocol version sandboxes from this template report (`envdVersion`).
    pub envd_version: String,
    /// Version of Kiln that built the template.
    pub kiln_version: String,
    /// Hash of the build recipe; a template whose hash differs from the current recipe
    /// is rebuilt.
    pub build_hash: String,
    /// Host id that sandbox uid/gid 0 maps to; files in `rootfs` are owned by
    /// `id_map_base + sandbox id`.
    pub id_map_base: u32,
    /// Bytes of regular-file data in the root filesystem (hard links counted once).
    pub rootfs_bytes: u64,
    /// Started in the background in every new sandbox (as the default user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    /// Must exit 0 before a new sandbox is handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    /// Environment variables set by the recipe's ENV steps, given to every sandbox.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub envs: std::collections::BTreeMap<String, String>,
    /// The runtime the template's sandboxes run on (`jail`, `gvisor`); `None`: the
    /// server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The port of the template's browser DevTools endpoint (`kiln.toml`'s
    /// `cdp_port`), which Kiln's proxy serves with its CDP route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdp_port: Option<u16>,
    /// What the build used from the caches, for [`crate::gc`]. `None` for the Debian
    /// bases and for templates built before it was recorded (then only the layer the
    /// `rootfs` symlink points at counts as used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<LayerChain>,
}

/// The cache entries a built template was made from: kept by [`crate::gc`] while the
/// template is installed, so rebuilding it (or a recipe sharing its first steps) hits
/// the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerChain {
    /// Hashes of its step layers under `templates/.layers/`, first to last (ENV steps
    /// make none; the one-off layers of forced steps are left out, they are removed).
    #[serde(default)]
    pub layers: Vec<String>,
    /// Files hashes of its COPY contexts under `templates/.files/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Cache key of its pulled base image under `templates/.images/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Name of its internal Debian base under `templates/.bases/` (e.g. `base-trixie`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// Reading or writing `template.json` failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid template metadata")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format {found}, this Kiln reads format {META_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl TemplateMeta {
    /// Reads `dir/template.json`; `Ok(None)` when the file does not exist.
    pub fn read(dir: &Path) -> Result<Option<Self>, MetaError> {
        let path = dir.join(META_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(MetaError::Read { path, source }),
        };
        let meta: TemplateMeta =
            serde_json::from_slice(&bytes).map_err(|source| MetaError::Parse {
                path: path.clone(),
                source,
            })?;
        if meta.format != META_FORMAT {
            return Err(MetaError::Format {
                path,
                found: meta.format,
            });
        }
        Ok(Some(meta))
    }

    /// Writes `dir/template.json` atomically: a temporary file is written and synced,
    /// then renamed over the final name, and the directory is synced.
    pub fn write(&self, dir: &Path) -> Result<(), MetaError> {
        let path = dir.join(META_FILE);
        let tmp = dir.join(format!(".{META_FILE}.tmp"));
        let werr = |source| MetaError::Write {
            path: path.clone(),
            source,
        };
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| werr(io::Error::other(e)))?;
        json.push(b'\n');
        let mut file = fs::File::create(&tmp).map_err(werr)?;
        file.write_all(&json).map_err(werr)?;
        file.sync_all().map_err(werr)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(werr)?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        Ok(())
    }

    /// Removes `dir/template.json` (marks the template incomplete); missing is fine.
    pub fn remove(dir: &Path) -> Result<(), MetaError> {
        let path = dir.join(META_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(MetaError::Write { path, source }),
        }
    }
}

/// A template's metadata as the crate's tests need it: `name`, `build_hash`, defaults
/// for the rest (override with struct-update syntax).
#[cfg(test)]
pub(crate) fn test_meta(name: &str, build_hash: &str) -> TemplateMeta {
    TemplateMeta {
        format: META_FORMAT,
        name: name.into(),
        created_at: Utc::now(),
        default_user: "user".into(),
        default_workdir: "/home/user".into(),
        cpu_count: 2,
        memory_mb: 512,
        disk_size_mb: 4096,
        envd_version: crate::ENVD_VERSION.into(),
        kiln_version: "test".into(),
        build_hash: build_hash.into(),
        id_map_base: kiln_runtime::ID_MAP_BASE,
        rootfs_bytes: 0,
        start_cmd: None,
        ready_cmd: None,
        runtime: None,
        cdp_port: None,
        envs: Default::default(),
        chain: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TemplateMeta {
        TemplateMeta {
            format: META_FORMAT,
            name: "base".into(),
            created_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:00.5Z")
                .unwrap()
                .with_timezone(&Utc),
            default_user: "user".into(),
            default_workdir: "/home/user".into(),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 4096,
            envd_version: "0.6.13".into(),
            kiln_version: "0.1.0".into(),
            build_hash: "ab".repeat(32),
            id_map_base: 100_000,
            rootfs_bytes: 42,
            start_cmd: None,
            ready_cmd: None,
            runtime: None,
            cdp_port: None,
            envs: Default::default(),
            chain: None,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TemplateMeta::read(dir.path()).unwrap(), None);
        let meta = sample();
        meta.write(dir.path()).unwrap();
        assert_eq!(TemplateMeta::read(dir.path()).unwrap(), Some(meta.clone()));
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(META_FILE)]);
        // Overwrite works.
        let mut newer = meta;
        newer.cpu_count = 4;
        newer.write(dir.path()).unwrap();
        assert_eq!(
            TemplateMeta::read(dir.path()).unwrap().unwrap().cpu_count,
            4
        );
        // The layer chain round-trips; a file without one (older Kiln) reads as None.
        let mut chained = sample();
        chained.chain = Some(LayerChain {
            layers: vec!["a".repeat(64)],
            files: vec!["f".repeat(64)],
            image: Some("v1-sha256-00".into()),
            base: None,
        });
        chained.write(dir.path()).unwrap();
        assert_eq!(TemplateMeta::read(dir.path()).unwrap(), Some(chained));
        let mut old = serde_json::to_value(sample()).unwrap();
        old.as_object_mut().unwrap().remove("chain");
        fs::write(dir.path().join(META_FILE), old.to_string()).unwrap();
        assert_eq!(TemplateMeta::read(dir.path()).unwrap().unwrap().chain, None);
        TemplateMeta::remove(dir.path()).unwrap();
        TemplateMeta::remove(dir.path()).unwrap();
        assert_eq!(TemplateMeta::read(dir.path()).unwrap(), None);
    }

    #[test]
    fn corrupt_and_future_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(META_FILE), b"{not json").unwrap();
        assert!(matches!(
            TemplateMeta::read(dir.path()),
            Err(MetaError::Parse { .. })
        ));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["format"] = 99.into();
        fs::write(dir.path().join(META_FILE), v.to_string()).unwrap();
        assert!(matches!(
            TemplateMeta::read(dir.path()),
            Err(MetaError::Format { found: 99, .. })
        ));
    }
}
