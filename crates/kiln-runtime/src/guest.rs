//! How host code touches the parts of a sandbox's directory that the guest can write.
//!
//! A sandbox's `run/` directory is bound into the guest at `/run/kiln` and is writable
//! by the guest's root: whatever the host finds there may have been put there by an
//! attacker (a symlink to a host socket or to `/dev/zero`, a FIFO, a huge file). So host
//! code never hands such a path to the kernel to resolve. It opens the host-owned parent
//! directory, then the one name it wants beneath it with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` and `O_NOFOLLOW`,
//! checks the inode it got (type, owner), and reads at most a cap. envd's socket is
//! connected through `/proc/self/fd/N` of an `O_PATH` descriptor of the checked socket
//! inode, so the connection goes to exactly that inode and nothing the guest swaps in
//! afterwards.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::idmap::{self as ids, HostIds};

/// Why a guest-writable file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GuestFileError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a {found}, expected a {expected}")]
    WrongType {
        path: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("{path} belongs to host uid {uid}, which is not one of its sandbox's ids")]
    WrongOwner { path: String, uid: u32 },
    #[error("the id range of the sandbox of {path}")]
    Ids {
        path: String,
        #[source]
        source: ids::IdsError,
    },
    #[error("{path} holds more than {cap} bytes")]
    TooLarge { path: String, cap: usize },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl GuestFileError {
    /// Whether the file is simply not there (yet): a socket envd has not bound.
    pub fn is_not_found(&self) -> bool {
        matches!(self, GuestFileError::Open { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

/// Open `name` (one or more components, never `..` out, never through a symlink)
/// beneath the host-owned directory `dir`.
fn open_beneath(dir: &Path, name: &str, flags: OFlags) -> Result<OwnedFd, GuestFileError> {
    let shown = || dir.join(name).display().to_string();
    let open_err = |e: rustix::io::Errno| GuestFileError::Open {
        path: shown(),
        source: e.into(),
    };
    let dirfd = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| GuestFileError::Open {
        path: dir.display().to_string(),
        source: e.into(),
    })?;
    rustix::fs::openat2(
        &dirfd,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
    .map_err(open_err)
}

fn check_type(
    fd: impl AsFd,
    shown: impl Fn() -> String,
    expected: FileType,
) -> Result<rustix::fs::Stat, GuestFileError> {
    let st = rustix::fs::fstat(fd).map_err(|e| GuestFileError::Open {
        path: shown(),
        source: e.into(),
    })?;
    let found = FileType::from_raw_mode(st.st_mode);
    if found != expected {
        return Err(GuestFileError::WrongType {
            path: shown(),
            found: type_name(found),
            expected: type_name(expected),
        });
    }
    Ok(st)
}

/// Read the regular file `name` beneath `dir`, at most `cap` bytes (more is an error,
/// not a truncation). FIFOs, devices, sockets and symlinks are refused without being
/// read, so a guest cannot make the host block or read forever.
pub fn read_capped(dir: &Path, name: &str, cap: usize) -> Result<Vec<u8>, GuestFileError> {
    let shown = || dir.join(name).display().to_string();
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let fd = open_beneath(dir, name, OFlags::RDONLY | OFlags::NONBLOCK)?;
    check_type(&fd, shown, FileType::RegularFile)?;
    let mut buf = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    std::fs::File::from(fd)
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|source| GuestFileError::Read {
            path: shown(),
            source,
        })?;
    if buf.len() > cap {
        return Err(GuestFileError::TooLarge { path: shown(), cap });
    }
    Ok(buf)
}

/// The last `max` bytes of the log file at `path` (a sandbox's console, whose content
/// and size the guest controls), as text; empty when there is none. Never reads more
/// than `max` bytes, never follows a link, never blocks on a FIFO.
pub fn tail(path: &Path, max: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(fd) = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return String::new();
    };
    if check_type(&fd, || path.display().to_string(), FileType::RegularFile).is_err() {
        return String::new();
    }
    let mut file = std::fs::File::from(fd);
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = file.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// [`read_capped`] as text (lossy UTF-8).
pub fn read_capped_string(dir: &Path, name: &str, cap: usize) -> Result<String, GuestFileError> {
    read_capped(dir, name, cap).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The host ids of the sandbox whose envd socket is `<dir>/run/envd.sock`: the range
/// `<dir>/idmap` records (every jail or gVisor sandbox started since ranges exist;
/// `<dir>` is host-owned, the guest cannot write there), else the canonical range
/// (sandboxes of old, the simulated runtime).
fn sandbox_ids(socket_dir: &Path) -> Result<HostIds, ids::IdsError> {
    match socket_dir.parent() {
        Some(dir) => Ok(ids::read_record(dir)?.unwrap_or(HostIds::CANONICAL)),
        None => Ok(HostIds::CANONICAL),
    }
}

/// Whether the host may connect to a socket owned by `uid`: an id of the sandbox
/// (`ids`: a socket envd bound as the sandbox's root, or that runsc's gofer bound for
/// it), or, for a server that does not run as root (the control-plane tests'
/// simulated runtime), its own uid. Never host root's, another host user's, nor
/// another sandbox's.
fn acceptable_owner(uid: u32, ids: HostIds) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    ids.contains(uid) || (me != 0 && uid == me)
}

/// Connect to envd's Unix socket at `socket` (`<sandbox dir>/run/envd.sock`), whose
/// directory the guest can write. The socket must be a socket inode directly in that
/// directory (no symlink anywhere), owned by an id of that sandbox: a guest that
/// replaced it by a link to a host socket, or renamed a host-owned socket there, gets
/// an error, never a connection to the host.
pub async fn connect_envd(socket: &Path) -> Result<tokio::net::UnixStream, GuestFileError> {
    let shown = || socket.display().to_string();
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name().and_then(|n| n.to_str()))
    else {
        return Err(GuestFileError::Open {
            path: shown(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a socket path"),
        });
    };
    let ids = sandbox_ids(dir).map_err(|source| GuestFileError::Ids {
        path: shown(),
        source,
    })?;
    let fd = open_beneath(dir, name, OFlags::PATH)?;
    let st = check_type(&fd, shown, FileType::Socket)?;
    if !acceptable_owner(st.st_uid, ids) {
        return Err(GuestFileError::WrongOwner {
            path: shown(),
            uid: st.st_uid,
        });
    }
    // The magic link names the inode `fd` holds, checked above; the kernel connects to
    // the socket bound to that inode whatever the directory holds by now.
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let stream = tokio::net::UnixStream::connect(&via)
        .await
        .map_err(|source| GuestFileError::Connect {
            path: shown(),
            source,
        });
    drop(fd);
    stream
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, symlink};

    #[test]
    fn read_capped_reads_small_regular_files_only() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("pid"), "42\n").unwrap();
        assert_eq!(read_capped(t.path(), "pid", 16).unwrap(), b"42\n");
        let big = read_capped(t.path(), "pid", 2).unwrap_err();
        assert!(
            matches!(big, GuestFileError::TooLarge { cap: 2, .. }),
            "{big}"
        );
        assert!(read_capped(t.path(), "missing", 16)
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn a_symlink_planted_by_the_guest_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host data").unwrap();
        symlink(outside.path().join("secret"), t.path().join("pid")).unwrap();
        symlink("/dev/zero", t.path().join("zero")).unwrap();
        symlink(outside.path(), t.path().join("d")).unwrap();
        for name in ["pid", "zero", "d/secret"] {
            let err = read_capped(t.path(), name, 1 << 20).unwrap_err();
            assert!(matches!(err, GuestFileError::Open { .. }), "{name}: {err}");
        }
        let err = read_capped(t.path(), "../x", 16).unwrap_err();
        assert!(matches!(err, GuestFileError::Open { .. }), "{err}");
    }

    #[test]
    fn tail_reads_only_the_end_of_a_huge_console() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("console.log");
        let f = std::fs::File::create(&log).unwrap();
        f.set_len(8 << 30).unwrap(); // 8 GiB, sparse
        drop(f);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"\nlast words\n"))
            .unwrap();
        let text = tail(&log, 64);
        assert_eq!(text.len(), 64);
        assert!(text.ends_with("last words\n"), "{text:?}");
        symlink("/dev/zero", t.path().join("link")).unwrap();
        assert_eq!(tail(&t.path().join("link"), 64), "");
        assert_eq!(tail(&t.path().join("missing"), 64), "");
    }

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&t.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(t.path().join("dir")).unwrap();
        for name in ["fifo", "dir"] {
            let err = read_capped(t.path(), name, 16).unwrap_err();
            assert!(matches!(err, GuestFileError::WrongType { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn envd_socket_must_be_a_sandbox_owned_socket_not_a_link() {
        let t = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let host_sock = host.path().join("host.sock");
        let _host_listener = std::os::unix::net::UnixListener::bind(&host_sock).unwrap();

        // A link to a host socket: refused without connecting.
        let socket = t.path().join("envd.sock");
        symlink(&host_sock, &socket).unwrap();
        let err = connect_envd(&socket).await.unwrap_err();
        // O_PATH|O_NOFOLLOW opens the link itself, which is then not a socket.
        assert!(
            matches!(
                err,
                GuestFileError::WrongType {
                    found: "symlink",
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_file(&socket).unwrap();

        // A socket inode owned by host root: refused (the test needs root to make one).
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        if me == 0 {
            let err = connect_envd(&socket).await.unwrap_err();
            assert!(
                matches!(err, GuestFileError::WrongOwner { uid: 0, .. }),
                "{err}"
            );
        }
        // Owned by the sandbox's root (needs root to chown): accepted.
        if me == 0 {
            let base = crate::ID_MAP_BASE;
            chown(&socket, Some(base), Some(base)).unwrap();
            let (client, accepted) = tokio::join!(connect_envd(&socket), listener.accept());
            client.unwrap();
            accepted.unwrap();
        }
        let err = connect_envd(&t.path().join("missing.sock"))
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[tokio::test]
    async fn envd_socket_must_belong_to_its_own_sandboxs_range() {
        // <dir>/idmap records the sandbox's range; <dir>/run holds the socket.
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let socket = run.join("envd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (own, other) = (HostIds::slot(7).unwrap(), HostIds::slot(8).unwrap());
        ids::write_record(dir.path(), own).unwrap();
        assert_eq!(sandbox_ids(&run).unwrap(), own);
        assert!(acceptable_owner(own.host(0), own));
        assert!(acceptable_owner(own.host(65535), own));
        assert!(!acceptable_owner(other.host(0), own));
        assert!(!acceptable_owner(crate::ID_MAP_BASE, own));
        assert!(!acceptable_owner(0, own));
        if nix::unistd::geteuid().is_root() {
            chown(&socket, Some(other.root()), Some(other.root())).unwrap();
            let err = connect_envd(&socket).await.unwrap_err();
            assert!(matches!(err, GuestFileError::WrongOwner { .. }), "{err}");
            chown(&socket, Some(own.host(0)), Some(own.host(0))).unwrap();
            let (client, accepted) = tokio::join!(connect_envd(&socket), listener.accept());
            client.unwrap();
            accepted.unwrap();
        }
        // No record: the canonical range (sandboxes from before ranges).
        std::fs::remove_file(dir.path().join(ids::RECORD)).unwrap();
        assert_eq!(sandbox_ids(&run).unwrap(), HostIds::CANONICAL);
        // A record that is not one: refused.
        std::fs::write(dir.path().join(ids::RECORD), "0 5 65536\n").unwrap();
        let err = connect_envd(&socket).await.unwrap_err();
        assert!(matches!(err, GuestFileError::Ids { .. }), "{err}");
    }
}
