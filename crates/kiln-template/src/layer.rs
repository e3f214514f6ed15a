//! Layers: each build step's result is a complete root filesystem directory.
//!
//! A new layer is materialized as a *hard-link farm* of its parent (directories are
//! created fresh with the parent's owner and mode, everything else is hard-linked)
//! with an overlay upper directory applied on top. We chose this over stacking
//! overlays (`lowerdir=a:b:c`) because a template version stays one plain directory
//! that the jail mounts as its single lower layer, old versions stay valid while
//! sandboxes run on them, and the cost of a layer is one inode link per file, not a
//! copy of the data. Files are never modified in place: an upper entry replaces the
//! linked name (unlink, then link or copy), so the parent's inodes never change.
//!
//! Upper directories follow overlayfs' format (redirect_dir, metacopy and index are
//! off on the hosts we run on): a character device 0/0 is a whiteout (delete the
//! name), a directory with the `trusted.overlay.opaque` (or, for overlays mounted in
//! a user namespace, `user.overlay.opaque`) xattr set to `y` hides everything below it
//! in the lower layers.
//!
//! The upper directory belongs to the sandbox, which may still be changing it while it
//! is read (a process swapping a directory for a symlink to `/` mid-walk). So
//! [`apply_upper`] walks it by directory file descriptors only: every entry is looked
//! at and opened relative to its parent's fd with `O_NOFOLLOW` (`fstatat` with
//! `AT_SYMLINK_NOFOLLOW`, `openat(O_DIRECTORY|O_NOFOLLOW)`, `linkat` without
//! `AT_SYMLINK_FOLLOW`, `readlinkat`), and what is applied is what the opened fd says,
//! so nothing outside the upper directory is ever read or linked, whatever the guest
//! does concurrently; an entry that changes under the walk fails the step. Device nodes
//! other than whiteouts and sockets are not carried over (sandboxes mount their root
//! `nodev`).

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

/// Deepest directory nesting of an upper directory that is applied (the walk holds two
/// fds per level).
pub const MAX_UPPER_DEPTH: usize = 256;

/// Materializing a layer failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct LayerError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `out` (which must not exist) as a hard-link farm of `src`.
pub fn link_tree(src: &Path, out: &Path) -> Result<(), LayerError> {
    let meta = fs::symlink_metadata(src).map_err(err("stat", src))?;
    make_dir_like(out, &meta)?;
    for entry in fs::read_dir(src).map_err(err("read directory", src))? {
        let entry = entry.map_err(err("read directory", src))?;
        let from = entry.path();
        let to = out.join(entry.file_name());
        let ft = entry.file_type().map_err(err("stat", &from))?;
        if ft.is_dir() {
            link_tree(&from, &to)?;
        } else {
            fs::hard_link(&from, &to).map_err(err("hard-link", &to))?;
        }
    }
    Ok(())
}

#[cfg(test)]
type RaceHook = Box<dyn FnMut(&Path)>;

#[cfg(test)]
thread_local! {
    /// Test hook: runs between looking at an upper entry and opening or linking it,
    /// where a racing guest would swap it.
    static RACE: std::cell::RefCell<Option<RaceHook>> =
        const { std::cell::RefCell::new(None) };
}

fn race_point(_from: &Path) {
    #[cfg(test)]
    RACE.with(|r| {
        if let Some(f) = r.borrow_mut().as_mut() {
            f(_from)
        }
    });
}

/// Applies the overlay upper directory `upper` onto the layer directory `out`, by
/// directory fds (see the module documentation).
pub fn apply_upper(upper: &Path, out: &Path) -> Result<(), LayerError> {
    let up = open_dir(rfs::CWD, upper).map_err(err("open directory", upper))?;
    let dst = open_dir(rfs::CWD, out).map_err(err("open directory", out))?;
    apply_dir(up.as_fd(), dst.as_fd(), upper, out, 0)
}

/// Opens the directory `name` relative to `at`, never through a symlink.
fn open_dir(at: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in the directory `dir` (without `.` and `..`).
fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            out.push(name);
        }
    }
    Ok(out)
}

fn as_path(name: &CStr) -> &Path {
    Path::new(OsStr::from_bytes(name.to_bytes()))
}

/// The guest changed an entry between two looks at it.
fn changed(what: &str) -> io::Error {
    io::Error::other(format!("{what} changed while the layer was being read"))
}

fn apply_dir(
    up: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    up_path: &Path,
    out_path: &Path,
    depth: usize,
) -> Result<(), LayerError> {
    if depth >= MAX_UPPER_DEPTH {
        return Err(LayerError {
            op: "apply",
            path: up_path.to_path_buf(),
            source: io::Error::other(format!(
                "directories nested deeper than {MAX_UPPER_DEPTH} levels (the limit)"
            )),
        });
    }
    for name in names(up).map_err(err("read directory", up_path))? {
        let from = up_path.join(as_path(&name));
        let to = out_path.join(as_path(&name));
        let st = match rfs::statat(up, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Deleted since it was listed.
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(err("stat", &from)(e.into())),
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        match ft {
            FileType::CharacterDevice if st.st_rdev == 0 => remove_at(dst, &name, &to, 0)?,
            FileType::Directory => {
                race_point(&from);
                let child_up = open_dir(up, &name).map_err(|e| match e.raw_os_error() {
                    Some(raw) if is_swap_errno(raw) => err("open", &from)(changed("a directory")),
                    _ => err("open directory", &from)(e),
                })?;
                // What was opened, not what was looked at before.
                let st = rfs::fstat(&child_up).map_err(|e| err("stat", &from)(e.into()))?;
                let opaque = is_opaque(child_up.as_fd());
                let existing = match rfs::statat(dst, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(m) => Some(FileType::from_raw_mode(m.st_mode)),
                    Err(rustix::io::Errno::NOENT) => None,
                    Err(e) => return Err(err("stat", &to)(e.into())),
                };
                match existing {
                    Some(FileType::Directory) => {}
                    Some(_) => {
                        remove_at(dst, &name, &to, 0)?;
                        mkdir_at(dst, &name, &to)?;
                    }
                    None => mkdir_at(dst, &name, &to)?,
                }
                let child_out = open_dir(dst, &name).map_err(err("open directory", &to))?;
                if opaque && existing == Some(FileType::Directory) {
                    clear_at(child_out.as_fd(), &to, 0)?;
                }
                rfs::fchown(
                    &child_out,
                    Some(rfs::Uid::from_raw(st.st_uid)),
                    Some(rfs::Gid::from_raw(st.st_gid)),
                )
                .map_err(|e| err("chown", &to)(e.into()))?;
                rfs::fchmod(&child_out, Mode::from_raw_mode(st.st_mode & 0o7777))
                    .map_err(|e| err("chmod", &to)(e.into()))?;
                apply_dir(child_up.as_fd(), child_out.as_fd(), &from, &to, depth + 1)?;
            }
            // Real devices (only root on the host makes them) and sockets are not
            // carried over.
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Socket => {}
            _ => {
                remove_at(dst, &name, &to, 0)?;
                race_point(&from);
                link_or_copy_at(up, dst, &name, ft, &from, &to)?;
            }
        }
    }
    Ok(())
}

/// `ELOOP` (a symlink where a directory was), `ENOTDIR`, `ENOENT`: the entry changed.
fn is_swap_errno(raw: i32) -> bool {
    [
        rustix::io::Errno::LOOP,
        rustix::io::Errno::NOTDIR,
        rustix::io::Errno::NOENT,
    ]
    .iter()
    .any(|e| e.raw_os_error() == raw)
}

fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<(), LayerError> {
    rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700))
        .map_err(|e| err("create directory", path)(e.into()))
}

/// Hard-links the entry `name` of `up` (never following it) into `dst`, copying it
/// when they are on different filesystems.
fn link_or_copy_at(
    up: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    ft: FileType,
    from: &Path,
    to: &Path,
) -> Result<(), LayerError> {
    match rfs::linkat(up, name, dst, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::XDEV) => copy_at(up, dst, name, ft, from, to),
        Err(rustix::io::Errno::NOENT) => Err(err("hard-link", to)(changed("an entry"))),
        Err(e) => Err(err("hard-link", to)(e.into())),
    }
}

/// Copies the entry `name` of `up` into `dst` as `cp -a --no-dereference` would: data,
/// owner, mode, times and extended attributes (overlayfs' own excepted).
fn copy_at(
    up: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    ft: FileType,
    from: &Path,
    to: &Path,
) -> Result<(), LayerError> {
    match ft {
        FileType::Symlink => {
            let target = rfs::readlinkat(up, name, Vec::new()).map_err(|e| match e {
                rustix::io::Errno::INVAL | rustix::io::Errno::NOENT => {
                    err("read link", from)(changed("a symlink"))
                }
                e => err("read link", from)(e.into()),
            })?;
            let st = rfs::statat(up, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| err("stat", from)(e.into()))?;
            rfs::symlinkat(target.as_c_str(), dst, name)
                .map_err(|e| err("create symlink", to)(e.into()))?;
            rfs::chownat(
                dst,
                name,
                Some(rfs::Uid::from_raw(st.st_uid)),
                Some(rfs::Gid::from_raw(st.st_gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| err("chown", to)(e.into()))
        }
        FileType::Fifo => {
            let st = rfs::statat(up, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| err("stat", from)(e.into()))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::Fifo {
                return Err(err("copy", from)(changed("a fifo")));
            }
            rfs::mknodat(dst, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                .map_err(|e| err("create fifo", to)(e.into()))?;
            // `dst` is the host's own directory: nothing swaps the new fifo.
            set_owner_mode_at(dst, name, &st, to)
        }
        _ => {
            // O_NONBLOCK: a fifo swapped in does not block the open; the fstat below
            // refuses it.
            let src = rfs::openat(
                up,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                rustix::io::Errno::LOOP | rustix::io::Errno::NOENT => {
                    err("open", from)(changed("a file"))
                }
                e => err("open", from)(e.into()),
            })?;
            let st = rfs::fstat(&src).map_err(|e| err("stat", from)(e.into()))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(err("copy", from)(changed("a file")));
            }
            let dst_fd = rfs::openat(
                dst,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| err("create", to)(e.into()))?;
            let mut src = fs::File::from(src);
            let mut out = fs::File::from(dst_fd);
            io::copy(&mut (&mut src).take(st.st_size as u64), &mut out)
                .map_err(err("copy to", to))?;
            copy_xattrs(src.as_fd(), out.as_fd());
            rfs::fchown(
                &out,
                Some(rfs::Uid::from_raw(st.st_uid)),
                Some(rfs::Gid::from_raw(st.st_gid)),
            )
            .map_err(|e| err("chown", to)(e.into()))?;
            // After the chown, which clears setuid/setgid bits.
            rfs::fchmod(&out, Mode::from_raw_mode(st.st_mode & 0o7777))
                .map_err(|e| err("chmod", to)(e.into()))?;
            let meta = src.metadata().map_err(err("stat", from))?;
            let mut times = fs::FileTimes::new();
            if let Ok(m) = meta.modified() {
                times = times.set_modified(m);
            }
            if let Ok(a) = meta.accessed() {
                times = times.set_accessed(a);
            }
            out.set_times(times).map_err(err("set the times of", to))
        }
    }
}

fn set_owner_mode_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &rfs::Stat,
    path: &Path,
) -> Result<(), LayerError> {
    rfs::chownat(
        dir,
        name,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err("chown", path)(e.into()))?;
    rfs::chmodat(
        dir,
        name,
        Mode::from_raw_mode(st.st_mode & 0o7777),
        AtFlags::empty(),
    )
    .map_err(|e| err("chmod", path)(e.into()))
}

/// Copies the extended attributes of `from` to `to`, except overlayfs' own; best
/// effort, as `cp -a` (a filesystem without xattrs loses them).
fn copy_xattrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
    let mut list = vec![0u8; 64 << 10];
    let Ok(n) = rfs::flistxattr(from, &mut list[..]) else {
        return;
    };
    let mut value = vec![0u8; 64 << 10];
    for name in list[..n.min(list.len())].split(|b| *b == 0) {
        if name.is_empty()
            || name.starts_with(b"trusted.overlay.")
            || name.starts_with(b"user.overlay.")
        {
            continue;
        }
        let Ok(name) = CString::new(name) else {
            continue;
        };
        if let Ok(len) = rfs::fgetxattr(from, name.as_c_str(), &mut value[..]) {
            let _ = rfs::fsetxattr(
                to,
                name.as_c_str(),
                &value[..len.min(value.len())],
                rfs::XattrFlags::empty(),
            );
        }
    }
}

/// Removes the entry `name` of `dir` whatever it is (a directory with its contents),
/// never following a symlink; a missing entry is fine.
fn remove_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
    depth: usize,
) -> Result<(), LayerError> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(err("stat", path)(e.into())),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let child = open_dir(dir, name).map_err(err("open directory", path))?;
        clear_at(child.as_fd(), path, depth + 1)?;
        rfs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(|e| err("remove", path)(e.into()))
    } else {
        rfs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| err("remove", path)(e.into()))
    }
}

/// Empties the directory `dir`.
fn clear_at(dir: BorrowedFd<'_>, path: &Path, depth: usize) -> Result<(), LayerError> {
    if depth > 4 * MAX_UPPER_DEPTH {
        return Err(err("clear", path)(io::Error::other(
            "directories nested too deep",
        )));
    }
    for name in names(dir).map_err(err("read directory", path))? {
        remove_at(dir, &name, &path.join(as_path(&name)), depth)?;
    }
    Ok(())
}

/// A whiteout: a character device with device number 0/0.
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut buf = [0u8; 4];
            matches!(rfs::fgetxattr(dir, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
        })
}

fn make_dir_like(path: &Path, meta: &fs::Metadata) -> Result<(), LayerError> {
    fs::create_dir(path).map_err(err("create directory", path))?;
    set_owner_mode(path, meta)
}

fn set_owner_mode(path: &Path, meta: &fs::Metadata) -> Result<(), LayerError> {
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))
        .map_err(err("chown", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(err("chmod", path))
}

/// Removes `path` whatever it is; a missing path is fine.
pub fn remove_any(path: &Path) -> Result<(), LayerError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err("stat", path)(e)),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(err("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(err("remove", path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    fn parent(dir: &Path) -> PathBuf {
        let p = dir.join("parent");
        fs::create_dir_all(p.join("etc/sub")).unwrap();
        fs::create_dir_all(p.join("opt/old")).unwrap();
        fs::write(p.join("etc/keep"), "keep").unwrap();
        fs::write(p.join("etc/change"), "old").unwrap();
        fs::write(p.join("etc/gone"), "x").unwrap();
        fs::write(p.join("etc/sub/deep"), "deep").unwrap();
        fs::write(p.join("opt/old/file"), "old").unwrap();
        std::os::unix::fs::symlink("keep", p.join("etc/link")).unwrap();
        p
    }

    #[test]
    fn link_tree_shares_inodes_and_keeps_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = parent(dir.path());
        let out = dir.path().join("out");
        link_tree(&p, &out).unwrap();
        let a = fs::metadata(p.join("etc/keep")).unwrap();
        let b = fs::metadata(out.join("etc/keep")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(
            fs::read_link(out.join("etc/link")).unwrap(),
            Path::new("keep")
        );
        // Directories are fresh, not shared.
        assert_ne!(
            fs::metadata(p.join("etc")).unwrap().ino(),
            fs::metadata(out.join("etc")).unwrap().ino()
        );
    }

    #[test]
    fn upper_replaces_adds_and_never_touches_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let p = parent(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("etc/new")).unwrap();
        fs::write(upper.join("etc/change"), "new").unwrap();
        fs::write(upper.join("etc/new/f"), "f").unwrap();
        // A file replaced by a directory.
        fs::create_dir_all(upper.join("etc/keep2")).unwrap();
        let out = dir.path().join("out");
        link_tree(&p, &out).unwrap();
        apply_upper(&upper, &out).unwrap();
        assert_eq!(read(&out.join("etc/change")), "new");
        assert_eq!(read(&p.join("etc/change")), "old");
        assert_eq!(read(&out.join("etc/new/f")), "f");
        assert_eq!(read(&out.join("etc/keep")), "keep");
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        // Creating a 0/0 char device and setting trusted.* xattrs needs root.
        if !crate::tests::has_root("whiteouts_and_opaque_dirs", "mknod, trusted.* xattrs") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = parent(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::create_dir_all(upper.join("opt/old")).unwrap();
        fs::write(upper.join("opt/old/fresh"), "fresh").unwrap();
        rustix::fs::setxattr(
            upper.join("opt/old").as_path(),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        for name in ["etc/gone", "etc/sub"] {
            nix::sys::stat::mknod(
                &upper.join(name),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .unwrap();
        }
        let out = dir.path().join("out");
        link_tree(&p, &out).unwrap();
        apply_upper(&upper, &out).unwrap();
        assert!(!out.join("etc/gone").exists());
        assert!(!out.join("etc/sub").exists());
        assert!(out.join("etc/keep").exists());
        assert!(!out.join("opt/old/file").exists());
        assert_eq!(read(&out.join("opt/old/fresh")), "fresh");
        // The parent is untouched.
        assert!(p.join("etc/gone").exists());
        assert!(p.join("opt/old/file").exists());
    }

    /// Every regular file below `root` (symlinks not followed), with its contents.
    fn files_below(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_file() {
                    out.push((e.path(), fs::read(e.path()).unwrap()));
                }
            }
        }
        out
    }

    /// A directory on the "host" (outside the upper dir) holding a secret.
    fn host_secret(dir: &Path) -> PathBuf {
        let host = dir.join("host");
        fs::create_dir_all(host.join("sub")).unwrap();
        fs::write(host.join("secret"), "HOST SECRET").unwrap();
        fs::write(host.join("sub/secret"), "HOST SECRET").unwrap();
        host
    }

    fn assert_no_host_data(out: &Path) {
        for (path, data) in files_below(out) {
            assert_ne!(data, b"HOST SECRET", "{} holds host data", path.display());
        }
    }

    /// The attack: the guest swaps a directory of the upper dir for a symlink to a host
    /// directory after the walk saw a directory. The old walk recursed by path, so the
    /// kernel followed the symlink and the host's files were hard-linked into the layer.
    /// The fd walk opens with `O_NOFOLLOW` and fails the step instead.
    #[test]
    fn upper_dir_swapped_for_a_symlink_mid_walk_does_not_leak_host_files() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_secret(dir.path());
        let p = parent(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("etc/d")).unwrap();
        fs::write(upper.join("etc/d/f"), "guest").unwrap();
        let out = dir.path().join("out");
        link_tree(&p, &out).unwrap();
        let target = upper.join("etc/d");
        let host_for_hook = host.clone();
        RACE.with(|r| {
            *r.borrow_mut() = Some(Box::new(move |from: &Path| {
                if from == target {
                    fs::remove_dir_all(&target).unwrap();
                    std::os::unix::fs::symlink(&host_for_hook, &target).unwrap();
                }
            }))
        });
        let result = apply_upper(&upper, &out);
        RACE.with(|r| *r.borrow_mut() = None);
        let e = result.unwrap_err();
        assert!(
            crate::ErrorChain(&e).to_string().contains("changed while"),
            "{}",
            crate::ErrorChain(&e)
        );
        assert_no_host_data(&out);
        assert_eq!(
            fs::read_dir(&host).unwrap().count(),
            2,
            "host dir untouched"
        );
    }

    /// A file swapped for a symlink to a host file just before it is linked: the link
    /// itself lands in the layer (`linkat` without `AT_SYMLINK_FOLLOW`), never the
    /// host's data.
    #[test]
    fn upper_file_swapped_for_a_symlink_links_the_symlink_not_the_host_file() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_secret(dir.path());
        let p = parent(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::write(upper.join("etc/change"), "guest").unwrap();
        let out = dir.path().join("out");
        link_tree(&p, &out).unwrap();
        let target = upper.join("etc/change");
        let secret = host.join("secret");
        RACE.with(|r| {
            *r.borrow_mut() = Some(Box::new(move |from: &Path| {
                if from == target {
                    fs::remove_file(&target).unwrap();
                    std::os::unix::fs::symlink(&secret, &target).unwrap();
                }
            }))
        });
        let result = apply_upper(&upper, &out);
        RACE.with(|r| *r.borrow_mut() = None);
        result.unwrap();
        assert!(fs::symlink_metadata(out.join("etc/change"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_no_host_data(&out);
    }

    /// Static symlinks in the upper dir (where a directory is in the parent) are
    /// applied as symlinks; nothing is read through them.
    #[test]
    fn upper_symlink_where_a_directory_was_does_not_copy_host_data() {
        let dir = tempfile::tempdir().unwrap();
        let host = host_secret(dir.path());
        let p = parent(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        std::os::unix::fs::symlink(&host, upper.join("etc")).unwrap();
        let out = dir.path().join("out");
        link_tree(&p, &out).unwrap();
        apply_upper(&upper, &out).unwrap();
        assert!(fs::symlink_metadata(out.join("etc"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_no_host_data(&out);
        // The parent's `etc` is untouched.
        assert_eq!(read(&p.join("etc/keep")), "keep");
    }

    /// The guest swaps directories for symlinks to a host directory as fast as it can
    /// (`renameat2(RENAME_EXCHANGE)`, so the name is always one or the other) while the
    /// upper dir is applied again and again: no attempt puts host data in the layer.
    #[test]
    fn upper_walk_racing_a_swapping_guest_never_reaches_the_host() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let host = host_secret(dir.path());
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("a/d")).unwrap();
        for i in 0..20 {
            fs::write(upper.join(format!("a/d/f{i}")), "guest").unwrap();
        }
        std::os::unix::fs::symlink(&host, upper.join("a/l")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let stop = stop.clone();
            let a = upper.join("a");
            std::thread::spawn(move || {
                let fd = open_dir(rfs::CWD, &a).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let _ = rfs::renameat_with(&fd, "d", &fd, "l", rfs::RenameFlags::EXCHANGE);
                }
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        let mut attempts = 0;
        while std::time::Instant::now() < deadline {
            let out = dir.path().join(format!("out{attempts}"));
            fs::create_dir(&out).unwrap();
            let _ = apply_upper(&upper, &out);
            assert_no_host_data(&out);
            fs::remove_dir_all(&out).unwrap();
            attempts += 1;
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(attempts > 10, "{attempts}");
    }

    /// The copy used across filesystems (`EXDEV`) reads through fds and copies a
    /// symlink as a symlink, a file's data, mode and times.
    #[test]
    fn copy_across_filesystems_keeps_links_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("up");
        let out = dir.path().join("out");
        fs::create_dir_all(&up).unwrap();
        fs::create_dir_all(&out).unwrap();
        fs::write(up.join("f"), "data").unwrap();
        fs::set_permissions(up.join("f"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", up.join("l")).unwrap();
        let (u, o) = (
            open_dir(rfs::CWD, &up).unwrap(),
            open_dir(rfs::CWD, &out).unwrap(),
        );
        for (name, ft) in [(c"f", FileType::RegularFile), (c"l", FileType::Symlink)] {
            copy_at(u.as_fd(), o.as_fd(), name, ft, &up, &out).unwrap();
        }
        assert_eq!(read(&out.join("f")), "data");
        assert_eq!(fs::metadata(out.join("f")).unwrap().mode() & 0o7777, 0o751);
        assert_eq!(
            fs::metadata(out.join("f")).unwrap().mtime(),
            fs::metadata(up.join("f")).unwrap().mtime()
        );
        assert_eq!(
            fs::read_link(out.join("l")).unwrap(),
            Path::new("/etc/passwd")
        );
        // Told "a file" but a symlink is there (swapped): refused, not followed.
        let e = copy_at(u.as_fd(), o.as_fd(), c"l", FileType::RegularFile, &up, &out);
        assert!(e.is_err());
    }

    /// A guest can nest directories arbitrarily deep; the walk stops at the limit with
    /// an error instead of running out of fds or stack.
    #[test]
    fn upper_nested_past_the_depth_limit_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        let mut fd = open_dir(rfs::CWD, &upper).unwrap();
        for _ in 0..MAX_UPPER_DEPTH + 1 {
            rfs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
            fd = open_dir(&fd, "d").unwrap();
        }
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let e = apply_upper(&upper, &out).unwrap_err();
        assert!(
            crate::ErrorChain(&e).to_string().contains("deeper than"),
            "{}",
            crate::ErrorChain(&e)
        );
    }
}
