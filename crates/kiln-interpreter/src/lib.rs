//! `kiln-interpreter`: E2B's code-interpreter server (port 49999 in a sandbox) over real
//! Jupyter kernels, so the unmodified `e2b-code-interpreter` SDKs work against Kiln.
//!
//! Unlike E2B's reference (a FastAPI server in front of a Jupyter server), this binary
//! launches the kernels itself from their kernelspecs and speaks the Jupyter wire
//! protocol over ZeroMQ (`jupyter-zmq-client`, pure Rust): no Jupyter server, no Python
//! in the server, one static binary.
//!
//! Code map:
//! - [`server`]: routes and CORS; [`error`]: plain-text HTTP errors.
//! - [`report`]: an error with its whole cause chain, for logs and messages.
//! - [`context`]: contexts and the registry (default context per language).
//! - [`execute`]: one `/execute` run: env vars, NDJSON lines, keepalive, interrupt.
//! - [`kernel`]: a kernel process, its sockets and message router; [`kernelspec`]: discovery.
//! - [`output`]: NDJSON line and Result shapes; [`language`]: names and env snippets.
//! - [`envd`]: sandbox-level env vars from envd's `GET /envs`.
//! - [`tslab`]: the script preloaded into JavaScript/TypeScript (tslab) kernels.
//!
//! Tests: unit tests beside the code; `tests/api.rs` starts the binary against a real
//! ipykernel (skips without one, fails under `CI`); `tests/sdk_smoke.py` drives it with the
//! official Python SDK.

pub mod context;
pub mod envd;
pub mod error;
pub mod execute;
pub mod kernel;
pub mod kernelspec;
pub mod language;
pub mod output;
pub mod report;
pub mod server;
pub mod tslab;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::context::{Launcher, Registry};
use crate::envd::EnvdTarget;
use crate::execute::ExecSettings;
use crate::kernel::LaunchOptions;
use crate::kernelspec::SearchPath;
use crate::language::Language;

/// Command-line flags of `kiln-interpreter`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kiln-interpreter",
    version,
    about = "Kiln code interpreter (E2B code-interpreter protocol over Jupyter kernels)"
)]
pub struct Args {
    /// Address to serve on (inside the sandbox's network namespace; the host reaches it
    /// through envd's tunnel).
    #[arg(long, default_value = "0.0.0.0:49999")]
    pub listen: SocketAddr,

    /// Languages whose default context is started before serving, comma-separated (a
    /// language without an installed kernel is skipped with a log line). Empty: none.
    /// `/health` answers once they are ready, so a sandbox's first run_code is fast.
    #[arg(long, value_delimiter = ',', default_value = "python")]
    pub warm: Vec<String>,

    /// Languages whose default context is started in the background once the server
    /// listens, comma-separated; a run in one of them meanwhile waits for it. For
    /// kernels too slow to hold up a sandbox's readiness: tslab's JavaScript kernel
    /// takes seconds (its TypeScript compiler). Empty: none.
    #[arg(long, value_delimiter = ',', default_value = "javascript")]
    pub warm_background: Vec<String>,

    /// Working directory of contexts created without one.
    #[arg(long, default_value = "/home/user")]
    pub default_cwd: String,

    /// Extra Jupyter data dir (holding `kernels/`) or kernels dir, searched first.
    /// Repeatable. `JUPYTER_PATH`, `~/.local/share/jupyter`, `<prefix>/share/jupyter` of
    /// every `PATH` entry and the system dirs are always searched.
    #[arg(long = "kernelspec-dir", value_name = "DIR")]
    pub kernelspec_dirs: Vec<PathBuf>,

    /// Where sandbox-level env vars come from: `unix:PATH` (Kiln envd socket),
    /// `http://HOST:PORT`, or `off`.
    #[arg(long, default_value = "unix:/run/kiln/envd.sock")]
    pub envd: EnvdTarget,

    /// Directory for kernel connection files (they hold the kernels' HMAC keys).
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,

    /// Keepalive line interval while a cell is silent, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub keepalive_ms: u64,

    /// Longest a cell may run, in seconds, before the server interrupts it (0: no limit;
    /// the SDK's own `timeout` works by disconnecting, which also interrupts).
    #[arg(long, default_value_t = 0)]
    pub max_execution_secs: u64,

    /// After an interrupt, seconds the kernel has to go idle before it is killed and
    /// replaced.
    #[arg(long, default_value_t = 10)]
    pub interrupt_grace_secs: u64,

    /// Seconds a kernel may take to start.
    #[arg(long, default_value_t = 60)]
    pub kernel_startup_secs: u64,

    /// Do not run Kiln's setup cell in new Python kernels (E2B data/chart/JSON formats,
    /// plain tracebacks, PIL display), e.g. when the template's IPython profile does it.
    #[arg(long)]
    pub no_python_setup: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let search = SearchPath::from_env(&args.kernelspec_dirs);
    let kernels: Vec<String> = search
        .list()
        .await
        .into_iter()
        .map(|k| k.kernel_name)
        .collect();
    tracing::info!(?kernels, "kernelspecs found");
    let runtime_dir = args
        .runtime_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-interpreter"));
    let tslab_preload = match tslab::install(&runtime_dir) {
        Ok(path) => Some(path),
        Err(e) => {
            // JavaScript still runs, with tslab's own (less E2B-like) results and errors.
            tracing::warn!(error = %report::chain(&e), "JavaScript kernels start without Kiln's tslab preload");
            None
        }
    };
    let launcher = Launcher {
        search,
        options: LaunchOptions {
            runtime_dir,
            startup_timeout: Duration::from_secs(args.kernel_startup_secs.max(1)),
        },
        python_setup: !args.no_python_setup,
        tslab_preload,
    };
    let registry = Arc::new(Registry::new(launcher, args.default_cwd.clone()));
    let settings = Arc::new(ExecSettings {
        keepalive: Duration::from_millis(args.keepalive_ms.max(100)),
        max_duration: (args.max_execution_secs > 0)
            .then(|| Duration::from_secs(args.max_execution_secs)),
        interrupt_grace: Duration::from_secs(args.interrupt_grace_secs.max(1)),
        envd: args.envd.clone(),
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // Warm before serving: `/health` answering means the first run_code is fast.
    warm(&registry, &args.warm).await;
    tracing::info!(addr = %listener.local_addr()?, "kiln-interpreter listening");
    // Announced before serving, so a list of contexts waits for them.
    let announced: Vec<_> = args
        .warm_background
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Language::normalize(Some(l)))
        .filter_map(|l| registry.announce_default(&l).map(|gate| (l, gate)))
        .collect();
    tokio::spawn({
        let registry = registry.clone();
        async move { warm_announced(&registry, announced).await }
    });
    let app = server::router(server::AppState {
        registry: registry.clone(),
        settings,
    });
    let on_signal = {
        let registry = registry.clone();
        async move {
            shutdown_signal().await;
            // Kernels first: their running cells then end (ContextRestarting), which
            // lets the graceful shutdown finish instead of waiting on open streams.
            registry.shutdown_all().await;
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(on_signal)
        .await
        .context("serving")?;
    registry.shutdown_all().await;
    Ok(())
}

/// Starts the default context of each of `languages`, one after another (they compete
/// for the same CPUs), logging how long each took.
async fn warm(registry: &Registry, languages: &[String]) {
    let announced = languages
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Language::normalize(Some(l)))
        .filter_map(|l| registry.announce_default(&l).map(|gate| (l, gate)))
        .collect();
    warm_announced(registry, announced).await;
}

async fn warm_announced(
    registry: &Registry,
    announced: Vec<(Language, tokio::sync::OwnedMutexGuard<()>)>,
) {
    for (language, gate) in announced {
        let started = std::time::Instant::now();
        match registry.default_held(&language, gate).await {
            Ok(context) => {
                tracing::info!(%language, context = %context.id, ms = started.elapsed().as_millis() as u64, "default context ready")
            }
            Err(context::ContextError::NoKernel(e)) => {
                tracing::info!(%language, reason = %e, "default context not started")
            }
            Err(e) => {
                tracing::warn!(%language, error = %report::chain(&e), "default context not started")
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
