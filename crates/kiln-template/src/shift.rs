//! The uid/gid shift of a freshly built root filesystem into the host range that a
//! sandbox's user namespace maps (sandbox id `n` ↔ host id `base + n`).
//!
//! Why a one-time shift and not idmapped mounts: see `docs/jail.md`. What it covers:
//! - every file, directory, symlink (the link itself, `lchown`, never its target), device
//!   node, fifo and socket below the root, the root included;
//! - hard links once (an inode seen before is skipped, so its ids are not shifted twice);
//! - setuid/setgid/sticky bits, which `chown` clears on regular files: they are set again,
//!   so `sudo` stays setuid root inside the sandbox.
//!
//! Not covered: ids inside POSIX ACLs (`system.posix_acl_*`) and namespaced file
//! capabilities (`security.capability`, which `chown` also drops). The base template has
//! neither (checked with `getfattr -R -d -m -` after a build); templates that need them
//! must be built in the user namespace instead.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode bits that `chown` may clear and that must be put back.
const SPECIAL_BITS: u32 = 0o7000;

/// The ownership changes the shift makes, behind a trait so the walk is unit-tested
/// without root.
pub trait Chown {
    /// Changes the owner of `path` itself (never a symlink's target).
    fn lchown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    /// Sets the full mode (`0o7777` bits) of `path`, which is not a symlink.
    fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()>;
}

/// The real thing: `lchown(2)` and `chmod(2)` through std.
#[derive(Debug, Default)]
pub struct HostChown;

impl Chown for HostChown {
    fn lchown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    }
}

/// What the shift did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShiftStats {
    /// Directory entries visited (the root included).
    pub entries: u64,
    /// Distinct inodes whose owner was changed.
    pub inodes: u64,
    /// Bytes of regular-file data (each inode once).
    pub bytes: u64,
    /// Files whose setuid/setgid/sticky bits were set again after the chown.
    pub special_modes_restored: u64,
}

/// The shift could not be completed; the tree is then half-shifted and must be thrown
/// away.
#[derive(Debug, thiserror::Error)]
pub enum ShiftError {
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot change owner of {path} to {uid}:{gid}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot restore mode {mode:o} of {path}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is owned by {kind} {id}, outside the {len} ids a sandbox maps (0..{len}); \
         the tree may already be shifted"
    )]
    IdOutOfRange {
        path: PathBuf,
        kind: &'static str,
        id: u32,
        len: u32,
    },
    #[error("{path} is on another filesystem than the root being shifted (a mount?); refusing")]
    CrossesMount { path: PathBuf },
    #[error("id map base {base} + length {len} overflows a 32-bit id")]
    BadRange { base: u32, len: u32 },
}

/// Shifts the owner of every entry below (and including) `root` from sandbox id `n` to
/// host id `base + n`, for ids `n < len`, and restores special mode bits.
///
/// Refuses to cross into another filesystem, so a stale mount inside the tree is never
/// touched.
pub fn shift_ids(
    root: &Path,
    base: u32,
    len: u32,
    chown: &mut dyn Chown,
) -> Result<ShiftStats, ShiftError> {
    if base.checked_add(len).is_none() {
        return Err(ShiftError::BadRange { base, len });
    }
    let root_meta = lstat(root)?;
    let root_dev = root_meta.dev();
    let mut stats = ShiftStats::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![(root.to_path_buf(), root_meta)];

    while let Some((path, meta)) = stack.pop() {
        stats.entries += 1;
        if meta.dev() != root_dev {
            return Err(ShiftError::CrossesMount { path });
        }
        let is_dir = meta.file_type().is_dir();
        // A hard-linked inode appears under several names; shift it once.
        let first_visit = is_dir || meta.nlink() <= 1 || seen.insert((meta.dev(), meta.ino()));
        if first_visit {
            shift_one(&path, &meta, base, len, chown, &mut stats)?;
        }
        if is_dir {
            let entries = fs::read_dir(&path).map_err(|source| ShiftError::ReadDir {
                path: path.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| ShiftError::ReadDir {
                    path: path.clone(),
                    source,
                })?;
                let child = entry.path();
                let child_meta = lstat(&child)?;
                stack.push((child, child_meta));
            }
        }
    }
    Ok(stats)
}

fn shift_one(
    path: &Path,
    meta: &fs::Metadata,
    base: u32,
    len: u32,
    chown: &mut dyn Chown,
    stats: &mut ShiftStats,
) -> Result<(), ShiftError> {
    let map = |kind, id: u32| {
        if id < len {
            Ok(base + id)
        } else {
            Err(ShiftError::IdOutOfRange {
                path: path.to_path_buf(),
                kind,
                id,
                len,
            })
        }
    };
    let uid = map("uid", meta.uid())?;
    let gid = map("gid", meta.gid())?;
    chown
        .lchown(path, uid, gid)
        .map_err(|source| ShiftError::Chown {
            path: path.to_path_buf(),
            uid,
            gid,
            source,
        })?;
    stats.inodes += 1;
    let file_type = meta.file_type();
    if file_type.is_file() {
        stats.bytes += meta.len();
    }
    let mode = meta.mode() & 0o7777;
    if !file_type.is_symlink() && mode & SPECIAL_BITS != 0 {
        chown
            .set_mode(path, mode)
            .map_err(|source| ShiftError::Chmod {
                path: path.to_path_buf(),
                mode,
                source,
            })?;
        stats.special_modes_restored += 1;
    }
    Ok(())
}

fn lstat(path: &Path) -> Result<fs::Metadata, ShiftError> {
    fs::symlink_metadata(path).map_err(|source| ShiftError::Stat {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    /// Records what the shift asked for instead of doing it (no root needed).
    #[derive(Default)]
    struct Recorder {
        owners: BTreeMap<PathBuf, (u32, u32)>,
        modes: BTreeMap<PathBuf, u32>,
    }

    impl Chown for Recorder {
        fn lchown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
            assert!(
                self.owners.insert(path.to_path_buf(), (uid, gid)).is_none(),
                "{} chowned twice",
                path.display()
            );
            Ok(())
        }
        fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
            self.modes.insert(path.to_path_buf(), mode);
            Ok(())
        }
    }

    /// A small tree: a file, a setuid file, a sticky dir, a symlink (to a file outside the
    /// tree), a broken symlink and a hard link.
    fn tree() -> (tempfile::TempDir, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::write(r.join("usr/bin/plain"), b"abc").unwrap();
        fs::write(r.join("usr/bin/sudo"), b"sudo!").unwrap();
        fs::set_permissions(r.join("usr/bin/sudo"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::create_dir(r.join("tmp")).unwrap();
        fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(outside.path().join("target"), b"x").unwrap();
        symlink(outside.path().join("target"), r.join("link-out")).unwrap();
        symlink("/does/not/exist", r.join("broken")).unwrap();
        fs::hard_link(r.join("usr/bin/plain"), r.join("usr/bin/plain2")).unwrap();
        (dir, outside)
    }

    #[test]
    fn walk_visits_each_inode_once_and_restores_special_bits() {
        let (dir, _outside) = tree();
        let r = dir.path();
        let mut rec = Recorder::default();
        // Use the current ids as "sandbox ids": any id below u32::MAX/2 fits a big len.
        let stats = shift_ids(r, 1000, 1 << 30, &mut rec).unwrap();
        assert_eq!(stats.entries, 9);
        // plain and plain2 are one inode.
        assert_eq!(stats.inodes, 8);
        assert_eq!(stats.bytes, 3 + 5);
        let me = fs::symlink_metadata(r).unwrap();
        assert_eq!(rec.owners[r], (me.uid() + 1000, me.gid() + 1000));
        assert!(rec.owners.contains_key(&r.join("link-out")));
        assert!(rec.owners.contains_key(&r.join("broken")));
        let plain_once = rec.owners.contains_key(&r.join("usr/bin/plain"))
            ^ rec.owners.contains_key(&r.join("usr/bin/plain2"));
        assert!(plain_once);
        assert_eq!(rec.modes.get(&r.join("usr/bin/sudo")), Some(&0o4755));
        assert_eq!(rec.modes.get(&r.join("tmp")), Some(&0o1777));
        assert_eq!(rec.modes.len(), 2);
        assert_eq!(stats.special_modes_restored, 2);
    }

    #[test]
    fn ids_outside_the_map_are_refused() {
        let (dir, _outside) = tree();
        let mut rec = Recorder::default();
        let uid = fs::symlink_metadata(dir.path()).unwrap().uid();
        let err = shift_ids(dir.path(), 100_000, uid, &mut rec).unwrap_err();
        assert!(
            matches!(err, ShiftError::IdOutOfRange { kind: "uid", .. }),
            "{err}"
        );
        let err = shift_ids(dir.path(), u32::MAX, 2, &mut rec).unwrap_err();
        assert!(matches!(err, ShiftError::BadRange { .. }));
    }

    /// Privilege tier: root (real `lchown` to other ids). Skips, saying so, without root.
    #[test]
    fn real_shift_as_root() {
        if !crate::tests::has_root("real_shift_as_root", "CAP_CHOWN") {
            return;
        }
        let (dir, outside) = tree();
        let r = dir.path();
        for p in ["", "usr", "usr/bin", "usr/bin/plain", "usr/bin/sudo", "tmp"] {
            std::os::unix::fs::chown(r.join(p), Some(0), Some(0)).unwrap();
        }
        std::os::unix::fs::lchown(r.join("link-out"), Some(0), Some(0)).unwrap();
        std::os::unix::fs::lchown(r.join("broken"), Some(5), Some(7)).unwrap();
        // chown above cleared the setuid bit; set it as a package would have.
        fs::set_permissions(r.join("usr/bin/sudo"), fs::Permissions::from_mode(0o4755)).unwrap();
        let target_before = fs::metadata(outside.path().join("target")).unwrap();

        let stats = shift_ids(r, 100_000, 65_536, &mut HostChown).unwrap();
        assert_eq!(stats.special_modes_restored, 2);

        let m = |p: &str| fs::symlink_metadata(r.join(p)).unwrap();
        for p in ["", "usr/bin", "usr/bin/plain", "usr/bin/plain2", "link-out"] {
            assert_eq!((m(p).uid(), m(p).gid()), (100_000, 100_000), "{p}");
        }
        assert_eq!((m("broken").uid(), m("broken").gid()), (100_005, 100_007));
        // sudo keeps its setuid bit, tmp its sticky bit.
        assert_eq!(m("usr/bin/sudo").mode() & 0o7777, 0o4755);
        assert_eq!(m("usr/bin/sudo").uid(), 100_000);
        assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
        // The symlink's target outside the tree was not followed.
        let target_after = fs::metadata(outside.path().join("target")).unwrap();
        assert_eq!(target_after.uid(), target_before.uid());
        // A second shift would push ids out of the sandbox range: refused, not applied.
        let err = shift_ids(r, 100_000, 65_536, &mut HostChown).unwrap_err();
        assert!(matches!(err, ShiftError::IdOutOfRange { .. }));
    }
}
