//! Starting a child: environment, cwd, identity, stdio or PTY.
//!
//! envd runs multithreaded, so the code between fork and exec (`pre_exec`) does only
//! async-signal-safe system calls on memory prepared before the fork.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use super::pty::{self, PtyMaster, WinSize};

/// What to run and as whom.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (primary group included).
    pub groups: Vec<u32>,
    /// Attach a stdin pipe (otherwise `/dev/null`). Ignored for PTYs.
    pub stdin: bool,
    /// Run on a new PTY of this size.
    pub pty: Option<WinSize>,
}

/// The child's output side.
pub enum Output {
    Pipes {
        stdout: ChildStdout,
        stderr: ChildStderr,
    },
    Pty(Arc<PtyMaster>),
}

/// The child's input side.
pub enum Input {
    Pipe(ChildStdin),
    Null,
    Pty(Arc<PtyMaster>),
}

pub struct Spawned {
    pub child: Child,
    pub pid: u32,
    pub input: Input,
    pub output: Output,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("allocating a pty")]
    Pty(#[source] io::Error),
    #[error("starting '{cmd}'")]
    Start {
        cmd: String,
        #[source]
        source: io::Error,
    },
}

/// Identity switch done in the child. Prepared before fork: `pre_exec` must not
/// allocate.
#[derive(Clone)]
struct Credentials {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    /// False when envd is not root and already is `uid` (tests, development).
    switch: bool,
}

pub fn spawn(spec: SpawnSpec) -> Result<Spawned, SpawnError> {
    let mut command = Command::new(&spec.cmd);
    command
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .kill_on_drop(false);

    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let creds = Credentials {
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        switch: euid == 0 || euid != spec.uid,
    };

    let (pty_master, pty_slave) = match spec.pty {
        Some(size) => {
            let (master, slave) = pty::open(size).map_err(SpawnError::Pty)?;
            // Programs check that their terminal belongs to them (as after login).
            let _ = nix::unistd::fchown(
                &slave,
                Some(nix::unistd::Uid::from_raw(spec.uid)),
                Some(nix::unistd::Gid::from_raw(spec.gid)),
            );
            (Some(Arc::new(master)), Some(slave))
        }
        None => (None, None),
    };

    match &pty_slave {
        Some(slave) => {
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(SpawnError::Pty);
            command
                .stdin(Stdio::from(dup(slave)?))
                .stdout(Stdio::from(dup(slave)?))
                .stderr(Stdio::from(dup(slave)?));
        }
        None => {
            command
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Own process group, so signals can reach the whole job.
                .process_group(0);
        }
    }

    let with_pty = pty_slave.is_some();
    // SAFETY: the closure runs in the forked child before exec. It makes only
    // async-signal-safe system calls (open, write, close, setsid, ioctl, setgroups,
    // setgid, setuid) on data prepared before the fork (`creds`, static strings), and it
    // neither allocates nor takes locks.
    unsafe {
        command.pre_exec(move || child_setup(with_pty, &creds));
    }

    let mut child = command.spawn().map_err(|source| SpawnError::Start {
        cmd: spec.cmd.clone(),
        source,
    })?;
    // The child has its copies; ours must go so the master sees EOF when it exits.
    drop(command);
    drop(pty_slave);

    let pid = child.id().unwrap_or_default();
    let (input, output) = match pty_master {
        Some(master) => (Input::Pty(master.clone()), Output::Pty(master)),
        None => {
            let input = child.stdin.take().map_or(Input::Null, Input::Pipe);
            let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
                return Err(SpawnError::Start {
                    cmd: spec.cmd,
                    source: io::Error::other("child has no stdout/stderr pipes"),
                });
            };
            (input, Output::Pipes { stdout, stderr })
        }
    };
    Ok(Spawned {
        child,
        pid,
        input,
        output,
    })
}

/// Makes the child a preferred OOM victim over envd (as envd does with
/// `echo 100 > /proc/$$/oom_score_adj`). Best effort: procfs may be absent.
fn raise_oom_score() {
    const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
    const VALUE: &[u8] = b"100";
    // SAFETY: PATH is a static NUL-terminated string; open has no other preconditions.
    let fd = unsafe { libc::open(PATH.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` was just opened by us; VALUE is a static buffer of VALUE.len() bytes.
    unsafe {
        libc::write(fd, VALUE.as_ptr().cast(), VALUE.len());
        libc::close(fd);
    }
}

/// Runs in the child between fork and exec.
fn child_setup(with_pty: bool, creds: &Credentials) -> io::Result<()> {
    raise_oom_score();
    if with_pty {
        // SAFETY: setsid has no memory-safety preconditions.
        if unsafe { libc::setsid() } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd 0 is the PTY slave (dup2'ed by Command before this hook); TIOCSCTTY
        // takes an integer argument, no pointer.
        if unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    if creds.switch {
        // SAFETY: `groups` is a live Vec owned by `creds` for the whole call; the pointer
        // and length describe exactly its initialised elements.
        if unsafe { libc::setgroups(creds.groups.len(), creds.groups.as_ptr()) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: setgid/setuid take plain integers. Group before user: after setuid we
        // could no longer change groups.
        if unsafe { libc::setgid(creds.gid) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::setuid(creds.uid) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
