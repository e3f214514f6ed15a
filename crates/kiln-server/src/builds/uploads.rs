//! Upload links for COPY contexts: `GET /templates/{id}/files/{hash}` hands out a
//! one-time link (`/_kiln/uploads/{token}`, served without an API key: the token is the
//! credential) valid for [`UPLOAD_LINK_TTL`]; the `PUT` to it stores the archive once
//! per hash, at most [`MAX_UPLOAD_BYTES`].

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_template::recipe::is_files_hash;
use tokio::io::AsyncWriteExt;

use super::BuildServiceError;

/// Path prefix of upload links.
pub const UPLOAD_PREFIX: &str = "/_kiln/uploads/";

/// Largest uploaded COPY context accepted, in bytes as sent (1 GiB).
pub const MAX_UPLOAD_BYTES: u64 = 1 << 30;

/// How long an upload link is valid after it was handed out.
pub const UPLOAD_LINK_TTL: Duration = Duration::from_secs(3600);

/// An upload link handed out and not used yet.
#[derive(Debug, Clone)]
pub struct UploadLink {
    pub files_hash: String,
    /// The team that asked for it (not enforced yet).
    pub owner: Option<i64>,
    expires: Instant,
}

/// The upload links handed out, by token.
#[derive(Debug)]
pub struct UploadLinks {
    links: Mutex<HashMap<String, UploadLink>>,
    ttl: Duration,
}

impl UploadLinks {
    pub fn new(ttl: Duration) -> Self {
        UploadLinks {
            links: Mutex::default(),
            ttl,
        }
    }

    /// A new link's token for `files_hash`.
    pub fn issue(&self, files_hash: String, owner: Option<i64>) -> String {
        let token = hex::encode(rand::random::<[u8; 16]>());
        let now = Instant::now();
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        // An expired link is kept for one more period, so that its use is told it
        // expired rather than that it is unknown; then it goes.
        links.retain(|_, l| l.expires + self.ttl > now);
        links.insert(
            token.clone(),
            UploadLink {
                files_hash,
                owner,
                expires: now + self.ttl,
            },
        );
        token
    }

    /// Takes the link of `token` (a link is used once).
    pub fn redeem(&self, token: &str) -> Result<UploadLink, BuildServiceError> {
        let link = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token)
            .ok_or(BuildServiceError::UnknownUpload)?;
        if Instant::now() >= link.expires {
            return Err(BuildServiceError::UploadExpired {
                valid_secs: self.ttl.as_secs(),
            });
        }
        Ok(link)
    }
}

/// Stores an uploaded COPY context as `<files_dir>/<hash>`: write once (a context
/// already stored under `hash` is kept, as E2B's `present: true` says, and the upload is
/// discarded), at most `limit` bytes ([`MAX_UPLOAD_BYTES`]), written to a temporary file that is then
/// linked into place (`link(2)` never replaces, so two concurrent uploads for one hash
/// cannot both land).
pub(super) async fn store_upload<S, B, E>(
    files_dir: &FsPath,
    scope: &str,
    hash: &str,
    token: &str,
    mut stream: S,
    limit: u64,
) -> Result<(), BuildServiceError>
where
    S: futures::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    // The hash names a file: only what `files_link` accepted gets here; checked again.
    if !is_files_hash(hash) {
        return Err(BuildServiceError::FilesHash {
            hash: hash.to_string(),
        });
    }
    // Each team's uploads are its own (see `BuildRequest::scope`).
    let name = kiln_template::build::upload_name(scope, hash);
    let path = files_dir.join(&name);
    if tokio::fs::symlink_metadata(&path).await.is_ok() {
        return Ok(());
    }
    let tmp = files_dir.join(format!(".{name}.{token}.part"));
    let io = BuildServiceError::UploadStore;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .await
        .map_err(io)?;
    let written = async {
        let mut size: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BuildServiceError::UploadInterrupted {
                reason: e.to_string(),
            })?;
            let chunk = chunk.as_ref();
            size += chunk.len() as u64;
            if size > limit {
                return Err(BuildServiceError::UploadTooLarge { limit });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AppError;

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
        store_upload(
            dir.path(),
            "",
            &hash,
            "t1",
            chunks(&[b"first", b" upload"]),
            64,
        )
        .await
        .unwrap();
        store_upload(dir.path(), "", &hash, "t2", chunks(&[b"second"]), 64)
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
            let e = store_upload(dir.path(), "", bad, "t", chunks(&[b"x"]), 64)
                .await
                .unwrap_err();
            assert!(
                matches!(e, BuildServiceError::FilesHash { .. }),
                "{bad}: {e}"
            );
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
        let e = store_upload(dir.path(), "", &hash, "t", stream, 15)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than 15 bytes"), "{e}");
        assert_eq!(
            AppError::from(e).status(),
            http::StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Privilege tier: none.
    #[test]
    fn links_are_used_once_and_expire() {
        let links = UploadLinks::new(Duration::from_secs(60));
        let token = links.issue("ab".repeat(32), Some(7));
        let link = links.redeem(&token).unwrap();
        assert_eq!(
            (link.files_hash.as_str(), link.owner),
            ("ab".repeat(32).as_str(), Some(7))
        );
        assert!(matches!(
            links.redeem(&token),
            Err(BuildServiceError::UnknownUpload)
        ));
        let links = UploadLinks::new(Duration::ZERO);
        let token = links.issue("ab".repeat(32), None);
        let e = links.redeem(&token).unwrap_err();
        assert!(matches!(e, BuildServiceError::UploadExpired { .. }), "{e}");
        assert_eq!(AppError::from(e).status(), http::StatusCode::GONE);
    }
}
