//! The sandbox's filesystem.
//!
//! Two halves. [`prepare_rootfs`] runs in the helper, as host root, inside a private
//! mount namespace of its own (so nothing appears in the host's mount table and
//! everything vanishes with the sandbox): the overlay, the read-only guest binaries,
//! the `/run/kiln` bind and the generated `/etc` files. [`enter_rootfs`] runs in the
//! sandbox child, inside the new user and mount namespaces: it mounts what must belong
//! to the sandbox (`/proc` of its pid namespace, `/dev`, `/tmp`) and pivots into the
//! root.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::idmapped::{self, IdmapError};
use super::spec::SandboxPaths;
use crate::idmap::HostIds;
use crate::{GUEST_BIN_DIR, GUEST_ENVD_SOCKET};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} at {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path {path} cannot be used as an overlay layer (it contains ',' or ':' or is not absolute)")]
    BadLayerPath { path: PathBuf },
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("idmapped template layer")]
    Idmap(#[from] IdmapError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn do_mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    mount(src, target, fstype, flags, data).map_err(|source| MountError::Mount {
        what: fstype
            .map(str::to_string)
            .or_else(|| src.map(|s| s.display().to_string()))
            .unwrap_or_default(),
        target: target.to_path_buf(),
        source,
    })
}

/// Bind `src` at `target`, then remount the bind with `flags` (a bind mount ignores
/// flags on its first call).
fn bind(src: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
    do_mount(Some(src), target, None, MsFlags::MS_BIND, None)?;
    do_mount(
        None,
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None,
    )
}

fn layer_ok(p: &Path) -> Result<(), MountError> {
    let s = p.to_string_lossy();
    if !p.is_absolute() || s.contains(',') || s.contains(':') {
        return Err(MountError::BadLayerPath {
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// overlayfs mount options for a sandbox.
pub fn overlay_options(lower: &Path, paths: &SandboxPaths) -> Result<String, MountError> {
    for p in [lower.to_path_buf(), paths.upper(), paths.work()] {
        layer_ok(&p)?;
    }
    Ok(format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        paths.upper().display(),
        paths.work().display()
    ))
}

/// Create `rel` (relative to `root`) and missing parents, owned by sandbox root (host
/// id `owner`), and refuse to follow symlinks planted by a template out of the root.
pub fn ensure_dir(root: &Path, rel: &str, owner: u32) -> Result<PathBuf, MountError> {
    let mut path = root.to_path_buf();
    for comp in Path::new(rel.trim_start_matches('/')).components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        path.push(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                // A file or symlink where a mount point must be: replace it.
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
            }
            Err(_) => {}
        }
        fs::create_dir(&path).map_err(io_err("mkdir", &path))?;
        chown_to(&path, owner)?;
    }
    Ok(path)
}

fn chown_to(path: &Path, id: u32) -> Result<(), MountError> {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).map_err(io_err("chown", path))
}

/// Replace `/etc/<name>` in the merged root with `content` (never writing through a
/// symlink the template may have there), owned by sandbox root (host id `owner`).
pub fn write_etc(root: &Path, name: &str, content: &str, owner: u32) -> Result<(), MountError> {
    let etc = ensure_dir(root, "etc", owner)?;
    let path = etc.join(name);
    if fs::symlink_metadata(&path).is_ok() {
        fs::remove_file(&path).map_err(io_err("removing", &path))?;
    }
    fs::write(&path, content).map_err(io_err("writing", &path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
        .map_err(io_err("chmod", &path))?;
    chown_to(&path, owner)
}

pub fn hosts_file(id: &str, guest_ip: Option<std::net::Ipv4Addr>) -> String {
    let mut s = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{id}\n"
    );
    if let Some(ip) = guest_ip {
        s.push_str(&format!("{ip}\t{id}\n"));
    }
    s
}

/// Host half, in the helper's private mount namespace (as host root). `ids`: the
/// sandbox's host ids; unless they are the canonical range the template's layer
/// (stored in it) is first mounted idmapped over its own path (`idmapped.rs`).
pub fn prepare_rootfs(
    lower: &Path,
    paths: &SandboxPaths,
    guest_bin_dir: &Path,
    etc_files: &[(&str, String)],
    ids: HostIds,
) -> Result<(), MountError> {
    let root = paths.rootfs();
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let opts = overlay_options(lower, paths)?;
    if !ids.is_canonical() {
        let userns = idmapped::layer_userns(ids)?;
        idmapped::mount_over_itself(lower, &userns)?;
    }
    let owner = ids.root();
    // nodev: a template must not smuggle in device nodes; the sandbox's /dev is built
    // from binds of the host's harmless ones.
    do_mount(
        Some(Path::new("overlay")),
        &root,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(&opts),
    )?;
    for dir in ["proc", "dev", "tmp", "sys"] {
        ensure_dir(&root, dir, owner)?;
    }
    let bin = ensure_dir(&root, GUEST_BIN_DIR, owner)?;
    bind(
        guest_bin_dir,
        &bin,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let run_dir = Path::new(GUEST_ENVD_SOCKET)
        .parent()
        .unwrap_or(Path::new("/run/kiln"));
    let run = ensure_dir(&root, &run_dir.to_string_lossy(), owner)?;
    bind(
        &paths.run(),
        &run,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )?;
    for (name, content) in etc_files {
        write_etc(&root, name, content, owner)?;
    }
    Ok(())
}

const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: [(&str, &str); 5] = [
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Make the current directory, the merged root at `<sandbox dir>/rootfs`, a mount of
/// the sandbox's own (the overlay arrives locked from the helper's namespace, and
/// pivot_root refuses a locked new root) and enter it. Runs in the child before it
/// becomes sandbox root, while the sandbox directory is still searchable by it.
pub fn rebind_cwd_root() -> Result<(), MountError> {
    let here = Path::new(".");
    do_mount(
        Some(here),
        here,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    // `.` still names the mount below the new one; going through the parent enters
    // the top mount at `rootfs/`.
    nix::unistd::chdir("../rootfs").map_err(|source| MountError::Sys {
        what: "chdir into the re-bound root",
        source,
    })
}

/// Sizes of the sandbox's tmpfs mounts (`/tmp`, `/dev/shm`) in MiB. Their pages are
/// charged to the sandbox's memory cgroup but belong to no process, so an unbounded
/// tmpfs filled to the memory limit makes the OOM killer kill processes (envd first,
/// if it is the largest) without freeing anything. Bounded, a full tmpfs is ENOSPC.
pub fn tmpfs_sizes(memory_mb: u64) -> (u64, u64) {
    let tmp = (memory_mb / 2).max(1);
    let shm = (memory_mb / 4).clamp(1, 64);
    (tmp, shm)
}

/// Sandbox half: in the child (sandbox root, new user/mount/pid namespaces), with the
/// current directory at the root filesystem. Ends with `/` = that root.
pub fn enter_rootfs(memory_mb: u64) -> Result<(), MountError> {
    let (tmp_mb, shm_mb) = tmpfs_sizes(memory_mb);
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let here = Path::new(".");
    do_mount(
        Some(Path::new("proc")),
        &here.join("proc"),
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;

    let dev = here.join("dev");
    do_mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::write(&target, b"").map_err(io_err("creating", &target))?;
        do_mount(
            Some(&Path::new("/dev").join(name)),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).map_err(io_err("mkdir", &pts))?;
    do_mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(io_err("mkdir", &shm))?;
    do_mount(
        Some(Path::new("shm")),
        &shm,
        Some("tmpfs"),
        nosuid_nodev,
        Some(&format!("mode=1777,size={shm_mb}m")),
    )?;
    for (name, to) in DEV_LINKS {
        let link = dev.join(name);
        symlink(to, &link).map_err(io_err("symlink", &link))?;
    }
    let tmp_opts = format!("mode=1777,size={tmp_mb}m");
    do_mount(
        Some(Path::new("tmpfs")),
        &here.join("tmp"),
        Some("tmpfs"),
        nosuid_nodev,
        Some(&tmp_opts),
    )?;

    // pivot_root(".", "."): the old root ends up stacked on top of the new one, and
    // unmounting "." detaches it (with every host mount under it).
    nix::unistd::pivot_root(here, here).map_err(|source| MountError::Sys {
        what: "pivot_root",
        source,
    })?;
    umount2(here, MntFlags::MNT_DETACH).map_err(|source| MountError::Sys {
        what: "detaching the old root",
        source,
    })?;
    nix::unistd::chdir("/").map_err(|source| MountError::Sys {
        what: "chdir /",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_and_bad_paths() {
        let p = SandboxPaths::new(Path::new("/data/sandboxes"), "abc");
        assert_eq!(
            overlay_options(Path::new("/t/rootfs"), &p).unwrap(),
            "lowerdir=/t/rootfs,upperdir=/data/sandboxes/abc/disk/upper,workdir=/data/sandboxes/abc/disk/work"
        );
        assert!(overlay_options(Path::new("/t/a,b"), &p).is_err());
        assert!(overlay_options(Path::new("/t/a:b"), &p).is_err());
        assert!(overlay_options(Path::new("rel"), &p).is_err());
    }

    #[test]
    fn tmpfs_sizes_follow_the_memory_limit() {
        assert_eq!(tmpfs_sizes(64), (32, 16));
        assert_eq!(tmpfs_sizes(4096), (2048, 64));
        assert_eq!(tmpfs_sizes(1), (1, 1));
    }

    #[test]
    fn hosts() {
        let h = hosts_file("sb1", Some("10.77.0.2".parse().unwrap()));
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("127.0.1.1\tsb1\n"));
        assert!(h.ends_with("10.77.0.2\tsb1\n"));
        assert!(!hosts_file("sb1", None).contains("10.77"));
    }

    #[test]
    fn ensure_dir_replaces_files_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("proc"), "x").unwrap();
        symlink("/etc", t.path().join("run")).unwrap();
        // chown needs root; only check the shape when we are root.
        if nix::unistd::geteuid().is_root() {
            assert!(ensure_dir(t.path(), "proc", 4242).unwrap().is_dir());
            assert!(ensure_dir(t.path(), "/run/kiln", 4242).unwrap().is_dir());
            let meta = fs::metadata(t.path().join("run/kiln")).unwrap();
            assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 4242);
            assert!(!fs::symlink_metadata(t.path().join("run"))
                .unwrap()
                .file_type()
                .is_symlink());
        }
    }
}
