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

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// Applies the overlay upper directory `upper` onto the layer directory `out`.
pub fn apply_upper(upper: &Path, out: &Path) -> Result<(), LayerError> {
    for entry in fs::read_dir(upper).map_err(err("read directory", upper))? {
        let entry = entry.map_err(err("read directory", upper))?;
        let from = entry.path();
        let to = out.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(err("stat", &from))?;
        let ft = meta.file_type();
        if is_whiteout(&meta) {
            remove_any(&to)?;
        } else if ft.is_dir() {
            let existing = fs::symlink_metadata(&to).ok();
            match existing {
                Some(m) if m.is_dir() => {
                    if is_opaque(&from) {
                        clear_dir(&to)?;
                    }
                    set_owner_mode(&to, &meta)?;
                }
                Some(_) => {
                    remove_any(&to)?;
                    make_dir_like(&to, &meta)?;
                }
                None => make_dir_like(&to, &meta)?,
            }
            apply_upper(&from, &to)?;
        } else {
            remove_any(&to)?;
            link_or_copy(&from, &to)?;
        }
    }
    Ok(())
}

/// A whiteout: a character device with device number 0/0.
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut buf = [0u8; 4];
            matches!(rustix::fs::lgetxattr(dir, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
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

/// Hard-links `from` to `to`, copying (with `cp -a`, which keeps owner, mode and
/// xattrs) when they are on different filesystems.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), LayerError> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(18) => {
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg("--no-dereference")
                .arg(from)
                .arg(to)
                .status()
                .map_err(err("run cp -a for", to))?;
            if status.success() {
                Ok(())
            } else {
                Err(LayerError {
                    op: "copy",
                    path: to.to_path_buf(),
                    source: io::Error::other(format!("cp -a exited with {status}")),
                })
            }
        }
        Err(e) => Err(err("hard-link", to)(e)),
    }
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

fn clear_dir(dir: &Path) -> Result<(), LayerError> {
    for entry in fs::read_dir(dir).map_err(err("read directory", dir))? {
        let entry = entry.map_err(err("read directory", dir))?;
        remove_any(&entry.path())?;
    }
    Ok(())
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
}
