//! Server configuration: where it listens, where it keeps state, and the limits it
//! enforces. Limits default from the `E2B_*` environment variables E2B's own
//! self-hosting uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Limits applied to every create request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Maximum number of sandboxes running at once (`E2B_MAX_SANDBOXES`).
    pub max_sandboxes: usize,
    /// Maximum sandbox lifetime in seconds (`E2B_SANDBOX_TIMEOUT_SEC`).
    pub max_timeout_secs: i64,
    /// Memory per sandbox in MiB unless the template says otherwise (`E2B_SANDBOX_MEMORY_MB`).
    pub memory_mb: u64,
    /// CPUs per sandbox unless the template says otherwise (`E2B_SANDBOX_CPU_LIMIT`).
    pub cpu_count: u32,
    /// Maximum tasks per sandbox.
    pub pids_max: u32,
    /// Size of each sandbox's writable layer, in MiB (`KILN_SANDBOX_DISK_MB`): a cap
    /// the runtime enforces (writes past it fail with `ENOSPC` inside).
    pub disk_size_mb: u64,
    /// The most memory any sandbox gets, whatever its template asks (`KILN_MAX_MEMORY_MB`).
    pub max_memory_mb: u64,
    /// The most CPUs any sandbox gets, whatever its template asks (`KILN_MAX_CPUS`).
    pub max_cpu_count: u32,
    /// The longest deadline a command may ask for, in seconds
    /// (`E2B_EXECUTION_TIMEOUT_SEC`): a `process.Process/Start` whose
    /// `Connect-Timeout-Ms` is longer is refused. A command without a deadline
    /// (the SDK's `timeout=0`, background servers) is not one execution and stays
    /// bounded by the sandbox's lifetime.
    pub execution_timeout_secs: u64,
    /// Idle sandboxes kept started per template (`KILN_POOL_SIZE`; 0 turns pools off).
    pub pool_size: usize,
    /// The longest a sandbox of the `desktop` template lives from its start, however
    /// often its deadline is moved (`E2B_DESKTOP_MAX_DURATION`, seconds).
    pub desktop_max_duration_secs: i64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sandboxes: 20,
            max_timeout_secs: 3600,
            memory_mb: 512,
            cpu_count: 2,
            pids_max: 1024,
            disk_size_mb: 10 * 1024,
            max_memory_mb: 8 * 1024,
            max_cpu_count: 8,
            execution_timeout_secs: 300,
            pool_size: 2,
            desktop_max_duration_secs: 3600,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is not valid: expected {expected}")]
pub struct EnvError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

fn env_num<T: std::str::FromStr + PartialOrd + Default>(
    name: &'static str,
    default: T,
) -> Result<T, EnvError> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(value) => match value.trim().parse::<T>() {
            Ok(v) if v > T::default() => Ok(v),
            _ => Err(EnvError {
                name,
                value,
                expected: "a positive whole number",
            }),
        },
    }
}

impl LimitsConfig {
    /// Defaults overridden by the `E2B_*` environment variables.
    pub fn from_env() -> Result<Self, EnvError> {
        let d = LimitsConfig::default();
        let limits = LimitsConfig {
            max_sandboxes: env_num("E2B_MAX_SANDBOXES", d.max_sandboxes)?,
            max_timeout_secs: env_num("E2B_SANDBOX_TIMEOUT_SEC", d.max_timeout_secs)?,
            memory_mb: env_num("E2B_SANDBOX_MEMORY_MB", d.memory_mb)?,
            cpu_count: env_num("E2B_SANDBOX_CPU_LIMIT", d.cpu_count)?,
            pids_max: env_num("KILN_SANDBOX_PIDS_MAX", d.pids_max)?,
            disk_size_mb: env_num("KILN_SANDBOX_DISK_MB", d.disk_size_mb)?,
            max_memory_mb: env_num("KILN_MAX_MEMORY_MB", d.max_memory_mb)?,
            max_cpu_count: env_num("KILN_MAX_CPUS", d.max_cpu_count)?,
            execution_timeout_secs: env_num("E2B_EXECUTION_TIMEOUT_SEC", d.execution_timeout_secs)?,
            desktop_max_duration_secs: env_num(
                "E2B_DESKTOP_MAX_DURATION",
                d.desktop_max_duration_secs,
            )?,
            pool_size: match std::env::var("KILN_POOL_SIZE") {
                Ok(v) => v.trim().parse().map_err(|_| EnvError {
                    name: "KILN_POOL_SIZE",
                    value: v,
                    expected: "a whole number (0 turns warm pools off)",
                })?,
                Err(_) => d.pool_size,
            },
        };
        limits.check()?;
        Ok(limits)
    }

    /// The defaults must fit under the caps.
    fn check(&self) -> Result<(), EnvError> {
        if self.memory_mb > self.max_memory_mb {
            return Err(EnvError {
                name: "E2B_SANDBOX_MEMORY_MB",
                value: self.memory_mb.to_string(),
                expected: "at most KILN_MAX_MEMORY_MB",
            });
        }
        if self.cpu_count > self.max_cpu_count {
            return Err(EnvError {
                name: "E2B_SANDBOX_CPU_LIMIT",
                value: self.cpu_count.to_string(),
                expected: "at most KILN_MAX_CPUS",
            });
        }
        Ok(())
    }
}

/// How template builds share the host: how many run at once and how long a step and
/// a whole build may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildConfig {
    /// Builds that run at once (`KILN_MAX_CONCURRENT_BUILDS`, 1-64); later ones wait.
    /// Builds of one template always run one after the other.
    pub max_concurrent: usize,
    /// The longest one build step may run (`KILN_BUILD_STEP_TIMEOUT_SEC`).
    pub step_timeout: Duration,
    /// The longest one build may run, waiting for its turn not counted
    /// (`KILN_BUILD_TIMEOUT_SEC`).
    pub build_timeout: Duration,
}

/// The most builds `KILN_MAX_CONCURRENT_BUILDS` may allow at once.
pub const MAX_CONCURRENT_BUILDS: usize = 64;

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            max_concurrent: 2,
            step_timeout: Duration::from_secs(1800),
            build_timeout: Duration::from_secs(3600),
        }
    }
}

impl BuildConfig {
    /// Defaults overridden by the `KILN_*BUILD*` environment variables.
    pub fn from_env() -> Result<Self, EnvError> {
        let d = BuildConfig::default();
        let max_concurrent = env_num("KILN_MAX_CONCURRENT_BUILDS", d.max_concurrent)?;
        if max_concurrent > MAX_CONCURRENT_BUILDS {
            return Err(EnvError {
                name: "KILN_MAX_CONCURRENT_BUILDS",
                value: max_concurrent.to_string(),
                expected: "a whole number from 1 to 64",
            });
        }
        let secs =
            |name, default: Duration| env_num(name, default.as_secs()).map(Duration::from_secs);
        Ok(BuildConfig {
            max_concurrent,
            step_timeout: secs("KILN_BUILD_STEP_TIMEOUT_SEC", d.step_timeout)?,
            build_timeout: secs("KILN_BUILD_TIMEOUT_SEC", d.build_timeout)?,
        })
    }
}

/// Limits every spell runs under (`E2B_SPELLS_TIMEOUT`, `E2B_SPELLS_MAX_MEMORY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpellLimits {
    /// A spell's timeout when it names none, and the most it may name, seconds.
    pub timeout_secs: u64,
    /// The memory of a spell's sandbox when it names none, and the most it may name.
    pub max_memory_mb: u64,
}

impl Default for SpellLimits {
    fn default() -> Self {
        SpellLimits {
            timeout_secs: 300,
            max_memory_mb: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Directory holding the guest binaries and the jail helper (`kiln-envd`,
    /// `kiln-init`, `kiln-jail`); by default the directory of the running `kiln`.
    pub bin_dir: PathBuf,
    pub limits: LimitsConfig,
    /// Base domain for `{port}-{id}.{domain}` host routing; `None` routes by header
    /// (and by any host of that shape).
    pub domain: Option<String>,
    /// An API key to register as admin at start (`KILN_API_KEY`).
    pub api_key: Option<String>,
    /// Built-in templates to build (in the background) after `base`; see
    /// [`crate::builtins`].
    pub builtins: Vec<String>,
    /// Template build concurrency and timeouts.
    pub builds: BuildConfig,
    /// NATS server for lifecycle events and work requests (`--nats-url`); `None`: no
    /// NATS.
    pub nats_url: Option<String>,
    /// The team on whose behalf work requested over NATS runs (`KILN_NATS_TEAM`,
    /// default the `default` team).
    pub nats_team: Option<String>,
    /// Spell timeout and memory caps.
    pub spells: SpellLimits,
    /// The operator's exceptions to the ranges no sandbox reaches (`--egress-allow`),
    /// which the egress proxy honours as the firewall does.
    pub egress_allow: Vec<kiln_runtime::jail::net::Ipv4Cidr>,
    /// A PEM file of extra roots the egress proxy trusts for the servers behind header
    /// rules (`--egress-upstream-ca`).
    pub egress_upstream_ca: Option<PathBuf>,
    /// Where `{port}-{id}.{domain}` is served over TLS (`--sandbox-tls-listen`).
    pub sandbox_tls_listen: Option<SocketAddr>,
    /// The operator's certificate and key for it (else the local CA's).
    pub tls_cert: Option<(PathBuf, PathBuf)>,
    /// The screen of desktops Kiln starts itself (NATS desktop requests;
    /// `E2B_DESKTOP_RESOLUTION`). The e2b-desktop SDK passes its own.
    pub desktop_resolution: kiln_api::desktop::Resolution,
    /// What a public desktop's live view wants from a browser
    /// (`E2B_DESKTOP_AUTH_TOKEN`; `crate::live_view`).
    pub desktop_auth_token: Option<kiln_api::desktop::ViewToken>,
}

impl SpellLimits {
    /// Defaults overridden by `E2B_SPELLS_TIMEOUT` (seconds) and `E2B_SPELLS_MAX_MEMORY`
    /// (MiB).
    pub fn from_env() -> Result<Self, EnvError> {
        let d = Self::default();
        Ok(Self {
            timeout_secs: env_num("E2B_SPELLS_TIMEOUT", d.timeout_secs)?,
            max_memory_mb: env_num("E2B_SPELLS_MAX_MEMORY", d.max_memory_mb)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_rejects_garbage() {
        // Names unique to this test so parallel tests do not race on them.
        std::env::set_var("KILN_TEST_NUM_OK", "7");
        std::env::set_var("KILN_TEST_NUM_BAD", "seven");
        std::env::set_var("KILN_TEST_NUM_ZERO", "0");
        assert_eq!(env_num("KILN_TEST_NUM_OK", 1u32).unwrap(), 7);
        assert_eq!(env_num("KILN_TEST_NUM_MISSING", 3u32).unwrap(), 3);
        let err = env_num("KILN_TEST_NUM_BAD", 1u32).unwrap_err();
        assert!(err.to_string().contains("KILN_TEST_NUM_BAD"), "{err}");
        assert!(env_num("KILN_TEST_NUM_ZERO", 1u32).is_err());
    }

    #[test]
    fn build_concurrency_is_checked() {
        // The only test that sets these variables.
        std::env::set_var("KILN_MAX_CONCURRENT_BUILDS", "65");
        let err = BuildConfig::from_env().unwrap_err();
        assert!(err.to_string().contains("from 1 to 64"), "{err}");
        std::env::set_var("KILN_MAX_CONCURRENT_BUILDS", "0");
        assert!(BuildConfig::from_env().is_err());
        std::env::set_var("KILN_MAX_CONCURRENT_BUILDS", "4");
        std::env::set_var("KILN_BUILD_STEP_TIMEOUT_SEC", "5");
        let c = BuildConfig::from_env().unwrap();
        assert_eq!(
            (c.max_concurrent, c.step_timeout),
            (4, Duration::from_secs(5))
        );
        assert_eq!(c.build_timeout, BuildConfig::default().build_timeout);
        std::env::remove_var("KILN_MAX_CONCURRENT_BUILDS");
        std::env::remove_var("KILN_BUILD_STEP_TIMEOUT_SEC");
    }
}
