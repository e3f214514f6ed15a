//! Running a host tool as root of a user namespace that maps the sandbox id range, so
//! that it sees a template's shifted tree (host ids `base + n`) with the guest's ids
//! (`n`): `mkfs.ext4 -d` writing a template's disk image is the user.
//!
//! Only a process outside a new user namespace, with CAP_SETUID/CAP_SETGID there, may
//! write a map of more than one id. So the child makes the namespace itself
//! (`unshare(CLONE_NEWUSER)` between fork and exec), sends its pid to a thread of this
//! process, which writes `/proc/<pid>/{uid,gid}_map`, and waits for one byte before it
//! becomes the namespace's root and execs the tool. The server process is multithreaded,
//! so the forked child makes only raw system calls before exec.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};

/// Host ids `base..base+len` appear as `0..len` in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub base: u32,
    pub len: u32,
}

/// Running a tool in a mapped user namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("id range {base} + {len} overflows a 32-bit id")]
    BadRange { base: u32, len: u32 },
    #[error("making a pipe")]
    Pipe(#[source] nix::Error),
    #[error("cannot start it (is it installed?)")]
    Spawn(#[source] io::Error),
    #[error("mapping host ids {base}..{end} to 0..: {message}")]
    IdMap {
        base: u32,
        end: u64,
        message: String,
    },
    #[error("waiting for it")]
    Wait(#[source] io::Error),
}

/// Runs `cmd` to completion as uid and gid 0 of a new user namespace that maps host ids
/// `range.base..` to `0..range.len`, with no supplementary groups, and collects its
/// output (stdin is `/dev/null`). `keep` are descriptors the tool reaches through
/// `/proc/self/fd/N`: they stay open across its exec. Needs root.
pub fn output_as_mapped_root(
    mut cmd: Command,
    range: IdRange,
    keep: &[BorrowedFd<'_>],
) -> Result<Output, UsernsError> {
    let end = u64::from(range.base) + u64::from(range.len);
    if end > u64::from(u32::MAX) {
        return Err(UsernsError::BadRange {
            base: range.base,
            len: range.len,
        });
    }
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(UsernsError::Pipe);
    let (pid_r, pid_w) = pipe()?;
    let (go_r, go_w) = pipe()?;

    let mapper_ends = [pid_r.as_raw_fd(), go_w.as_raw_fd()];
    let map = format!("0 {} {}\n", range.base, range.len);
    let mapper = std::thread::spawn(move || write_maps(pid_r, go_w, &map));

    // The mapper holds `pid_r` and `go_w` but cannot close them before the fork: it
    // waits on `pid_r` until the child writes, and `pid_w` stays open here until
    // `spawn` returns. So their numbers are still theirs in the forked child.
    let fds = ChildFds {
        pid_w: pid_w.as_raw_fd(),
        go_r: go_r.as_raw_fd(),
        mapper_ends,
        keep: keep.iter().map(|fd| fd.as_raw_fd()).collect(),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec. It only reads `fds`
    // (allocated before the fork, never freed in the child) and makes raw system calls
    // (close, unshare, getpid, write, read, fcntl, setgroups, setresgid, setresuid) on
    // descriptors this process keeps open until `spawn` returns: no allocation, no
    // lock, nothing another thread of the parent could have left half-done.
    unsafe {
        cmd.pre_exec(move || enter_namespace(&fds));
    }
    let spawned = cmd.spawn();
    // Close our copies of the child's ends: the mapper sees EOF if the child died
    // before sending its pid, and the child sees EOF if the mapper gave up.
    drop(pid_w);
    drop(go_r);
    let mapped = mapper
        .join()
        .unwrap_or_else(|_| Err("the id-map thread panicked".to_string()));
    let id_map_err = |message| UsernsError::IdMap {
        base: range.base,
        end,
        message,
    };
    let child = match spawned {
        Ok(child) => child,
        // A mapper failure explains the child's failure better than its errno.
        Err(e) => return Err(mapped.err().map_or(UsernsError::Spawn(e), id_map_err)),
    };
    let output = child.wait_with_output().map_err(UsernsError::Wait)?;
    mapped.map_err(id_map_err)?;
    Ok(output)
}

/// The mapper thread: reads the child's pid, writes its id maps, then releases it with
/// one byte. On a failure it returns without writing, so the child reads EOF and fails
/// before exec.
fn write_maps(pid_r: OwnedFd, go_w: OwnedFd, map: &str) -> Result<(), String> {
    let mut buf = [0u8; 4];
    fs::File::from(pid_r)
        .read_exact(&mut buf)
        .map_err(|e| format!("the child did not report its pid: {e}"))?;
    let pid = i32::from_ne_bytes(buf);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        fs::write(&path, map).map_err(|e| format!("writing {path}: {e} (needs root)"))?;
    }
    fs::File::from(go_w)
        .write_all(b"g")
        .map_err(|e| format!("releasing the child: {e}"))
}

/// Descriptors the child uses before exec, and those it keeps across it.
struct ChildFds {
    /// Where the child writes its pid.
    pid_w: RawFd,
    /// Where the child waits for its id maps.
    go_r: RawFd,
    /// The mapper's ends, inherited by the fork: closed first, so that the child sees
    /// EOF on `go_r` when the mapper gives up instead of holding the pipe open itself.
    mapper_ends: [RawFd; 2],
    /// Descriptors whose close-on-exec flag the child clears.
    keep: Vec<RawFd>,
}

/// Child side, between fork and exec: a new user namespace, the pid to the mapper,
/// wait for the maps, keep the `keep` descriptors, then root of the namespace with no
/// supplementary groups.
///
/// Errors are bare errno values: std reports only the errno of a failed `pre_exec`,
/// and a message would allocate in the forked child.
fn enter_namespace(fds: &ChildFds) -> io::Result<()> {
    for &fd in &fds.mapper_ends {
        // SAFETY: `fd` is the forked copy of a descriptor the mapper thread still held
        // at the fork (see `output_as_mapped_root`); closing it touches nothing else.
        unsafe { libc::close(fd) };
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER)?;
    let pid = nix::unistd::getpid().as_raw().to_ne_bytes();
    // SAFETY: `pid_w` is the write end of a pipe the parent keeps open until spawn
    // returns; the buffer is a live 4-byte array.
    if unsafe { libc::write(fds.pid_w, pid.as_ptr().cast(), pid.len()) } != 4 {
        return Err(io::Error::last_os_error());
    }
    let mut go = [0u8; 1];
    // SAFETY: as above, for the read end `go_r` and a live 1-byte buffer.
    if unsafe { libc::read(fds.go_r, go.as_mut_ptr().cast(), 1) } != 1 {
        // The mapper gave up (and says why); EPERM stands for "no id maps".
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    for &fd in &fds.keep {
        // SAFETY: `fd` is open (the caller borrows it until spawn returns); F_SETFD
        // with 0 only clears its close-on-exec flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nix::unistd::setgroups(&[])?;
    let (gid, uid) = (Gid::from_raw(0), Uid::from_raw(0));
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Privilege tier: root (writes multi-id maps). Skips without it, except under CI,
    /// which runs as root: there it fails.
    fn has_root(test: &str) -> bool {
        if Uid::effective().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} needs root, and CI runs as root"
        );
        eprintln!("SKIP {test}: needs root");
        false
    }

    #[test]
    fn the_tool_runs_as_root_of_the_mapped_range() {
        if !has_root("the_tool_runs_as_root_of_the_mapped_range") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owned");
        fs::write(&file, "").unwrap();
        std::os::unix::fs::chown(&file, Some(100_000 + 1000), Some(100_000 + 1000)).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "id -u; id -g; id -G; stat -c %u:%g \"$1\"", "sh"])
            .arg(&file);
        let range = IdRange {
            base: 100_000,
            len: 65_536,
        };
        let out = output_as_mapped_root(cmd, range, &[]).unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n0\n0\n1000:1000\n");
    }

    /// A map the kernel refuses (an empty range) fails the call with the reason; the
    /// child must not wait forever for the go-ahead.
    #[test]
    fn a_refused_map_is_an_error_not_a_hang() {
        if !has_root("a_refused_map_is_an_error_not_a_hang") {
            return;
        }
        let range = IdRange {
            base: 100_000,
            len: 0,
        };
        let err = output_as_mapped_root(Command::new("true"), range, &[]).unwrap_err();
        assert!(
            matches!(&err, UsernsError::IdMap { message, .. } if message.contains("uid_map")),
            "{err}"
        );
    }
}
