//! The in-sandbox daemon: E2B's envd protocol (processes, PTYs, files, watch) plus Kiln's
//! TCP tunnel, served over HTTP/1.1 on a Unix socket.
//!
//! Code map:
//! - [`server`]: router, listeners, access-token and CORS middleware.
//! - [`rpc`]: the Connect server side (unary and streaming replies, keepalives).
//! - [`process`]: `process.Process` (spawn, PTY, subscribers, signals).
//! - [`filesystem`]: `filesystem.Filesystem` (entries, listing, watchers).
//! - [`files`]: `GET/POST /files`. [`system`]: `/health`, `/init`, `/envs`, `/metrics`.
//! - [`tunnel`]: `GET /_kiln/tunnel/{port}` upgrades to a raw TCP stream.
//! - [`quiesce`]: SIGUSR1/SIGUSR2 let go of the socket and every connection around a
//!   gVisor checkpoint, and bind it again after the restore.
//! - [`users`], [`paths`], [`env`], [`auth`]: identity, path and environment rules.
//! - [`state`]: what every handler shares (the `/init` defaults, the user database);
//!   the process and watcher tables belong to their services.
//!
//! Top-level modules form no cycle (`scripts/check-module-cycles`): handlers depend on
//! [`state`] and [`rpc`], never the other way round.
//!
//! Tests: unit tests beside the code; `tests/*.rs` start the real binary on a temporary
//! socket (unprivileged, except one root-tier test of the uid/gid/groups switch, which
//! says SKIP without root); `tests/sdk_debug_smoke.py` drives a dev TCP listener with the
//! official E2B Python SDK (see its docstring).

pub mod auth;
pub mod env;
pub mod error;
pub mod files;
pub mod filesystem;
pub mod paths;
pub mod process;
pub mod quiesce;
pub mod rpc;
pub mod server;
pub mod state;
pub mod system;
pub mod tunnel;
pub mod users;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use server::run;

/// Command-line flags of `kiln-envd`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kiln-envd",
    version,
    about = "Kiln in-sandbox daemon (E2B envd protocol)"
)]
pub struct Args {
    /// Unix socket to serve on (parent directories are created, a stale socket is
    /// replaced, the socket is made mode 0600).
    #[arg(long, default_value = kiln_proto::envd::DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,

    /// ALSO serve on this TCP address. For development and tests only: off by default,
    /// never use it in a sandbox (anything on the network could drive envd).
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<SocketAddr>,

    /// User that requests without an explicit user run as (until `POST /init` changes it).
    #[arg(long, default_value = "user")]
    pub default_user: String,

    /// Working directory for an empty path or cwd (default: the user's home).
    #[arg(long)]
    pub default_workdir: Option<String>,

    /// passwd database to resolve users from (read on every lookup; NSS is not used).
    #[arg(long, default_value = "/etc/passwd")]
    pub passwd_file: PathBuf,

    /// group database for supplementary groups and group names.
    #[arg(long, default_value = "/etc/group")]
    pub group_file: PathBuf,
}
