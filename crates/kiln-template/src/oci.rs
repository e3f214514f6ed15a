//! Base images pulled from OCI registries (`fromImage` other than the Debian names that
//! the built-in `base` template stands for).
//!
//! A pull resolves the reference (`[registry/]repository[:tag|@digest]`, Docker Hub's
//! `docker.io/library/…` by default) to the registry's linux/amd64 image manifest, then
//! unpacks the layers in order into a fresh root filesystem ([`crate::unpack`]:
//! whiteouts, modes, owners, links, never a path outside the tree) and prepares it the
//! way the Debian base is prepared: Kiln's mount points and neutral `/etc/hostname` and
//! `/etc/resolv.conf` ([`base::finalize_rootfs`]), a `root` account for envd when the
//! image has none, and the uid shift into the sandbox id range ([`shift`]). The image's
//! config gives the build its starting `Env`, `WorkingDir` and `User`. What to pull
//! ([`ImageSource`]) comes from the recipe; progress goes out as [`PullEvent`]s.
//!
//! Prepared images are cached by manifest digest under `templates/.images/<key>/`
//! (`rootfs/` and `image.json`, written last) and never changed afterwards: step layers
//! are hard-link farms of them. A later build of the same image asks the registry only
//! for the manifest (a digest reference not even that); when the registry cannot be
//! reached, the image last pulled for that reference is used, with a warning, unless the
//! build is forced.
//!
//! Registries are spoken to over HTTPS (rustls, the system's CA store), except those on
//! the loopback interface, which are plain HTTP (a registry a developer or a test runs
//! next to Kiln). Pulls are anonymous, or use the recipe's `fromImageRegistry` username
//! and password; the token flow of registries such as Docker Hub is oci-client's.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use serde::{Deserialize, Serialize};

use crate::recipe::ImageSource;
use crate::{base, fsutil, recipe, shift, unpack};

mod pull;

/// Directory of prepared images inside the templates directory.
pub const IMAGES_DIR: &str = ".images";
/// The record of a prepared image, written last.
const IMAGE_FILE: &str = "image.json";
/// Bump when unpacking or preparing changes what goes into the tree: the cache key
/// includes it, so images are prepared again (old ones stay for the layers built on
/// them).
const PREPARE_VERSION: u32 = 1;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for the next bytes of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `registry` (`host[:port]`) is on the loopback interface: `localhost`,
/// `127.0.0.0/8` or `[::1]`. Only those are spoken to over plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What the image's config sets for the processes it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `User` as written (`name`, `uid`, `name:group`, …); empty means root.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl ImageConfig {
    /// Reads the `config` object of an image configuration blob.
    pub fn parse(blob: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Blob {
            #[serde(default)]
            config: Option<Runtime>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Runtime {
            #[serde(default)]
            user: Option<String>,
            #[serde(default)]
            env: Option<Vec<String>>,
            #[serde(default)]
            working_dir: Option<String>,
        }
        let b: Blob = serde_json::from_slice(blob)?;
        let c = b.config.unwrap_or(Runtime {
            user: None,
            env: None,
            working_dir: None,
        });
        Ok(Self {
            user: c.user.unwrap_or_default(),
            workdir: c
                .working_dir
                .filter(|w| !w.trim().is_empty())
                .map(|w| recipe::normalize(&w)),
            env: c
                .env
                .unwrap_or_default()
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// The user name the build starts as: the name part of `User`, a numeric uid looked
    /// up in the image's `/etc/passwd` (envd runs commands by name), root when empty.
    pub fn start_user(&self, rootfs: &Path) -> Result<String, String> {
        let user = self.user.split(':').next().unwrap_or("").trim();
        if user.is_empty() {
            return Ok("root".to_string());
        }
        let Ok(uid) = user.parse::<u32>() else {
            return Ok(user.to_string());
        };
        // The image's own file: a regular file only, capped (never a fifo or a link out).
        let passwd = fsutil::read_layer_file(rootfs, "etc/passwd");
        passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2].parse() == Ok(uid)).then(|| f[0].to_string())
            })
            .ok_or_else(|| format!("the image's User {:?} has no /etc/passwd entry", self.user))
    }
}

/// A prepared image, ready to be the lower layer of build steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference as pulled (normalized, e.g. `docker.io/library/alpine:3.20`).
    pub reference: String,
    /// Digest of the image manifest (the linux/amd64 one when the reference names an
    /// index).
    pub digest: String,
    /// The root filesystem, owned by the sandbox id range. Never modified.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Bytes of regular-file data (hard links once).
    pub rootfs_bytes: u64,
}

impl PulledImage {
    /// The layer hash of this base: covers the digest and how the image was prepared.
    pub fn base_hash(&self) -> String {
        recipe::base_hash(
            &format!("oci-image {}", self.digest),
            &format!(
                "prepare={PREPARE_VERSION} id_map_base={}",
                kiln_runtime::ID_MAP_BASE
            ),
        )
    }
}

/// Progress of a pull, for the caller to show (a build shows it in its `base` step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// What the pull does: a cache hit, the layers downloaded and applied.
    Log { line: String },
    /// Something is off but the pull goes on: the registry is unreachable, so the image
    /// pulled before for the same reference is used.
    Warning { message: String },
}

/// A pull failed: `cannot pull <image>: <cause>`.
#[derive(Debug, thiserror::Error)]
#[error("cannot pull {image}")]
pub struct PullError {
    pub image: String,
    /// Boxed: registry errors are large, and this travels inside every build result.
    #[source]
    pub cause: Box<PullCause>,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullCause {
    #[error("registry {registry} unreachable")]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error(
        "registry {registry} refused access (the image does not exist, or needs \
         credentials: fromImageRegistry with username and password)"
    )]
    Denied {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} has no such image (for linux/amd64)")]
    NotFound {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("registry {registry} failed")]
    Registry {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("the registry client cannot be set up")]
    Client(#[source] OciDistributionError),
    #[error("not a container image: its config has media type {0:?}")]
    NotAnImage(String),
    #[error("layer {digest} has media type {media_type:?}, not a filesystem layer")]
    LayerType { digest: String, media_type: String },
    #[error("the registry gave an invalid digest {0:?}")]
    BadDigest(String),
    #[error("the image config is not valid JSON")]
    Config(#[source] serde_json::Error),
    #[error("applying layer {index} ({digest})")]
    Unpack {
        index: usize,
        digest: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("preparing Kiln's files in the image")]
    Prepare(#[from] base::InjectError),
    #[error("shifting file ownership into the sandbox id range")]
    Shift(#[from] shift::ShiftError),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image cache")]
    Store(#[from] crate::TemplateError),
    #[error("removing a stale pull")]
    Remove(#[from] fsutil::RemoveError),
    #[error("a pull task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl PullCause {
    fn from_registry(registry: &str, e: OciDistributionError) -> Self {
        use OciDistributionError as E;
        let registry = registry.to_string();
        let codes: Vec<&OciErrorCode> = match &e {
            E::RegistryError { envelope, .. } => envelope.errors.iter().map(|x| &x.code).collect(),
            _ => Vec::new(),
        };
        let not_found = codes.iter().any(|c| {
            matches!(
                c,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown
            )
        });
        let denied = codes
            .iter()
            .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied));
        match &e {
            E::RequestError(r) if r.is_connect() || r.is_timeout() => Self::Unreachable {
                registry,
                source: e,
            },
            E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => Self::Denied {
                registry,
                source: e,
            },
            E::ServerError {
                code: 401 | 403, ..
            } => Self::Denied {
                registry,
                source: e,
            },
            E::ImageManifestNotFoundError(_) | E::ServerError { code: 404, .. } => Self::NotFound {
                registry,
                source: e,
            },
            _ if not_found => Self::NotFound {
                registry,
                source: e,
            },
            _ if denied => Self::Denied {
                registry,
                source: e,
            },
            _ => Self::Registry {
                registry,
                source: e,
            },
        }
    }
}

/// The cache key of a manifest digest (`sha256:ab…` → `v1-sha256-ab…`); the digest comes
/// from the registry, so it is checked before it names a directory.
fn cache_key(digest: &str) -> Option<String> {
    let (alg, hex) = digest.split_once(':')?;
    let ok = !alg.is_empty()
        && alg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && (32..=128).contains(&hex.len())
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| format!("v{PREPARE_VERSION}-{alg}-{hex}"))
}

/// envd runs commands by user name and needs a `root` entry (and its home) to run
/// anything; an image without `/etc/passwd` (built `FROM scratch`) gets one.
fn ensure_root_account(root: &Path) -> io::Result<()> {
    let etc = fsutil::resolve_dir(root, Path::new("etc"), true)?;
    for (file, line) in [
        ("passwd", "root:x:0:0:root:/root:/bin/sh"),
        ("group", "root:x:0:"),
    ] {
        let path = match fsutil::resolve_file(root, &Path::new("etc").join(file))? {
            Some(p) => p,
            None => etc.join(file),
        };
        let mut text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        if text.lines().any(|l| l.starts_with("root:")) {
            continue;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
        fs::write(&path, text)?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }
    if fsutil::resolve_file(root, Path::new("root"))?.is_none() {
        let home = fsutil::resolve_dir(root, Path::new("root"), true)?;
        fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
