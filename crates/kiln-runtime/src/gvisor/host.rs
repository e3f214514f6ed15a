//! What the host builds around a gVisor sandbox before `runsc` starts and removes
//! after it ends: the per-sandbox directories, the overlay root filesystem (mounted in
//! the host's mount namespace, since runsc's gofer serves it from there), the
//! generated `/etc` files, and, for Internet sandboxes, a named network namespace
//! with the jail's veth/NAT plan ([`crate::jail::net`]).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::bundle::BundlePaths;
use super::rootfs::{self, RootfsError};
use crate::idmap::HostIds;
use crate::jail::disk::{self, DiskError};
use crate::jail::mounts::{self, ensure_dir, hosts_file, write_etc, MountError};
use crate::jail::net::{self, NetError, Slot};
use crate::{GUEST_BIN_DIR, GUEST_ENVD_SOCKET};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root filesystem")]
    Mount(#[from] MountError),
    #[error("the sandbox's disk")]
    Disk(#[from] DiskError),
    #[error("mounting the overlay at {target}")]
    Overlay {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("network")]
    Net(#[from] NetError),
    #[error("mounting the overlay over the idmapped template layer")]
    Idmapped(#[from] RootfsError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HostError + 'a {
    move |source| HostError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(path: &Path, mode: u32, owner: Option<u32>) -> Result<(), HostError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("mkdir", path))?;
    // The umask may have narrowed the mode.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))?;
    if let Some(id) = owner {
        std::os::unix::fs::chown(path, Some(id), Some(id)).map_err(io_err("chown", path))?;
    }
    Ok(())
}

/// Create `state_dir/<id>/` (`0710 root:<sandbox root group>`: runsc's gofer runs as
/// the sandbox's mapped root and must traverse it; no other host user can reach
/// anything below, envd's socket included) with the record of the sandbox's host ids
/// (`idmap`, written first, see [`crate::idmap`]), the sandbox's disk (`disk.img` of
/// `disk_mb` MiB mounted at `disk/`, `0700 root`: see [`crate::jail::disk`]) holding
/// `upper/` (owned by sandbox root, host `ids.root()`) and `work/`, and `run/` owned
/// by sandbox root; mount the overlay at `rootfs/` ([`mount_overlay`]) and write `/etc`
/// files.
pub fn prepare_rootfs(
    lower: &Path,
    paths: &BundlePaths,
    disk_mb: u64,
    etc_files: &[(&str, String)],
    ids: HostIds,
    helper: &Path,
) -> Result<(), HostError> {
    let root_id = ids.root();
    mkdir(&paths.dir, 0o710, None)?;
    std::os::unix::fs::chown(&paths.dir, Some(0), Some(root_id))
        .map_err(io_err("chown", &paths.dir))?;
    // From here on the range is taken for every allocator that reads the state
    // directory (a restarted server included), until `kill` removes the directory.
    crate::idmap::write_record(&paths.dir, ids).map_err(io_err("writing", &paths.idmap()))?;
    mkdir(&paths.disk(), 0o700, None)?;
    disk::create(&paths.disk_image(), &paths.disk(), disk_mb)?;
    mkdir(&paths.upper(), 0o755, Some(root_id))?;
    mkdir(&paths.work(), 0o700, None)?;
    mkdir(&paths.rootfs(), 0o755, None)?;
    mkdir(&paths.run(), 0o700, Some(root_id))?;
    mount_overlay(lower, paths, ids, helper)?;
    let root = paths.rootfs();
    let run_dir = Path::new(GUEST_ENVD_SOCKET)
        .parent()
        .unwrap_or(Path::new("/run/kiln"));
    for dir in [
        "proc",
        "dev",
        "tmp",
        "sys",
        GUEST_BIN_DIR,
        &run_dir.to_string_lossy(),
    ] {
        ensure_dir(&root, dir, root_id)?;
    }
    for (name, content) in etc_files {
        write_etc(&root, name, content, root_id)?;
    }
    Ok(())
}

/// Mount the overlay `lowerdir=<lower>,upperdir=upper,workdir=work` at `rootfs/`
/// (again, after a reboot, for a checkpointed sandbox: `upper/` keeps its writes on
/// the disk image, which is mounted again first if the reboot took its mount). With
/// the canonical range (template builds) the server mounts it itself; with a range of
/// its own the `helper` (`kiln-jail`) mounts it over the template layer idmapped to
/// `ids` ([`rootfs`]).
pub fn mount_overlay(
    lower: &Path,
    paths: &BundlePaths,
    ids: HostIds,
    helper: &Path,
) -> Result<(), HostError> {
    let image = paths.disk_image();
    if image.is_file() && !disk::is_mounted(&paths.disk()) {
        disk::remount(&image, &paths.disk())?;
    }
    // Same upper/work layout as the jail's.
    let jail_paths = crate::jail::spec::SandboxPaths {
        dir: paths.dir.clone(),
    };
    let opts = mounts::overlay_options(lower, &jail_paths)?;
    if !ids.is_canonical() {
        rootfs::mount_with_helper(helper, &paths.dir, lower)?;
        return Ok(());
    }
    let root = paths.rootfs();
    // nodev: a template must not smuggle in device nodes.
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(opts.as_str()),
    )
    .map_err(|source| HostError::Overlay {
        target: root.clone(),
        source,
    })
}

/// Whether something is mounted at `rootfs/` (it lies on another device than the
/// sandbox directory holding it).
pub fn rootfs_mounted(paths: &BundlePaths) -> Result<bool, HostError> {
    use std::os::unix::fs::MetadataExt;
    let root = paths.rootfs();
    let inner = fs::metadata(&root).map_err(io_err("stat", &root))?;
    let outer = fs::metadata(&paths.dir).map_err(io_err("stat", &paths.dir))?;
    Ok(inner.dev() != outer.dev())
}

/// The `/etc` files every sandbox gets.
pub fn etc_files(id: &str, slot: Option<Slot>) -> Result<Vec<(&'static str, String)>, HostError> {
    let mut files = vec![
        ("hostname", format!("{id}\n")),
        ("hosts", hosts_file(id, slot.map(|s| s.guest_ip()))),
    ];
    if slot.is_some() {
        files.push(("resolv.conf", net::sandbox_resolv_conf()?));
    }
    Ok(files)
}

/// Unmount the overlay, then the disk under it (its loop device goes with its last
/// mount), and anything else left under the sandbox's directory.
pub fn unmount_rootfs(paths: &BundlePaths) {
    let _ = umount2(&paths.rootfs(), MntFlags::MNT_DETACH);
    crate::jail::unmount_leftovers(&paths.dir);
}

/// Name of a sandbox's network namespace (`ip netns`, `/run/netns/<name>`).
pub fn netns_name(id: &str) -> String {
    format!("kiln-{id}")
}

pub fn netns_path(id: &str) -> PathBuf {
    Path::new("/run/netns").join(netns_name(id))
}

/// Create the sandbox's network namespace with `lo` up and the slot's veth pair:
/// host end `kv<n>` on the host, `eth0` with address and default route inside. runsc
/// (`--network=sandbox`) copies that configuration into gVisor's network stack.
pub fn setup_netns(id: &str, slot: Slot) -> Result<(), HostError> {
    let name = netns_name(id);
    net::run("ip", &["netns", "add", &name], None)?;
    net::run("ip", &["-n", &name, "link", "set", "lo", "up"], None)?;
    net::setup_host_side_in(slot, &name)?;
    net::run(
        "ip",
        &["-n", &name, "-batch", "-"],
        Some(&slot.guest_batch()),
    )?;
    Ok(())
}

/// Remove the veth pair and the namespace; missing ones are fine.
pub fn remove_netns(id: &str, slot: Option<Slot>) -> Result<(), HostError> {
    if let Some(slot) = slot {
        net::remove_host_side(slot)?;
    }
    if netns_path(id).exists() {
        net::run("ip", &["netns", "del", &netns_name(id)], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names() {
        assert_eq!(netns_name("ab1"), "kiln-ab1");
        assert_eq!(netns_path("ab1"), Path::new("/run/netns/kiln-ab1"));
    }

    #[test]
    fn loopback_etc_files_need_no_resolver() {
        let f = etc_files("sb9", None).unwrap();
        assert_eq!(f[0], ("hostname", "sb9\n".to_string()));
        assert!(f[1].1.contains("127.0.1.1\tsb9"));
        assert_eq!(f.len(), 2);
    }
}
