//! The overlay root of a gVisor sandbox with a host id range of its own.
//!
//! runsc's gofer runs as the sandbox's mapped root (host `<base>`) and serves the
//! overlay at `<id>/rootfs/` from the host's mount namespace. The template's layer is
//! stored in the canonical range (host `100000 + n`), outside the gofer's map, so the
//! overlay's lower layer must be an idmapped mount of it (`jail::idmapped`), and the
//! overlay's `lowerdir=` must still name the template's own path: the template garbage
//! collector (`kiln-template/src/gc.rs`) reads it from the host's `mountinfo` to keep
//! layers in use.
//!
//! The multithreaded server cannot `unshare(CLONE_NEWNS)`, so the single-threaded
//! `kiln-jail` helper does it ([`SUBCOMMAND`]): it unshares a private mount namespace,
//! mounts the idmapped layer over the template's own path there, mounts the overlay
//! (`lowerdir=<template path>`) at `rootfs/`, takes a detached copy of it
//! (`open_tree(OPEN_TREE_CLONE)`), `setns`es back into the host's namespace and
//! attaches the copy at `rootfs/` (`move_mount`). The overlay keeps its own references
//! to its layers, so the private namespace (and the idmapped mount in it) may die with
//! the helper; the host sees an overlay whose options name the template, as before.
//! Written down in docs/gvisor.md ("Host ids").

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;

use crate::idmap::{read_record, IdsError};
use crate::jail::idmapped::{self, IdmapError};
use crate::jail::mounts::{self, MountError};
use crate::jail::spec::SandboxPaths;

/// `kiln-jail gvisor-rootfs --dir <sandbox dir> --lower <template rootfs>`.
pub const SUBCOMMAND: &str = "gvisor-rootfs";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("usage: kiln-jail {SUBCOMMAND} --dir <sandbox dir> --lower <template rootfs>")]
    Usage,
    #[error("{0}")]
    Invalid(String),
    #[error("the sandbox's id range")]
    Ids(#[from] IdsError),
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the overlay")]
    Mount(#[from] MountError),
    #[error("the idmapped template layer")]
    Idmap(#[from] IdmapError),
    #[error("running {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{exe} {SUBCOMMAND} failed ({status}): {stderr}")]
    Helper {
        exe: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn sys_err(what: &'static str) -> impl FnOnce(nix::Error) -> RootfsError {
    move |source| RootfsError::Sys { what, source }
}

/// The helper's side (`kiln-jail gvisor-rootfs`; single-threaded, host root): mount
/// the overlay of the sandbox directory `dir` over the template layer `lower`, idmapped
/// to the range `dir` records, at `dir/rootfs` in the host's mount namespace.
pub fn helper_main(args: &[String]) -> Result<(), RootfsError> {
    let [dir_flag, dir, lower_flag, lower] = args else {
        return Err(RootfsError::Usage);
    };
    if dir_flag != "--dir" || lower_flag != "--lower" {
        return Err(RootfsError::Usage);
    }
    let (dir, lower) = (Path::new(dir), Path::new(lower));
    if !dir.is_absolute() || !lower.is_absolute() || !lower.is_dir() {
        return Err(RootfsError::Invalid(format!(
            "{} and {} must be absolute paths, the template layer a directory",
            dir.display(),
            lower.display()
        )));
    }
    // The record is the host-owned truth about the sandbox's ids (written by the
    // server before anything of the sandbox exists).
    let ids = read_record(dir)?
        .filter(|ids| !ids.is_canonical())
        .ok_or_else(|| {
            RootfsError::Invalid(format!(
                "{} records no host id range of its own",
                dir.display()
            ))
        })?;
    let paths = SandboxPaths {
        dir: dir.to_path_buf(),
    };
    let rootfs = paths.rootfs();
    let opts = mounts::overlay_options(lower, &paths)?;
    let host_ns = File::open("/proc/self/ns/mnt").map_err(|source| RootfsError::Open {
        path: "/proc/self/ns/mnt".into(),
        source,
    })?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys_err("unshare(CLONE_NEWNS)"))?;
    // Nothing mounted here may propagate to the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys_err("making / private"))?;
    let userns = idmapped::layer_userns(ids)?;
    idmapped::mount_over_itself(lower, &userns)?;
    // nodev, nosuid: a template must not smuggle in device nodes or setuid binaries
    // for the host (the same flags as the canonical overlay's).
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(opts.as_str()),
    )
    .map_err(sys_err("mounting the overlay"))?;
    let tree = idmapped::clone_tree(&rootfs, true)?;
    // Back to the host's namespace (this process is single-threaded, so setns is
    // allowed); the private one dies when this process exits, the copy of the overlay
    // lives on where it is attached.
    nix::sched::setns(&host_ns, CloneFlags::CLONE_NEWNS)
        .map_err(sys_err("setns back to the host mount namespace"))?;
    idmapped::attach_tree(&tree, &rootfs)?;
    Ok(())
}

/// The server's side: run `helper` (`kiln-jail`) to mount the overlay of the sandbox
/// directory `dir` over `lower`, idmapped to the range `dir` records. Blocking.
pub fn mount_with_helper(helper: &Path, dir: &Path, lower: &Path) -> Result<(), RootfsError> {
    let out = Command::new(helper)
        .arg(SUBCOMMAND)
        .arg("--dir")
        .arg(dir)
        .arg("--lower")
        .arg(lower)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| RootfsError::Spawn {
            exe: helper.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(RootfsError::Helper {
        exe: helper.to_path_buf(),
        status: out.status,
        stderr: stderr.trim().chars().take(2000).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_refuses_bad_arguments_before_touching_anything() {
        let t = tempfile::tempdir().unwrap();
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert!(matches!(helper_main(&s(&[])), Err(RootfsError::Usage)));
        assert!(matches!(
            helper_main(&s(&["--lower", "/", "--dir", "/"])),
            Err(RootfsError::Usage)
        ));
        assert!(matches!(
            helper_main(&s(&["--dir", "rel", "--lower", "/"])),
            Err(RootfsError::Invalid(_))
        ));
        // No record, or the canonical range: nothing to idmap.
        let dir = t.path().to_str().unwrap();
        assert!(matches!(
            helper_main(&s(&["--dir", dir, "--lower", "/"])),
            Err(RootfsError::Invalid(_))
        ));
        crate::idmap::write_record(t.path(), crate::idmap::HostIds::CANONICAL).unwrap();
        assert!(matches!(
            helper_main(&s(&["--dir", dir, "--lower", "/"])),
            Err(RootfsError::Invalid(_))
        ));
    }

    #[test]
    fn a_failing_helper_reports_its_stderr() {
        let t = tempfile::tempdir().unwrap();
        let fake = t.path().join("kiln-jail");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"kiln-jail: $1 went wrong\" >&2\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = mount_with_helper(&fake, t.path(), Path::new("/")).unwrap_err();
        assert!(
            err.to_string()
                .contains("kiln-jail: gvisor-rootfs went wrong"),
            "{err}"
        );
    }
}
