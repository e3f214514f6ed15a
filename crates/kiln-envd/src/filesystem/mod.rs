//! `filesystem.Filesystem`: stat, list, make, move, remove, watch (spec §5.3).

pub mod entry;
pub mod meta_store;
pub mod watch;
pub mod xattr;

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use kiln_proto::connect::ConnectError;
use kiln_proto::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, Empty, EntryResponse, GetWatcherEventsRequest,
    GetWatcherEventsResponse, ListDirRequest, ListDirResponse, MakeDirRequest, MoveRequest,
    RemoveRequest, RemoveResponse, RemoveWatcherRequest, RemoveWatcherResponse, StatRequest,
    WatchDirRequest, WatchDirResponse,
};
use tokio::sync::mpsc;

use self::entry::entry_info;
use self::watch::{Watch, WatcherTable};
use crate::paths::PathError;
use crate::rpc::{
    stream_error, EventStream, RpcContext, RpcError, StreamRequest, Unary, UnaryResult,
};
use crate::state::{Identity, Sandbox};
use crate::users::UsersError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    User(#[from] UsersError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("file not found: '{0}'")]
    NotFound(PathBuf),
    #[error("path '{0}' is not a directory")]
    NotADirectory(PathBuf),
    #[error("path '{0}' contains a symlink loop")]
    SymlinkLoop(PathBuf),
    #[error("directory '{0}' already exists")]
    DirExists(PathBuf),
    #[error("path '{0}' already exists but is not a directory")]
    ExistsNotDirectory(PathBuf),
    #[error("path '{0}' is on a network filesystem; set allow_network_mounts to watch it")]
    NetworkMount(PathBuf),
    #[error("watcher '{0}' not found")]
    WatcherNotFound(String),
    #[error("permission denied: {op} '{path}'")]
    PermissionDenied { op: &'static str, path: PathBuf },
    #[error("{op} '{path}'")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("watcher error: {0}")]
    Watch(String),
}

impl FsError {
    /// Classifies an I/O error on `path`.
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => Self::NotFound(path.to_owned()),
            io::ErrorKind::PermissionDenied => Self::PermissionDenied {
                op,
                path: path.to_owned(),
            },
            _ if source.raw_os_error() == Some(libc::ELOOP) => Self::SymlinkLoop(path.to_owned()),
            _ => Self::Io {
                op,
                path: path.to_owned(),
                source,
            },
        }
    }
}

impl From<FsError> for ConnectError {
    fn from(e: FsError) -> Self {
        let message = crate::error::chain(&e);
        match e {
            FsError::User(UsersError::UnknownUser(_)) => ConnectError::unauthenticated(message),
            FsError::Path(_)
            | FsError::NotADirectory(_)
            | FsError::ExistsNotDirectory(_)
            | FsError::NetworkMount(_) => ConnectError::invalid_argument(message),
            FsError::NotFound(_) | FsError::WatcherNotFound(_) => ConnectError::not_found(message),
            FsError::SymlinkLoop(_) => ConnectError::failed_precondition(message),
            FsError::DirExists(_) => ConnectError::already_exists(message),
            FsError::PermissionDenied { .. } => {
                ConnectError::new(kiln_proto::Code::PermissionDenied, message)
            }
            FsError::User(_) | FsError::Io { .. } | FsError::Watch(_) => {
                ConnectError::internal(message)
            }
        }
    }
}

impl From<FsError> for RpcError {
    fn from(e: FsError) -> Self {
        Self(e.into())
    }
}

/// What the `filesystem.Filesystem` handlers share: the sandbox and this service's
/// polled watchers, which nothing else uses.
#[derive(Clone)]
struct Service {
    sandbox: Sandbox,
    watchers: Arc<WatcherTable>,
}

/// The `filesystem.Filesystem` routes over a new, empty watcher table.
pub fn routes(sandbox: Sandbox) -> Router {
    let service = Service {
        sandbox,
        watchers: Arc::new(WatcherTable::default()),
    };
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(get_watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
        .with_state(service)
}

fn identity(state: &Service, ctx: &RpcContext) -> Result<Identity, FsError> {
    Ok(state.sandbox.identity(ctx.user.as_deref())?)
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FsError::Watch(format!("filesystem task failed: {e}")))?
}

async fn stat(
    State(state): State<Service>,
    ctx: RpcContext,
    Unary(req): Unary<StatRequest>,
) -> UnaryResult<EntryResponse> {
    let id = identity(&state, &ctx)?;
    let path = id.resolve(&req.path).map_err(FsError::from)?;
    let users = state.sandbox.user_db();
    let entry =
        blocking(move || entry_info(&path, &users).map_err(|e| FsError::io("stat", &path, e)))
            .await?;
    Ok(Unary(EntryResponse { entry: Some(entry) }))
}

/// Creates `path` and missing parents (mode 0755), chowning each new directory to
/// `uid:gid`. Returns whether anything was created.
pub fn ensure_dirs(path: &Path, uid: u32, gid: u32) -> io::Result<bool> {
    let mut missing = Vec::new();
    let mut cursor = Some(path);
    while let Some(dir) = cursor {
        match std::fs::symlink_metadata(dir) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(dir),
            Err(e) => return Err(e),
        }
        cursor = dir.parent();
    }
    for dir in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    }
    Ok(!missing.is_empty())
}

async fn make_dir(
    State(state): State<Service>,
    ctx: RpcContext,
    Unary(req): Unary<MakeDirRequest>,
) -> UnaryResult<EntryResponse> {
    let id = identity(&state, &ctx)?;
    let path = id.resolve(&req.path).map_err(FsError::from)?;
    let users = state.sandbox.user_db();
    let entry = blocking(move || {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => return Err(FsError::DirExists(path)),
            Ok(_) => return Err(FsError::ExistsNotDirectory(path)),
            Err(_) => {}
        }
        ensure_dirs(&path, id.user.uid, id.user.gid)
            .map_err(|e| FsError::io("creating directory", &path, e))?;
        entry_info(&path, &users).map_err(|e| FsError::io("stat", &path, e))
    })
    .await?;
    Ok(Unary(EntryResponse { entry: Some(entry) }))
}

async fn move_entry(
    State(state): State<Service>,
    ctx: RpcContext,
    Unary(req): Unary<MoveRequest>,
) -> UnaryResult<EntryResponse> {
    let id = identity(&state, &ctx)?;
    let source = id.resolve(&req.source).map_err(FsError::from)?;
    let destination = id.resolve(&req.destination).map_err(FsError::from)?;
    let users = state.sandbox.user_db();
    let entry = blocking(move || {
        std::fs::symlink_metadata(&source).map_err(|e| FsError::io("stat", &source, e))?;
        if let Some(parent) = destination.parent() {
            ensure_dirs(parent, id.user.uid, id.user.gid)
                .map_err(|e| FsError::io("creating directory", parent, e))?;
        }
        std::fs::rename(&source, &destination).map_err(|e| FsError::io("renaming", &source, e))?;
        xattr::moved(&source, &destination);
        entry_info(&destination, &users).map_err(|e| FsError::io("stat", &destination, e))
    })
    .await?;
    Ok(Unary(EntryResponse { entry: Some(entry) }))
}

async fn list_dir(
    State(state): State<Service>,
    ctx: RpcContext,
    Unary(req): Unary<ListDirRequest>,
) -> UnaryResult<ListDirResponse> {
    let id = identity(&state, &ctx)?;
    let shown = id.resolve(&req.path).map_err(FsError::from)?;
    let users = state.sandbox.user_db();
    let entries = blocking(move || {
        let real =
            std::fs::canonicalize(&shown).map_err(|e| FsError::io("resolving", &shown, e))?;
        let meta = std::fs::metadata(&real).map_err(|e| FsError::io("stat", &shown, e))?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(shown));
        }
        entry::walk(&real, &shown, req.depth, &users).map_err(|e| FsError::io("listing", &shown, e))
    })
    .await?;
    Ok(Unary(ListDirResponse { entries }))
}

async fn remove(
    State(state): State<Service>,
    ctx: RpcContext,
    Unary(req): Unary<RemoveRequest>,
) -> UnaryResult<RemoveResponse> {
    let id = identity(&state, &ctx)?;
    let path = id.resolve(&req.path).map_err(FsError::from)?;
    blocking(move || {
        let result = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) => Err(e),
        };
        if result.is_ok() {
            xattr::removed(&path);
        }
        match result {
            // Removing what is not there is success.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(|e| FsError::io("removing", &path, e)),
        }
    })
    .await?;
    Ok(Unary(RemoveResponse {}))
}

/// Validates a watch request and starts the inotify watch.
fn start_watch(state: &Service, ctx: &RpcContext, req: &WatchDirRequest) -> Result<Watch, FsError> {
    let id = identity(state, ctx)?;
    let path = id.resolve(&req.path)?;
    let meta = std::fs::metadata(&path).map_err(|e| FsError::io("stat", &path, e))?;
    if !meta.is_dir() {
        return Err(FsError::NotADirectory(path));
    }
    if !req.allow_network_mounts && watch::is_network_fs(&path) {
        return Err(FsError::NetworkMount(path));
    }
    Watch::new(
        path,
        req.recursive,
        req.include_entry,
        state.sandbox.user_db(),
    )
}

async fn watch_dir(
    State(state): State<Service>,
    ctx: RpcContext,
    StreamRequest(req): StreamRequest<WatchDirRequest>,
) -> Response {
    let mut watch = match start_watch(&state, &ctx, &req) {
        Ok(w) => w,
        Err(e) => return stream_error(e.into()),
    };
    let (tx, rx) = mpsc::channel(64);
    let _ = tx.try_send(Ok(WatchDirResponse::Start(Empty {})));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                next = watch.next() => match next {
                    Ok(event) => {
                        if tx.send(Ok(WatchDirResponse::Filesystem(event))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                },
            }
        }
    });
    EventStream {
        rx,
        keepalive: Some((ctx.keepalive, WatchDirResponse::Keepalive(Empty {}))),
        deadline: ctx.deadline(),
    }
    .into_response()
}

async fn create_watcher(
    State(state): State<Service>,
    ctx: RpcContext,
    Unary(req): Unary<CreateWatcherRequest>,
) -> UnaryResult<CreateWatcherResponse> {
    let watch = start_watch(&state, &ctx, &req)?;
    Ok(Unary(CreateWatcherResponse {
        watcher_id: state.watchers.create(watch),
    }))
}

async fn get_watcher_events(
    State(state): State<Service>,
    Unary(req): Unary<GetWatcherEventsRequest>,
) -> UnaryResult<GetWatcherEventsResponse> {
    let events = state.watchers.take_events(&req.watcher_id)?;
    Ok(Unary(GetWatcherEventsResponse { events }))
}

async fn remove_watcher(
    State(state): State<Service>,
    Unary(req): Unary<RemoveWatcherRequest>,
) -> UnaryResult<RemoveWatcherResponse> {
    state.watchers.remove(&req.watcher_id)?;
    Ok(Unary(RemoveWatcherResponse {}))
}
