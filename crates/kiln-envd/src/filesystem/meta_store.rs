//! Where file metadata goes when the filesystem refuses `user.*` extended attributes
//! (gVisor's root filesystem answers `EOPNOTSUPP`): a small store in the sandbox,
//! `/var/lib/kiln-envd/metadata.json`, keyed by path and checked against the file's
//! device and inode, so a file replaced behind envd's back never shows another's
//! metadata. envd's own renames and removes carry entries along or drop them; a file a
//! process renames itself loses its metadata (its old entry no longer matches).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The most files with metadata the store keeps.
const MAX_ENTRIES: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    dev: u64,
    ino: u64,
    metadata: BTreeMap<String, String>,
}

pub struct MetaStore {
    file: PathBuf,
    entries: Mutex<Option<BTreeMap<PathBuf, Entry>>>,
}

/// The sandbox's store.
pub fn global() -> &'static MetaStore {
    static STORE: std::sync::OnceLock<MetaStore> = std::sync::OnceLock::new();
    STORE.get_or_init(|| MetaStore::new(PathBuf::from("/var/lib/kiln-envd/metadata.json")))
}

/// The key of `path`: its parent resolved, so a file reached through a linked
/// directory is one entry.
fn key(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl MetaStore {
    pub fn new(file: PathBuf) -> Self {
        MetaStore {
            file,
            entries: Mutex::new(None),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<PathBuf, Entry>) -> T) -> T {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entries = guard.get_or_insert_with(|| {
            std::fs::read(&self.file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        });
        f(entries)
    }

    fn save(&self, entries: &BTreeMap<PathBuf, Entry>) -> io::Result<()> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(entries).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, &self.file)
    }

    /// `path`'s metadata, if the store has it for the file that is there now.
    pub fn get(&self, path: &Path) -> BTreeMap<String, String> {
        self.with(|entries| {
            if entries.is_empty() {
                return BTreeMap::new();
            }
            match entries.get(&key(path)) {
                Some(e) if identity(path).is_ok_and(|id| id == (e.dev, e.ino)) => {
                    e.metadata.clone()
                }
                _ => BTreeMap::new(),
            }
        })
    }

    /// Replace `path`'s metadata (empty: forget it).
    pub fn set(&self, path: &Path, metadata: &BTreeMap<String, String>) -> io::Result<()> {
        let (dev, ino) = identity(path)?;
        let key = key(path);
        self.with(|entries| {
            if metadata.is_empty() {
                if entries.remove(&key).is_none() {
                    return Ok(());
                }
            } else {
                if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
                    // Entries whose file is gone or replaced make room first.
                    entries.retain(|p, e| identity(p).is_ok_and(|id| id == (e.dev, e.ino)));
                    if entries.len() >= MAX_ENTRIES {
                        return Err(io::Error::other(format!(
                            "the metadata store is full ({MAX_ENTRIES} files have metadata)"
                        )));
                    }
                }
                entries.insert(
                    key,
                    Entry {
                        dev,
                        ino,
                        metadata: metadata.clone(),
                    },
                );
            }
            self.save(entries)
        })
    }

    /// `from` (a file or a directory) was renamed to `to` by envd: its entries follow.
    pub fn renamed(&self, from: &Path, to: &Path) {
        let (from_key, to_key) = (key(from), key(to));
        self.with(|entries| {
            let moved: Vec<PathBuf> = entries
                .keys()
                .filter(|p| p.starts_with(&from_key))
                .cloned()
                .collect();
            if moved.is_empty() {
                return;
            }
            for old in moved {
                if let Some(e) = entries.remove(&old) {
                    let rest = old.strip_prefix(&from_key).unwrap_or(Path::new(""));
                    let new = if rest.as_os_str().is_empty() {
                        to_key.clone()
                    } else {
                        to_key.join(rest)
                    };
                    entries.insert(new, e);
                }
            }
            if let Err(e) = self.save(entries) {
                tracing::warn!(error = %e, "saving the metadata store failed");
            }
        })
    }

    /// `path` (a file or a directory) was removed by envd: its entries go.
    pub fn removed(&self, path: &Path) {
        let gone = key(path);
        self.with(|entries| {
            let before = entries.len();
            entries.retain(|p, _| !p.starts_with(&gone));
            if entries.len() != before {
                if let Err(e) = self.save(entries) {
                    tracing::warn!(error = %e, "saving the metadata store failed");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("owner".to_string(), v.to_string())])
    }

    #[test]
    fn metadata_follows_envds_renames_and_goes_with_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(dir.path().join("state/metadata.json"));
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "x").unwrap();
        store.set(&file, &meta("ann")).unwrap();
        assert_eq!(store.get(&file), meta("ann"));

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let moved = sub.join("b.txt");
        std::fs::rename(&file, &moved).unwrap();
        store.renamed(&file, &moved);
        assert_eq!(store.get(&moved), meta("ann"));
        assert!(store.get(&file).is_empty());

        let renamed_dir = dir.path().join("sub2");
        std::fs::rename(&sub, &renamed_dir).unwrap();
        store.renamed(&sub, &renamed_dir);
        let inside = renamed_dir.join("b.txt");
        assert_eq!(store.get(&inside), meta("ann"));

        // A fresh store reads what was saved.
        let again = MetaStore::new(dir.path().join("state/metadata.json"));
        assert_eq!(again.get(&inside), meta("ann"));

        std::fs::remove_dir_all(&renamed_dir).unwrap();
        store.removed(&renamed_dir);
        std::fs::create_dir(&renamed_dir).unwrap();
        std::fs::write(&inside, "new").unwrap();
        assert!(store.get(&inside).is_empty());
    }

    #[test]
    fn a_file_replaced_behind_envd_shows_no_stale_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(dir.path().join("metadata.json"));
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "x").unwrap();
        store.set(&file, &meta("ann")).unwrap();
        // Kept across content writes (same inode)...
        std::fs::write(&file, "y").unwrap();
        assert_eq!(store.get(&file), meta("ann"));
        // ...but not for a new file at the same path.
        let other = dir.path().join("b.txt");
        std::fs::write(&other, "z").unwrap();
        std::fs::rename(&other, &file).unwrap();
        assert!(store.get(&file).is_empty());
        // Overwriting with no metadata forgets it.
        store.set(&file, &meta("bob")).unwrap();
        store.set(&file, &BTreeMap::new()).unwrap();
        assert!(store.get(&file).is_empty());
    }
}
