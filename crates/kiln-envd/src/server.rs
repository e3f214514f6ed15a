//! The HTTP/1.1 server: routes, middleware, and the Unix-socket (and optional dev TCP)
//! listeners.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use anyhow::Context as _;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::{TcpListener, UnixListener};

use crate::error::HttpError;
use crate::state::{AppState, Defaults};
use crate::users::UserFiles;
use crate::{auth, files, filesystem, process, system, tunnel, Args};

/// The full envd application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(system::routes())
        .merge(files::routes())
        .merge(process::routes())
        .merge(filesystem::routes())
        .merge(tunnel::routes())
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn(cors))
        // Uploads stream to disk; RPC extractors apply their own limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
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

/// Builds the initial state from the command line.
pub fn state_from_args(args: &Args) -> AppState {
    let defaults = Defaults {
        // Until the host's `/init` replaces it.
        env_vars: BTreeMap::from([("E2B_SANDBOX".to_owned(), "true".to_owned())]),
        access_token: None,
        user: args.default_user.clone(),
        workdir: args.default_workdir.clone(),
    };
    AppState::new(
        defaults,
        UserFiles {
            passwd: args.passwd_file.clone(),
            group: args.group_file.clone(),
        },
    )
}

/// Binds the Unix socket: parent created, a stale socket replaced, mode 0600.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let app = router(state_from_args(&args));
    let unix = bind_socket(&args.socket)?;
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
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}
