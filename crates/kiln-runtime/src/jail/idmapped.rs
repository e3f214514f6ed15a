//! Idmapped template layers: the template's root filesystem is stored owned by the
//! canonical range (host `100000 + n`); a sandbox with a range of its own sees it
//! through an idmapped mount (`mount_setattr(2)` with `MOUNT_ATTR_IDMAP`, Linux ≥ 5.19
//! for overlayfs lower layers) in which on-disk `100000 + n` reads as `base + n`, which
//! the sandbox's user namespace maps to `n`. Nothing on disk changes; files the sandbox
//! copies up or creates land in its upper layer owned by its own range.
//!
//! Runs in the helper (single-threaded, host root), in its private mount namespace,
//! before the overlay is mounted. The idmapped mount is put on top of the layer's own
//! path there, so the overlay's `lowerdir=` names the template's path as before (the
//! template garbage collector reads it from every mount namespace's `mountinfo`).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;

use crate::idmap::HostIds;

#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("making the user namespace of the id mapping: {what}")]
    Userns {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{call} on {path}")]
    Mount {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn userns_err(what: &'static str) -> impl FnOnce(std::io::Error) -> IdmapError {
    move |source| IdmapError::Userns { what, source }
}

/// A user namespace whose uid and gid maps are `ids.layer_map_line()` (canonical →
/// the sandbox's range), held by a descriptor. A short-lived child creates it
/// (`clone(CLONE_NEWUSER)`) and waits while this process, host root in the parent
/// namespace, writes its maps; the descriptor keeps the namespace after the child
/// exits.
pub fn layer_userns(ids: HostIds) -> Result<OwnedFd, IdmapError> {
    let mut stack = vec![0u8; 64 * 1024];
    // The child only waits to be killed: the namespace lives on in our descriptor.
    let cb = Box::new(|| loop {
        nix::unistd::pause();
    });
    // SAFETY: the helper is single-threaded, so the child (a copy of this process
    // without CLONE_VM) cannot inherit a lock held by another thread; `stack` outlives
    // the call in the parent and is a private copy in the child, which only pauses
    // until it is killed.
    let child = unsafe {
        nix::sched::clone(
            cb,
            &mut stack,
            CloneFlags::CLONE_NEWUSER,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| userns_err("clone(CLONE_NEWUSER)")(e.into()))?;
    let result = (|| {
        let map = ids.layer_map_line();
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{child}/{file}"), &map)
                .map_err(userns_err("writing its id map"))?;
        }
        File::open(format!("/proc/{child}/ns/user"))
            .map(OwnedFd::from)
            .map_err(userns_err("opening it"))
    })();
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
    result
}

fn cstr(path: &Path) -> Result<CString, IdmapError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| IdmapError::Mount {
        call: "open_tree",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in path"),
    })
}

/// A detached copy of the mount tree at `path` (`open_tree(OPEN_TREE_CLONE)`; with
/// `recursive`, its submounts too), owned by the returned descriptor until it is
/// attached with [`attach_tree`] (or dropped, which unmounts it).
pub fn clone_tree(path: &Path, recursive: bool) -> Result<OwnedFd, IdmapError> {
    let c_path = cstr(path)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as u32;
    }
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call; the flags
    // ask for a detached copy of the mount at `c_path`, returned as a new descriptor
    // that we own at once (checked for -1 first).
    let tree =
        unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_path.as_ptr(), flags) };
    if tree < 0 {
        return Err(IdmapError::Mount {
            call: "open_tree(OPEN_TREE_CLONE)",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `tree` is a descriptor open_tree just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// Attach the detached mount tree `tree` (from [`clone_tree`]) at `path`, in the
/// calling process's current mount namespace (`move_mount(2)`).
pub fn attach_tree(tree: &OwnedFd, path: &Path) -> Result<(), IdmapError> {
    let c_path = cstr(path)?;
    let empty = c"";
    // SAFETY: `tree` is an open descriptor of a detached mount for the duration of
    // the call, `empty` and `c_path` are NUL-terminated strings that outlive it.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if moved < 0 {
        return Err(IdmapError::Mount {
            call: "move_mount",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mount `layer` over itself, read-only and idmapped through `userns`, in the calling
/// process's mount namespace (which must be private: the helper's).
pub fn mount_over_itself(layer: &Path, userns: &OwnedFd) -> Result<(), IdmapError> {
    let tree = clone_tree(layer, false)?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `tree` and `userns` are open descriptors for the duration of the call,
    // `empty` is a NUL-terminated string, and `attr` is a `mount_attr` of the size
    // passed, read (not kept) by the kernel.
    let set = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if set < 0 {
        return Err(IdmapError::Mount {
            call: "mount_setattr(MOUNT_ATTR_IDMAP)",
            path: layer.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    attach_tree(&tree, layer)
}
