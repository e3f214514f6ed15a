//! `kiln-jail`: the single-threaded helper that builds one sandbox and supervises it.
//!
//! The server (a multithreaded tokio process) must not unshare, setns or fork-and-mount
//! itself, so it spawns `kiln-jail start --id <id>` with a [`HelperSpec`] on stdin. The
//! helper runs the sequence written down in `docs/jail.md`, writes `state.json`,
//! prints one [`HelperReply`] JSON line on stdout, closes stdout and stderr, and stays
//! as the parent of the sandbox's PID 1: it only waits for it, so PID 1 is always
//! reaped by a process Kiln owns, then records its exit status in `state_dir/<id>/exit`.
//! On failure it prints the error chain on stderr and exits 1; the runtime then calls
//! `kill` to remove whatever was created.
//!
//! `kiln-jail gvisor-rootfs` is its second job, for the gVisor runtime: mount a
//! sandbox's overlay over an idmapped template layer in the host's mount namespace
//! (`crate::gvisor::rootfs`), then exit.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use super::cgroup::{self, CgroupError};
use super::disk::{self, DiskError};
use super::mounts::{self, MountError};
use super::net::{self, NetError};
use super::seccomp::{self, SeccompError};
use super::spec::{self, HelperReply, HelperSpec, SandboxPaths, SandboxState};
use super::sys;
use crate::GUEST_BIN_DIR;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const INIT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error(
        "usage: kiln-jail start --id <id>  (spec as JSON on stdin)\n       \
         kiln-jail gvisor-rootfs --dir <sandbox dir> --lower <template rootfs>"
    )]
    Usage,
    #[error("reading the spec from stdin")]
    Spec(#[source] serde_json::Error),
    #[error("invalid spec: {0}")]
    Invalid(String),
    #[error("sandbox directory {0} already exists")]
    Exists(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cgroups")]
    Cgroup(#[from] CgroupError),
    #[error("root filesystem")]
    Mount(#[from] MountError),
    #[error("the sandbox's disk")]
    Disk(#[from] DiskError),
    #[error("network")]
    Net(#[from] NetError),
    #[error("seccomp")]
    Seccomp(#[from] SeccompError),
    #[error("sandbox setup failed inside the new namespaces: {0}")]
    Child(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HelperError + 'a {
    move |source| HelperError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn sys_err(what: &'static str) -> impl FnOnce(nix::Error) -> HelperError {
    move |source| HelperError::Sys { what, source }
}

/// The `kiln-jail start` subcommand (`args` after the binary's name); the binary
/// (`src/bin/kiln-jail.rs`) also dispatches `gvisor-rootfs` to `gvisor::rootfs`.
pub fn main(args: &[String]) -> ExitCode {
    let result = match args {
        [cmd, flag, id] if cmd == "start" && flag == "--id" => start(id),
        _ => Err(HelperError::Usage),
    };
    exit_with(result)
}

/// `kiln-jail: <error>: <source>...` on stderr for an error, and the exit code.
pub fn exit_with<E: std::error::Error>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("kiln-jail: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn start(id: &str) -> Result<(), HelperError> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(io_err("reading", Path::new("stdin")))?;
    let spec: HelperSpec = serde_json::from_str(&input).map_err(HelperError::Spec)?;
    spec::validate_id(&spec.id).map_err(HelperError::Invalid)?;
    if spec.id != id {
        return Err(HelperError::Invalid(format!(
            "--id {id} does not match the spec's id {}",
            spec.id
        )));
    }
    if !spec.ids.is_canonical() && spec.ids.index().is_none() {
        return Err(HelperError::Invalid(format!(
            "host id range {} is neither the canonical one nor one of the plan's",
            spec.ids.base
        )));
    }
    // Leave the server's session and process group: the sandbox must outlive a server
    // restart (and a Ctrl-C in the server's terminal). Fails only if already a leader.
    let _ = nix::unistd::setsid();
    let paths = SandboxPaths::new(&spec.state_dir, &spec.id);
    let owner = spec::namespace_owner(std::process::id());
    make_dirs(&paths, &spec, owner)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())
        .map_err(io_err("opening", &paths.log()))?;
    let pid = build(&spec, &paths, &log, owner)?;
    let _ = writeln!(log, "kiln-jail: sandbox {} started, pid {pid}", spec.id);

    let reply = serde_json::to_string(&HelperReply { pid }).unwrap_or_default();
    // Not println!: if the server died meanwhile, EPIPE must not panic the supervisor.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{reply}").and_then(|()| stdout.flush());
    // Release the server's pipes: from here on the helper only logs to the file.
    redirect_std(&log)?;
    supervise(pid, &paths);
    Ok(())
}

fn make_dirs(paths: &SandboxPaths, spec: &HelperSpec, owner: u32) -> Result<(), HelperError> {
    let mut b = fs::DirBuilder::new();
    if let Some(parent) = paths.dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(io_err("mkdir", parent))?;
    }
    match b.mode(0o700).create(&paths.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(HelperError::Exists(paths.dir.display().to_string()))
        }
        Err(e) => return Err(io_err("mkdir", &paths.dir)(e)),
    }
    // mkdir honours the umask; set the modes that matter explicitly. Root's, and
    // searchable by the group of the sandbox's namespace owner only: the cloned child
    // runs as that owner until it becomes sandbox root, and must reach `rootfs/`.
    fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o710))
        .map_err(io_err("chmod", &paths.dir))?;
    std::os::unix::fs::lchown(&paths.dir, Some(0), Some(owner))
        .map_err(io_err("chown", &paths.dir))?;
    // The sandbox's host id range, recorded before anything of the sandbox exists:
    // from here on the range is taken for every allocator that reads the state
    // directory (a restarted server included), until `kill` removes the directory.
    crate::idmap::write_record(&paths.dir, spec.ids).map_err(io_err("writing", &paths.idmap()))?;
    let root = spec.ids.root();
    let made = |dir: &Path, mode: u32, owner: Option<u32>| -> Result<(), HelperError> {
        fs::create_dir(dir).map_err(io_err("mkdir", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", dir))?;
        if owner.is_some() {
            std::os::unix::fs::lchown(dir, owner, owner).map_err(io_err("chown", dir))?;
        }
        Ok(())
    };
    made(&paths.rootfs(), 0o755, None)?;
    // Only sandbox root may talk to envd (it runs commands as any user).
    made(&paths.run(), 0o700, Some(root))?;
    // The writable layer's own filesystem, mounted in the host's namespace (before
    // this helper unshares its own), so the kernel caps what the sandbox can write
    // and the layer outlives the sandbox's processes until `kill` (`disk.rs`).
    made(&paths.disk(), 0o700, None)?;
    disk::create(&paths.disk_image(), &paths.disk(), spec.limits.disk_mb)?;
    made(&paths.upper(), 0o755, Some(root))?;
    made(&paths.work(), 0o700, None)?;
    Ok(())
}

fn redirect_std(log: &File) -> Result<(), HelperError> {
    let null = File::open("/dev/null").map_err(io_err("opening", Path::new("/dev/null")))?;
    nix::unistd::dup2_stdin(&null).map_err(sys_err("dup2 stdin"))?;
    nix::unistd::dup2_stdout(log).map_err(sys_err("dup2 stdout"))?;
    nix::unistd::dup2_stderr(log).map_err(sys_err("dup2 stderr"))?;
    Ok(())
}

/// Everything the cloned child needs, prepared before the clone so that the child
/// does as little as possible (and nothing that can fail for a reason the parent could
/// have caught).
struct ChildCtx {
    id: String,
    go: OwnedFd,
    report: OwnedFd,
    log: OwnedFd,
    seccomp: Vec<seccompiler::BpfProgram>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    last_cap: u32,
    memory_mb: u64,
}

/// Builds the sandbox; returns its PID 1's host pid.
fn build(
    spec: &HelperSpec,
    paths: &SandboxPaths,
    log: &File,
    owner: u32,
) -> Result<u32, HelperError> {
    // 1. cgroups and limits.
    let cg = cgroup::detect(Path::new(CGROUP_ROOT))?;
    cg.create(&spec.id, &spec.limits)?;

    // 2. The root filesystem, in a mount namespace private to this helper.
    // The host's mount namespace, to return to once the sandbox runs (see below).
    let host_ns = File::open("/proc/self/ns/mnt")
        .map_err(io_err("opening", Path::new("/proc/self/ns/mnt")))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(sys_err("unshare(CLONE_NEWNS)"))?;
    let mut etc = vec![
        ("hostname", format!("{}\n", spec.id)),
        (
            "hosts",
            mounts::hosts_file(&spec.id, spec.slot.map(|s| s.guest_ip())),
        ),
    ];
    if spec.slot.is_some() {
        etc.push(("resolv.conf", net::sandbox_resolv_conf()?));
    }
    mounts::prepare_rootfs(&spec.rootfs, paths, &spec.guest_bin_dir, &etc, spec.ids)?;

    // 3. The child's program, all allocated now.
    let cstr =
        |s: &str| CString::new(s).map_err(|_| HelperError::Invalid(format!("NUL byte in {s:?}")));
    let mut argv = vec![cstr(&format!("{GUEST_BIN_DIR}/kiln-init"))?];
    if let Some(cmd) = &spec.envd_command {
        argv.push(cstr("--")?);
        for a in cmd {
            argv.push(cstr(a)?);
        }
    }
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let (rep_r, rep_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("pipe"))?;
    let ctx = ChildCtx {
        id: spec.id.clone(),
        go: go_r,
        report: rep_w,
        log: log.try_clone().map_err(io_err("dup", &paths.log()))?.into(),
        seccomp: seccomp::compile()?,
        argv,
        envp: vec![cstr(&format!("PATH={INIT_PATH}"))?],
        last_cap: sys::cap_last_cap(),
        memory_mb: spec.limits.memory_mb,
    };

    // 4. Clone into new user, mount, pid, uts, ipc and net namespaces.
    let flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    // The sandbox's PID 1 and envd inherit this: they are never the OOM killer's
    // choice, so a memory bomb kills the workload, not the daemon the host talks to.
    // envd sets +100 on every process it starts. (Lowering the score needs host
    // CAP_SYS_RESOURCE, so it is done here, before the clone, as host root.) Hosts
    // whose root lacks CAP_SYS_RESOURCE (some container hosts) keep the default score;
    // the OOM killer then still picks the largest process, which is the workload.
    if let Err(e) = fs::write("/proc/self/oom_score_adj", "-1000") {
        eprintln!("kiln-jail: warning: cannot protect envd from the OOM killer: {e}");
    }
    let mut stack = vec![0u8; 1024 * 1024];
    let mut ctx = Some(ctx);
    let cb = Box::new(move || match ctx.take() {
        Some(c) => child_main(c),
        None => 1,
    });
    // The parent's copy of `ctx` (and so its ends of the child's pipes) is dropped with
    // the closure when clone returns.
    // The new user namespace belongs to the effective uid of the clone's caller: this
    // sandbox's own owner id (spec::namespace_owner), not root, so the kernel charges
    // its per-user limits apart from every other sandbox's. The effective ids change
    // for the clone alone; real and saved stay 0, so the helper takes root back after.
    // The child starts in the merged root: its copy of the mount namespace translates
    // the current directory (not descriptors) to its own mounts (step 12).
    nix::unistd::chdir(&paths.rootfs()).map_err(sys_err("chdir into the merged root"))?;
    let owner_id = Gid::from_raw(owner);
    nix::unistd::setresgid(Gid::from_raw(0), owner_id, Gid::from_raw(0))
        .map_err(sys_err("setresgid to the namespace owner"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(owner), Uid::from_raw(0))
        .map_err(sys_err("setresuid to the namespace owner"))?;
    // SAFETY: the helper is single-threaded, so the child (a copy of this process
    // without CLONE_VM) cannot inherit a lock held by another thread; `stack` outlives
    // the call in the parent and is a private copy in the child, which only runs
    // `child_main` and then execs or exits.
    let cloned = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) };
    let back = nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .and_then(|()| {
            nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        });
    let child = cloned.map_err(sys_err("clone"))?;
    if let Err(e) = back {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(sys_err("taking root back after the clone")(e));
    }
    let pid = child.as_raw() as u32;

    let result = configure_child(spec, &*cg, pid, go_w, rep_r).and_then(|()| {
        // The sandbox has its own copy of what it needs (and pivoted away from the
        // rest). Leave this private namespace, so it dies now: it holds a copy of every
        // mount the host had at the unshare, other sandboxes' disks included, and
        // would keep their filesystems and loop devices alive after their `kill`.
        nix::sched::setns(&host_ns, CloneFlags::CLONE_NEWNS)
            .map_err(sys_err("setns back to the host mount namespace"))
    });
    if let Err(e) = result {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(e);
    }
    // 6. Record the sandbox before answering, so a server restart can find it.
    let state = SandboxState {
        id: spec.id.clone(),
        pid,
        pid_start_time: spec::pid_start_time(pid).unwrap_or(0),
        helper_pid: std::process::id(),
        limits: spec.limits,
        slot: spec.slot,
        cgroup_version: cg.version().to_string(),
        owner_id: Some(owner),
    };
    let tmp = paths.dir.join("state.json.tmp");
    let json =
        serde_json::to_vec_pretty(&state).map_err(|e| HelperError::Invalid(e.to_string()))?;
    fs::write(&tmp, json).map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, paths.state()).map_err(io_err("renaming", &tmp))?;
    Ok(pid)
}

/// Parent side after the clone: id maps, cgroup membership, network; then release the
/// child and wait until it has exec'd kiln-init (or reported an error).
fn configure_child(
    spec: &HelperSpec,
    cg: &dyn cgroup::Cgroups,
    pid: u32,
    go: OwnedFd,
    report: OwnedFd,
) -> Result<(), HelperError> {
    let map = spec.ids.map_line();
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        fs::write(&path, &map).map_err(io_err("writing", Path::new(&path)))?;
    }
    cg.attach(&spec.id, pid)?;
    if let Some(slot) = spec.slot {
        net::setup_host_side(slot, pid)?;
        in_netns_of(pid, || {
            net::run("ip", &["-batch", "-"], Some(&slot.guest_batch()))
        })?;
    }
    // Release the child.
    let mut go = File::from(go);
    go.write_all(b"g")
        .map_err(io_err("releasing", Path::new("the sandbox child")))?;
    drop(go);
    // The report pipe is close-on-exec: EOF means kiln-init is running.
    let mut msg = String::new();
    File::from(report)
        .read_to_string(&mut msg)
        .map_err(io_err("reading", Path::new("the child's report")))?;
    if !msg.is_empty() {
        return Err(HelperError::Child(msg));
    }
    Ok(())
}

/// Run `f` with this (single-threaded) process inside the network namespace of `pid`.
fn in_netns_of<T>(pid: u32, f: impl FnOnce() -> Result<T, NetError>) -> Result<T, HelperError> {
    let own = File::open("/proc/self/ns/net")
        .map_err(io_err("opening", Path::new("/proc/self/ns/net")))?;
    let path = format!("/proc/{pid}/ns/net");
    let theirs = File::open(&path).map_err(io_err("opening", Path::new(&path)))?;
    nix::sched::setns(&theirs, CloneFlags::CLONE_NEWNET)
        .map_err(sys_err("setns into the sandbox network"))?;
    let result = f();
    nix::sched::setns(&own, CloneFlags::CLONE_NEWNET)
        .map_err(sys_err("setns back to the host network"))?;
    Ok(result?)
}

fn supervise(pid: u32, paths: &SandboxPaths) {
    let status = loop {
        match waitpid(Pid::from_raw(pid as i32), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let text = match status {
        Ok(WaitStatus::Exited(_, code)) => format!("exited {code}\n"),
        Ok(WaitStatus::Signaled(_, sig, _)) => format!("killed {sig}\n"),
        other => format!("unknown {other:?}\n"),
    };
    eprintln!("kiln-jail: sandbox pid {pid} {}", text.trim());
    let _ = fs::write(paths.exit(), text);
}

// ---------------------------------------------------------------------------------
// Child side (runs in the clone, then execs kiln-init).

fn child_main(ctx: ChildCtx) -> isize {
    // Only returns on failure: a successful exec replaced this process.
    let Err(err) = child_steps(&ctx);
    let mut full = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        full.push_str(&format!(": {s}"));
        source = s.source();
    }
    let _ = nix::unistd::write(&ctx.report, full.as_bytes());
    1
}

fn child_steps(ctx: &ChildCtx) -> Result<std::convert::Infallible, HelperError> {
    // Wait for the parent: id maps, cgroup and network are ready after this byte.
    let mut b = [0u8; 1];
    let n = nix::unistd::read(&ctx.go, &mut b).map_err(sys_err("waiting for the parent"))?;
    if n != 1 {
        return Err(HelperError::Invalid(
            "parent went away before releasing the sandbox".into(),
        ));
    }
    // Still the namespace owner's host ids here (unmapped in the namespace): the only
    // moment the sandbox's directory (0710, the owner's group) is searchable by us.
    // Re-bind the root (our current directory) as our own mount and enter it.
    mounts::rebind_cwd_root()?;
    nix::unistd::setgroups(&[]).map_err(sys_err("setgroups"))?;
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(sys_err("setresgid"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(sys_err("setresuid"))?;
    // The cgroup namespace is created now that the parent has moved us into the
    // sandbox's cgroup, so that cgroup becomes the namespace's root.
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(sys_err("unshare(CLONE_NEWCGROUP)"))?;
    nix::unistd::sethostname(&ctx.id).map_err(sys_err("sethostname"))?;
    mounts::enter_rootfs(ctx.memory_mb)?;
    sys::loopback_up().map_err(io_err("bringing up", Path::new("lo")))?;
    // `ping` through unprivileged ICMP echo sockets for every group of the sandbox: the
    // sandbox keeps no CAP_NET_RAW (a raw socket could forge any packet on its eth0).
    // The range is in the sandbox's gids (beyond the id map the kernel says EINVAL).
    // Best effort: without it only ping fails.
    let _ = std::fs::write(
        "/proc/sys/net/ipv4/ping_group_range",
        format!("0 {}", crate::ID_MAP_LEN - 1),
    );

    let null = File::open("/dev/null").map_err(io_err("opening", Path::new("/dev/null")))?;
    nix::unistd::dup2_stdin(&null).map_err(sys_err("dup2 stdin"))?;
    nix::unistd::dup2_stdout(&ctx.log).map_err(sys_err("dup2 stdout"))?;
    nix::unistd::dup2_stderr(&ctx.log).map_err(sys_err("dup2 stderr"))?;
    sys::cloexec_from(3).map_err(io_err("close_range", Path::new("fds")))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));

    sys::bound_capabilities(ctx.last_cap)
        .map_err(io_err("dropping capabilities", Path::new("bounding set")))?;
    seccomp::apply(&ctx.seccomp)?;
    let Err(source) = nix::unistd::execve(&ctx.argv[0], &ctx.argv, &ctx.envp);
    Err(HelperError::Sys {
        what: "exec kiln-init",
        source,
    })
}
