//! File metadata stored as `user.e2b.*` extended attributes (spec §3.5, §5.3).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Namespace of E2B metadata attributes.
pub const PREFIX: &str = "user.e2b.";

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "attribute name contains a NUL byte",
        )
    })
}

fn list_names(path: &CString) -> io::Result<Vec<Vec<u8>>> {
    loop {
        // SAFETY: `path` is a valid NUL-terminated string; a null buffer with size 0
        // asks only for the required size.
        let size = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` is a live, writable allocation of exactly `buf.len()` bytes.
        let got = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue; // the list grew between the two calls
            }
            return Err(err);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect());
    }
}

fn get(path: &CString, name: &CString) -> io::Result<Vec<u8>> {
    loop {
        // SAFETY: `path` and `name` are valid NUL-terminated strings; size query only.
        let size = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` is a live, writable allocation of exactly `buf.len()` bytes.
        let got = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(err);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

/// The file's `user.e2b.*` attributes, prefix stripped. Unsupported filesystems and
/// unreadable attributes yield an empty map.
pub fn read(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(cpath) = c_path(path) else {
        return out;
    };
    let names = match list_names(&cpath) {
        Ok(names) => names,
        Err(e) if is_unsupported(&e) => return super::meta_store::global().get(path),
        Err(_) => return out,
    };
    if !names.iter().any(|n| n.starts_with(PREFIX.as_bytes())) {
        return super::meta_store::global().get(path);
    }
    for name in names {
        let Some(key) = name.strip_prefix(PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name.clone()) else {
            continue;
        };
        if let Ok(value) = get(&cpath, &cname) {
            out.insert(
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    out
}

/// Replaces the file's whole `user.e2b.*` set with `metadata`.
pub fn replace(path: &Path, metadata: &BTreeMap<String, String>) -> io::Result<()> {
    let cpath = c_path(path)?;
    let existing = match list_names(&cpath) {
        Ok(names) => names,
        // The filesystem has no user attributes: the fallback store keeps them.
        Err(e) if is_unsupported(&e) => return super::meta_store::global().set(path, metadata),
        Err(e) => return Err(e),
    };
    for name in existing.iter().filter(|n| n.starts_with(PREFIX.as_bytes())) {
        let cname = CString::new(name.clone())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad attribute name"))?;
        // SAFETY: both arguments are valid NUL-terminated strings.
        if unsafe { libc::removexattr(cpath.as_ptr(), cname.as_ptr()) } < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENODATA) {
                return Err(err);
            }
        }
    }
    for (key, value) in metadata {
        let cname = c_name(&format!("{PREFIX}{key}"))?;
        // SAFETY: `cpath`/`cname` are valid NUL-terminated strings; `value` is a live
        // buffer whose pointer and length are passed together.
        let rc = unsafe {
            libc::setxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if is_unsupported(&err) {
                // Listing worked but user attributes cannot be set (gVisor's root).
                return super::meta_store::global().set(path, metadata);
            }
            return Err(err);
        }
    }
    if metadata.is_empty() {
        // Forget whatever the fallback store had for this path (a file written again
        // without metadata).
        super::meta_store::global().set(path, metadata)?;
    }
    Ok(())
}

/// envd renamed `from` to `to`: metadata kept outside the file follows it.
pub fn moved(from: &Path, to: &Path) {
    super::meta_store::global().renamed(from, to);
}

/// envd removed `path`: metadata kept outside the file goes with it.
pub fn removed(path: &Path) {
    super::meta_store::global().removed(path);
}

fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTSUP)
}

/// Whether `key` is a valid metadata key (an HTTP token, lowercased by the caller).
pub fn valid_key(key: &OsStr) -> bool {
    !key.is_empty()
        && key
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// Whether `value` is printable ASCII, as E2B requires for metadata values.
pub fn valid_value(value: &[u8]) -> bool {
    value.iter().all(|b| (0x20..=0x7e).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_when_supported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let meta = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "two".to_string()),
        ]);
        match replace(&file, &meta) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                eprintln!(
                    "SKIP: filesystem of {} has no user xattrs",
                    dir.path().display()
                );
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(read(&file), meta);
        let only_c = BTreeMap::from([("c".to_string(), "3".to_string())]);
        replace(&file, &only_c).unwrap();
        assert_eq!(read(&file), only_c);
        replace(&file, &BTreeMap::new()).unwrap();
        assert!(read(&file).is_empty());
    }

    #[test]
    fn validation() {
        assert!(valid_key(OsStr::new("my-key_1")));
        assert!(!valid_key(OsStr::new("bad key")));
        assert!(valid_value(b"hello world ~"));
        assert!(!valid_value("caf\u{e9}".as_bytes()));
        assert!(!valid_value(b"tab\t"));
    }
}
