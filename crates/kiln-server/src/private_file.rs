//! Key files the operator holds (the secrets key, the local CA's key): opened once and
//! checked on the open file, so what is read is what was checked. A leaf module.

use std::fs::{File, Metadata};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Why an open key file is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A directory, device, FIFO...
    NotAFile,
    /// Group or others may read or write it; `mode` is its permission bits.
    Permissive { mode: u32 },
}

/// A key file, open for reading.
pub struct KeyFile {
    pub file: File,
    /// Its size when it was checked.
    pub len: u64,
    /// Whether it may hold a key: a regular file only its owner reads and writes.
    pub verdict: Result<(), Refused>,
}

/// `path` opened for reading and checked, if it exists.
pub fn open(path: &Path) -> std::io::Result<Option<KeyFile>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    Ok(Some(KeyFile {
        verdict: check(&meta),
        len: meta.len(),
        file,
    }))
}

fn check(meta: &Metadata) -> Result<(), Refused> {
    if !meta.is_file() {
        return Err(Refused::NotAFile);
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Refused::Permissive { mode });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_owners_only_regular_file_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert!(open(&path).unwrap().is_none());
        std::fs::write(&path, b"k").unwrap();
        for (mode, want) in [
            (0o600, Ok(())),
            (0o400, Ok(())),
            (0o640, Err(Refused::Permissive { mode: 0o640 })),
            (0o604, Err(Refused::Permissive { mode: 0o604 })),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(open(&path).unwrap().unwrap().verdict, want, "{mode:o}");
        }
        assert_eq!(
            open(dir.path()).unwrap().unwrap().verdict,
            Err(Refused::NotAFile)
        );
    }
}
