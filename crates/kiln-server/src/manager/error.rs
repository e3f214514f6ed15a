//! What can go wrong in the [`super::SandboxManager`], as types. Each message is
//! written for the client (no host paths, no error chains); `crate::error` maps each
//! variant to its HTTP status in one place.

use crate::store::StoreError;
use crate::templates::LookupError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Missing, or another team's (the two answer alike).
    #[error("sandbox \"{0}\" not found")]
    NotFound(String),
    #[error(transparent)]
    Template(#[from] LookupError),
    #[error("timeout must be a positive number of seconds, got {0}")]
    TimeoutNotPositive(i64),
    #[error(
        "timeout {got} s exceeds the maximum sandbox timeout of {max} s (E2B_SANDBOX_TIMEOUT_SEC)"
    )]
    TimeoutOverCap { got: i64, max: i64 },
    #[error(
        "a desktop sandbox lives at most {max} s from its start (E2B_DESKTOP_MAX_DURATION); \
         this would end it {got} s after its start"
    )]
    DesktopOverCap { got: i64, max: i64 },
    #[error("{0}")]
    BadLifecycle(&'static str),
    #[error("`{field}` is not supported by Kiln: {why}")]
    Unsupported {
        field: &'static str,
        why: &'static str,
    },
    #[error("duration must be between 0 and 3600 seconds, got {0}")]
    DurationOutOfRange(i64),
    #[error(
        "invalid environment variable name {0:?}: names must be non-empty and contain \
         neither '=' nor NUL"
    )]
    BadEnvName(String),
    #[error("memoryMB and cpuCount must be at least 1 when given")]
    ZeroSize,
    #[error(
        "{who} asks for {asked} {resource}; this server allows at most {max} per sandbox \
         ({})", .resource.setting()
    )]
    OverServerCap {
        /// `template "name"` or `this create`.
        who: String,
        resource: Resource,
        asked: u64,
        max: u64,
    },
    #[error(
        "maximum number of concurrent sandboxes ({max}) reached (E2B_MAX_SANDBOXES); kill a \
         sandbox or raise the limit"
    )]
    HostFull { max: usize },
    #[error(
        "this create would take your team to {used} {quota}, over its quota of {max}; kill a \
         sandbox or ask the operator to raise the quota"
    )]
    OverQuota { quota: Quota, used: u64, max: u64 },
    #[error("{0}")]
    BadQuery(String),
    /// A `network` object this server cannot honour as asked (which field, why).
    #[error(transparent)]
    BadNetwork(#[from] crate::egress::PolicyError),
    #[error("sandbox \"{0}\" is already paused")]
    AlreadyPaused(String),
    /// The runtime cannot pause (its message says why).
    #[error("{0}")]
    PauseUnsupported(String),
    /// A paused sandbox the host lost across a reboot.
    #[error("{0}")]
    Lost(String),
    #[error("the runtime did not start the sandbox within {0} s; try again")]
    StartTimedOut(u64),
    #[error("the runtime did not finish {what} within {secs} s; try again")]
    RuntimeTimedOut { what: &'static str, secs: u64 },
    /// The sandbox started but its guest did not become ready (envd's own words, or
    /// which step timed out).
    #[error("sandbox {id} started but {detail}")]
    GuestNotReady { id: String, detail: String },
    #[error("{what}")]
    Runtime {
        what: String,
        #[source]
        source: kiln_runtime::RuntimeError,
    },
    #[error("setting the network policy of sandbox {id} failed")]
    Firewall {
        id: String,
        #[source]
        source: kiln_runtime::jail::net::NetError,
    },
    #[error("setting up the egress CA of sandbox {id} failed: {reason}")]
    EgressCa { id: String, reason: String },
    #[error("starting the egress proxy failed")]
    EgressProxy {
        #[source]
        source: std::io::Error,
    },
    #[error("the control plane's database failed")]
    Store(#[from] StoreError),
    #[error("the create task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl SandboxError {
    pub(super) fn runtime(what: impl Into<String>, source: kiln_runtime::RuntimeError) -> Self {
        SandboxError::Runtime {
            what: what.into(),
            source,
        }
    }
}

/// A per-sandbox resource the operator caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    MemoryMb,
    Cpus,
}

impl Resource {
    fn setting(self) -> &'static str {
        match self {
            Resource::MemoryMb => "KILN_MAX_MEMORY_MB",
            Resource::Cpus => "KILN_MAX_CPUS",
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::MemoryMb => "MiB of memory",
            Resource::Cpus => "CPUs",
        })
    }
}

/// A team quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Sandboxes,
    MemoryMb,
    Cpus,
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quota::Sandboxes => "concurrent sandboxes (maxSandboxes)",
            Quota::MemoryMb => "MiB of memory across its running sandboxes (maxMemoryMB)",
            Quota::Cpus => "CPUs across its running sandboxes (maxCpus)",
        })
    }
}
