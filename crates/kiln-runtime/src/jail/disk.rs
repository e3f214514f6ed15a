//! The sandbox's disk: a small ext4 filesystem of its own that holds the overlay's
//! writable layers, so the kernel caps what a sandbox can write.
//!
//! `state_dir/<id>/disk.img` is a sparse file of the cap's size, formatted with
//! `mkfs.ext4`, attached to a free loop device (`LOOP_CONFIGURE` with
//! `LO_FLAGS_AUTOCLEAR`) and mounted `nodev,nosuid` at `state_dir/<id>/disk/` in the
//! host's mount namespace; `upper/` and `work/` live in it. Writing past the cap is
//! `ENOSPC` inside the sandbox; the data directory loses at most the cap. The mount
//! is in the host's namespace (not the jail helper's private one) so the writable
//! layer stays readable after the sandbox's processes are gone (`Runtime::stop`, then
//! a template build reads `upper/`), `stats` can `statvfs` it, and gVisor's overlay,
//! mounted by the host, can sit on it. Autoclear releases the loop device when the
//! last mount of the filesystem goes (the host's, and the jail helper's copy when its
//! namespace dies), so teardown is `umount` plus removing the image.
//!
//! Why a loop-mounted image rather than the alternatives: project quotas need the data
//! directory's filesystem mounted with `prjquota` (an operator's choice Kiln cannot
//! assume; not the case here), and tmpfs is memory, not disk. Measured costs are in
//! `docs/jail.md` ("Teardown" and "The sequence", step 3).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Cap of a sandbox's writable layer when the caller names none (MiB).
pub const DEFAULT_DISK_MB: u64 = 10 * 1024;
/// Smallest cap accepted (MiB): ext4's own metadata needs a few MiB.
pub const MIN_DISK_MB: u64 = 16;

/// Where `mkfs.ext4` is looked for when it is not on `PATH` (a server started with a
/// `PATH` without the sbin directories).
const MKFS_CANDIDATES: [&str; 3] = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4", "mkfs.ext4"];
/// How often a free loop device is asked for when another process takes it first.
const LOOP_ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 {image} failed ({status}): {stderr}")]
    Mkfs {
        image: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("no free loop device for {image} after {attempts} attempts")]
    NoLoopDevice { image: PathBuf, attempts: u32 },
    #[error("{what} (loop device for {image})")]
    Loop {
        what: &'static str,
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {device} at {target}")]
    Mount {
        device: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("disk cap of {mb} MiB is below the minimum of {MIN_DISK_MB} MiB")]
    TooSmall { mb: u64 },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The `mkfs.ext4` command line for `image` (fast: nothing is zeroed, no reserved
/// blocks for root, no journal; see `docs/jail.md` for why no journal).
pub fn mkfs_args(image: &Path) -> Vec<String> {
    vec![
        "-q".into(),
        "-F".into(),
        // The "default" type (4 KiB blocks, one inode per 16 KiB) whatever the size:
        // mke2fs's "small" type for < 512 MiB spends a tenth of a small disk on inodes.
        "-T".into(),
        "default".into(),
        "-m".into(),
        "0".into(),
        "-O".into(),
        "^has_journal".into(),
        "-E".into(),
        "lazy_itable_init=1,lazy_journal_init=1".into(),
        image.display().to_string(),
    ]
}

/// Create `image` (sparse, `size_mb` MiB, `0600`), format it, and mount it at
/// `target` (an existing empty directory), which is left `0700 root`.
pub fn create(image: &Path, target: &Path, size_mb: u64) -> Result<(), DiskError> {
    if size_mb < MIN_DISK_MB {
        return Err(DiskError::TooSmall { mb: size_mb });
    }
    {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(image)
            .map_err(io_err("creating", image))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", image))?;
        f.set_len(size_mb.saturating_mul(1024 * 1024))
            .map_err(io_err("sizing", image))?;
    }
    mkfs(image)?;
    attach_and_mount(image, target)?;
    fs::set_permissions(target, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", target))
}

fn mkfs(image: &Path) -> Result<(), DiskError> {
    let mut last = None;
    for exe in MKFS_CANDIDATES {
        match Command::new(exe)
            .args(mkfs_args(image))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
        {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                return Err(DiskError::Mkfs {
                    image: image.to_path_buf(),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(io_err("running mkfs.ext4 for", image)(e)),
        }
    }
    Err(io_err(
        "running mkfs.ext4 (is e2fsprogs installed?) for",
        image,
    )(last.unwrap_or_else(|| {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    })))
}

/// Mount an existing image at `target` again (after a reboot took the mount away).
pub fn remount(image: &Path, target: &Path) -> Result<(), DiskError> {
    attach_and_mount(image, target)
}

// From linux/loop.h (not in the libc crate).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (`LOOP_CONFIGURE`, Linux ≥ 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn loop_config(backing: &File, flags: u32) -> LoopConfig {
    LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    }
}

/// Attach `image` to a free loop device with autoclear, mount it, and let go of the
/// device: from then on the mount alone holds it, and the kernel detaches it when the
/// filesystem's last mount goes.
fn attach_and_mount(image: &Path, target: &Path) -> Result<(), DiskError> {
    let loop_err = |what: &'static str| {
        move |source: std::io::Error| DiskError::Loop {
            what,
            image: image.to_path_buf(),
            source,
        }
    };
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io_err("opening", image))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(io_err("opening", Path::new("/dev/loop-control")))?;
    for _ in 0..LOOP_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number;
        // `control` is an open fd of /dev/loop-control for the whole call.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(loop_err("LOOP_CTL_GET_FREE")(
                std::io::Error::last_os_error(),
            ));
        }
        let device = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new().read(true).write(true).open(&device) {
            Ok(f) => f,
            // udev may not have made the node yet, or another process took it.
            Err(_) => continue,
        };
        // Direct I/O keeps the sandbox's data out of the page cache twice (once for
        // ext4, once for the image); a backing filesystem without O_DIRECT falls back.
        let mut configured = false;
        for flags in [LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO, LO_FLAGS_AUTOCLEAR] {
            let cfg = loop_config(&backing, flags);
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `LoopConfig`
            // matches field for field (repr(C)); `cfg` lives across the call, and the
            // kernel takes its own reference to the backing fd, which is open.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
            if r == 0 {
                configured = true;
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EBUSY) => break,
                Some(libc::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => continue,
                _ => return Err(loop_err("LOOP_CONFIGURE")(e)),
            }
        }
        if !configured {
            continue; // taken by another process between GET_FREE and CONFIGURE
        }
        let mounted = mount(
            Some(&device),
            target,
            Some("ext4"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .map_err(|source| DiskError::Mount {
            device: device.clone(),
            target: target.to_path_buf(),
            source,
        });
        // Closing `dev` detaches the device (autoclear) unless the mount holds it.
        drop(dev);
        return mounted;
    }
    Err(DiskError::NoLoopDevice {
        image: image.to_path_buf(),
        attempts: LOOP_ATTEMPTS,
    })
}

/// Whether a filesystem is mounted at `target` (it lies on another device than its
/// parent directory). `false` when `target` does not exist.
pub fn is_mounted(target: &Path) -> bool {
    let Some(parent) = target.parent() else {
        return false;
    };
    match (fs::metadata(target), fs::metadata(parent)) {
        (Ok(t), Ok(p)) => t.dev() != p.dev(),
        _ => false,
    }
}

/// Unmount `target` (missing or not mounted is fine). A busy filesystem is detached
/// lazily: it (and its loop device) goes when its last user does.
pub fn unmount(target: &Path) {
    if !is_mounted(target) {
        return;
    }
    if umount2(target, MntFlags::empty()).is_err() {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
}

/// Usage of the disk: `(used, total)` bytes as `df` inside the sandbox counts them
/// (`statvfs` of the mounted filesystem: total = its blocks, a little under the cap
/// for ext4's metadata; used = blocks not free). Opened with `O_PATH|O_NOFOLLOW`
/// after checking the mount, so nothing under the guest-writable `upper/` is walked.
/// When the disk is not mounted (a checkpointed gVisor sandbox after a reboot, before
/// adopt mounts it again): the image's allocated bytes and its size.
pub fn usage(image: &Path, target: &Path) -> Result<(u64, u64), DiskError> {
    if is_mounted(target) {
        let fd = nix::fcntl::open(
            target,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_err("opening", target)(std::io::Error::from(e)))?;
        let v = nix::sys::statvfs::fstatvfs(&fd)
            .map_err(|e| io_err("statvfs", target)(std::io::Error::from(e)))?;
        let frsize = v.fragment_size() as u64;
        let blocks = v.blocks() as u64;
        let free = v.blocks_free() as u64;
        return Ok((
            blocks.saturating_sub(free).saturating_mul(frsize),
            blocks.saturating_mul(frsize),
        ));
    }
    let meta = fs::symlink_metadata(image).map_err(io_err("stat", image))?;
    Ok((meta.blocks().saturating_mul(512), meta.len()))
}

/// Wait (at most `timeout`) until no loop device is backed by `image` any more: the
/// kernel detaches an autoclear device asynchronously after its filesystem's last
/// mount goes. `false` if one is still there (it goes when the filesystem's last user
/// does; `kill` reports nothing for it, the image's blocks are freed then).
pub fn wait_detached(image: &Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if loop_devices_of(image).is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The loop devices whose backing file is `image` (`/sys/block/loop*/loop/backing_file`),
/// for leak checks and tests.
pub fn loop_devices_of(image: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let want = image.to_string_lossy();
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            // The kernel appends " (deleted)" once the image is unlinked.
            let backing = backing.trim_end().trim_end_matches(" (deleted)");
            (name.starts_with("loop") && backing == want).then_some(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mkfs_is_fast_and_journal_free() {
        let args = mkfs_args(Path::new("/d/x/disk.img"));
        assert_eq!(args.last().map(String::as_str), Some("/d/x/disk.img"));
        for want in ["-q", "-F", "^has_journal", "default"] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        let e = args.iter().position(|a| a == "-E").unwrap();
        assert!(args[e + 1].contains("lazy_itable_init=1"));
        let m = args.iter().position(|a| a == "-m").unwrap();
        assert_eq!(args[m + 1], "0");
    }

    #[test]
    fn loop_config_matches_the_kernel_layout() {
        // linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn too_small_is_refused_before_touching_anything() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        assert!(matches!(
            create(&img, t.path(), 1),
            Err(DiskError::TooSmall { mb: 1 })
        ));
        assert!(!img.exists());
    }

    #[test]
    fn unmounted_usage_reads_the_image() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let mnt = t.path().join("disk");
        fs::create_dir(&mnt).unwrap();
        let f = File::create(&img).unwrap();
        f.set_len(32 << 20).unwrap();
        let (used, total) = usage(&img, &mnt).unwrap();
        assert_eq!(total, 32 << 20);
        assert!(used < 1 << 20, "sparse image counted as {used}");
        assert!(!is_mounted(&mnt));
        unmount(&mnt); // not mounted: nothing to do
        assert!(loop_devices_of(&img).is_empty());
    }
}
