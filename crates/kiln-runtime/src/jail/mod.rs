//! The jail runtime: Linux namespaces, cgroups, overlayfs, seccomp.
//!
//! The server-side half ([`JailRuntime`]) validates, allocates a network slot, spawns
//! the single-threaded `kiln-jail` helper (see [`helper`]) which builds the sandbox,
//! then waits for envd's socket. Teardown (`kill`) runs in-process: it only signals,
//! removes cgroups, deletes a veth and files. The sequence is written down, in the
//! order it runs, in `docs/jail.md`.

pub mod cgroup;
pub mod disk;
pub mod helper;
pub mod idmapped;
pub mod ids;
pub mod mounts;
pub mod net;
pub mod seccomp;
pub mod spec;
mod sys;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use self::cgroup::Cgroups;
use self::spec::{HelperReply, HelperSpec, SandboxPaths, SandboxState};
use crate::idmap::HostIds;
use crate::{Runtime, RuntimeError, RuntimeKind, SandboxConfig, SandboxInstance, SandboxStats};

pub use self::sys::KEEP_CAPS;

/// How the server configures the jail runtime.
#[derive(Debug, Clone)]
pub struct JailOptions {
    /// `<data>/sandboxes`: one `0700` directory per sandbox (`<id>/`).
    pub state_dir: PathBuf,
    /// Host directory holding the static `kiln-init` and `kiln-envd`, bind-mounted
    /// read-only at `/opt/kiln/bin` in every sandbox.
    pub guest_bin_dir: PathBuf,
    /// The `kiln-jail` helper binary (built by this crate, next to `kiln`).
    pub helper_exe: PathBuf,
    /// Command kiln-init runs instead of envd (tests); `None` in production.
    pub envd_command: Option<Vec<String>>,
    /// How long `start` waits for envd's socket.
    pub start_timeout: Duration,
    /// Private ranges Internet sandboxes may reach anyway (`net::parse_egress_allow`);
    /// host-wide: give the gVisor runtime the same list.
    pub egress_allow: Vec<net::Ipv4Cidr>,
    /// Give every sandbox that asks for it ([`HostIdMode::PerSandbox`], the default) a
    /// host id range of its own (`ids.rs`, template layers mounted idmapped). `false`:
    /// every sandbox uses the canonical range, as before ranges existed.
    pub per_sandbox_ids: bool,
}

impl JailOptions {
    pub fn new(state_dir: PathBuf, guest_bin_dir: PathBuf, helper_exe: PathBuf) -> Self {
        JailOptions {
            state_dir,
            guest_bin_dir,
            helper_exe,
            envd_command: None,
            start_timeout: Duration::from_secs(10),
            egress_allow: Vec::new(),
            per_sandbox_ids: true,
        }
    }
}

/// The jail backend of [`Runtime`]. Needs root.
#[derive(Debug, Clone)]
pub struct JailRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    opts: JailOptions,
    cgroups: Box<dyn Cgroups>,
    id_plan: ids::Plan,
}

/// The whole error chain on one line (for messages that cross the API boundary).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

pub(crate) fn cgroup_err(id: &str, what: &str, e: cgroup::CgroupError) -> RuntimeError {
    RuntimeError::io(
        format!("sandbox {id}: {what}"),
        std::io::Error::other(chain(&e)),
    )
}

pub(crate) fn validate(config: &SandboxConfig) -> Result<(), RuntimeError> {
    spec::validate_id(&config.id).map_err(RuntimeError::InvalidConfig)?;
    let l = &config.limits;
    if l.memory_mb < 16 || l.cpu_count == 0 || l.pids_max < 8 || l.disk_mb < disk::MIN_DISK_MB {
        return Err(RuntimeError::InvalidConfig(format!(
            "limits too small: memory_mb {} (min 16), cpu_count {} (min 1), pids_max {} (min 8), \
             disk_mb {} (min {})",
            l.memory_mb,
            l.cpu_count,
            l.pids_max,
            l.disk_mb,
            disk::MIN_DISK_MB
        )));
    }
    if !config.rootfs.is_absolute() || !config.rootfs.is_dir() {
        return Err(RuntimeError::InvalidConfig(format!(
            "rootfs {} is not an absolute path to a directory",
            config.rootfs.display()
        )));
    }
    Ok(())
}

impl JailRuntime {
    /// Check the host, create `state_dir`, install the host firewall chains (idempotent)
    /// and remember the network slots of sandboxes already on disk.
    pub fn new(opts: JailOptions) -> Result<Self, RuntimeError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(RuntimeError::Unsupported(
                "the jail runtime must run as root".into(),
            ));
        }
        let mut needed = vec![
            ("helper", opts.helper_exe.clone()),
            ("kiln-init", opts.guest_bin_dir.join("kiln-init")),
        ];
        if opts.envd_command.is_none() {
            needed.push(("kiln-envd", opts.guest_bin_dir.join("kiln-envd")));
        }
        for (what, path) in needed {
            if !path.is_file() {
                return Err(RuntimeError::Unsupported(format!(
                    "{what} binary {} not found",
                    path.display()
                )));
            }
        }
        let cgroups = cgroup::detect(Path::new(helper::CGROUP_ROOT))
            .map_err(|e| RuntimeError::Unsupported(chain(&e)))?;
        std::fs::create_dir_all(&opts.state_dir)
            .map_err(|e| RuntimeError::io(format!("creating {}", opts.state_dir.display()), e))?;
        net::install_host_rules(&opts.egress_allow)
            .map_err(|e| RuntimeError::Unsupported(format!("host network setup: {}", chain(&e))))?;
        let rt = JailRuntime {
            inner: Arc::new(Inner {
                opts,
                cgroups,
                id_plan: ids::Plan::host(),
            }),
        };
        for id in rt.ids()? {
            if let Some(slot) = rt.read_state(&id).and_then(|s| s.slot) {
                net::reserve(slot.index);
            }
            rt.reserve_ids(&id);
        }
        Ok(rt)
    }

    /// The host ids of a sandbox: its record (`<dir>/idmap`), else the canonical
    /// range (a sandbox from before ranges existed, or none at all).
    pub fn host_ids(&self, id: &str) -> HostIds {
        ids::recorded_or_canonical(&self.paths(id).dir)
    }

    /// Marks the range a sandbox found on disk records as used: in this process's set,
    /// and host-wide unless a claim is there already.
    fn reserve_ids(&self, id: &str) {
        ids::reserve_recorded(&self.inner.id_plan, &self.paths(id).dir);
    }

    /// Gives a sandbox's range back (its directory is gone, or never recorded it).
    fn release_ids(&self, id: &str, host_ids: HostIds) {
        ids::give_back(&self.inner.id_plan, &self.paths(id).dir, host_ids);
    }

    fn allocate_ids(&self, config: &SandboxConfig) -> Result<HostIds, RuntimeError> {
        ids::allocate_for(
            &self.inner.id_plan,
            &self.inner.opts.state_dir,
            &self.paths(&config.id).dir,
            self.inner.opts.per_sandbox_ids,
            config,
        )
    }

    pub fn options(&self) -> &JailOptions {
        &self.inner.opts
    }

    /// Host paths of a sandbox (its directory, socket, log, ...).
    pub fn paths(&self, id: &str) -> SandboxPaths {
        SandboxPaths::new(&self.inner.opts.state_dir, id)
    }

    /// The cgroup directories a sandbox uses (for leak checks).
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.inner.cgroups.dirs(id)
    }

    /// The sandbox's persisted state, if any.
    pub fn read_state(&self, id: &str) -> Option<SandboxState> {
        let bytes = std::fs::read(self.paths(id).state()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn ids(&self) -> Result<Vec<String>, RuntimeError> {
        let dir = &self.inner.opts.state_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(format!("listing {}", dir.display()), e)),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| spec::validate_id(n).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn instance(&self, state: &SandboxState) -> SandboxInstance {
        SandboxInstance {
            id: state.id.clone(),
            pid: state.pid,
            envd_socket: self.paths(&state.id).envd_socket(),
        }
    }

    fn log_tail(&self, id: &str) -> String {
        // The guest writes this file: read its last 64 KiB, not all of it.
        let log = crate::guest::tail(&self.paths(id).log(), 64 * 1024);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn spawn_helper(&self, spec: &HelperSpec) -> Result<HelperReply, RuntimeError> {
        let id = &spec.id;
        let start_err = |reason: String| RuntimeError::Start {
            id: id.clone(),
            reason,
        };
        let mut child = tokio::process::Command::new(&self.inner.opts.helper_exe)
            .args(["start", "--id", id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                RuntimeError::io(
                    format!("spawning {}", self.inner.opts.helper_exe.display()),
                    e,
                )
            })?;
        let json = serde_json::to_vec(spec)
            .map_err(|e| start_err(format!("encoding the helper spec: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&json)
                .await
                .map_err(|e| RuntimeError::io("writing the helper spec", e))?;
        }
        let mut stdout = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| start_err("no helper stdout".into()))?,
        );
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| start_err("no helper stderr".into()))?;
        let mut line = String::new();
        let read =
            tokio::time::timeout(self.inner.opts.start_timeout, stdout.read_line(&mut line)).await;
        let reply = match read {
            Ok(Ok(n)) if n > 0 => serde_json::from_str::<HelperReply>(line.trim()).ok(),
            _ => None,
        };
        match reply {
            Some(reply) => {
                // The helper stays as the sandbox's supervisor; reap it whenever it ends.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                Ok(reply)
            }
            None => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                let mut err = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut err))
                        .await;
                let status = status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown status".into());
                Err(start_err(format!("kiln-jail ({status}): {}", err.trim())))
            }
        }
    }

    async fn wait_for_envd(&self, id: &str, reply: &HelperReply) -> Result<(), RuntimeError> {
        let paths = self.paths(id);
        let socket = paths.envd_socket();
        let deadline = Instant::now() + self.inner.opts.start_timeout;
        let mut delay = Duration::from_millis(1);
        loop {
            if crate::guest::connect_envd(&socket).await.is_ok() {
                return Ok(());
            }
            let dead = paths.exit().exists() || spec::pid_start_time(reply.pid).is_none();
            if dead || Instant::now() >= deadline {
                let why = if dead {
                    "the sandbox exited"
                } else {
                    "timed out"
                };
                return Err(RuntimeError::Start {
                    id: id.to_string(),
                    reason: format!(
                        "envd did not accept connections on {} ({why}); sandbox log:\n{}",
                        socket.display(),
                        self.log_tail(id)
                    ),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// Every process of the sandbox killed, the helper gone with its mount namespace
    /// (and so the overlay); the disk with `upper/` stays mounted on the host.
    fn stop_blocking(&self, id: &str, state: Option<&SandboxState>) -> Result<(), RuntimeError> {
        // A frozen task takes SIGKILL only once thawed; thawing a cgroup that is not
        // frozen (or gone) is harmless.
        let _ = self.inner.cgroups.request_frozen(id, false);
        if let Some(s) = state.filter(|s| s.is_alive()) {
            // Killing PID 1 of the pid namespace kills every process in it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let killed = cgroup::kill_all(&*self.inner.cgroups, id, Duration::from_secs(5))
            .map_err(|e| cgroup_err(id, "killing its processes", e));
        if let Some(s) = state {
            wait_helper_gone(s.helper_pid, id, Duration::from_secs(2));
        }
        killed
    }

    fn kill_blocking(&self, id: &str) -> Result<(), RuntimeError> {
        let paths = self.paths(id);
        let state = self.read_state(id);
        let host_ids = self.host_ids(id);
        let io =
            |what: &str, e: std::io::Error| RuntimeError::io(format!("sandbox {id}: {what}"), e);
        // Every step runs even when an earlier one failed, so one stuck resource does
        // not leave the others behind; the first failure is reported.
        let mut failures: Vec<RuntimeError> = Vec::new();
        let stopped = self.stop_blocking(id, state.as_ref());
        let processes_gone = stopped.is_ok();
        if let Err(e) = stopped {
            failures.push(e);
        }
        if let Some(s) = &state {
            if let Some(slot) = s.slot {
                match net::remove_host_side(slot) {
                    Ok(()) => net::release(slot.index),
                    Err(e) => {
                        failures.push(io("removing its veth", std::io::Error::other(chain(&e))))
                    }
                }
            }
        }
        unmount_leftovers(&paths.dir);
        if !disk::wait_detached(&paths.disk_image(), Duration::from_secs(2)) {
            tracing::warn!(%id, "its disk's loop device is still attached (a user is left)");
        }
        if let Err(e) = self.inner.cgroups.remove(id) {
            failures.push(cgroup_err(id, "removing its cgroups", e));
        }
        let dir_gone = match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                failures.push(io("removing its directory", e));
                false
            }
        };
        // The id range is free once no process of the sandbox is left and its record
        // is gone. Otherwise it stays taken (a retried kill that removes the directory
        // gives it back; with processes left, only a restart of the server does).
        if processes_gone && dir_gone {
            self.release_ids(id, host_ids);
        }
        match failures.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Wait (bounded) for the sandbox's helper to exit after reaping PID 1. The pid is
/// only trusted while its command line still names this sandbox.
fn wait_helper_gone(pid: u32, id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let ours = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.contains(&b"start".as_slice()) && args.contains(&id.as_bytes())
            })
            .unwrap_or(false)
    };
    while ours() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Unmount everything at or under `dir` in the host's mount table, deepest first:
/// the sandbox's disk (and gVisor's overlay on it); the jail's other mounts live in
/// the helper's and the sandbox's private namespaces and vanish with them. A busy
/// mount is detached lazily. Unmounting the disk's last mount releases its loop
/// device (autoclear).
pub(crate) fn unmount_leftovers(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|t| under(Path::new(t), dir))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        if nix::mount::umount2(t, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// `path` is `dir` or below it, by whole components (`.../ab1` is not under `.../ab`).
fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

#[async_trait]
impl Runtime for JailRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Jail
    }

    fn upper_dir(&self, id: &str) -> Option<PathBuf> {
        Some(self.paths(id).upper())
    }

    fn console_tail(&self, id: &str, max: u64) -> Option<String> {
        let path = self.paths(id).log();
        path.exists().then(|| crate::guest::tail(&path, max))
    }

    fn network_slot(&self, id: &str) -> Option<net::Slot> {
        if crate::jail::spec::validate_id(id).is_err() {
            return None;
        }
        self.read_state(id)?.slot
    }

    fn owns(&self, id: &str) -> bool {
        crate::jail::spec::validate_id(id).is_ok() && self.paths(id).dir.is_dir()
    }

    async fn start(&self, config: &SandboxConfig) -> Result<SandboxInstance, RuntimeError> {
        validate(config)?;
        let paths = self.paths(&config.id);
        if paths.dir.exists() {
            return Err(RuntimeError::InvalidConfig(format!(
                "sandbox {} already exists",
                config.id
            )));
        }
        let host_ids = self.allocate_ids(config)?;
        let slot = match net::allocate_for(&mut net::slots(), &config.id, config.network) {
            Ok(slot) => slot,
            Err(e) => {
                self.release_ids(&config.id, host_ids);
                return Err(e);
            }
        };
        let spec = HelperSpec {
            id: config.id.clone(),
            rootfs: config.rootfs.clone(),
            state_dir: self.inner.opts.state_dir.clone(),
            guest_bin_dir: self.inner.opts.guest_bin_dir.clone(),
            limits: config.limits,
            slot,
            envd_command: self.inner.opts.envd_command.clone(),
            ids: host_ids,
        };
        let started = async {
            let reply = self.spawn_helper(&spec).await?;
            self.wait_for_envd(&config.id, &reply).await?;
            Ok::<_, RuntimeError>(reply)
        }
        .await;
        match started {
            Ok(reply) => {
                tracing::debug!(id = %config.id, pid = reply.pid, "jail sandbox started");
                Ok(SandboxInstance {
                    id: config.id.clone(),
                    pid: reply.pid,
                    envd_socket: paths.envd_socket(),
                })
            }
            Err(e) => {
                // A recorded range is given back by a kill that removed everything
                // (and stays taken otherwise); an unrecorded one (the helper failed
                // before writing it) is given back here.
                let recorded = paths.idmap().exists();
                if let Err(cleanup) = self.kill(&config.id).await {
                    tracing::warn!(id = %config.id, error = %chain(&cleanup), "cleanup after a failed start");
                }
                if let Some(slot) = slot {
                    net::release(slot.index);
                }
                if !recorded {
                    self.release_ids(&config.id, host_ids);
                }
                Err(e)
            }
        }
    }

    /// SIGKILL PID 1 and everything in the cgroup, wait for the helper; the disk
    /// with `upper/`, the cgroups, the veth and the directory stay until `kill`.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        spec::validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let state = this.read_state(&id);
            this.stop_blocking(&id, state.as_ref())
        })
        .await
        .map_err(|e| RuntimeError::io("stop task", std::io::Error::other(e.to_string())))?
    }

    async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        spec::validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || this.kill_blocking(&id))
            .await
            .map_err(|e| RuntimeError::io("kill task", std::io::Error::other(e.to_string())))?
    }

    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        spec::validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let state = self
            .read_state(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_string() })?;
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let cg = this
                .inner
                .cgroups
                .stats(&id)
                .map_err(|e| cgroup_err(&id, "reading its cgroup stats", e))?;
            let paths = this.paths(&id);
            let (disk_used, disk_total) =
                disk::usage(&paths.disk_image(), &paths.disk()).map_err(|e| {
                    RuntimeError::io(
                        format!("sandbox {id}: its disk usage"),
                        std::io::Error::other(chain(&e)),
                    )
                })?;
            Ok(SandboxStats {
                cpu_usage_ns: cg.cpu_usage_ns,
                cpu_count: state.limits.cpu_count,
                mem_used_bytes: cg.mem_used_bytes,
                mem_cache_bytes: cg.mem_cache_bytes,
                mem_total_bytes: cg.mem_limit_bytes,
                disk_used_bytes: disk_used,
                disk_total_bytes: disk_total,
            })
        })
        .await
        .map_err(|e| RuntimeError::io("stats task", std::io::Error::other(e.to_string())))?
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        self.ids()
    }

    async fn adopt(&self, id: &str) -> Result<Option<SandboxInstance>, RuntimeError> {
        spec::validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let Some(state) = self.read_state(id) else {
            return Ok(None);
        };
        if !state.is_alive() {
            return Ok(None);
        }
        if let Some(slot) = state.slot {
            net::reserve(slot.index);
        }
        self.reserve_ids(id);
        Ok(Some(self.instance(&state)))
    }

    /// The cgroup freezer: every task stops where it is, memory stays in place. It
    /// lasts as long as the host runs (a restart of `kiln serve` re-adopts the frozen
    /// sandbox), not across a reboot.
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.freeze(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.freeze(id, false).await
    }
}

impl JailRuntime {
    async fn freeze(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        spec::validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        if !self.read_state(id).is_some_and(|s| s.is_alive()) {
            return Err(RuntimeError::NotFound { id: id.to_string() });
        }
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let what = if frozen { "freezing it" } else { "thawing it" };
            cgroup::set_frozen(&*this.inner.cgroups, &id, frozen, Duration::from_secs(10))
                .map_err(|e| cgroup_err(&id, what, e))
        })
        .await
        .map_err(|e| RuntimeError::io("freeze task", std::io::Error::other(e.to_string())))?
    }
}

/// How long ago a host-wide claim file (a network slot's, an id range's) was made
/// (zero when that cannot be told, so a claim is never taken over by mistake).
fn claim_age(path: &std::path::Path) -> std::time::Duration {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, NetworkMode};

    fn config(id: &str, rootfs: &Path) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            rootfs: rootfs.into(),
            limits: Limits {
                memory_mb: 256,
                cpu_count: 1,
                pids_max: 64,
                disk_mb: 64,
            },
            network: NetworkMode::Loopback,
            host_ids: crate::HostIdMode::PerSandbox,
        }
    }

    #[test]
    fn validation() {
        let t = tempfile::tempdir().unwrap();
        assert!(validate(&config("ok1", t.path())).is_ok());
        assert!(validate(&config("Bad", t.path())).is_err());
        assert!(validate(&config("ok", Path::new("/nonexistent/x"))).is_err());
        assert!(validate(&config("ok", Path::new("relative"))).is_err());
        let mut c = config("ok", t.path());
        c.limits.cpu_count = 0;
        assert!(matches!(validate(&c), Err(RuntimeError::InvalidConfig(_))));
        let mut c = config("ok", t.path());
        c.limits.disk_mb = disk::MIN_DISK_MB - 1;
        let err = validate(&c).unwrap_err().to_string();
        assert!(err.contains("disk_mb 15 (min 16)"), "{err}");
    }

    #[test]
    fn leftovers_are_matched_by_whole_components() {
        let d = Path::new("/data/sandboxes/ab");
        assert!(under(Path::new("/data/sandboxes/ab"), d));
        assert!(under(Path::new("/data/sandboxes/ab/disk"), d));
        assert!(!under(Path::new("/data/sandboxes/ab1/disk"), d));
        assert!(!under(Path::new("/data/sandboxes/a"), d));
    }
}
