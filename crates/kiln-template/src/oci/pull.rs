//! The pull itself and the cache of prepared images (see the [`super`] module).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::manifest::{
    OciDescriptor, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    cache_key, ensure_root_account, is_loopback, ImageConfig, ImageSource, PullCause, PullError,
    PullEvent, PulledImage, CONNECT_TIMEOUT, IMAGES_DIR, IMAGE_FILE, READ_TIMEOUT,
};
use crate::{base, fsutil, shift, unpack, TemplateStore};

/// `image.json` of a prepared image.
#[derive(Debug, Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    digest: String,
    config: ImageConfig,
    rootfs_bytes: u64,
    pulled_at: DateTime<Utc>,
}

/// `refs/<hash of the reference>.json`: what a reference resolved to last time.
#[derive(Debug, Serialize, Deserialize)]
struct RefRecord {
    reference: String,
    key: String,
}

fn log(on_event: &mut (dyn FnMut(PullEvent) + Send), line: String) {
    on_event(PullEvent::Log { line });
}

fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

impl TemplateStore {
    /// Where prepared images live (`<templates>/.images`).
    pub fn images_dir(&self) -> PathBuf {
        self.templates_dir.join(IMAGES_DIR)
    }

    /// Pulls and prepares `src`, or returns the prepared image from the cache; progress
    /// goes to `on_event`. With `refresh` (a forced build), an unreachable registry is an
    /// error even when the reference was pulled before. Needs root (owners, the uid
    /// shift).
    pub async fn pull_image(
        &self,
        src: &ImageSource,
        refresh: bool,
        on_event: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<PulledImage, PullError> {
        let image = src.reference.whole();
        let fail = |cause: PullCause| PullError {
            image: image.clone(),
            cause: Box::new(cause),
        };
        let images = self.images_dir();
        fs::create_dir_all(images.join("refs")).map_err(|source| {
            fail(PullCause::Io {
                path: images.clone(),
                source,
            })
        })?;
        // A digest names the same content forever: no need to ask the registry again
        // (it is the manifest's, or an index's pulled before).
        if let Some(digest) = src.reference.digest() {
            let by_digest = cache_key(digest).and_then(|key| self.cached(&key));
            if let Some(p) = by_digest.or_else(|| self.cached_ref(&image)) {
                log(on_event, format!("CACHED {image} [{}]", p.digest));
                return Ok(p);
            }
        }
        let registry = src.registry().to_string();
        let client = client_for(&registry).map_err(&fail)?;
        let auth = match &src.credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let (manifest, digest) = match client.pull_image_manifest(&src.reference, &auth).await {
            Ok(m) => m,
            Err(e) => {
                let cause = PullCause::from_registry(&registry, e);
                if let (PullCause::Unreachable { .. }, false) = (&cause, refresh) {
                    if let Some(p) = self.cached_ref(&image) {
                        let why = crate::ErrorChain(&cause).to_string();
                        on_event(PullEvent::Warning {
                            message: format!(
                                "{why}; using {image} as pulled before [{}]",
                                p.digest
                            ),
                        });
                        return Ok(p);
                    }
                }
                return Err(fail(cause));
            }
        };
        let key = cache_key(&digest).ok_or_else(|| fail(PullCause::BadDigest(digest.clone())))?;
        if let Some(p) = self.cached(&key) {
            self.remember_ref(&image, &key);
            log(on_event, format!("CACHED {image} [{digest}]"));
            return Ok(p);
        }
        let _lock = crate::lock_path(images.join(format!(".{key}.lock")))
            .await
            .map_err(|e| fail(e.into()))?;
        // Another build may have pulled it while we waited.
        if let Some(p) = self.cached(&key) {
            self.remember_ref(&image, &key);
            return Ok(p);
        }
        let pulled = match self
            .pull_into(&client, src, &manifest, &digest, &key, on_event)
            .await
        {
            Ok(p) => p,
            Err(cause) => {
                // Downloads and a half-unpacked tree can be large: not kept for later.
                let tmp = images.join(format!(".tmp-{key}"));
                if let Err(e) = remove_tree(&tmp).await {
                    tracing::warn!(path = %tmp.display(), error = %crate::ErrorChain(&e), "removing a failed pull");
                }
                return Err(fail(cause));
            }
        };
        self.remember_ref(&image, &key);
        Ok(pulled)
    }

    async fn pull_into(
        &self,
        client: &Client,
        src: &ImageSource,
        manifest: &oci_client::manifest::OciImageManifest,
        digest: &str,
        key: &str,
        on_event: &mut (dyn FnMut(PullEvent) + Send),
    ) -> Result<PulledImage, PullCause> {
        let image = src.reference.whole();
        let registry = src.registry().to_string();
        let from_registry = |e| PullCause::from_registry(&registry, e);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PullCause::Io { path, source }
        };
        let images = self.images_dir();
        let tmp = images.join(format!(".tmp-{key}"));
        let (rootfs, blobs) = (tmp.join(crate::ROOTFS_DIR), tmp.join("blobs"));
        remove_tree(&tmp).await?;
        for dir in [&tmp, &rootfs, &blobs] {
            fs::create_dir(dir).map_err(io(dir))?;
        }
        fs::set_permissions(&rootfs, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io(&rootfs))?;

        let config_type = manifest.config.media_type.as_str();
        if config_type != IMAGE_CONFIG_MEDIA_TYPE && config_type != IMAGE_DOCKER_CONFIG_MEDIA_TYPE {
            return Err(PullCause::NotAnImage(config_type.to_string()));
        }
        let mut blob = Vec::new();
        client
            .pull_blob(&src.reference, &manifest.config, &mut blob)
            .await
            .map_err(from_registry)?;
        let config = ImageConfig::parse(&blob).map_err(PullCause::Config)?;
        let total: i64 = manifest.layers.iter().map(|l| l.size.max(0)).sum();
        log(
            on_event,
            format!(
                "pulling {image} [{digest}]: {} layers, {}",
                manifest.layers.len(),
                size(total as u64)
            ),
        );
        let n = manifest.layers.len();
        for (i, layer) in manifest.layers.iter().enumerate() {
            check_layer_type(layer)?;
            log(
                on_event,
                format!(
                    "layer {}/{n} {} ({})",
                    i + 1,
                    layer.digest,
                    size(layer.size.max(0) as u64)
                ),
            );
            let path = blobs.join(i.to_string());
            let file = tokio::fs::File::create(&path).await.map_err(io(&path))?;
            client
                .pull_blob(&src.reference, layer, file)
                .await
                .map_err(from_registry)?;
            let (root, blob_path) = (rootfs.clone(), path.clone());
            let stats = tokio::task::spawn_blocking(move || {
                unpack::apply_layer_file(&root, &blob_path, &mut shift::HostChown)
            })
            .await?
            .map_err(|source| PullCause::Unpack {
                index: i + 1,
                digest: layer.digest.clone(),
                source,
            })?;
            fs::remove_file(&path).map_err(io(&path))?;
            let mut line = format!(
                "layer {}/{n} applied: {} entries, {} whiteouts",
                i + 1,
                stats.entries,
                stats.whiteouts
            );
            if stats.skipped_devices > 0 {
                line.push_str(&format!(
                    ", {} device nodes left out",
                    stats.skipped_devices
                ));
            }
            log(on_event, line);
        }

        let (root, workdir) = (rootfs.clone(), config.workdir.clone());
        let stats = tokio::task::spawn_blocking(move || -> Result<shift::ShiftStats, PullCause> {
            base::finalize_rootfs(&root)?;
            ensure_root_account(&root).map_err(|source| PullCause::Io {
                path: root.join("etc/passwd"),
                source,
            })?;
            // Docker creates a missing WorkingDir when a container starts; here it is
            // made once, so every command can start in it.
            if let Some(w) = workdir {
                fsutil::resolve_dir(&root, Path::new(&w), true).map_err(|source| {
                    PullCause::Io {
                        path: root.join(w.trim_start_matches('/')),
                        source,
                    }
                })?;
            }
            Ok(shift::shift_ids(
                &root,
                kiln_runtime::ID_MAP_BASE,
                kiln_runtime::ID_MAP_LEN,
                &mut shift::HostChown,
            )?)
        })
        .await??;
        fs::remove_dir(&blobs).map_err(io(&blobs))?;
        let record = ImageRecord {
            reference: image.clone(),
            digest: digest.to_string(),
            config: config.clone(),
            rootfs_bytes: stats.bytes,
            pulled_at: Utc::now(),
        };
        let record_path = tmp.join(IMAGE_FILE);
        let json = serde_json::to_vec_pretty(&record).map_err(PullCause::Config)?;
        fs::write(&record_path, json).map_err(io(&record_path))?;
        let dir = images.join(key);
        fs::rename(&tmp, &dir).map_err(io(&dir))?;
        fs::File::open(&images)
            .and_then(|d| d.sync_all())
            .map_err(io(&images))?;
        log(
            on_event,
            format!(
                "{image} unpacked: {} of files, owners shifted into the sandbox id range",
                size(stats.bytes)
            ),
        );
        Ok(PulledImage {
            reference: image,
            digest: digest.to_string(),
            rootfs: dir.join(crate::ROOTFS_DIR),
            config,
            rootfs_bytes: stats.bytes,
        })
    }

    /// The prepared image with cache key `key`, if complete.
    fn cached(&self, key: &str) -> Option<PulledImage> {
        let dir = self.images_dir().join(key);
        let record: ImageRecord =
            serde_json::from_slice(&fs::read(dir.join(IMAGE_FILE)).ok()?).ok()?;
        let rootfs = dir.join(crate::ROOTFS_DIR);
        rootfs.is_dir().then_some(PulledImage {
            reference: record.reference,
            digest: record.digest,
            rootfs,
            config: record.config,
            rootfs_bytes: record.rootfs_bytes,
        })
    }

    /// The prepared image `reference` resolved to when it was last pulled.
    fn cached_ref(&self, reference: &str) -> Option<PulledImage> {
        let path = self.ref_path(reference);
        let r: RefRecord = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        let mut p = self.cached(&r.key)?;
        p.reference = reference.to_string();
        Some(p)
    }

    fn remember_ref(&self, reference: &str, key: &str) {
        let path = self.ref_path(reference);
        let record = RefRecord {
            reference: reference.to_string(),
            key: key.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&record)
            .map_err(io::Error::from)
            .and_then(|json| fs::write(&tmp, json))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            // Only the offline fallback needs it.
            tracing::warn!(path = %path.display(), error = %e, "recording an image reference failed");
        }
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(reference.as_bytes()));
        self.images_dir().join("refs").join(format!("{h}.json"))
    }
}

fn client_for(registry: &str) -> Result<Client, PullCause> {
    let protocol = if is_loopback(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        ClientProtocol::Https
    };
    Client::try_from(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    })
    .map_err(PullCause::Client)
}

/// Layers are tar archives (plain, gzip or zstd); anything else (an artifact's blob, a
/// Wasm module) is no filesystem.
fn check_layer_type(layer: &OciDescriptor) -> Result<(), PullCause> {
    let t = layer.media_type.as_str();
    let ok = t.starts_with("application/vnd.oci.image.layer.")
        || t.starts_with("application/vnd.docker.image.rootfs.");
    if ok {
        Ok(())
    } else {
        Err(PullCause::LayerType {
            digest: layer.digest.clone(),
            media_type: t.to_string(),
        })
    }
}

async fn remove_tree(path: &Path) -> Result<(), PullCause> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || fsutil::remove_tree(&p)).await??;
    Ok(())
}
