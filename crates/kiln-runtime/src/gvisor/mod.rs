//! The gVisor runtime: every sandbox is an OCI bundle run by `runsc`, gVisor's
//! user-space kernel, so the workload's syscalls are served by the Sentry and never
//! reach the host kernel directly.
//!
//! Per sandbox the host builds `state_dir/<id>/` (overlay root filesystem, `config.json`
//! from [`bundle`], the `run/` directory envd's socket appears in), for Internet
//! sandboxes a named network namespace with a veth ([`host`]), then runs
//! `runsc run` as a supervising child ([`runsc`]). envd's Unix socket reaches the host
//! through runsc's `--host-uds=all`. Pause is a checkpoint to disk (`pause`). Each
//! sandbox has a host id range of its own (the jail's allocator, `jail::ids`), its
//! template layer mounted idmapped by the `kiln-jail` helper ([`rootfs`]).
//! Written down in `docs/gvisor.md`.

pub mod bundle;
pub mod host;
mod pause;
pub mod rootfs;
pub mod runsc;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use self::bundle::{BundlePaths, BundleSpec};
use self::runsc::{Network, Runsc};
use crate::idmap::HostIds;
use crate::jail::cgroup::{self, Cgroups};
use crate::jail::{cgroup_err, chain, disk, ids, net, spec::validate_id, validate};
use crate::{
    Limits, Runtime, RuntimeError, RuntimeKind, SandboxConfig, SandboxInstance, SandboxStats,
};

/// How the server configures the gVisor runtime.
#[derive(Debug, Clone)]
pub struct GvisorOptions {
    /// `<data>/sandboxes-gvisor`: one `0700` directory per sandbox plus `runsc-root/`.
    pub state_dir: PathBuf,
    /// Host directory holding the static `kiln-init` and `kiln-envd`, bind-mounted
    /// read-only at `/opt/kiln/bin`.
    pub guest_bin_dir: PathBuf,
    /// The `runsc` binary; `None`: the first `runsc` on `PATH` (so an install in
    /// `/usr/local/bin` wins over Debian's `/usr/bin/runsc`).
    pub runsc: Option<PathBuf>,
    /// `--platform`; `None`: the first of [`runsc::PLATFORM_PREFERENCE`] (systrap,
    /// ptrace) whose probe passes.
    pub platform: Option<String>,
    /// Command kiln-init runs instead of envd (tests); `None` in production.
    pub envd_command: Option<Vec<String>>,
    /// How long `start` waits for envd's socket.
    pub start_timeout: Duration,
    /// runsc debug logs (`--debug --debug-log=<dir>/`), for diagnosing start failures.
    pub debug_log_dir: Option<PathBuf>,
    /// Private ranges Internet sandboxes may reach anyway (`net::parse_egress_allow`);
    /// host-wide: give the jail runtime the same list.
    pub egress_allow: Vec<net::Ipv4Cidr>,
    /// Give every sandbox that asks for it ([`HostIdMode::PerSandbox`], the default) a
    /// host id range of its own, as the jail does (`jail::ids`; the template layer is
    /// mounted idmapped by `helper_exe`). `false`: every sandbox's Sentry and gofer
    /// run as the canonical range, as before ranges existed.
    pub per_sandbox_ids: bool,
    /// The `kiln-jail` helper (default: `guest_bin_dir/kiln-jail`, where `kiln serve`
    /// keeps it): it mounts the overlay over the idmapped layer ([`rootfs`]).
    pub helper_exe: PathBuf,
}

impl GvisorOptions {
    pub fn new(state_dir: PathBuf, guest_bin_dir: PathBuf) -> Self {
        GvisorOptions {
            state_dir,
            helper_exe: guest_bin_dir.join("kiln-jail"),
            guest_bin_dir,
            runsc: None,
            platform: None,
            envd_command: None,
            start_timeout: Duration::from_secs(20),
            debug_log_dir: None,
            egress_allow: Vec::new(),
            per_sandbox_ids: true,
        }
    }
}

/// `state_dir/<id>/state.json`: what `kill`, `stats` and `adopt` need.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GvisorState {
    pub id: String,
    pub limits: Limits,
    pub slot: Option<net::Slot>,
    /// The template root filesystem (the overlay's lower layer), to mount the overlay
    /// again for a restore after a reboot. `None` in state written before it was kept.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// How the sandbox is paused, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<PauseKind>,
}

/// The two ways a gVisor sandbox is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseKind {
    /// `runsc checkpoint` into `snapshot/`: no Sentry runs; survives a reboot.
    Checkpoint,
    /// `runsc pause` (envd could not quiesce): the Sentry keeps the memory in RAM.
    Frozen,
}

/// The gVisor backend of [`Runtime`]. Needs root.
#[derive(Debug, Clone)]
pub struct GvisorRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    opts: GvisorOptions,
    runsc: Runsc,
    version: String,
    cgroups: Box<dyn Cgroups>,
    id_plan: ids::Plan,
}

fn io_other(context: String, e: &dyn std::error::Error) -> RuntimeError {
    RuntimeError::io(context, std::io::Error::other(chain(e)))
}

impl GvisorRuntime {
    /// Check the host (root, binaries, cgroups, platform), probe `runsc` once (cached
    /// in `state_dir/runsc-probe`), install the host firewall chains (idempotent) and
    /// remember the network slots of sandboxes already on disk.
    pub fn new(opts: GvisorOptions) -> Result<Self, RuntimeError> {
        let unsupported = |what: &str, e: &dyn std::error::Error| {
            RuntimeError::Unsupported(format!("{what}: {}", chain(e)))
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(RuntimeError::Unsupported(
                "the gvisor runtime must run as root".into(),
            ));
        }
        let mut needed = vec![opts.guest_bin_dir.join("kiln-init")];
        if opts.envd_command.is_none() {
            needed.push(opts.guest_bin_dir.join("kiln-envd"));
            needed.push(opts.guest_bin_dir.join("kiln-sudo"));
        }
        if opts.per_sandbox_ids {
            needed.push(opts.helper_exe.clone());
        }
        for path in needed {
            if !path.is_file() {
                return Err(RuntimeError::Unsupported(format!(
                    "binary {} not found",
                    path.display()
                )));
            }
        }
        let candidates = runsc::platform_candidates(opts.platform.as_deref())
            .map_err(|e| unsupported("runsc platform", &e))?;
        let exe = runsc::locate(opts.runsc.as_deref()).map_err(|e| unsupported("runsc", &e))?;
        let version = runsc::version(&exe)
            .map_err(|e| unsupported(&format!("{} --version", exe.display()), &e))?;
        std::fs::create_dir_all(&opts.state_dir)
            .map_err(|e| RuntimeError::io(format!("creating {}", opts.state_dir.display()), e))?;
        let platform = runsc::choose_platform(&exe, &candidates, &version, &opts.state_dir)
            .map_err(|e| unsupported(&format!("{} probe", exe.display()), &e))?;
        let cgroups = cgroup::detect(Path::new(crate::jail::helper::CGROUP_ROOT))
            .map_err(|e| unsupported("cgroups", &e))?;
        net::install_host_rules(&opts.egress_allow)
            .map_err(|e| unsupported("host network setup", &e))?;
        let runsc = Runsc {
            exe,
            root: opts.state_dir.join("runsc-root"),
            platform,
            debug_log_dir: opts.debug_log_dir.clone(),
        };
        let rt = GvisorRuntime {
            inner: Arc::new(Inner {
                opts,
                runsc,
                version,
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
    /// range (a sandbox from before gVisor sandboxes had ranges, or none at all).
    pub fn host_ids(&self, id: &str) -> HostIds {
        ids::recorded_or_canonical(&self.paths(id).dir)
    }

    /// Marks the range a sandbox found on disk records as used (in the one set the
    /// process's jail and gVisor runtimes share, and host-wide).
    fn reserve_ids(&self, id: &str) {
        ids::reserve_recorded(&self.inner.id_plan, &self.paths(id).dir);
    }

    /// Gives a sandbox's range back (its directory is gone, or never recorded it).
    fn release_ids(&self, id: &str, host_ids: HostIds) {
        ids::give_back(&self.inner.id_plan, &self.paths(id).dir, host_ids);
    }

    /// A range of its own for the sandbox, or the canonical one for a template build
    /// step (its upper directory becomes a template layer, stored in that range) and
    /// when ranges are off.
    fn allocate_ids(&self, config: &SandboxConfig) -> Result<HostIds, RuntimeError> {
        ids::allocate_for(
            &self.inner.id_plan,
            &self.inner.opts.state_dir,
            &self.paths(&config.id).dir,
            self.inner.opts.per_sandbox_ids,
            config,
        )
    }

    pub fn options(&self) -> &GvisorOptions {
        &self.inner.opts
    }

    /// `runsc --version`'s first line and the platform in use.
    pub fn runsc_info(&self) -> (&str, &str) {
        (&self.inner.version, &self.inner.runsc.platform)
    }

    /// The `runsc` binary in use.
    pub fn runsc_path(&self) -> &Path {
        &self.inner.runsc.exe
    }

    pub fn paths(&self, id: &str) -> BundlePaths {
        BundlePaths::new(&self.inner.opts.state_dir, id)
    }

    /// The cgroup directories a sandbox uses (for leak checks).
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.inner.cgroups.dirs(id)
    }

    /// runsc's state directory (`state_dir/runsc-root`).
    pub fn runsc_root(&self) -> &Path {
        &self.inner.runsc.root
    }

    pub fn read_state(&self, id: &str) -> Option<GvisorState> {
        let bytes = std::fs::read(self.paths(id).state()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replace `state.json` (through a rename: a crash leaves the old or the new one).
    fn write_state(&self, state: &GvisorState) -> Result<(), RuntimeError> {
        let path = self.paths(&state.id).state();
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec(state)
            .map_err(|e| RuntimeError::io("encoding state.json", std::io::Error::other(e)))?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| RuntimeError::io(format!("writing {}", path.display()), e))
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
            .filter(|n| validate_id(n).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn log_tail(&self, id: &str) -> String {
        // The guest writes this file: read its last 64 KiB, not all of it.
        let log = crate::guest::tail(&self.paths(id).log(), 64 * 1024);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Host side of a start, blocking: directories, overlay, network, config.json.
    fn prepare_blocking(
        &self,
        config: &SandboxConfig,
        slot: Option<net::Slot>,
        host_ids: HostIds,
    ) -> Result<(), RuntimeError> {
        let id = &config.id;
        let paths = self.paths(id);
        let start_err = |what: &str, e: &dyn std::error::Error| RuntimeError::Start {
            id: id.clone(),
            reason: format!("{what}: {}", chain(e)),
        };
        let etc = host::etc_files(id, slot).map_err(|e| start_err("etc files", &e))?;
        host::prepare_rootfs(
            &config.rootfs,
            &paths,
            config.limits.disk_mb,
            &etc,
            host_ids,
            &self.inner.opts.helper_exe,
        )
        .map_err(|e| start_err("preparing the root filesystem", &e))?;
        self.write_state(&GvisorState {
            id: id.clone(),
            limits: config.limits,
            slot,
            rootfs: Some(config.rootfs.clone()),
            paused: None,
        })?;
        let netns = match slot {
            Some(slot) => {
                host::setup_netns(id, slot).map_err(|e| start_err("network namespace", &e))?;
                Some(host::netns_path(id))
            }
            None => None,
        };
        let rootfs = paths.rootfs();
        let run_dir = paths.run();
        // kiln-sudo stands in for the template's sudo (setuid is ignored by gVisor).
        let sudo = (self.inner.opts.guest_bin_dir.join("kiln-sudo").is_file()
            && rootfs
                .join(bundle::SUDO_PATH.trim_start_matches('/'))
                .symlink_metadata()
                .is_ok())
        .then_some(bundle::SUDO_PATH);
        let spec = bundle::build(&BundleSpec {
            id,
            rootfs: &rootfs,
            run_dir: &run_dir,
            guest_bin_dir: &self.inner.opts.guest_bin_dir,
            limits: config.limits,
            netns: netns.as_deref(),
            envd_command: self.inner.opts.envd_command.as_deref(),
            sudo,
            ids: host_ids,
        })
        .map_err(|e| start_err("config.json", &e))?;
        spec.save(paths.config())
            .map_err(|e| start_err("writing config.json", &e))
    }

    /// Start `runsc run` (or, with `image`, `runsc restore` from that checkpoint) as
    /// a supervising child: it stays until the sandbox ends and reaps the Sentry and
    /// gofer. Its output goes to the log file, never a pipe. Loopback sandboxes only
    /// (Internet ones: [`Self::create_and_start`]).
    fn spawn_runsc(&self, id: &str, image: Option<&Path>) -> Result<(), RuntimeError> {
        let paths = self.paths(id);
        let log = self.open_log(id)?;
        let log2 = log
            .try_clone()
            .map_err(|e| RuntimeError::io("duplicating the log fd", e))?;
        let mut cmd = tokio::process::Command::new(&self.inner.runsc.exe);
        cmd.args(self.inner.runsc.global_args(Network::None));
        match image {
            None => cmd.arg("run"),
            Some(dir) => cmd
                .arg("restore")
                .arg(format!("--image-path={}", dir.display())),
        };
        cmd.arg(format!("--bundle={}", paths.dir.display()))
            .arg(id)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Own process group: a Ctrl-C in the server's terminal does not reach it.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            RuntimeError::io(format!("spawning {}", self.inner.runsc.exe.display()), e)
        })?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    fn open_log(&self, id: &str) -> Result<std::fs::File, RuntimeError> {
        let log = self.paths(id).log();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| RuntimeError::io(format!("opening {}", log.display()), e))
    }

    /// Internet sandboxes: `runsc create`, then `runsc start` (or, with `image`,
    /// `runsc restore --detach` from that checkpoint) from a mount namespace that
    /// hides `/proc/sys/net` (see [`hide_net_core_on_exec`]): `start` and `restore`
    /// set up the network, `create` starts the Sentry and gofer. Those are children
    /// of `create`, which exits: they are re-parented to the host's init (or the
    /// nearest subreaper), which reaps them (docs/gvisor.md).
    async fn create_and_start(&self, id: &str, image: Option<&Path>) -> Result<(), RuntimeError> {
        let paths = self.paths(id);
        let global = self.inner.runsc.global_args(Network::Sandbox);
        let mut create = tokio::process::Command::new(&self.inner.runsc.exe);
        create
            .args(&global)
            .arg("create")
            .arg(format!("--bundle={}", paths.dir.display()))
            .arg(id)
            .stdin(Stdio::null())
            .stdout(self.open_log(id)?)
            .stderr(self.open_log(id)?)
            .process_group(0);
        let mut start = tokio::process::Command::new(&self.inner.runsc.exe);
        start.args(&global);
        let second = match image {
            None => {
                start.arg("start");
                "start"
            }
            Some(dir) => {
                start
                    .arg("restore")
                    .arg("--detach")
                    .arg(format!("--image-path={}", dir.display()))
                    .arg(format!("--bundle={}", paths.dir.display()));
                "restore"
            }
        };
        start
            .arg(id)
            .stdin(Stdio::null())
            .stdout(self.open_log(id)?)
            .stderr(self.open_log(id)?);
        hide_net_core_on_exec(&mut start);
        for (what, mut cmd) in [("create", create), (second, start)] {
            let run = async {
                cmd.status()
                    .await
                    .map_err(|e| RuntimeError::io(format!("running runsc {what}"), e))
            };
            let status = tokio::time::timeout(self.inner.opts.start_timeout, run)
                .await
                .map_err(|_| RuntimeError::Start {
                    id: id.to_string(),
                    reason: format!("runsc {what} timed out"),
                })??;
            if !status.success() {
                return Err(RuntimeError::Start {
                    id: id.to_string(),
                    reason: format!(
                        "runsc {what} failed ({status}); log:\n{}",
                        self.log_tail(id)
                    ),
                });
            }
        }
        Ok(())
    }

    async fn wait_for_envd(&self, id: &str) -> Result<u32, RuntimeError> {
        let socket = self.paths(id).envd_socket();
        let deadline = Instant::now() + self.inner.opts.start_timeout;
        let mut delay = Duration::from_millis(2);
        loop {
            if crate::guest::connect_envd(&socket).await.is_ok() {
                return self.sentry_pid(id).await;
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::Start {
                    id: id.to_string(),
                    reason: format!(
                        "envd did not accept connections on {} within {:?}; log:\n{}",
                        socket.display(),
                        self.inner.opts.start_timeout,
                        self.log_tail(id)
                    ),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// The Sentry, gofer and every workload process gone, runsc's container deleted;
    /// the overlay and the disk with `upper/` stay mounted. Every step runs; the
    /// first failure is reported.
    fn stop_blocking(&self, id: &str) -> Vec<RuntimeError> {
        let mut failures: Vec<RuntimeError> = Vec::new();
        // A sandbox `runsc pause` froze takes SIGKILL only once thawed.
        let _ = self.inner.cgroups.request_frozen(id, false);
        // runsc put the Sentry and gofer into kiln/<id>: SIGKILL them there first.
        // (`runsc delete --force` on a live sandbox tries a graceful stop that times
        // out here; on a dead one it only removes runsc's state.)
        if let Err(e) = cgroup::kill_all(&*self.inner.cgroups, id, Duration::from_secs(5)) {
            failures.push(cgroup_err(id, "killing its processes", e));
        }
        if let Err(e) = self.inner.runsc.delete(id) {
            failures.push(io_other(format!("sandbox {id}: runsc delete"), &e));
        }
        failures
    }

    fn kill_blocking(&self, id: &str) -> Result<(), RuntimeError> {
        let paths = self.paths(id);
        let state = self.read_state(id);
        let host_ids = self.host_ids(id);
        // Every step runs even when an earlier one failed; the first failure is reported.
        let mut failures = self.stop_blocking(id);
        let processes_gone = failures.is_empty();
        let slot = state.as_ref().and_then(|s| s.slot);
        match host::remove_netns(id, slot) {
            Ok(()) => {
                if let Some(slot) = slot {
                    net::release(slot.index);
                }
            }
            Err(e) => failures.push(io_other(format!("sandbox {id}: removing its network"), &e)),
        }
        host::unmount_rootfs(&paths);
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
                failures.push(RuntimeError::io(
                    format!("sandbox {id}: removing its directory"),
                    e,
                ));
                false
            }
        };
        // As on the jail: the range is free once no process of the sandbox is left
        // and its record is gone; otherwise it stays taken until a retried kill (or a
        // restart of the server) finds both true.
        if processes_gone && dir_gone {
            self.release_ids(id, host_ids);
        }
        match failures.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// runsc 2022 decides it runs "in the root network namespace" when
/// `/proc/sys/net/core/rmem_default` exists, which was true only there before Linux
/// namespaced that sysctl; on current kernels `--network=sandbox` is then refused
/// for every namespace. The command is run in a private mount namespace with an
/// empty tmpfs over `/proc/sys/net`, so the check sees the namespace it joined.
/// Only for `runsc start`: a Sentry or gofer started from that namespace
/// could not mount a fresh procfs in its user namespace (the overmount makes /proc
/// "not fully visible").
fn hide_net_core_on_exec(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes three raw system calls
    // (unshare, mount, mount) with static NUL-terminated strings and allocates
    // nothing. unshare(CLONE_NEWNS) only affects the child.
    unsafe {
        cmd.pre_exec(|| {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                c"/proc/sys/net".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))
        });
    }
}

#[async_trait]
impl Runtime for GvisorRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Gvisor
    }

    fn describe(&self) -> String {
        let r = &self.inner.runsc;
        let version = self.inner.version.trim_start_matches("runsc version ");
        format!(
            "gvisor with {} {version}, platform {}",
            r.exe.display(),
            r.platform
        )
    }

    fn upper_dir(&self, id: &str) -> Option<PathBuf> {
        // `--overlay2=none`: the Sentry writes through to the host overlay.
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
        let network = if slot.is_some() {
            Network::Sandbox
        } else {
            Network::None
        };
        let started = async {
            let this = self.clone();
            let cfg = config.clone();
            tokio::task::spawn_blocking(move || this.prepare_blocking(&cfg, slot, host_ids))
                .await
                .map_err(|e| RuntimeError::io("prepare task", std::io::Error::other(e)))??;
            match network {
                Network::None => self.spawn_runsc(&config.id, None)?,
                Network::Sandbox => self.create_and_start(&config.id, None).await?,
            }
            self.wait_for_envd(&config.id).await
        }
        .await;
        match started {
            Ok(pid) => {
                tracing::debug!(id = %config.id, pid, "gvisor sandbox started");
                Ok(SandboxInstance {
                    id: config.id.clone(),
                    pid,
                    envd_socket: paths.envd_socket(),
                })
            }
            Err(e) => {
                // A recorded range is given back by a kill that removed everything
                // (and stays taken otherwise); an unrecorded one is given back here.
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

    /// SIGKILL everything in the sandbox's cgroups (Sentry, gofer, workload) and
    /// `runsc delete` its container; the overlay and the disk with `upper/` stay
    /// mounted, unchanging, until `kill`. A checkpointed sandbox has no process: its
    /// stopped container is deleted, and it can no longer be resumed.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let failures = this.stop_blocking(&id);
            // Not paused any more: adopt must not take it for a live checkpoint.
            if let Some(mut st) = this.read_state(&id).filter(|s| s.paused.is_some()) {
                st.paused = None;
                let _ = std::fs::remove_dir_all(this.snapshot_dir(&id));
                this.write_state(&st)?;
            }
            match failures.into_iter().next() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| RuntimeError::io("stop task", std::io::Error::other(e)))?
    }

    async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || this.kill_blocking(&id))
            .await
            .map_err(|e| RuntimeError::io("kill task", std::io::Error::other(e)))?
    }

    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let state = self
            .read_state(id)
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_string() })?;
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let cg = if state.paused == Some(PauseKind::Checkpoint) {
                // No Sentry, no memory in use: only the limit and the disk are left.
                cgroup::CgroupStats {
                    mem_limit_bytes: state.limits.memory_mb.saturating_mul(1024 * 1024),
                    ..Default::default()
                }
            } else {
                this.inner
                    .cgroups
                    .stats(&id)
                    .map_err(|e| cgroup_err(&id, "reading its cgroup stats", e))?
            };
            let paths = this.paths(&id);
            let (disk_used, disk_total) = disk::usage(&paths.disk_image(), &paths.disk())
                .map_err(|e| io_other(format!("sandbox {id}: its disk usage"), &e))?;
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
        .map_err(|e| RuntimeError::io("stats task", std::io::Error::other(e)))?
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        self.ids()
    }

    async fn adopt(&self, id: &str) -> Result<Option<SandboxInstance>, RuntimeError> {
        validate_id(id).map_err(RuntimeError::InvalidConfig)?;
        let Some(state) = self.read_state(id) else {
            return Ok(None);
        };
        if state.paused == Some(PauseKind::Checkpoint) {
            // No Sentry runs: the sandbox is its snapshot on disk.
            if !self.is_checkpointed(id) {
                tracing::warn!(%id, "checkpointed, but its snapshot is missing");
                return Ok(None);
            }
            if let Some(slot) = state.slot {
                net::reserve(slot.index);
            }
            self.reserve_ids(id);
            // After a reboot: mount its overlay again now, so its template layer is
            // in use (template garbage collection keeps mounted lower layers).
            let this = self.clone();
            let st = state.clone();
            match tokio::task::spawn_blocking(move || this.ensure_host_side(&st)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%id, error = %chain(&e), "setting up a checkpointed sandbox's host side; resume will try again")
                }
                Err(e) => tracing::warn!(%id, error = %e, "host setup task"),
            }
            return Ok(Some(SandboxInstance {
                id: id.to_string(),
                pid: 0,
                envd_socket: self.paths(id).envd_socket(),
            }));
        }
        let cs = self.runsc_state(id).await?;
        // A paused sandbox (`runsc pause`) is alive too: its Sentry holds its memory.
        let Some(cs) = cs.filter(|c| c.status == "running" || c.status == "paused") else {
            return Ok(None);
        };
        if let Some(slot) = state.slot {
            net::reserve(slot.index);
        }
        self.reserve_ids(id);
        Ok(Some(SandboxInstance {
            id: id.to_string(),
            pid: cs.sentry_pid().unwrap_or(0),
            envd_socket: self.paths(id).envd_socket(),
        }))
    }

    /// `runsc checkpoint` to `state_dir/<id>/snapshot/` after envd let go of its
    /// socket: processes, kernel state and memory go to disk and the Sentry exits
    /// (memory released). Falls back to `runsc pause` (memory kept in RAM) when envd
    /// cannot quiesce. See [`pause`] and docs/gvisor.md.
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.pause_sandbox(id).await
    }

    /// `runsc restore` from the snapshot, then envd listens again (or `runsc resume`
    /// after the fallback).
    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.resume_sandbox(id).await
    }

    /// A checkpoint is on disk with the overlay's upper layer: after a reboot the
    /// overlay is mounted and the network namespace made again before the restore.
    /// (A sandbox that fell back to `runsc pause` is lost with the host's RAM.)
    fn pause_survives_reboot(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_roundtrip() {
        let s = GvisorState {
            id: "g1".into(),
            limits: Limits {
                memory_mb: 128,
                cpu_count: 1,
                pids_max: 64,
                disk_mb: 256,
            },
            slot: net::Slot::new(3),
            rootfs: Some("/t/rootfs".into()),
            paused: Some(PauseKind::Checkpoint),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""paused":"checkpoint""#), "{json}");
        assert_eq!(serde_json::from_str::<GvisorState>(&json).unwrap(), s);
        // state.json written before pauses and the template were recorded.
        let old: GvisorState = serde_json::from_str(
            r#"{"id":"g1","limits":{"memory_mb":1,"cpu_count":1,"pids_max":1},"slot":null}"#,
        )
        .unwrap();
        assert_eq!((old.rootfs, old.paused), (None, None));
    }

    #[test]
    fn new_refuses_without_root_or_binaries() {
        let t = tempfile::tempdir().unwrap();
        let opts = GvisorOptions::new(t.path().join("state"), t.path().join("nobin"));
        assert!(matches!(
            GvisorRuntime::new(opts),
            Err(RuntimeError::Unsupported(_))
        ));
    }
}
