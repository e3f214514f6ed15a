//! The secrets key and what it does: AES-256-GCM with a random 96-bit nonce per
//! write, the secret's team and name bound as associated data, so a row copied to
//! another team or renamed in the database no longer opens.
//!
//! The key is a file of exactly 32 random bytes outside the database
//! (`<data-dir>/secrets.key`, or `KILN_SECRETS_KEY_FILE`): a copy of `kiln.db` alone
//! reveals no value. It is created once, from the system's CSPRNG, with `O_EXCL` and
//! mode 0600; a key file that group or others can read, or of another length, is
//! refused rather than used.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes in a key file.
pub const KEY_LEN: usize = 32;

/// Why the key file cannot be used. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the secrets key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the secrets key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "the secrets key file {path} is open to group or others (mode {mode:03o}); \
         refusing to use it: make it its owner's only (chmod 600 {path})"
    )]
    Permissive { path: PathBuf, mode: u32 },
    #[error(
        "the secrets key file {path} is {len} bytes; a key is exactly {KEY_LEN} random \
         bytes (a file cut short while being created holds no key any secret uses: \
         remove it if no secret was ever stored)"
    )]
    WrongLength { path: PathBuf, len: u64 },
    #[error("the system's random number generator failed")]
    Random,
}

/// The key that seals secret values. Its `Debug` shows nothing of it.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// The sealing failed (only the random number generator can make it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealFailed;

/// What a sealed value is bound to besides the key: its team and name. A version tag
/// first, so the format can change; NUL between the parts, which a name cannot hold.
pub fn associated_data(team_id: i64, name: &str) -> Vec<u8> {
    format!("kiln-secret-v1\0{team_id}\0{name}").into_bytes()
}

impl SealKey {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> SealKey {
        let key = UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 takes a 32-byte key");
        SealKey(LessSafeKey::new(key))
    }

    /// `(nonce, ciphertext with its tag)`, under a fresh random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SealFailed> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealFailed)?;
        let mut sealed = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| SealFailed)?;
        Ok((nonce.to_vec(), sealed))
    }

    /// The plaintext, or `None` when this key, `nonce` and `aad` do not open it.
    pub fn open(&self, nonce: &[u8], aad: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ciphertext.to_vec();
        let len = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

/// The key in `path`; `None` when there is no such file.
pub fn load(path: &Path) -> Result<Option<SealKey>, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let Some(crate::private_file::KeyFile {
        mut file,
        len,
        verdict,
    }) = crate::private_file::open(path).map_err(read_err)?
    else {
        return Ok(None);
    };
    let path_buf = path.to_path_buf();
    verdict.map_err(|refused| match refused {
        crate::private_file::Refused::NotAFile => KeyError::NotAFile { path: path_buf },
        crate::private_file::Refused::Permissive { mode } => KeyError::Permissive {
            path: path_buf,
            mode,
        },
    })?;
    if len != KEY_LEN as u64 {
        return Err(KeyError::WrongLength {
            path: path.to_path_buf(),
            len,
        });
    }
    let mut bytes = [0u8; KEY_LEN];
    file.read_exact(&mut bytes).map_err(read_err)?;
    let key = SealKey::from_bytes(&bytes);
    bytes.fill(0);
    Ok(Some(key))
}

/// A new key in `path`, which must not exist (`O_EXCL`); if it appeared meanwhile, the
/// key in it.
pub fn create(path: &Path) -> Result<SealKey, KeyError> {
    let mut bytes = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| KeyError::Random)?;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let create_err = |source| KeyError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match created {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bytes.fill(0);
            return load(path)?.ok_or_else(|| create_err(e));
        }
        Err(e) => return Err(create_err(e)),
    };
    let written = file.write_all(&bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        // Nothing was sealed with it: leave no half-written key behind.
        let _ = std::fs::remove_file(path);
        return Err(create_err(e));
    }
    // The new name durable too, not only the bytes.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the secrets key's directory");
        }
    }
    let key = SealKey::from_bytes(&bytes);
    bytes.fill(0);
    tracing::info!(path = %path.display(), "created the secrets key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn values_open_only_with_their_key_team_and_name() {
        let key = SealKey::from_bytes(&[3; KEY_LEN]);
        let aad = associated_data(1, "token");
        let (nonce, sealed) = key.seal(&aad, b"hunter2").unwrap();
        assert_eq!(nonce.len(), 12);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(key.open(&nonce, &aad, &sealed).unwrap(), b"hunter2");
        // A fresh nonce each time.
        let (nonce2, sealed2) = key.seal(&aad, b"hunter2").unwrap();
        assert_ne!((&nonce, &sealed), (&nonce2, &sealed2));
        // Another team, another name, another key, a flipped bit: none opens it.
        assert!(key
            .open(&nonce, &associated_data(2, "token"), &sealed)
            .is_none());
        assert!(key
            .open(&nonce, &associated_data(1, "other"), &sealed)
            .is_none());
        let other = SealKey::from_bytes(&[4; KEY_LEN]);
        assert!(other.open(&nonce, &aad, &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(key.open(&nonce, &aad, &flipped).is_none());
        assert!(key.open(&nonce[..8], &aad, &sealed).is_none());
        assert_eq!(format!("{key:?}"), "SealKey(..)");
    }

    #[test]
    fn key_files_are_created_once_private_and_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        assert!(load(&path).unwrap().is_none());
        let key = create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), KEY_LEN as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Another create finds the file and uses its key rather than replacing it.
        let again = create(&path).unwrap();
        let aad = associated_data(1, "n");
        let (nonce, sealed) = key.seal(&aad, b"v").unwrap();
        assert_eq!(again.open(&nonce, &aad, &sealed).unwrap(), b"v");
        assert_eq!(
            load(&path)
                .unwrap()
                .unwrap()
                .open(&nonce, &aad, &sealed)
                .unwrap(),
            b"v"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissive { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let short = dir.path().join("short.key");
        std::fs::write(&short, [1u8; 16]).unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(&short).unwrap_err();
        assert!(
            matches!(err, KeyError::WrongLength { len: 16, .. }),
            "{err}"
        );

        assert!(matches!(load(dir.path()), Err(KeyError::NotAFile { .. })));
    }
}
