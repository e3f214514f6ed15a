//! `kiln`: the command line. Thin: it parses, calls a library, renders.

#![forbid(unsafe_code)]

mod build_progress;
mod code_cmd;
mod doctor;
mod spell_cmd;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kiln_client::{Client, ExecEvent};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Self-hosted sandboxes for AI agents, served over the E2B API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the E2B REST API and sandbox traffic on one listener.
    Serve(ServeArgs),
    /// Work with sandboxes on a running server.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Manage API keys in a data directory.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage teams (the owners of sandboxes, templates and keys) in a data directory.
    #[command(subcommand)]
    Teams(TeamsCommand),
    /// Build, list and remove templates on a running server.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Run code in a sandbox's code interpreter (a new code-interpreter-v1 sandbox,
    /// or --sandbox ID), streaming its output; exits 1 when the code raised.
    RunCode(code_cmd::RunCodeArgs),
    /// pip-install packages into a sandbox's Python kernel environment, importable by
    /// the next run-code.
    InstallPackage(code_cmd::InstallArgs),
    /// Print a sandbox's Python environment as JSON: version, platform, packages.
    EnvInfo(code_cmd::EnvInfoArgs),
    /// List, define, delete and run spells (named code-execution patterns) on a
    /// running server.
    #[command(subcommand)]
    Spell(spell_cmd::SpellCommand),
    /// Serve sandboxes as MCP tools to an MCP client (Claude Desktop, agents): over
    /// stdio by default, or Streamable HTTP at /mcp (with the REST bridge) with --listen.
    Mcp(McpArgs),
    /// Surf: web crawls by a desktop sandbox's Chromium over CDP, watched live
    /// (`docs/surf.md`): an API and a page on its own listener.
    Surf(SurfArgs),
    /// Check this host for what sandboxes need (runsc, cgroups, namespaces, overlayfs,
    /// iptables, disk, the data directory, the guest binaries); exits 1 on a FAIL.
    Doctor(doctor::DoctorArgs),
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Build a template from DIR/Dockerfile (and DIR/kiln.toml).
    Build {
        #[command(flatten)]
        remote: Remote,
        /// The project directory (the build context).
        dir: PathBuf,
        /// Template name (default: `name` in kiln.toml, else the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Rebuild every step, ignoring the layer cache.
        #[arg(long)]
        skip_cache: bool,
    },
    /// List templates.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove templates.
    Rm {
        #[command(flatten)]
        remote: Remote,
        names: Vec<String>,
    },
    /// Write an ext4 disk image of a template's root filesystem, with the ids the
    /// sandbox sees (for a runtime that boots a disk; needs root). Reads the data
    /// directory directly: no server needed.
    Image {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
        /// The template.
        name: String,
        /// Where to write the image (default: NAME.ext4 in the current directory).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Size of the disk in MiB (default: the template's disk size).
        #[arg(long)]
        size_mb: Option<u64>,
    },
    /// Free disk space: remove build layers, uploads, pulled images and Debian bases
    /// that no template needs and no build used recently (waits for running builds).
    Gc {
        #[command(flatten)]
        remote: Remote,
        /// Keep unneeded entries used within this many days (default: the server's
        /// KILN_TEMPLATE_CACHE_DAYS, else 7; 0 removes all of them).
        #[arg(long)]
        keep_days: Option<f64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RuntimeChoice {
    /// Namespaces, cgroups, seccomp, overlayfs: fast, a container boundary.
    Jail,
    /// gVisor (`runsc`): a user-space kernel between the workload and the host.
    Gvisor,
    /// gVisor when it works on this host, else the jail (with a warning).
    Auto,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The screen of desktops Kiln starts itself for NATS desktop requests
    /// (WIDTHxHEIGHT); the e2b-desktop SDK passes its own.
    #[arg(long, env = "E2B_DESKTOP_RESOLUTION", default_value = "1024x768")]
    desktop_resolution: kiln_api::desktop::Resolution,
    /// What a browser opening a desktop's live view (port 6080) must bring as
    /// `?kiln_token=`, unless the sandbox's ports are private (then its traffic token).
    #[arg(long, env = "E2B_DESKTOP_AUTH_TOKEN", hide_env_values = true)]
    desktop_auth_token: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000", env = "KILN_LISTEN")]
    listen: SocketAddr,
    /// Where Kiln keeps its database, templates and sandboxes.
    #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
    data_dir: PathBuf,
    /// Publish lifecycle events (`kiln.<type>.v1`) to this NATS server, e.g.
    /// nats://127.0.0.1:4222. Kiln keeps serving when NATS is down.
    #[arg(long, env = "KILN_NATS_URL")]
    nats_url: Option<String>,
    /// Isolation runtime (`auto`: gVisor when it works on this host, else the jail).
    #[arg(long, value_enum, default_value = "auto", env = "KILN_RUNTIME")]
    runtime: RuntimeChoice,
    /// The runsc binary of the gvisor runtime (default: the first `runsc` on PATH).
    #[arg(long, env = "KILN_RUNSC")]
    runsc: Option<PathBuf>,
    /// gVisor platform: systrap, ptrace or kvm (default: systrap if it works here,
    /// else ptrace; kvm is refused on PVM hosts).
    #[arg(long, env = "KILN_RUNSC_PLATFORM")]
    runsc_platform: Option<String>,
    /// Base domain for `{port}-{id}.{domain}` routing of sandbox traffic.
    #[arg(long, env = "KILN_DOMAIN")]
    domain: Option<String>,
    /// Directory holding kiln-envd, kiln-init and kiln-jail (default: next to kiln).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Private IPv4 ranges sandboxes with internet access may reach, comma-separated
    /// CIDRs (e.g. `10.1.2.0/24,192.168.5.7`). Loopback, RFC 1918, CGNAT, link-local,
    /// multicast and the host's own networks are denied to sandboxes unless listed here.
    #[arg(long, env = "KILN_EGRESS_ALLOW", value_parser = parse_egress_allow)]
    egress_allow: Option<EgressAllow>,
    /// A PEM file of extra root certificates the egress proxy trusts when it
    /// re-encrypts a sandbox's HTTPS request that a header rule changed (besides the
    /// system's and webpki's roots).
    #[arg(long, env = "KILN_EGRESS_UPSTREAM_CA")]
    egress_upstream_ca: Option<PathBuf>,
    /// Serve sandbox hosts `{port}-{id}.{domain}` over TLS on this address (e.g.
    /// `0.0.0.0:443`), with `--domain` (default `localhost`); the certificate is
    /// `--tls-cert`/`--tls-key`, or one from a local CA made in `<data-dir>/tls/`.
    #[arg(long, env = "KILN_SANDBOX_TLS_LISTEN")]
    sandbox_tls_listen: Option<std::net::SocketAddr>,
    /// PEM certificate (chain) for `*.{domain}` for `--sandbox-tls-listen`.
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Idle sandboxes kept started per template, so creates claim one in milliseconds
    /// (default 2, or KILN_POOL_SIZE; 0 turns warm pools off).
    #[arg(long)]
    pool_size: Option<usize>,
    /// Built-in templates to build in the background after `base`, comma-separated,
    /// or `none` (the SDKs' defaults: `code-interpreter-v1` for e2b-code-interpreter).
    #[arg(
        long,
        env = "KILN_BUILTIN_TEMPLATES",
        default_value = "code-interpreter-v1",
        value_parser = parse_builtins
    )]
    builtin_templates: Builtins,
}

/// `--builtin-templates`: names of built-in templates.
#[derive(Clone, Debug)]
struct Builtins(Vec<String>);

#[derive(Clone, Debug)]
struct EgressAllow(Vec<kiln_runtime::jail::net::Ipv4Cidr>);

fn parse_egress_allow(s: &str) -> Result<EgressAllow, String> {
    kiln_runtime::jail::net::parse_egress_allow(s)
        .map(EgressAllow)
        .map_err(|e| e.to_string())
}

fn parse_builtins(s: &str) -> Result<Builtins, String> {
    let known = kiln_server::builtins::names();
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "none" {
            continue;
        }
        if !known.contains(&name) {
            return Err(format!(
                "unknown built-in template {name:?}; built-ins: {} (or none)",
                known.join(", ")
            ));
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    Ok(Builtins(out))
}

#[derive(clap::Args)]
pub(crate) struct Remote {
    /// The server's API URL.
    #[arg(long, env = "E2B_API_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// An API key.
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: String,
}

#[derive(clap::Args)]
struct SurfArgs {
    /// Where Surf's API and page listen. Whoever reaches it crawls with its API key:
    /// keep it on loopback, or behind a proxy that authenticates.
    #[arg(long, env = "KILN_SURF_LISTEN", default_value = "127.0.0.1:3080")]
    listen: SocketAddr,
    /// The Kiln server's API URL (plain HTTP: DevTools WebSockets go there too).
    #[arg(long, env = "E2B_API_URL", default_value = "http://127.0.0.1:3000")]
    api_url: String,
    /// The API key Surf acts with.
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Sessions crawling at once; more are refused (429) until one ends.
    #[arg(long, env = "E2B_SURF_CONCURRENT", default_value_t = 2)]
    concurrent: usize,
    /// The longest one session's crawl may take, in seconds.
    #[arg(long, env = "E2B_SURF_TIMEOUT", default_value_t = 300)]
    timeout: u64,
    /// The domain Kiln serves sandbox hosts under over TLS (`kiln serve --domain`,
    /// `--sandbox-tls-listen`), for the live views; without it they point at
    /// `{port}-{id}.localhost` on the API's port.
    #[arg(long, env = "E2B_DOMAIN")]
    domain: Option<String>,
    /// The screen of the desktops Surf starts (WIDTHxHEIGHT).
    #[arg(long, env = "E2B_DESKTOP_RESOLUTION", default_value = "1024x768")]
    desktop_resolution: kiln_api::desktop::Resolution,
    /// What a browser opening a desktop's live view (port 6080) must bring as
    /// `?kiln_token=`, unless the sandbox's ports are private (then its traffic token).
    #[arg(long, env = "E2B_DESKTOP_AUTH_TOKEN", hide_env_values = true)]
    desktop_auth_token: Option<String>,
    /// Computer-use mode: the base of a model's OpenAI-compatible Responses API
    /// (`https://api.openai.com/v1`); without it the mode is off.
    #[arg(long, env = "E2B_SURF_MODEL_URL")]
    model_url: Option<String>,
    /// The model's API key (else OPENAI_API_KEY), sent as a Bearer token.
    #[arg(long, env = "E2B_SURF_MODEL_KEY", hide_env_values = true)]
    model_key: Option<String>,
    /// The model computer-use mode asks for.
    #[arg(long, env = "E2B_SURF_MODEL", default_value = "computer-use-preview")]
    model: String,
}

async fn surf(args: SurfArgs) -> Result<()> {
    if args.concurrent == 0 || args.timeout == 0 {
        bail!("E2B_SURF_CONCURRENT and E2B_SURF_TIMEOUT must be at least 1");
    }
    // A session's sandbox outlives its crawl by 5 minutes (to look at the results),
    // within the most a desktop may live (the server refuses more).
    let desktop_max = kiln_server::config::LimitsConfig::from_env()?.desktop_max_duration_secs;
    let desktop_max = u64::try_from(desktop_max).unwrap_or(0);
    if args.timeout >= desktop_max {
        bail!(
            "E2B_SURF_TIMEOUT ({} s) must be below E2B_DESKTOP_MAX_DURATION ({desktop_max} s): \
             a crawl runs in a desktop sandbox, which lives no longer than that",
            args.timeout
        );
    }
    let config = kiln_surf::SurfConfig {
        api_url: args.api_url,
        api_key: args.api_key,
        concurrent: args.concurrent,
        timeout: std::time::Duration::from_secs(args.timeout),
        sandbox_lifetime: std::time::Duration::from_secs((args.timeout + 300).min(desktop_max)),
        domain: args.domain.filter(|d| !d.is_empty()),
        resolution: args.desktop_resolution,
        view_token: view_token(args.desktop_auth_token)?,
        model: args
            .model_url
            .filter(|u| !u.is_empty())
            .map(|url| kiln_surf::ModelConfig {
                url,
                key: args
                    .model_key
                    .or_else(|| std::env::var("OPENAI_API_KEY").ok())
                    .filter(|k| !k.is_empty()),
                model: args.model,
            }),
    };
    kiln_surf::serve(config, args.listen).await?;
    Ok(())
}

/// `E2B_DESKTOP_AUTH_TOKEN`: unset or empty is none; anything else must be a token.
fn view_token(raw: Option<String>) -> Result<Option<kiln_api::desktop::ViewToken>> {
    match raw.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => Ok(Some(t.parse().map_err(anyhow::Error::msg)?)),
    }
}

#[derive(clap::Args)]
struct McpArgs {
    /// The Kiln server's API URL.
    #[arg(
        long,
        alias = "url",
        env = "E2B_API_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    api_url: String,
    /// The API key the tools act with: every call over stdio, and HTTP callers that
    /// present E2B_MCP_SERVER_TOKEN (others bring their own key).
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Serve Streamable HTTP at /mcp and the REST bridge on this address instead of
    /// stdio (`--listen` alone: 127.0.0.1:7073).
    #[arg(long, num_args = 0..=1, default_missing_value = kiln_mcp::DEFAULT_LISTEN)]
    listen: Option<SocketAddr>,
    /// A shared secret HTTP callers may present as `Authorization: Bearer TOKEN` to act
    /// with --api-key.
    #[arg(long, env = "E2B_MCP_SERVER_TOKEN", hide_env_values = true)]
    server_token: Option<String>,
    /// The screen of desktops the desktop tools start (WIDTHxHEIGHT).
    #[arg(long, env = "E2B_DESKTOP_RESOLUTION", default_value = "1024x768")]
    desktop_resolution: kiln_api::desktop::Resolution,
}

async fn mcp(args: McpArgs) -> Result<()> {
    let shared = kiln_mcp::Shared {
        api_url: args.api_url,
        default_key: args.api_key.filter(|k| !k.is_empty()),
        reaper: kiln_mcp::Reaper::default(),
        desktop_resolution: args.desktop_resolution,
    };
    match args.listen {
        Some(addr) => kiln_mcp::serve_http(shared, addr, args.server_token).await?,
        None => {
            if shared.default_key.is_none() {
                bail!("kiln mcp over stdio needs an API key: --api-key or E2B_API_KEY");
            }
            kiln_mcp::serve_stdio(shared).await?
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// List running sandboxes.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only sandboxes with this metadata (key=value; repeatable).
        #[arg(long = "metadata", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    /// Create a sandbox and print its id.
    Create {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, default_value = "base")]
        template: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: i64,
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        #[arg(long = "metadata", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
        /// Loopback-only network.
        #[arg(long)]
        no_internet: bool,
    },
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec {
        #[command(flatten)]
        remote: Remote,
        id: String,
        #[arg(long)]
        user: Option<String>,
        /// The command line, run with `bash -l -c`.
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Kill sandboxes.
    Kill {
        #[command(flatten)]
        remote: Remote,
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (it is shown only this once).
    Create {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, default_value = "cli")]
        name: String,
        /// The team the key acts for: it sees and changes only that team's sandboxes
        /// and templates.
        #[arg(long, default_value = kiln_server::store::DEFAULT_TEAM)]
        team: String,
        /// An operator's key: manages teams and keys and sees every team's resources.
        #[arg(long)]
        admin: bool,
    },
    /// List keys (prefixes only).
    List {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Revoke a key by id or prefix.
    Revoke {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
        key: String,
    },
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Create a team, with optional quotas.
    Create {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
        /// a-z, 0-9, '-' and '_', at most 64.
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Set a team's quotas (each one not given is removed).
    SetQuotas {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List teams and their quotas.
    List {
        #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct QuotaArgs {
    /// Sandboxes running at once.
    #[arg(long)]
    max_sandboxes: Option<u32>,
    /// MiB of memory across the team's running sandboxes.
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// CPUs across the team's running sandboxes.
    #[arg(long)]
    max_cpus: Option<u32>,
    /// MiB of disk across the team's templates.
    #[arg(long)]
    max_template_disk_mb: Option<u64>,
}

impl From<QuotaArgs> for kiln_server::store::Quotas {
    fn from(q: QuotaArgs) -> Self {
        kiln_server::store::Quotas {
            max_sandboxes: q.max_sandboxes,
            max_memory_mb: q.max_memory_mb,
            max_cpus: q.max_cpus,
            max_template_disk_mb: q.max_template_disk_mb,
        }
    }
}

pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Sandbox(cmd) => sandbox(cmd).await,
            Command::Keys(cmd) => keys(cmd),
            Command::Teams(cmd) => teams(cmd),
            Command::Template(cmd) => template(cmd).await,
            Command::RunCode(args) => code_cmd::run_code(args).await,
            Command::InstallPackage(args) => code_cmd::install(args).await,
            Command::EnvInfo(args) => code_cmd::env_info(args).await,
            Command::Mcp(args) => mcp(args).await,
            Command::Surf(args) => surf(args).await,
            Command::Doctor(args) => doctor::doctor(args),
            Command::Spell(cmd) => spell_cmd::spell(cmd).await,
        }
    })
}

/// Where kiln-jail and the guest binaries are when `--bin-dir` is not given: beside
/// the running `kiln`.
fn default_bin_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("locating the kiln binary")?
        .parent()
        .context("the kiln binary has no parent directory")?
        .to_path_buf())
}

/// The host checks of `kiln doctor`, before any runtime is set up: fixes what Kiln may
/// (the search bit above the data directory), prints what changed and the warnings,
/// and refuses to start on a FAIL, naming the fix.
fn preflight(args: &ServeArgs, bin_dir: &std::path::Path) -> Result<()> {
    // Made here (the server would make it anyway) so its own mode is checked too.
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let report = doctor::run(&doctor::Options {
        data_dir: &args.data_dir,
        bin_dir,
        runtime: args.runtime,
        runsc: args.runsc.as_deref(),
        runsc_platform: args.runsc_platform.as_deref(),
        builtins: &args.builtin_templates.0,
        fix: true,
        probe: false,
    });
    for change in &report.changes {
        eprintln!("{change}");
    }
    for check in report
        .checks
        .iter()
        .filter(|c| c.level == doctor::Level::Warn)
    {
        // Under `auto` the runtime's own fall-back warning says this, with the reason.
        if check.name == doctor::RUNSC && matches!(args.runtime, RuntimeChoice::Auto) {
            continue;
        }
        eprintln!("{check}");
    }
    let failures: Vec<String> = report.failures().map(|c| c.to_string()).collect();
    if failures.is_empty() {
        return Ok(());
    }
    bail!(
        "this host cannot run sandboxes:\n{}\n(`kiln doctor` runs every check again)",
        failures.join("\n")
    )
}

async fn serve(args: ServeArgs) -> Result<()> {
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => default_bin_dir()?,
    };
    preflight(&args, &bin_dir)?;
    let mut limits = kiln_server::LimitsConfig::from_env()?;
    if let Some(n) = args.pool_size {
        limits.pool_size = n;
    }
    let api_key = std::env::var("KILN_API_KEY").ok().filter(|k| !k.is_empty());
    // The firewall chains are host-wide and each runtime installs them: both get the
    // same list.
    let egress_allow = args.egress_allow.clone().map(|e| e.0).unwrap_or_default();
    let jail = || -> Result<Arc<dyn kiln_runtime::Runtime>> {
        let mut opts = kiln_runtime::jail::JailOptions::new(
            args.data_dir.join("sandboxes"),
            bin_dir.clone(),
            bin_dir.join("kiln-jail"),
        );
        opts.egress_allow = egress_allow.clone();
        Ok(Arc::new(
            kiln_runtime::jail::JailRuntime::new(opts).context("setting up the jail runtime")?,
        ))
    };
    let gvisor = || {
        let mut opts = kiln_runtime::gvisor::GvisorOptions::new(
            args.data_dir.join("sandboxes-gvisor"),
            bin_dir.clone(),
        );
        opts.runsc = args.runsc.clone();
        opts.platform = args.runsc_platform.clone();
        opts.egress_allow = egress_allow.clone();
        kiln_runtime::gvisor::GvisorRuntime::new(opts)
    };
    // The default runtime, then the other one when it can be set up too: templates may
    // ask for either (`runtime` in kiln.toml).
    let (default, other): (
        Arc<dyn kiln_runtime::Runtime>,
        Option<Arc<dyn kiln_runtime::Runtime>>,
    ) = match args.runtime {
        RuntimeChoice::Jail => (jail()?, gvisor().ok().map(|g| Arc::new(g) as _)),
        RuntimeChoice::Gvisor => (
            Arc::new(gvisor().context("setting up the gvisor runtime")?),
            jail().ok(),
        ),
        RuntimeChoice::Auto => match gvisor() {
            Ok(g) => {
                eprintln!("runtime auto: gVisor works on this host; using it");
                (Arc::new(g), jail().ok())
            }
            Err(e) => {
                eprintln!(
                        "WARNING: runtime auto: gVisor is not usable here ({e}); falling back to \
                         the jail, a container boundary (namespaces, cgroups, seccomp) that shares \
                         the host's kernel with every sandbox. Install runsc (scripts/install-deps.sh) \
                         for a user-space kernel between sandboxes and the host."
                    );
                (jail()?, None)
            }
        },
    };
    let runtime: Arc<dyn kiln_runtime::Runtime> = Arc::new(kiln_runtime::multi::MultiRuntime::new(
        default,
        other.into_iter().collect(),
    ));
    let config = kiln_server::ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        bin_dir,
        limits,
        domain: args.domain,
        api_key,
        builtins: args.builtin_templates.0,
        builds: kiln_server::BuildConfig::from_env()?,
        nats_url: args.nats_url.clone(),
        nats_team: std::env::var("KILN_NATS_TEAM")
            .ok()
            .filter(|t| !t.is_empty()),
        spells: kiln_server::spells::SpellLimits::from_env()?,
        egress_allow,
        egress_upstream_ca: args.egress_upstream_ca.clone(),
        sandbox_tls_listen: args.sandbox_tls_listen,
        tls_cert: args.tls_cert.clone().zip(args.tls_key.clone()),
        desktop_resolution: args.desktop_resolution,
        desktop_auth_token: view_token(args.desktop_auth_token)?,
    };
    kiln_server::serve(config, runtime)
        .await
        .map_err(anyhow::Error::from)
}

async fn sandbox(cmd: SandboxCommand) -> Result<()> {
    match cmd {
        SandboxCommand::List { remote, metadata } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let list = client.list(&metadata.into_iter().collect()).await?;
            println!(
                "{:<22} {:<12} {:<8} {:<26} METADATA",
                "ID", "TEMPLATE", "RUNTIME", "ENDS AT"
            );
            for s in list {
                let md: Vec<String> = s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<22} {:<12} {:<8} {:<26} {}",
                    s.sandbox_id,
                    s.template_id,
                    s.runtime.as_deref().unwrap_or("-"),
                    s.end_at.to_rfc3339(),
                    md.join(",")
                );
            }
            Ok(())
        }
        SandboxCommand::Create {
            remote,
            template,
            timeout,
            env,
            metadata,
            no_internet,
        } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let req = kiln_api::NewSandbox {
                template_id: template,
                timeout: Some(timeout),
                secure: Some(true),
                allow_internet_access: Some(!no_internet),
                metadata: Some(metadata.into_iter().collect::<BTreeMap<_, _>>()),
                env_vars: Some(env.into_iter().collect::<BTreeMap<_, _>>()),
                auto_pause: None,
                ..Default::default()
            };
            let sbx = client.create(&req).await?;
            println!("{}", sbx.sandbox_id);
            Ok(())
        }
        SandboxCommand::Exec {
            remote,
            id,
            user,
            command,
        } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let out = client
                .exec(
                    &id,
                    &command.join(" "),
                    user.as_deref(),
                    |event| match event {
                        ExecEvent::Stdout(b) => {
                            let mut o = std::io::stdout().lock();
                            let _ = o.write_all(&b);
                            let _ = o.flush();
                        }
                        ExecEvent::Stderr(b) => {
                            let _ = std::io::stderr().write_all(&b);
                        }
                        ExecEvent::Started { .. } => {}
                    },
                )
                .await?;
            if out.exit_code != 0 {
                if out.exit_code < 0 {
                    eprintln!("{}", out.status);
                }
                std::process::exit(out.exit_code.clamp(1, 255));
            }
            Ok(())
        }
        SandboxCommand::Kill { remote, ids } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let mut failed = false;
            for id in ids {
                match client.kill(&id).await {
                    Ok(()) => println!("killed {id}"),
                    Err(e) => {
                        eprintln!("{id}: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some sandboxes could not be killed");
            }
            Ok(())
        }
    }
}

fn keys(cmd: KeysCommand) -> Result<()> {
    use kiln_server::keys;
    use kiln_server::store::{SqliteStore, Store};
    let open = |dir: &PathBuf| -> Result<SqliteStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(SqliteStore::open(&dir.join("kiln.db"))?)
    };
    match cmd {
        KeysCommand::Create {
            data_dir,
            name,
            team,
            admin,
        } => {
            let store = open(&data_dir)?;
            let team = keys::team_id(&store, &team)?;
            let key = keys::generate();
            keys::register(&store, &name, &key, admin, team)?;
            println!("{key}");
        }
        KeysCommand::List { data_dir } => {
            let store = open(&data_dir)?;
            let teams = store.list_teams()?;
            println!(
                "{:<4} {:<16} {:<24} {:<16} {:<6} {:<26} STATUS",
                "ID", "PREFIX", "NAME", "TEAM", "ADMIN", "CREATED"
            );
            for k in store.list_keys()? {
                let team = teams
                    .iter()
                    .find(|t| t.id == k.team_id)
                    .map_or_else(|| k.team_id.to_string(), |t| t.name.clone());
                println!(
                    "{:<4} {:<16} {:<24} {:<16} {:<6} {:<26} {}",
                    k.id,
                    format!("{}…", k.prefix),
                    k.name,
                    team,
                    if k.admin { "yes" } else { "no" },
                    k.created_at.to_rfc3339(),
                    if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
        }
        KeysCommand::Revoke { data_dir, key } => {
            let store = open(&data_dir)?;
            let prefix = if key.starts_with(keys::KEY_PREFIX) && key.len() > 12 {
                keys::display_prefix(&key)
            } else {
                key.clone()
            };
            match store.revoke_key(&prefix)? {
                0 => bail!("no active key matches {key:?} (give a key id from `kiln keys list` or the key itself)"),
                n => println!("revoked {n} key(s)"),
            }
        }
    }
    Ok(())
}

fn teams(cmd: TeamsCommand) -> Result<()> {
    use kiln_server::store::{SqliteStore, Store};
    let open = |dir: &PathBuf| -> Result<SqliteStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(SqliteStore::open(&dir.join("kiln.db"))?)
    };
    let show = |q: Option<u64>| q.map_or_else(|| "-".to_string(), |v| v.to_string());
    match cmd {
        TeamsCommand::Create {
            data_dir,
            name,
            quotas,
        } => {
            kiln_server::admin_api::check_team_name(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
            let team = open(&data_dir)?.create_team(&name, quotas.into())?;
            println!("created team {} (id {})", team.name, team.id);
        }
        TeamsCommand::SetQuotas {
            data_dir,
            name,
            quotas,
        } => {
            let store = open(&data_dir)?;
            let team = kiln_server::keys::team_id(&store, &name)?;
            store.set_quotas(team, quotas.into())?;
            println!("quotas of {name} set");
        }
        TeamsCommand::List { data_dir } => {
            let store = open(&data_dir)?;
            println!(
                "{:<4} {:<24} {:>10} {:>12} {:>9} {:>14}",
                "ID", "NAME", "SANDBOXES", "MEMORY_MB", "CPUS", "TEMPLATE_MB"
            );
            for t in store.list_teams()? {
                let q = t.quotas;
                println!(
                    "{:<4} {:<24} {:>10} {:>12} {:>9} {:>14}",
                    t.id,
                    t.name,
                    show(q.max_sandboxes.map(u64::from)),
                    show(q.max_memory_mb),
                    show(q.max_cpus.map(u64::from)),
                    show(q.max_template_disk_mb),
                );
            }
        }
    }
    Ok(())
}

async fn template(cmd: TemplateCommand) -> Result<()> {
    match cmd {
        TemplateCommand::Build {
            remote,
            dir,
            name,
            skip_cache,
        } => {
            let project = kiln_template::dockerfile::load_project(&dir, name, skip_cache)?;
            let uploads: Vec<kiln_client::ContextUpload> = project
                .uploads
                .into_iter()
                .map(|u| kiln_client::ContextUpload {
                    files_hash: u.files_hash,
                    archive: u.archive,
                })
                .collect();
            for note in &project.recipe.skipped {
                eprintln!("note: Dockerfile {note}");
            }
            let client = Client::new(&remote.url, &remote.api_key);
            let mut progress = build_progress::BuildProgress::new();
            let build = client
                .start_template_build(
                    &project.name,
                    project.cpu_count,
                    project.memory_mb,
                    &project.recipe.spec,
                    &uploads,
                )
                .await?;
            // Ctrl-C cancels the build on the server rather than leaving it running.
            let outcome = tokio::select! {
                outcome = client.follow_build(&build, |e| progress.on_log(e)) => outcome,
                _ = tokio::signal::ctrl_c() => {
                    progress.finish(false);
                    client.cancel_build(&build.template_id, &build.build_id).await?;
                    eprintln!("cancelled");
                    std::process::exit(130);
                }
            };
            progress.finish(outcome.as_ref().is_ok_and(|o| o.status == "ready"));
            let outcome = outcome?;
            if outcome.status != "ready" {
                let (message, _) = outcome
                    .reason
                    .unwrap_or_else(|| ("the build failed".to_string(), None));
                bail!("building {} failed: {message}", project.name);
            }
            println!("{}", outcome.template_id);
            Ok(())
        }
        TemplateCommand::List { remote } => {
            let client = Client::new(&remote.url, &remote.api_key);
            println!("{:<32} {:>4} {:>8}  CREATED", "NAME", "CPU", "MEMORY");
            for t in client.list_templates().await? {
                println!(
                    "{:<32} {:>4} {:>6}Mi  {}",
                    t["templateID"].as_str().unwrap_or("?"),
                    t["cpuCount"],
                    t["memoryMB"],
                    t["createdAt"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        TemplateCommand::Rm { remote, names } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let mut failed = false;
            for name in names {
                match client.delete_template(&name).await {
                    Ok(()) => println!("removed {name}"),
                    Err(e) => {
                        eprintln!("{name}: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some templates could not be removed");
            }
            Ok(())
        }
        TemplateCommand::Image {
            data_dir,
            name,
            out,
            size_mb,
        } => {
            let store = kiln_template::TemplateStore::open(&data_dir)?;
            let Some(t) = store.get(&name)? else {
                bail!(
                    "no template {name:?} in {} (see `kiln template list`)",
                    data_dir.display()
                );
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.ext4")));
            let opts = kiln_template::image::Ext4Options::for_template(
                &name,
                size_mb.unwrap_or(t.meta.disk_size_mb),
            );
            let r = tokio::task::spawn_blocking(move || {
                kiln_template::image::write_ext4(&t.rootfs, &out, &opts).map(|r| (r, out))
            })
            .await??;
            let (report, out) = r;
            println!(
                "{}: ext4, {} MiB disk, {} inodes, {:.1} MiB of files",
                out.display(),
                report.size_mb,
                report.inodes,
                report.used_bytes as f64 / 1_048_576.0
            );
            Ok(())
        }
        TemplateCommand::Gc { remote, keep_days } => {
            let client = Client::new(&remote.url, &remote.api_key);
            let r = client.gc_templates(keep_days).await?;
            println!(
                "removed {} layers, {} uploads, {} images, {} Debian bases, {} leftovers; \
                 freed {:.1} MiB",
                r.removed_layers,
                r.removed_uploads,
                r.removed_images,
                r.removed_bases,
                r.removed_temporary,
                r.freed_bytes as f64 / 1_048_576.0
            );
            println!(
                "kept {} layers templates use, {} recently used entries",
                r.kept_layers, r.kept_recent
            );
            if r.failed > 0 {
                bail!(
                    "{} entries could not be removed (see the server log)",
                    r.failed
                );
            }
            Ok(())
        }
    }
}
