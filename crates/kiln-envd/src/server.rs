//! The HTTP/1.1 server: routes, middleware, and the Unix-socket (quiescing, see
//! [`quiesce`]) and optional dev TCP listeners.

use std::collections::BTreeMap;

use anyhow::Context as _;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;

use crate::error::HttpError;
use crate::quiesce::{self, QuiescingListener};
use crate::state::{Defaults, Sandbox};
use crate::users::UserFiles;
use crate::{auth, files, filesystem, process, system, tunnel, Args};

/// The full envd application. Each service gets the sandbox and keeps its own tables
/// (processes, watchers), which live as long as the router and its clones.
pub fn router(sandbox: Sandbox) -> Router {
    Router::new()
        .merge(system::routes(sandbox.clone()))
        .merge(files::routes(sandbox.clone()))
        .merge(process::routes(sandbox.clone()))
        .merge(filesystem::routes(sandbox.clone()))
        .merge(tunnel::routes())
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(sandbox, auth::require_token))
        .layer(middleware::from_fn(cors))
        // Uploads stream to disk; RPC extractors apply their own limit.
        .layer(DefaultBodyLimit::disable())
}

async fn fallback(method: Method, uri: axum::http::Uri) -> HttpError {
    HttpError::not_found(format!("no route for {method} {}", uri.path()))
}

/// Permissive CORS, as envd has (browser SDKs call envd directly).
async fn cors(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    let star = HeaderValue::from_static("*");
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, star.clone());
    if preflight {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, star.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, star);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("7200"),
        );
    } else {
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(
                "Connect-Protocol-Version, Connect-Timeout-Ms, Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, X-Envd-Version",
            ),
        );
    }
    response
}

/// Builds the initial sandbox state from the command line.
pub fn sandbox_from_args(args: &Args) -> Sandbox {
    let defaults = Defaults {
        // Until the host's `/init` replaces it.
        env_vars: BTreeMap::from([("E2B_SANDBOX".to_owned(), "true".to_owned())]),
        access_token: None,
        user: args.default_user.clone(),
        workdir: args.default_workdir.clone(),
    };
    Sandbox::new(
        defaults,
        UserFiles {
            passwd: args.passwd_file.clone(),
            group: args.group_file.clone(),
        },
    )
}

/// How long a quiesce waits for accepted connections to close before it reports
/// them (they close at once unless a handler ignores its connection).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves until SIGTERM or SIGINT; SIGUSR1/SIGUSR2 quiesce and resume the Unix socket
/// around a checkpoint ([`quiesce`]).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let app = router(sandbox_from_args(&args));
    let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
    // Handlers first: a SIGUSR1 must never find the default action (exit).
    quiesce::forward_signals(control_tx).context("installing SIGUSR1/SIGUSR2 handlers")?;
    let unix = QuiescingListener::bind(&args.socket, control_rx, DRAIN_TIMEOUT)?;
    let pid_file = quiesce::pid_path(&args.socket);
    // The pid file tells the host this envd can quiesce, and whom to signal.
    if let Err(e) =
        quiesce::write_atomically(&pid_file, format!("{}\n", std::process::id()).as_bytes())
    {
        tracing::warn!(path = %pid_file.display(), error = %e, "cannot write the pid file; the host will not be able to checkpoint this sandbox");
    }
    tracing::info!(socket = %args.socket.display(), version = kiln_proto::envd::ENVD_VERSION, "kiln-envd listening");
    let mut servers = tokio::task::JoinSet::new();
    {
        let app = app.clone();
        servers.spawn(async move { axum::serve(unix, app).await.context("unix socket server") });
    }
    if let Some(addr) = args.listen_tcp {
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding tcp {addr}"))?;
        let local = tcp.local_addr()?;
        tracing::warn!(addr = %local, "ALSO listening on TCP (development only; do not use in sandboxes)");
        servers.spawn(async move { axum::serve(tcp, app).await.context("tcp server") });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM; exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT; exiting"),
        Some(result) = servers.join_next() => {
            result.context("server task panicked")??;
        }
    }
    for path in [
        args.socket.clone(),
        pid_file,
        quiesce::marker_path(&args.socket),
    ] {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
