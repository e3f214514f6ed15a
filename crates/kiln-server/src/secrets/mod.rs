//! Secrets: a team's named values, E2B's `/secrets` API. Values are write-only:
//! nothing here hands one out except [`SecretSource::value`], which the egress proxy
//! calls to fill a `${e2b.secrets.NAME}` placeholder into a request leaving a sandbox.
//!
//! The store holds only ciphertext ([`crypt`]: AES-256-GCM, bound to team and name);
//! the key is a file outside the database. Names follow E2B: lower-cased before
//! storage, unique within a team; `sec_` starts ids, never names, so a path segment
//! is unambiguously one or the other. Each update stores a new version; only the
//! current one's value is kept.

pub mod crypt;
mod error;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::egress::rules::SecretSource;
use crate::report::chain;
use crate::store::{SecretRecord, SecretRef, Store, StoreError};
use crypt::SealKey;
pub use error::SecretError;

/// Names the key file instead of `<data-dir>/secrets.key`.
pub const KEY_FILE_ENV: &str = "KILN_SECRETS_KEY_FILE";
const KEY_FILE_NAME: &str = "secrets.key";
/// Starts every id and no name.
pub const ID_PREFIX: &str = "sec_";
pub const MAX_NAME_BYTES: usize = 128;
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
pub const MAX_METADATA_ENTRIES: usize = 32;
const MAX_METADATA_KEY_BYTES: usize = 128;
const MAX_METADATA_VALUE_BYTES: usize = 1024;
const MAX_METADATA_BYTES: usize = 8192;
/// The largest page of a listing, and the default.
pub const MAX_LIST_LIMIT: usize = 100;
/// Updates that lose a race to another update of the same secret retry this often.
const UPDATE_ATTEMPTS: usize = 8;

/// The key file: `KILN_SECRETS_KEY_FILE`, else `<data_dir>/secrets.key`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    match std::env::var_os(KEY_FILE_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => data_dir.join(KEY_FILE_NAME),
    }
}

/// A secret's value on its way in. Neither `Debug` nor anything else shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: String) -> SecretValue {
        SecretValue(value)
    }

    fn check(&self) -> Result<(), SecretError> {
        if self.0.is_empty() {
            return Err(SecretError::InvalidValue(
                "a value must not be empty".into(),
            ));
        }
        if self.0.len() > MAX_VALUE_BYTES {
            return Err(SecretError::InvalidValue(format!(
                "a value is at most {MAX_VALUE_BYTES} bytes, this one is {}",
                self.0.len()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// What anyone may know about a secret: everything but its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub id: String,
    pub name: String,
    pub version: i64,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<&SecretRecord> for SecretInfo {
    fn from(r: &SecretRecord) -> Self {
        SecretInfo {
            id: r.id.clone(),
            name: r.name.clone(),
            version: r.version,
            metadata: r.metadata.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// One page of a listing; `next_token` asks for the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPage {
    pub items: Vec<SecretInfo>,
    pub next_token: Option<String>,
}

/// The secrets of every team: the store and the key.
pub struct Secrets {
    store: Arc<dyn Store>,
    key_path: PathBuf,
    /// Loaded (or created) at first use; a failure is not kept, so a fixed file is
    /// picked up without a restart.
    key: Mutex<Option<Arc<SealKey>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// `name` in its stored form, or why it cannot be a secret's name (E2B's rule: it is
/// put into the `${e2b.secrets.<name>}` placeholder).
pub fn canonical_name(name: &str) -> Result<String, SecretError> {
    let invalid = |reason: String| SecretError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("a name must not be empty".into()));
    }
    if name.chars().any(|c| c == '{' || c == '}' || c.is_control()) {
        return Err(invalid(
            "a name cannot contain '{', '}' or control characters (it goes into the \
             ${e2b.secrets.<name>} placeholder)"
                .into(),
        ));
    }
    let lower = name.to_lowercase();
    if lower.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "a name is at most {MAX_NAME_BYTES} bytes (lower-cased), this one is {}",
            lower.len()
        )));
    }
    if lower.starts_with(ID_PREFIX) {
        return Err(invalid(format!(
            "the {ID_PREFIX} prefix is reserved for secret ids"
        )));
    }
    Ok(lower)
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), SecretError> {
    let invalid = |reason: String| Err(SecretError::InvalidMetadata(reason));
    if metadata.len() > MAX_METADATA_ENTRIES {
        return invalid(format!(
            "at most {MAX_METADATA_ENTRIES} entries, got {}",
            metadata.len()
        ));
    }
    let mut total = 0;
    for (k, v) in metadata {
        if k.len() > MAX_METADATA_KEY_BYTES {
            return invalid(format!(
                "a key is at most {MAX_METADATA_KEY_BYTES} bytes; one is {}",
                k.len()
            ));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return invalid(format!(
                "a value is at most {MAX_METADATA_VALUE_BYTES} bytes; that of {k:?} is {}",
                v.len()
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_METADATA_BYTES {
        return invalid(format!(
            "keys and values are at most {MAX_METADATA_BYTES} bytes together, got {total}"
        ));
    }
    Ok(())
}

/// How a path segment names a secret: `sec_…` is an id, anything else a name (in any
/// case; names are stored lower-cased).
fn reference(id_or_name: &str) -> (bool, String) {
    if id_or_name.starts_with(ID_PREFIX) {
        (true, id_or_name.to_string())
    } else {
        (false, id_or_name.to_lowercase())
    }
}

fn new_id() -> String {
    format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

impl Secrets {
    /// The team's secrets in `store`, sealed with the key in `key_path`. A key file
    /// that is there is checked now, so a bad one stops `kiln serve` at start with
    /// the reason; a missing one is created at the first write.
    pub fn open(store: Arc<dyn Store>, key_path: PathBuf) -> Result<Secrets, SecretError> {
        let key = crypt::load(&key_path)?.map(Arc::new);
        Ok(Secrets {
            store,
            key_path,
            key: Mutex::new(key),
        })
    }

    /// The key; `create`: make one if there is none and no secret needs an old one.
    fn key(&self, create: bool) -> Result<Arc<SealKey>, SecretError> {
        let mut slot = self.key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = &*slot {
            return Ok(key.clone());
        }
        let key = match crypt::load(&self.key_path)? {
            Some(key) => key,
            None => {
                let sealed = self.store.count_secrets()?;
                if !create || sealed > 0 {
                    return Err(SecretError::KeyMissing {
                        path: self.key_path.clone(),
                        sealed,
                    });
                }
                crypt::create(&self.key_path)?
            }
        };
        let key = Arc::new(key);
        *slot = Some(key.clone());
        Ok(key)
    }

    fn seal(
        &self,
        team_id: i64,
        name: &str,
        value: &SecretValue,
    ) -> Result<(Vec<u8>, Vec<u8>), SecretError> {
        let aad = crypt::associated_data(team_id, name);
        self.key(true)?
            .seal(&aad, value.0.as_bytes())
            .map_err(|_| SecretError::Seal {
                name: name.to_string(),
            })
    }

    fn find(&self, team_id: i64, id_or_name: &str) -> Result<SecretRecord, SecretError> {
        let (is_id, key) = reference(id_or_name);
        let by = if is_id {
            SecretRef::Id(&key)
        } else {
            SecretRef::Name(&key)
        };
        self.store
            .secret(team_id, by)?
            .ok_or_else(|| SecretError::NotFound(id_or_name.to_string()))
    }

    /// A new secret of `team_id`, at version 1.
    pub fn create(
        &self,
        team_id: i64,
        name: &str,
        value: &SecretValue,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<SecretInfo, SecretError> {
        let name = canonical_name(name)?;
        value.check()?;
        let metadata = metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        let (nonce, ciphertext) = self.seal(team_id, &name, value)?;
        let now = Utc::now();
        let rec = SecretRecord {
            id: new_id(),
            team_id,
            name,
            version: 1,
            nonce,
            ciphertext,
            metadata,
            created_at: now,
            updated_at: now,
        };
        match self.store.insert_secret(&rec) {
            Ok(()) => Ok(SecretInfo::from(&rec)),
            Err(StoreError::Conflict(_)) => Err(SecretError::Exists(rec.name)),
            Err(e) => Err(e.into()),
        }
    }

    /// A new version of the secret with `value`; `metadata`, when given, replaces
    /// what it had.
    pub fn update(
        &self,
        team_id: i64,
        id_or_name: &str,
        value: &SecretValue,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<SecretInfo, SecretError> {
        value.check()?;
        if let Some(m) = &metadata {
            check_metadata(m)?;
        }
        for _ in 0..UPDATE_ATTEMPTS {
            let old = self.find(team_id, id_or_name)?;
            let (nonce, ciphertext) = self.seal(team_id, &old.name, value)?;
            let rec = SecretRecord {
                version: old.version + 1,
                nonce,
                ciphertext,
                metadata: metadata.clone().unwrap_or_else(|| old.metadata.clone()),
                updated_at: Utc::now(),
                ..old.clone()
            };
            if self.store.update_secret(&rec, old.version)? {
                return Ok(SecretInfo::from(&rec));
            }
        }
        Err(SecretError::Contended {
            name: id_or_name.to_string(),
        })
    }

    pub fn get(&self, team_id: i64, id_or_name: &str) -> Result<SecretInfo, SecretError> {
        Ok(SecretInfo::from(&self.find(team_id, id_or_name)?))
    }

    /// A page of the team's secrets by name: `limit` (1 to 100, default 100) from
    /// where `next_token` left off.
    pub fn list(
        &self,
        team_id: i64,
        limit: Option<usize>,
        next_token: Option<&str>,
    ) -> Result<SecretPage, SecretError> {
        let limit = limit.unwrap_or(MAX_LIST_LIMIT);
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(SecretError::InvalidQuery(format!(
                "limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}"
            )));
        }
        let after = next_token
            .filter(|t| !t.is_empty())
            .map(|t| {
                hex::decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| SecretError::InvalidQuery(format!("invalid nextToken {t:?}")))
            })
            .transpose()?;
        let mut rows = self
            .store
            .list_secrets(team_id, after.as_deref(), limit + 1)?;
        let next_token = (rows.len() > limit).then(|| hex::encode(&rows[limit - 1].name));
        rows.truncate(limit);
        Ok(SecretPage {
            items: rows.iter().map(SecretInfo::from).collect(),
            next_token,
        })
    }

    /// Delete the secret; what it was.
    pub fn delete(&self, team_id: i64, id_or_name: &str) -> Result<SecretInfo, SecretError> {
        let rec = self.find(team_id, id_or_name)?;
        if !self.store.delete_secret(team_id, &rec.id)? {
            return Err(SecretError::NotFound(id_or_name.to_string()));
        }
        Ok(SecretInfo::from(&rec))
    }

    /// The current value of the team's secret `name`; `None` when it has none.
    fn reveal(&self, team_id: i64, name: &str) -> Result<Option<String>, SecretError> {
        let name = name.to_lowercase();
        let Some(rec) = self.store.secret(team_id, SecretRef::Name(&name))? else {
            return Ok(None);
        };
        let undecryptable = || SecretError::Undecryptable {
            name: rec.name.clone(),
        };
        let plain = self
            .key(false)?
            .open(
                &rec.nonce,
                &crypt::associated_data(rec.team_id, &rec.name),
                &rec.ciphertext,
            )
            .ok_or_else(undecryptable)?;
        // Values go in as JSON strings; bytes that open but are not UTF-8 were not
        // sealed by this code.
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| undecryptable())
    }
}

impl SecretSource for Secrets {
    fn value(&self, team_id: i64, name: &str) -> Result<Option<String>, String> {
        self.reveal(team_id, name).map_err(|e| chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Quotas, SqliteStore};
    use std::os::unix::fs::PermissionsExt;

    const VALUE: &str = "hunter2-the-value";

    fn value() -> SecretValue {
        SecretValue::new(VALUE.into())
    }

    fn secrets(dir: &Path) -> (Arc<SqliteStore>, Secrets) {
        let store = Arc::new(SqliteStore::open(&dir.join("kiln.db")).unwrap());
        let s = Secrets::open(store.clone(), dir.join("secrets.key")).unwrap();
        (store, s)
    }

    #[test]
    fn values_are_sealed_versioned_and_only_revealed_to_their_team() {
        let dir = tempfile::tempdir().unwrap();
        let (store, s) = secrets(dir.path());
        let other = store.create_team("beta", Quotas::default()).unwrap().id;
        assert!(
            !dir.path().join("secrets.key").exists(),
            "created at first use"
        );
        let meta = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let info = s
            .create(1, "OpenAI-Key", &value(), Some(meta.clone()))
            .unwrap();
        assert!(info.id.starts_with(ID_PREFIX));
        assert_eq!((info.name.as_str(), info.version), ("openai-key", 1));
        assert_eq!(info.metadata, meta);
        let key_mode = std::fs::metadata(dir.path().join("secrets.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);

        // The database holds no trace of the value.
        let db = std::fs::read(dir.path().join("kiln.db")).unwrap();
        let wal = std::fs::read(dir.path().join("kiln.db-wal")).unwrap_or_default();
        for bytes in [&db, &wal] {
            assert!(!bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()));
        }

        assert_eq!(s.value(1, "openai-key").unwrap().as_deref(), Some(VALUE));
        assert_eq!(s.value(1, "OPENAI-KEY").unwrap().as_deref(), Some(VALUE));
        assert_eq!(s.value(other, "openai-key").unwrap(), None);
        assert!(matches!(
            s.get(other, &info.id),
            Err(SecretError::NotFound(_))
        ));
        assert_eq!(s.get(1, &info.id).unwrap(), info);
        assert_eq!(s.get(1, "OpenAI-Key").unwrap(), info);

        let updated = s
            .update(1, &info.id, &SecretValue::new("v2".into()), None)
            .unwrap();
        assert_eq!(updated.version, 2);
        assert_eq!(updated.metadata, meta, "kept when not given");
        assert_eq!(s.value(1, "openai-key").unwrap().as_deref(), Some("v2"));
        let updated = s
            .update(1, "openai-key", &value(), Some(BTreeMap::new()))
            .unwrap();
        assert_eq!(updated.version, 3);
        assert!(updated.metadata.is_empty());
        assert!(matches!(
            s.update(other, "openai-key", &value(), None),
            Err(SecretError::NotFound(_))
        ));

        assert!(matches!(
            s.create(1, "openai-KEY", &value(), None),
            Err(SecretError::Exists(_))
        ));
        s.create(other, "openai-key", &value(), None).unwrap();

        assert!(matches!(
            s.delete(other, &info.id),
            Err(SecretError::NotFound(_))
        ));
        assert_eq!(s.delete(1, "openai-key").unwrap().id, info.id);
        assert_eq!(s.value(1, "openai-key").unwrap(), None);
        assert_eq!(
            s.value(other, "openai-key").unwrap().as_deref(),
            Some(VALUE)
        );
    }

    #[test]
    fn bad_input_is_refused_naming_the_rule_and_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let (_, s) = secrets(dir.path());
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        for (name, want) in [
            ("", "empty"),
            ("a{b", "'{'"),
            ("a}b", "'{'"),
            ("a\nb", "control"),
            ("a\u{85}b", "control"),
            ("sec_abc", "reserved"),
            ("SEC_abc", "reserved"),
            (long.as_str(), "128 bytes"),
        ] {
            let err = s.create(1, name, &value(), None).unwrap_err();
            assert!(
                matches!(err, SecretError::InvalidName { .. }),
                "{name:?}: {err}"
            );
            assert!(err.to_string().contains(want), "{name:?}: {err}");
        }
        s.create(1, &"é".repeat(64), &value(), None).unwrap();

        let err = s
            .create(1, "n", &SecretValue::new(String::new()), None)
            .unwrap_err();
        assert!(matches!(err, SecretError::InvalidValue(_)), "{err}");
        let huge = "k".repeat(MAX_VALUE_BYTES + 1);
        let err = s
            .create(1, "n", &SecretValue::new(huge.clone()), None)
            .unwrap_err();
        assert!(err.to_string().contains("65536"), "{err}");
        assert!(!err.to_string().contains("kkkk"), "{err}");
        assert!(!format!("{err:?}").contains("kkkk"));
        s.create(1, "n", &SecretValue::new("k".repeat(MAX_VALUE_BYTES)), None)
            .unwrap();
        assert_eq!(format!("{:?}", value()), "SecretValue(<redacted>)");

        let many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        let err = s.create(1, "m", &value(), Some(many)).unwrap_err();
        assert!(err.to_string().contains("at most 32"), "{err}");
        let big = BTreeMap::from([("k".to_string(), "v".repeat(1025))]);
        let err = s.update(1, "n", &value(), Some(big)).unwrap_err();
        assert!(matches!(err, SecretError::InvalidMetadata(_)), "{err}");
        let total: BTreeMap<_, _> = (0..9)
            .map(|i| (format!("k{i}"), "v".repeat(1000)))
            .collect();
        let err = s.create(1, "m", &value(), Some(total)).unwrap_err();
        assert!(err.to_string().contains("8192"), "{err}");
    }

    #[test]
    fn listings_page_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (_, s) = secrets(dir.path());
        for name in ["c", "a", "e", "b", "d"] {
            s.create(1, name, &value(), None).unwrap();
        }
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let page = s.list(1, Some(2), token.as_deref()).unwrap();
            assert!(page.items.len() <= 2);
            names.extend(page.items.into_iter().map(|i| i.name));
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        assert_eq!(s.list(1, None, None).unwrap().items.len(), 5);
        assert!(s.list(2, None, None).unwrap().items.is_empty());
        for bad in [Some(0), Some(101)] {
            assert!(matches!(
                s.list(1, bad, None),
                Err(SecretError::InvalidQuery(_))
            ));
        }
        assert!(matches!(
            s.list(1, None, Some("zz")),
            Err(SecretError::InvalidQuery(_))
        ));
    }

    #[test]
    fn another_key_or_a_moved_row_fails_to_decrypt_as_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let (store, s) = secrets(dir.path());
        s.create(1, "token", &value(), None).unwrap();
        drop(s);

        // Another key in the file: the value does not open, and the error says so
        // without the value.
        let key = dir.path().join("secrets.key");
        std::fs::remove_file(&key).unwrap();
        crypt::create(&key).unwrap();
        let s = Secrets::open(store.clone(), key.clone()).unwrap();
        let err = s.value(1, "token").unwrap_err();
        assert_eq!(
            err,
            "secret \"token\" cannot be decrypted with this server's key"
        );
        drop(s);

        // No key file, but sealed secrets: no new key is made over them.
        std::fs::remove_file(&key).unwrap();
        let s = Secrets::open(store.clone(), key.clone()).unwrap();
        let err = s.create(1, "new", &value(), None).unwrap_err();
        assert!(
            matches!(err, SecretError::KeyMissing { sealed: 1, .. }),
            "{err}"
        );
        assert!(s.value(1, "token").unwrap_err().contains("is missing"));
        assert!(!key.exists());
        // They can still be deleted, after which a new key is made.
        s.delete(1, "token").unwrap();
        s.create(1, "new", &value(), None).unwrap();
        assert_eq!(s.value(1, "new").unwrap().as_deref(), Some(VALUE));

        // A row moved to another name does not open under it.
        let mut rec = store.secret(1, SecretRef::Name("new")).unwrap().unwrap();
        rec.id = new_id();
        rec.name = "moved".into();
        store.insert_secret(&rec).unwrap();
        assert!(s
            .value(1, "moved")
            .unwrap_err()
            .contains("cannot be decrypted"));

        // A key file others can read stops the service at open.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secrets::open(store, key).unwrap_err();
        assert!(chain(&err).contains("chmod 600"), "{}", chain(&err));
    }
}
