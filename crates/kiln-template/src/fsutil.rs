//! Removing build directories safely.
//!
//! mmdebstrap (root mode) mounts `/proc`, `/sys` and device nodes inside the tree it
//! builds. If it is killed, those mounts stay, and a plain recursive delete of the stale
//! tree would walk into the host's `/sys` or `/dev`. So every mount at or below the tree
//! is detached first, deepest first, and the delete happens only once none is left.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};

/// Removing a directory tree failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("cannot read /proc/self/mountinfo to check {path} for mounts")]
    MountInfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {mount} (inside {path}); unmount it by hand, then retry")]
    Unmount {
        path: PathBuf,
        mount: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{path} still has mounts below it after unmounting: {mounts:?}")]
    StillMounted { path: PathBuf, mounts: Vec<PathBuf> },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Removes `path` recursively after detaching every mount at or below it. A missing
/// `path` is success.
pub fn remove_tree(path: &Path) -> Result<(), RemoveError> {
    let abs = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(RemoveError::Remove {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mounts = mounts_below(&abs)?;
    for mount in &mounts {
        // EINVAL: not a mount point any more (a parent's detach took it along).
        match umount2(mount, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(source) => {
                return Err(RemoveError::Unmount {
                    path: abs,
                    mount: mount.clone(),
                    source,
                })
            }
        }
    }
    if !mounts.is_empty() {
        let left = mounts_below(&abs)?;
        if !left.is_empty() {
            return Err(RemoveError::StillMounted {
                path: abs,
                mounts: left,
            });
        }
    }
    let meta = fs::symlink_metadata(&abs).map_err(|source| RemoveError::Remove {
        path: abs.clone(),
        source,
    })?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(&abs)
    } else {
        fs::remove_file(&abs)
    };
    result.map_err(|source| RemoveError::Remove { path: abs, source })
}

/// Mount points at or below `dir` (absolute, canonical), deepest first.
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>, RemoveError> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| RemoveError::MountInfo {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(mounts_below_in(&text, dir))
}

fn mounts_below_in(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|mp| mp.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = octal_byte(&bytes[i + 1..i + 4]) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn octal_byte(digits: &[u8]) -> Option<u8> {
    let mut v: u32 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return None;
        }
        v = v * 8 + u32::from(d - b'0');
    }
    u8::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:5 / /var/lib/kiln/templates/base/.rootfs.build/dev rw - devtmpfs udev rw
41 22 0:20 / /var/lib/kiln/templates/base/.rootfs.build/proc rw - proc proc rw
42 41 0:21 / /var/lib/kiln/templates/base/.rootfs.build/proc/sys/fs/binfmt_misc rw - binfmt_misc b rw
43 22 0:22 / /var/lib/kiln/templates/base/rootfs-other rw - tmpfs t rw
44 22 0:23 / /tmp/with\\040space/x rw - tmpfs t rw
";

    #[test]
    fn finds_mounts_below_deepest_first() {
        let dir = Path::new("/var/lib/kiln/templates/base/.rootfs.build");
        let found = mounts_below_in(MOUNTINFO, dir);
        assert_eq!(
            found,
            vec![
                dir.join("proc/sys/fs/binfmt_misc"),
                dir.join("dev"),
                dir.join("proc"),
            ]
        );
        // Prefix match is by path component, not by string.
        assert!(
            mounts_below_in(MOUNTINFO, Path::new("/var/lib/kiln/templates/base/rootfs")).is_empty()
        );
        assert_eq!(
            mounts_below_in(MOUNTINFO, Path::new("/tmp/with space")),
            vec![PathBuf::from("/tmp/with space/x")]
        );
    }

    #[test]
    fn unescape() {
        assert_eq!(unescape_mount_path("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mount_path("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape_mount_path("/x\\999"), "/x\\999");
    }

    fn is_root() -> bool {
        fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
            .unwrap_or(false)
    }

    /// Privilege tier: root (mounts a tmpfs). Skips, saying so, without root.
    #[test]
    fn remove_tree_unmounts_first() {
        if !is_root() {
            eprintln!("SKIP remove_tree_unmounts_first: needs root (mount)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("stale");
        let mnt = t.join("proc");
        fs::create_dir_all(&mnt).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        // A file on the mount: it must not be deleted through the tree, the mount goes.
        fs::write(mnt.join("on-the-mount"), b"x").unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        assert!(mounts_below(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn remove_tree_removes_and_tolerates_missing() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        fs::create_dir_all(t.join("a/b")).unwrap();
        fs::write(t.join("a/b/f"), b"x").unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        remove_tree(&t).unwrap();
    }
}
