//! Isolation runtimes for Kiln sandboxes.
//!
//! A [`Runtime`] turns a [`SandboxConfig`] (a template root filesystem, limits and a
//! network mode) into a running sandbox whose envd answers on a Unix socket that only
//! the host can open. Backends: [`jail`] (namespaces, cgroups, seccomp, overlayfs) and
//! [`gvisor`] (OCI bundles run by `runsc`). Warm pools come later behind the same trait.

use std::path::PathBuf;

use async_trait::async_trait;

pub mod guest;
pub mod gvisor;
pub mod idmap;
pub mod jail;
pub mod multi;
pub mod userns;

/// First host uid (and gid) of the canonical range: template root filesystems are
/// stored already shifted into it (see `docs/jail.md`), build sandboxes map their ids
/// 0.. to it. Other sandboxes (jail and gVisor) get a range of their own
/// ([`HostIdMode::PerSandbox`], `jail::ids`).
pub const ID_MAP_BASE: u32 = 100_000;
/// Number of ids mapped into every sandbox (sandbox ids 0..65535).
pub const ID_MAP_LEN: u32 = 65_536;
/// Where the guest binaries (`kiln-init`, `kiln-envd`) appear inside a sandbox.
pub const GUEST_BIN_DIR: &str = "/opt/kiln/bin";
/// Where envd's Unix socket appears inside a sandbox.
pub const GUEST_ENVD_SOCKET: &str = "/run/kiln/envd.sock";

/// Which backend runs a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Jail,
    Gvisor,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Jail => "jail",
            RuntimeKind::Gvisor => "gvisor",
        }
    }

    /// `jail` or `gvisor`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jail" => Some(RuntimeKind::Jail),
            "gvisor" => Some(RuntimeKind::Gvisor),
            _ => None,
        }
    }
}

/// Resource limits applied to the whole sandbox (its cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Memory limit in MiB (RAM; swap is not granted on top).
    pub memory_mb: u64,
    /// CPU quota, in whole CPUs.
    pub cpu_count: u32,
    /// Maximum number of tasks (processes and threads).
    pub pids_max: u32,
    /// Cap of the sandbox's writable layer in MiB: everything it writes to its root
    /// filesystem lives on an ext4 filesystem of this size of its own (a loop-mounted
    /// sparse image, see `jail::disk`); writing past it is `ENOSPC` inside the sandbox.
    /// Absent in state written before the cap existed: [`DEFAULT_DISK_MB`].
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u64,
}

/// The writable-layer cap when none is given (MiB): 10 GiB.
pub const DEFAULT_DISK_MB: u64 = jail::disk::DEFAULT_DISK_MB;

fn default_disk_mb() -> u64 {
    DEFAULT_DISK_MB
}

/// What the sandbox's network namespace can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Loopback only.
    Loopback,
    /// A veth pair with NAT to the outside world and working DNS; the host's own
    /// addresses and other sandboxes stay unreachable.
    Internet,
}

/// Everything a runtime needs to start one sandbox.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SandboxConfig {
    /// Sandbox id: `[a-z0-9]+`, also the hostname.
    pub id: String,
    /// Template root filesystem (read-only lower layer), already owned by the mapped
    /// uid range (see `docs/jail.md`).
    pub rootfs: PathBuf,
    pub limits: Limits,
    pub network: NetworkMode,
    /// Which host ids the sandbox's ids are. Template build steps must ask for
    /// [`HostIdMode::Canonical`]: their writable layer becomes a template layer.
    #[serde(default)]
    pub host_ids: HostIdMode,
}

/// Which host id range a sandbox's ids `0..65535` map to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostIdMode {
    /// A range of its own, shared with no other live sandbox of either runtime. The
    /// template's layers appear through idmapped mounts (`docs/jail.md`,
    /// `docs/gvisor.md`).
    #[default]
    PerSandbox,
    /// The canonical range [`ID_MAP_BASE`], the one template layers are stored in:
    /// for template build steps, whose writable layer becomes a template layer.
    Canonical,
}

/// A running sandbox as the runtime reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SandboxInstance {
    pub id: String,
    /// Host pid of the sandbox's PID 1.
    pub pid: u32,
    /// Host path of the Unix socket on which envd serves HTTP (envd's whole API,
    /// plus the port tunnel). Only root on the host can open it.
    pub envd_socket: PathBuf,
}

/// Resource usage read from the sandbox's cgroup and writable layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SandboxStats {
    /// Total CPU time consumed, in nanoseconds (monotonic; callers derive a percentage).
    pub cpu_usage_ns: u64,
    pub cpu_count: u32,
    pub mem_used_bytes: u64,
    pub mem_cache_bytes: u64,
    pub mem_total_bytes: u64,
    /// Bytes in use on the sandbox's disk (its writable layer's own filesystem, as
    /// `df` counts them: file data plus ext4's metadata).
    pub disk_used_bytes: u64,
    /// Size of that filesystem: the cap (`Limits::disk_mb`) less ext4's metadata.
    pub disk_total_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("sandbox {id} not found")]
    NotFound { id: String },
    #[error("invalid sandbox configuration: {0}")]
    InvalidConfig(String),
    #[error("host is not able to run this runtime: {0}")]
    Unsupported(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {id} failed to start: {reason}")]
    Start { id: String, reason: String },
}

impl RuntimeError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An isolation backend. Implementations are shared (`Arc<dyn Runtime>`) and must be
/// safe to call concurrently for different sandbox ids.
#[async_trait]
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// The backend as the server's start banner names it: the kind, plus what an
    /// operator wants to know about it (gVisor: which runsc, which platform).
    fn describe(&self) -> String {
        self.kind().as_str().to_string()
    }

    /// Start a sandbox. Returns once envd accepts connections on its socket.
    async fn start(&self, config: &SandboxConfig) -> Result<SandboxInstance, RuntimeError>;

    /// Start a sandbox on the backend a template asks for (`None`: the default). A
    /// single backend starts its own kind and refuses another;
    /// [`multi::MultiRuntime`] picks among its backends.
    async fn start_on(
        &self,
        kind: Option<RuntimeKind>,
        config: &SandboxConfig,
    ) -> Result<SandboxInstance, RuntimeError> {
        match kind {
            Some(k) if k != self.kind() => Err(multi::unavailable(k, &[self.kind()])),
            _ => self.start(config).await,
        }
    }

    /// Whether `id`'s state is this backend's (its directory exists).
    fn owns(&self, id: &str) -> bool {
        let _ = id;
        true
    }

    /// The backend that runs `id`.
    fn kind_of(&self, id: &str) -> RuntimeKind {
        let _ = id;
        self.kind()
    }

    /// [`pause_survives_reboot`](Runtime::pause_survives_reboot) for the backend
    /// that runs `id`.
    fn pause_of_survives_reboot(&self, id: &str) -> bool {
        let _ = id;
        self.pause_survives_reboot()
    }

    /// Kill every process of a sandbox (for gVisor: its Sentry and gofer, and runsc's
    /// container) but keep its writable layer ([`upper_dir`](Runtime::upper_dir)) on
    /// the host, readable and no longer changing, until [`kill`](Runtime::kill)
    /// removes it with the rest. Template builds stop a step's sandbox before reading
    /// its layer, so a background process the step left cannot change it meanwhile.
    /// Idempotent; a stopped sandbox is no longer alive for `adopt`.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(format!(
            "the {} runtime cannot stop sandbox {id}",
            self.kind().as_str()
        )))
    }

    /// Kill a sandbox and remove everything it created on the host: processes,
    /// mounts, cgroups, network devices and rules, directories. Idempotent: killing an
    /// unknown or already-removed sandbox succeeds.
    async fn kill(&self, id: &str) -> Result<(), RuntimeError>;

    /// Resource usage of a running sandbox.
    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError>;

    /// Sandboxes this runtime finds on the host (left by an earlier server process,
    /// alive or not), for re-adoption or cleanup after a restart.
    async fn list(&self) -> Result<Vec<String>, RuntimeError>;

    /// The running instance of `id`, if its PID 1 is still alive.
    async fn adopt(&self, id: &str) -> Result<Option<SandboxInstance>, RuntimeError>;

    /// Stop every process of the sandbox where it is, keeping its memory, until
    /// [`resume`](Runtime::resume).
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(format!(
            "the {} runtime cannot pause sandbox {id}",
            self.kind().as_str()
        )))
    }

    /// Continue a paused sandbox.
    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(format!(
            "the {} runtime cannot resume sandbox {id}",
            self.kind().as_str()
        )))
    }

    /// The host directory that holds what the sandbox wrote to its root filesystem
    /// (its overlay's upper layer, with overlayfs whiteouts): template builds turn it
    /// into a layer. `None` when the backend keeps no such directory.
    fn upper_dir(&self, id: &str) -> Option<PathBuf> {
        let _ = id;
        None
    }

    /// The last `max` bytes of the sandbox's console (what its init, envd and start
    /// command wrote), read without trusting the guest-written file's size or type;
    /// `None` when the backend keeps no console.
    fn console_tail(&self, id: &str, max: u64) -> Option<String> {
        let _ = (id, max);
        None
    }

    /// The network slot of sandbox `id` (its veth pair and addresses), for rules of
    /// its own ([`jail::net::egress`]); `None` for a loopback-only sandbox or one this
    /// runtime does not know.
    fn network_slot(&self, id: &str) -> Option<jail::net::Slot> {
        let _ = id;
        None
    }

    /// Whether a paused sandbox outlives a reboot of the host (a snapshot on disk)
    /// or only lives while the host runs (a frozen cgroup).
    fn pause_survives_reboot(&self) -> bool {
        false
    }
}
