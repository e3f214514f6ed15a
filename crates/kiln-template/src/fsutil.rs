//! Removing build directories safely, and resolving paths inside a root filesystem.
//!
//! mmdebstrap (root mode) mounts `/proc`, `/sys` and device nodes inside the tree it
//! builds. If it is killed, those mounts stay, and a plain recursive delete of the stale
//! tree would walk into the host's `/sys` or `/dev`. So every mount at or below the tree
//! is detached first, deepest first, and the delete happens only once none is left.
//!
//! A root filesystem from an image may hold symlinks such as `etc -> /etc` or
//! `lib -> ../../..`. The host writes into such trees (layers, Kiln's own files) only
//! through [`resolve_dir`] and [`resolve_file`], which follow symlinks as if the tree
//! were `/` (what the kernel's `RESOLVE_IN_ROOT` does), so nothing lands outside it.
//! `read_layer_file` reads a small text file of such a tree (`/etc/passwd`) the same
//! way, and only when it is a regular file.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{umount2, MntFlags};

/// Largest `/etc/passwd` or `/etc/group` of a layer [`read_layer_file`] reads (to look
/// up a COPY owner or an image's numeric `User`).
const MAX_ID_FILE: u64 = 16 << 20;

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

/// Symlinks followed in one resolution before it fails with `ELOOP` (Linux's limit).
const MAX_SYMLINKS: u32 = 40;

/// Resolves `rel` inside `root` to a directory, as a process chrooted into `root` would:
/// symlinks are followed, absolute targets start at `root`, `..` never climbs above it.
/// Missing components are created (mode 0755) when `create`, else the result is
/// `NotFound`; a component that is not a directory is `NotADirectory`. No component of
/// the returned path below `root` is a symlink, so writing below it stays inside `root`
/// (as long as nothing else changes the tree meanwhile: use it on trees Kiln owns).
pub fn resolve_dir(root: &Path, rel: &Path, create: bool) -> io::Result<PathBuf> {
    walk_in_root(
        root,
        rel,
        if create { Walk::CreateDirs } else { Walk::Dirs },
    )
}

/// Resolves `rel` inside `root` like [`resolve_dir`], following a final symlink too;
/// `None` when the final component does not exist. The result may be any kind of file
/// but a symlink.
pub fn resolve_file(root: &Path, rel: &Path) -> io::Result<Option<PathBuf>> {
    match walk_in_root(root, rel, Walk::File) {
        Ok(p) if fs::symlink_metadata(&p).is_ok() => Ok(Some(p)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Resolves `rel` inside `root` like [`resolve_file`], except that a missing final
/// component is fine: its would-be path is returned.
pub fn resolve_path(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    walk_in_root(root, rel, Walk::File)
}

/// A text file of the root filesystem `layer` (resolved inside it), when it is a regular
/// file; at most [`MAX_ID_FILE`] bytes; empty when it is missing or cannot be read. A
/// template's or an image's `/etc/passwd` may be a symlink to `/dev/zero` or a fifo:
/// neither is read.
pub(crate) fn read_layer_file(layer: &Path, rel: &str) -> String {
    let Ok(Some(path)) = resolve_file(layer, Path::new(rel)) else {
        return String::new();
    };
    let open = fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(&path);
    let Ok(f) = open else {
        return String::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut text = String::new();
    let _ = f.take(MAX_ID_FILE).read_to_string(&mut text);
    text
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    Dirs,
    CreateDirs,
    /// Directories up to the last component, which may be anything or missing.
    File,
}

fn walk_in_root(root: &Path, rel: &Path, mode: Walk) -> io::Result<PathBuf> {
    fn push_components(queue: &mut VecDeque<OsString>, path: &Path) {
        // Front of the queue, in order: a symlink's target is walked before the rest.
        let comps: Vec<OsString> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
            })
            .collect();
        for c in comps.into_iter().rev() {
            queue.push_front(c);
        }
    }
    let mut queue = VecDeque::new();
    push_components(&mut queue, rel);
    let mut here = root.to_path_buf();
    let mut depth = 0usize;
    let mut hops = 0u32;
    while let Some(name) = queue.pop_front() {
        if name == ".." {
            if depth > 0 {
                here.pop();
                depth -= 1;
            }
            continue;
        }
        let last = queue.is_empty();
        let next = here.join(&name);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links at {}",
                        next.display()
                    )));
                }
                let target = fs::read_link(&next)?;
                if target.is_absolute() {
                    here = root.to_path_buf();
                    depth = 0;
                }
                push_components(&mut queue, &target);
            }
            Ok(m) if m.is_dir() => {
                here = next;
                depth += 1;
            }
            Ok(_) if last && mode == Walk::File => return Ok(next),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", next.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match mode {
                Walk::File if last => return Ok(next),
                Walk::CreateDirs => {
                    fs::create_dir(&next)?;
                    fs::set_permissions(&next, fs::Permissions::from_mode(0o755))?;
                    here = next;
                    depth += 1;
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} does not exist", next.display()),
                    ))
                }
            },
            Err(e) => return Err(e),
        }
    }
    Ok(here)
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
    fn resolves_symlinks_inside_the_root() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        // An absolute symlink to a path that also exists on the host.
        symlink(&outside, root.join("abs")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("../../../../../..", root.join("usr/up")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        fs::write(root.join("usr/lib/file"), "x").unwrap();
        symlink("/usr/lib/file", root.join("file-link")).unwrap();

        assert_eq!(
            resolve_dir(&root, Path::new("lib"), false).unwrap(),
            root.join("usr/lib")
        );
        assert_eq!(
            resolve_dir(&root, Path::new("/usr/up/usr/./lib/.."), false).unwrap(),
            root.join("usr")
        );
        // `abs` points at the host's `outside`: resolved in the root, it is created there.
        let p = resolve_dir(&root, Path::new("abs/sub"), true).unwrap();
        assert!(p.starts_with(&root), "{}", p.display());
        assert!(root
            .join(outside.strip_prefix("/").unwrap())
            .join("sub")
            .is_dir());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(
            resolve_dir(&root, Path::new("missing/x"), false)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            resolve_dir(&root, Path::new("usr/lib/file/x"), true)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotADirectory
        );
        assert!(resolve_dir(&root, Path::new("loop1"), false)
            .unwrap_err()
            .to_string()
            .contains("too many levels"));
        assert_eq!(
            resolve_file(&root, Path::new("file-link")).unwrap(),
            Some(root.join("usr/lib/file"))
        );
        assert_eq!(resolve_file(&root, Path::new("lib/nope")).unwrap(), None);
        assert_eq!(resolve_file(&root, Path::new("nope/nope")).unwrap(), None);
    }

    #[test]
    fn unescape() {
        assert_eq!(unescape_mount_path("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mount_path("/trailing\\04"), "/trailing\\04");
        assert_eq!(unescape_mount_path("/x\\999"), "/x\\999");
    }

    /// Privilege tier: root (mounts a tmpfs). Skips, saying so, without root.
    #[test]
    fn remove_tree_unmounts_first() {
        if !crate::tests::has_root("remove_tree_unmounts_first", "mount") {
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
