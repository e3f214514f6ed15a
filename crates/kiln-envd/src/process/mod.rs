//! `process.Process`: start commands and PTYs, stream their output, send input and
//! signals (spec §5.1).

pub mod pty;
pub mod registry;
pub mod spawn;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use kiln_proto::connect::{ConnectError, EnvelopeDecoder};
use kiln_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, DataEvent, KeepAlive, ListRequest,
    ListResponse, ProcessEvent, ProcessInput, ProcessSelector, SendInputRequest, SendInputResponse,
    SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse, StreamInputRequest,
    StreamInputResponse, UpdateRequest, UpdateResponse,
};
use nix::sys::signal::Signal as NixSignal;
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use tokio::time::Instant;

use self::pty::{PtyMaster, WinSize};
use self::registry::{Process, ProcessTable, Subscription};
use self::spawn::{Output, SpawnError, SpawnSpec};
use crate::paths::PathError;
use crate::rpc::{
    stream_error, stream_of, EventStream, RpcContext, StreamRequest, Unary, UnaryResult,
    MAX_MESSAGE_BYTES,
};
use crate::state::Sandbox;
use crate::users::UsersError;

/// Pipe output is read in chunks of up to this many bytes.
pub const PIPE_CHUNK: usize = 32 * 1024;
/// PTY output is read in chunks of up to this many bytes.
pub const PTY_CHUNK: usize = 16 * 1024;
/// PTY size when `Start` gives none.
const DEFAULT_PTY_SIZE: WinSize = WinSize { cols: 80, rows: 24 };

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    User(#[from] UsersError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("process config is required")]
    MissingConfig,
    #[error("process selector is required")]
    MissingSelector,
    #[error("cwd '{0}' does not exist")]
    CwdMissing(PathBuf),
    #[error("cwd '{0}' is not a directory")]
    CwdNotDirectory(PathBuf),
    #[error("process with {0} not found")]
    NotFound(ProcessSelector),
    #[error("error starting process")]
    Spawn(#[from] SpawnError),
    #[error("stdin is not enabled for this process (started with stdin=false) or was closed")]
    NoStdin,
    #[error("process is a PTY: send input as `pty` data")]
    StdinOnPty,
    #[error("process is not a PTY")]
    NotPty,
    #[error("cannot close stdin of a PTY process; send Ctrl-D (0x04) instead")]
    CloseStdinOnPty,
    #[error("signal {} is not supported: use SIGNAL_SIGKILL or SIGNAL_SIGTERM", .0.as_str())]
    UnsupportedSignal(Signal),
    #[error("sending signal to pid {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("writing input")]
    Input(#[source] std::io::Error),
    #[error("resizing pty")]
    Resize(#[source] std::io::Error),
    #[error("invalid input stream: {0}")]
    BadStream(String),
}

impl From<ProcessError> for ConnectError {
    fn from(e: ProcessError) -> Self {
        let message = crate::error::chain(&e);
        match e {
            ProcessError::User(UsersError::UnknownUser(_)) => {
                ConnectError::unauthenticated(message)
            }
            ProcessError::Path(_)
            | ProcessError::MissingConfig
            | ProcessError::MissingSelector
            | ProcessError::CwdMissing(_)
            | ProcessError::CwdNotDirectory(_)
            | ProcessError::BadStream(_) => ConnectError::invalid_argument(message),
            ProcessError::NotFound(_) => ConnectError::not_found(message),
            ProcessError::UnsupportedSignal(_) => ConnectError::unimplemented(message),
            ProcessError::CloseStdinOnPty => ConnectError::unknown(message),
            ProcessError::User(_)
            | ProcessError::Spawn(_)
            | ProcessError::NoStdin
            | ProcessError::StdinOnPty
            | ProcessError::NotPty
            | ProcessError::Signal { .. }
            | ProcessError::Input(_)
            | ProcessError::Resize(_) => ConnectError::internal(message),
        }
    }
}

impl From<ProcessError> for crate::rpc::RpcError {
    fn from(e: ProcessError) -> Self {
        Self(e.into())
    }
}

/// What the `process.Process` handlers share: the sandbox and this service's process
/// table, which nothing else uses.
#[derive(Clone)]
struct Service {
    sandbox: Sandbox,
    processes: Arc<ProcessTable>,
}

/// The `process.Process` routes over a new, empty process table.
pub fn routes(sandbox: Sandbox) -> Router {
    let service = Service {
        sandbox,
        processes: Arc::new(ProcessTable::default()),
    };
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/Update", post(update))
        .with_state(service)
}

fn keepalive() -> StartResponse {
    StartResponse {
        event: ProcessEvent::Keepalive(KeepAlive {}),
    }
}

async fn start(
    State(state): State<Service>,
    ctx: RpcContext,
    StreamRequest(req): StreamRequest<StartRequest>,
) -> Response {
    // `Connect-Timeout-Ms` bounds the process (`supervise` kills it then) and the
    // stream, which ends with `deadline_exceeded`, as E2B's envd does: the SDK raises
    // its TimeoutException rather than reporting a killed process. One instant for
    // both, so the kill's end event always comes after the stream's deadline.
    let deadline = ctx.deadline();
    match start_process(&state, &ctx, req, deadline) {
        Ok(rx) => EventStream {
            rx,
            keepalive: Some((ctx.keepalive, keepalive())),
            deadline,
        }
        .into_response(),
        Err(e) => stream_error(e.into()),
    }
}

fn start_process(
    state: &Service,
    ctx: &RpcContext,
    req: StartRequest,
    deadline: Option<Instant>,
) -> Result<Subscription, ProcessError> {
    let config = req.process.ok_or(ProcessError::MissingConfig)?;
    let identity = state.sandbox.identity(ctx.user.as_deref())?;
    let cwd = identity.resolve(config.cwd.as_deref().unwrap_or(""))?;
    match std::fs::metadata(&cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(ProcessError::CwdNotDirectory(cwd)),
        Err(_) => return Err(ProcessError::CwdMissing(cwd)),
    }
    let defaults = state.sandbox.defaults();
    let env = crate::env::build(
        state.sandbox.envd_path.as_deref(),
        &identity.user,
        &defaults.env_vars,
        &config.envs,
    );
    let pty = req.pty.map(|pty| {
        pty.size
            .map_or(DEFAULT_PTY_SIZE, |s| WinSize::new(s.cols, s.rows))
    });
    let spec = SpawnSpec {
        cmd: config.cmd.clone(),
        args: config.args.clone(),
        env,
        cwd,
        uid: identity.user.uid,
        gid: identity.user.gid,
        groups: state.sandbox.user_db().groups_of(&identity.user),
        stdin: req.stdin.unwrap_or(true),
        pty,
    };
    let spawned = spawn::spawn(spec)?;
    let process = Arc::new(Process::new(spawned.pid, req.tag, config, spawned.input));
    tracing::info!(pid = process.pid, cmd = %process.config.cmd, user = %identity.user.name, pty = process.is_pty(), "process started");
    // Subscribe before any output is read, so the Start stream sees all of it.
    let rx = process.subscribe();
    state.processes.insert(process.clone());
    tokio::spawn(supervise(
        state.processes.clone(),
        process,
        spawned.child,
        spawned.output,
        deadline,
    ));
    Ok(rx)
}

/// Pumps output, enforces the lifetime deadline, reaps the child and publishes `end`.
async fn supervise(
    table: Arc<ProcessTable>,
    process: Arc<Process>,
    mut child: Child,
    output: Output,
    deadline: Option<Instant>,
) {
    let readers = match output {
        Output::Pipes { stdout, stderr } => vec![
            tokio::spawn(pump_pipe(process.clone(), stdout, DataEvent::Stdout)),
            tokio::spawn(pump_pipe(process.clone(), stderr, DataEvent::Stderr)),
        ],
        Output::Pty(master) => vec![tokio::spawn(pump_pty(process.clone(), master))],
    };
    let work = async {
        let status = child.wait().await;
        for reader in readers {
            let _ = reader.await;
        }
        status
    };
    tokio::pin!(work);
    let status = match deadline {
        None => work.await,
        Some(deadline) => tokio::select! {
            status = &mut work => status,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(pid = process.pid, "process deadline (Connect-Timeout-Ms) reached; killing");
                signal_group(process.pid, NixSignal::SIGKILL).ok();
                process.stop_output.cancel();
                work.await
            }
        },
    };
    let end = match status {
        Ok(status) => status::end_event(status),
        Err(e) => status::wait_failed(&e),
    };
    tracing::info!(pid = process.pid, status = %end.status, "process ended");
    process.finish(end);
    // The pipe is useless now; close it rather than keep it for the retention period.
    process.stdin.lock().await.take();
    table.retire(&process);
}

async fn pump_pipe<R: AsyncRead + Unpin>(
    process: Arc<Process>,
    mut reader: R,
    wrap: fn(Vec<u8>) -> DataEvent,
) {
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            _ = process.stop_output.cancelled() => return,
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        let event = ProcessEvent::Data(wrap(buf[..n].to_vec()));
        tokio::select! {
            biased;
            _ = process.stop_output.cancelled() => return,
            _ = process.publish(event) => {}
        }
    }
}

async fn pump_pty(process: Arc<Process>, master: Arc<PtyMaster>) {
    let mut buf = vec![0u8; PTY_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            _ = process.stop_output.cancelled() => return,
            read = master.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        let event = ProcessEvent::Data(DataEvent::Pty(buf[..n].to_vec()));
        tokio::select! {
            biased;
            _ = process.stop_output.cancelled() => return,
            _ = process.publish(event) => {}
        }
    }
}

/// Signals the process group led by `pid`, and `pid` itself in case it left the group.
fn signal_group(pid: u32, signal: NixSignal) -> Result<(), ProcessError> {
    let Ok(raw) = i32::try_from(pid) else {
        return Ok(());
    };
    let group = nix::sys::signal::killpg(Pid::from_raw(raw), signal);
    let single = nix::sys::signal::kill(Pid::from_raw(raw), signal);
    match (group, single) {
        (Ok(()), _) | (_, Ok(())) => Ok(()),
        (Err(nix::Error::ESRCH), Err(nix::Error::ESRCH)) => Ok(()),
        (_, Err(source)) => Err(ProcessError::Signal { pid, source }),
    }
}

fn selector(process: Option<ProcessSelector>) -> Result<ProcessSelector, ProcessError> {
    process.ok_or(ProcessError::MissingSelector)
}

fn find_live(state: &Service, selector: ProcessSelector) -> Result<Arc<Process>, ProcessError> {
    state
        .processes
        .live(&selector)
        .ok_or(ProcessError::NotFound(selector))
}

async fn connect(
    State(state): State<Service>,
    ctx: RpcContext,
    StreamRequest(req): StreamRequest<ConnectRequest>,
) -> Response {
    let found = selector(req.process)
        .and_then(|sel| state.processes.any(&sel).ok_or(ProcessError::NotFound(sel)));
    match found {
        Ok(process) => EventStream {
            rx: process.subscribe(),
            keepalive: Some((ctx.keepalive, keepalive())),
            deadline: ctx.deadline(),
        }
        .into_response(),
        Err(e) => stream_error(e.into()),
    }
}

async fn list(
    State(state): State<Service>,
    Unary(_req): Unary<ListRequest>,
) -> UnaryResult<ListResponse> {
    Ok(Unary(ListResponse {
        processes: state.processes.list(),
    }))
}

async fn write_input(process: &Process, input: ProcessInput) -> Result<(), ProcessError> {
    match input {
        ProcessInput::Stdin(data) => {
            if process.is_pty() {
                return Err(ProcessError::StdinOnPty);
            }
            let mut stdin = process.stdin.lock().await;
            let pipe = stdin.as_mut().ok_or(ProcessError::NoStdin)?;
            pipe.write_all(&data).await.map_err(ProcessError::Input)?;
            pipe.flush().await.map_err(ProcessError::Input)
        }
        ProcessInput::Pty(data) => {
            let master = process.pty.as_ref().ok_or(ProcessError::NotPty)?;
            master.write_all(&data).await.map_err(ProcessError::Input)
        }
    }
}

async fn send_input(
    State(state): State<Service>,
    Unary(req): Unary<SendInputRequest>,
) -> UnaryResult<SendInputResponse> {
    let process = find_live(&state, selector(req.process)?)?;
    if let Some(input) = req.input {
        write_input(&process, input).await?;
    }
    Ok(Unary(SendInputResponse {}))
}

async fn send_signal(
    State(state): State<Service>,
    Unary(req): Unary<SendSignalRequest>,
) -> UnaryResult<SendSignalResponse> {
    let process = find_live(&state, selector(req.process)?)?;
    let signal = match req.signal {
        Signal::Sigkill => NixSignal::SIGKILL,
        Signal::Sigterm => NixSignal::SIGTERM,
        other => return Err(ProcessError::UnsupportedSignal(other).into()),
    };
    tracing::info!(pid = process.pid, signal = %signal, "signalling process");
    signal_group(process.pid, signal)?;
    // As envd does: a kill also stops the output readers, so `end` follows promptly
    // even if a grandchild keeps the pipes open.
    process.stop_output.cancel();
    Ok(Unary(SendSignalResponse {}))
}

async fn close_stdin(
    State(state): State<Service>,
    Unary(req): Unary<CloseStdinRequest>,
) -> UnaryResult<CloseStdinResponse> {
    let process = find_live(&state, selector(req.process)?)?;
    if process.is_pty() {
        return Err(ProcessError::CloseStdinOnPty.into());
    }
    // Dropping the pipe closes it; without one this is a no-op.
    process.stdin.lock().await.take();
    Ok(Unary(CloseStdinResponse {}))
}

async fn update(
    State(state): State<Service>,
    Unary(req): Unary<UpdateRequest>,
) -> UnaryResult<UpdateResponse> {
    let process = find_live(&state, selector(req.process)?)?;
    if let Some(pty) = req.pty {
        let master = process.pty.as_ref().ok_or(ProcessError::NotPty)?;
        if let Some(size) = pty.size {
            master
                .resize(WinSize::new(size.cols, size.rows))
                .map_err(ProcessError::Resize)?;
        }
    }
    Ok(Unary(UpdateResponse {}))
}

/// Client-streaming input: `start{process}` first, then `data{input}` messages.
async fn stream_input(State(state): State<Service>, request: Request) -> Response {
    match consume_input_stream(&state, request).await {
        Ok(()) => stream_of(&[StreamInputResponse {}]),
        Err(e) => stream_error(e.into()),
    }
}

async fn consume_input_stream(state: &Service, request: Request) -> Result<(), ProcessError> {
    let mut body = request.into_body().into_data_stream();
    let mut decoder = EnvelopeDecoder::new(MAX_MESSAGE_BYTES);
    let mut target: Option<Arc<Process>> = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ProcessError::BadStream(e.to_string()))?;
        decoder.push(&chunk);
        while let Some(envelope) = decoder
            .next_envelope()
            .map_err(|e| ProcessError::BadStream(e.to_string()))?
        {
            if envelope.is_end_stream() {
                return Ok(());
            }
            let message: StreamInputRequest = serde_json::from_slice(&envelope.payload)
                .map_err(|e| ProcessError::BadStream(format!("invalid message: {e}")))?;
            match message {
                StreamInputRequest::Start(start) => {
                    target = Some(find_live(state, selector(start.process)?)?);
                }
                StreamInputRequest::Data(data) => {
                    let process = target
                        .as_ref()
                        .ok_or_else(|| ProcessError::BadStream("data before start".to_owned()))?;
                    if let Some(input) = data.input {
                        write_input(process, input).await?;
                    }
                }
                StreamInputRequest::Keepalive(_) => {}
            }
        }
    }
    decoder
        .finish()
        .map_err(|e| ProcessError::BadStream(e.to_string()))
}
