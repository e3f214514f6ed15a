//! One running Jupyter kernel: its process (launched from a kernelspec), its ZeroMQ
//! sockets (iopub, shell, control; via `jupyter-zmq-client`), and a router that hands
//! every incoming message to the request it answers (by parent `msg_id`).
//!
//! The kernel lives in its own process group so that an interrupt (SIGINT) also reaches
//! the programs the user's code started, and so that dropping the [`Kernel`] kills all of
//! them: no kernel outlives its context.

pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use jupyter_protocol::connection_info::Transport;
use jupyter_protocol::{
    ConnectionInfo, ExecuteRequest, InterruptRequest, JupyterMessage, KernelInfoRequest,
    ShutdownRequest,
};
use jupyter_zmq_client::{Connection, KernelspecDir, RawMessage};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use zeromq::SocketRecv;

pub use wire::Incoming;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot prepare the kernel runtime directory {path}")]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reserve ports for kernel '{kernel}'")]
    Ports {
        kernel: String,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("cannot write connection file {path}")]
    ConnectionFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start kernel '{kernel}' ({argv0})")]
    Spawn {
        kernel: String,
        argv0: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernelspec '{kernel}' is unusable")]
    Spec {
        kernel: String,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("cannot connect to kernel '{kernel}' {channel} socket")]
    Connect {
        kernel: String,
        channel: &'static str,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("kernel '{kernel}' did not answer kernel_info within {secs} s")]
    StartTimeout { kernel: String, secs: u64 },
    #[error("kernel '{kernel}' exited during startup ({status})")]
    ExitedAtStart { kernel: String, status: String },
    #[error("kernel '{kernel}' is not running")]
    NotRunning { kernel: String },
    #[error("cannot send {msg_type} to kernel '{kernel}'")]
    Send {
        kernel: String,
        msg_type: &'static str,
        #[source]
        source: jupyter_zmq_client::RuntimeError,
    },
    #[error("cannot signal kernel '{kernel}'")]
    Signal {
        kernel: String,
        #[source]
        source: nix::Error,
    },
    #[error("kernel '{kernel}' did not finish a silent cell within {secs} s")]
    SilentTimeout { kernel: String, secs: u64 },
}

/// What a request's receiver gets.
#[derive(Debug, Clone)]
pub enum KernelEvent {
    Message(Incoming),
    /// The kernel process ended (exit status as text).
    Exited(String),
}

type Routes = Arc<StdMutex<HashMap<String, mpsc::UnboundedSender<KernelEvent>>>>;

/// Removes a request's route when the request is done or abandoned.
struct RouteGuard {
    routes: Routes,
    msg_id: String,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.msg_id);
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map inconsistent (single inserts
    // and removes), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An in-flight request: every message whose parent is `msg_id`, until dropped.
pub struct Pending {
    pub msg_id: String,
    pub events: mpsc::UnboundedReceiver<KernelEvent>,
    _route: RouteGuard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SilentOutcome {
    Done,
    Aborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InterruptMode {
    Signal,
    Message,
}

/// Launch settings shared by all kernels.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Where connection files (which hold the HMAC key) are written, mode 0600.
    pub runtime_dir: PathBuf,
    pub startup_timeout: Duration,
}

/// Per-kernel environment bookkeeping (spec A.6): the sandbox-level variables applied to
/// this kernel (`None` until the first execution applies them).
#[derive(Debug, Default)]
pub struct KernelEnv {
    pub sandbox: Option<BTreeMap<String, String>>,
}

pub struct Kernel {
    name: String,
    pgid: Option<Pid>,
    interrupt_mode: InterruptMode,
    shell: Mutex<jupyter_zmq_client::DealerSendConnection>,
    control: Mutex<jupyter_zmq_client::DealerSendConnection>,
    routes: Routes,
    alive: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
    connection_file: PathBuf,
    pub env: Mutex<KernelEnv>,
}

impl Kernel {
    /// Starts the kernel in `cwd`, with `env` on top of the kernelspec's environment,
    /// and waits until it answers `kernel_info` and its iopub messages reach us (so no
    /// output of the first cell is lost to ZeroMQ's slow join).
    pub async fn launch(
        spec: &KernelspecDir,
        cwd: &Path,
        opts: &LaunchOptions,
        env: &[(String, String)],
    ) -> Result<Kernel, KernelError> {
        let name = spec.kernel_name.clone();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.runtime_dir)
            .map_err(|source| KernelError::RuntimeDir {
                path: opts.runtime_dir.clone(),
                source,
            })?;
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (ports, listeners) = jupyter_zmq_client::peek_ports_with_listeners(ip, 5)
            .await
            .map_err(|source| KernelError::Ports {
                kernel: name.clone(),
                source,
            })?;
        let info = ConnectionInfo {
            ip: ip.to_string(),
            transport: Transport::TCP,
            shell_port: ports[0],
            iopub_port: ports[1],
            stdin_port: ports[2],
            control_port: ports[3],
            hb_port: ports[4],
            key: uuid::Uuid::new_v4().to_string(),
            signature_scheme: "hmac-sha256".to_owned(),
            kernel_name: Some(name.clone()),
        };
        let connection_file = opts
            .runtime_dir
            .join(format!("kernel-{}.json", uuid::Uuid::new_v4()));
        write_private(
            &connection_file,
            &serde_json::to_vec(&info).unwrap_or_default(),
        )
        .map_err(|source| KernelError::ConnectionFile {
            path: connection_file.clone(),
            source,
        })?;

        let argv0 = spec.kernelspec.argv.first().cloned().unwrap_or_default();
        let mut command = crate::kernelspec::with_resource_dir(spec)
            .command(
                &connection_file,
                Some(Stdio::inherit()),
                Some(Stdio::null()),
            )
            .map_err(|source| KernelError::Spec {
                kernel: name.clone(),
                source,
            })?;
        command
            .current_dir(cwd)
            .process_group(0)
            .kill_on_drop(true)
            // debugpy warns on stderr about frozen modules in every new kernel.
            .env("PYDEVD_DISABLE_FILE_VALIDATION", "1")
            .envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: the closure runs in the forked child between fork and exec, where only
        // async-signal-safe calls are allowed; it makes a single prctl(2) call, allocates
        // nothing and touches no state shared with the parent. It makes the kernel die
        // with the interpreter (the parent is the launching thread: a runtime thread that
        // lives as long as the interpreter), so a supervisor's restart leaves no orphans.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let spawned = command.spawn();
        // The kernel binds the ports as its first act; hold them until it exists.
        drop(listeners);
        let mut child = spawned.map_err(|source| {
            let _ = std::fs::remove_file(&connection_file);
            KernelError::Spawn {
                kernel: name.clone(),
                argv0,
                source,
            }
        })?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);

        let routes: Routes = Arc::default();
        let (alive_tx, alive) = watch::channel(true);
        let monitor = {
            let routes = routes.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let status = match child.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                tracing::info!(kernel = %name, %status, "kernel process ended");
                let _ = alive_tx.send(false);
                let senders: Vec<_> = lock(&routes).values().cloned().collect();
                for s in senders {
                    let _ = s.send(KernelEvent::Exited(status.clone()));
                }
            })
        };

        // A kernel that exits at once (a missing program, a bad argv) fails the launch
        // now rather than after the sockets' connect timeout.
        let mut ended = alive.clone();
        let connected = tokio::select! {
            connected = connect(&name, &info, &routes) => connected,
            _ = ended.wait_for(|alive| !*alive) => Err(KernelError::ExitedAtStart {
                kernel: name.clone(),
                status: "exited before its sockets were connected; see the interpreter's log".to_owned(),
            }),
        };
        let sockets = match connected {
            Ok(sockets) => sockets,
            Err(e) => {
                // Dropping the monitor's Child kills the process (kill_on_drop).
                monitor.abort();
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                let _ = std::fs::remove_file(&connection_file);
                return Err(e);
            }
        };
        let mut tasks = sockets.readers;
        tasks.push(monitor);
        let kernel = Kernel {
            name,
            pgid,
            interrupt_mode: match spec.kernelspec.interrupt_mode.as_deref() {
                Some("message") => InterruptMode::Message,
                _ => InterruptMode::Signal,
            },
            shell: Mutex::new(sockets.shell),
            control: Mutex::new(sockets.control),
            routes,
            alive,
            tasks,
            connection_file,
            env: Mutex::new(KernelEnv::default()),
        };
        kernel.wait_ready(opts.startup_timeout).await?;
        Ok(kernel)
    }

    /// Repeats `kernel_info_request` until both its reply (shell) and its status
    /// (iopub) arrive.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), KernelError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message: JupyterMessage = KernelInfoRequest {}.into();
            let mut pending = self.send_shell(message, "kernel_info_request").await?;
            let (mut replied, mut iopub_seen) = (false, false);
            let round = tokio::time::Instant::now() + Duration::from_millis(1000);
            loop {
                let until = round.min(deadline);
                match tokio::time::timeout_at(until, pending.events.recv()).await {
                    Ok(Some(KernelEvent::Message(m))) => {
                        if m.msg_type == "kernel_info_reply" {
                            replied = true;
                        } else if m.msg_type == "status" {
                            iopub_seen = true;
                        }
                        if replied && iopub_seen {
                            tracing::debug!(kernel = %self.name, "kernel ready");
                            return Ok(());
                        }
                    }
                    Ok(Some(KernelEvent::Exited(status))) => {
                        return Err(KernelError::ExitedAtStart {
                            kernel: self.name.clone(),
                            status,
                        })
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            if !self.is_alive() {
                return Err(KernelError::ExitedAtStart {
                    kernel: self.name.clone(),
                    status: "exited".to_owned(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KernelError::StartTimeout {
                    kernel: self.name.clone(),
                    secs: timeout.as_secs(),
                });
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Registers a route for `message`, then sends it on the shell socket.
    async fn send_shell(
        &self,
        message: JupyterMessage,
        msg_type: &'static str,
    ) -> Result<Pending, KernelError> {
        if !self.is_alive() {
            return Err(KernelError::NotRunning {
                kernel: self.name.clone(),
            });
        }
        let pending = self.route(&message);
        self.shell
            .lock()
            .await
            .send(message)
            .await
            .map_err(|source| KernelError::Send {
                kernel: self.name.clone(),
                msg_type,
                source,
            })?;
        Ok(pending)
    }

    fn route(&self, message: &JupyterMessage) -> Pending {
        let msg_id = message.header.msg_id.clone();
        let (tx, events) = mpsc::unbounded_channel();
        lock(&self.routes).insert(msg_id.clone(), tx);
        Pending {
            msg_id: msg_id.clone(),
            events,
            _route: RouteGuard {
                routes: self.routes.clone(),
                msg_id,
            },
        }
    }

    /// Sends `execute_request` (store history unless silent, no stdin).
    ///
    /// `stop_on_error` is off: it only aborts requests queued behind a failing one, and
    /// we never queue (one execution at a time per context), while some kernels (tslab)
    /// abort every later request once it is set.
    pub async fn execute(&self, code: &str, silent: bool) -> Result<Pending, KernelError> {
        let request = ExecuteRequest {
            code: code.to_owned(),
            silent,
            store_history: !silent,
            user_expressions: None,
            allow_stdin: false,
            stop_on_error: false,
        };
        self.send_shell(request.into(), "execute_request").await
    }

    /// Runs `code` silently (no outputs, no execution count) and waits for its reply.
    /// An aborted cell is retried once: some kernels (tslab) abort everything that
    /// arrives shortly after a failed cell.
    pub async fn run_silent(&self, code: &str, timeout: Duration) -> Result<(), KernelError> {
        let attempt = async {
            for _ in 0..2 {
                if self.silent_once(code).await? != SilentOutcome::Aborted {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| KernelError::SilentTimeout {
                kernel: self.name.clone(),
                secs: timeout.as_secs(),
            })?
    }

    async fn silent_once(&self, code: &str) -> Result<SilentOutcome, KernelError> {
        let mut pending = self.execute(code, true).await?;
        while let Some(event) = pending.events.recv().await {
            match event {
                KernelEvent::Message(m) if m.msg_type == "execute_reply" => {
                    return Ok(match m.str_field("status") {
                        Some("ok") => SilentOutcome::Done,
                        Some("abort" | "aborted") => SilentOutcome::Aborted,
                        _ => {
                            tracing::debug!(kernel = %self.name, reply = %m.content, "silent cell failed");
                            SilentOutcome::Done
                        }
                    });
                }
                KernelEvent::Message(_) => {}
                KernelEvent::Exited(_) => break,
            }
        }
        Err(KernelError::NotRunning {
            kernel: self.name.clone(),
        })
    }

    /// Interrupts the running cell the way the kernelspec asks (SIGINT to the kernel's
    /// process group, or `interrupt_request` on the control socket).
    pub async fn interrupt(&self) -> Result<(), KernelError> {
        tracing::info!(kernel = %self.name, "interrupting kernel");
        match (self.interrupt_mode, self.pgid) {
            (InterruptMode::Signal, Some(pgid)) => {
                killpg(pgid, Signal::SIGINT).map_err(|source| KernelError::Signal {
                    kernel: self.name.clone(),
                    source,
                })
            }
            _ => {
                let message: JupyterMessage = InterruptRequest {}.into();
                self.control
                    .lock()
                    .await
                    .send(message)
                    .await
                    .map_err(|source| KernelError::Send {
                        kernel: self.name.clone(),
                        msg_type: "interrupt_request",
                        source,
                    })
            }
        }
    }

    /// Asks the kernel to shut down, waits up to `grace`, then kills its process group.
    pub async fn shutdown(&self, grace: Duration) {
        if self.is_alive() {
            let message: JupyterMessage = ShutdownRequest { restart: false }.into();
            let sent = self.control.lock().await.send(message).await;
            if sent.is_ok() {
                let mut alive = self.alive.clone();
                let _ = tokio::time::timeout(grace, alive.wait_for(|a| !*a)).await;
            }
        }
        self.kill();
    }

    /// SIGKILL to the kernel's whole process group.
    pub fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (already gone) is the normal case after a clean shutdown.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.kill();
        for task in &self.tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.connection_file);
    }
}

async fn read_loop<S: SocketRecv>(mut conn: Connection<S>, routes: Routes, channel: &'static str) {
    loop {
        let frames = match conn.socket.recv().await {
            Ok(frames) => frames,
            Err(e) => {
                tracing::debug!(channel, error = %e, "kernel socket closed");
                return;
            }
        };
        let raw = match RawMessage::from_multipart(frames, &conn.mac) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(channel, error = %e, "dropping unverifiable kernel message");
                continue;
            }
        };
        let message = match wire::decode(&raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(channel, error = %e, "dropping malformed kernel message");
                continue;
            }
        };
        let Some(parent) = message.parent_msg_id.as_deref() else {
            continue;
        };
        let route = lock(&routes).get(parent).cloned();
        if let Some(tx) = route {
            let _ = tx.send(KernelEvent::Message(message));
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

struct Sockets {
    shell: jupyter_zmq_client::DealerSendConnection,
    control: jupyter_zmq_client::DealerSendConnection,
    readers: Vec<JoinHandle<()>>,
}

/// Connects iopub, shell and control, and starts a reader per socket.
async fn connect(
    name: &str,
    info: &ConnectionInfo,
    routes: &Routes,
) -> Result<Sockets, KernelError> {
    let session = uuid::Uuid::new_v4().to_string();
    let err = |channel| {
        let kernel = name.to_owned();
        move |source| KernelError::Connect {
            kernel,
            channel,
            source,
        }
    };
    let iopub = jupyter_zmq_client::create_client_iopub_connection(info, "", &session)
        .await
        .map_err(err("iopub"))?;
    let identity = jupyter_zmq_client::peer_identity_for_session(&session).map_err(err("shell"))?;
    let shell =
        jupyter_zmq_client::create_client_shell_connection_with_identity(info, &session, identity)
            .await
            .map_err(err("shell"))?;
    let control = jupyter_zmq_client::create_client_control_connection(info, &session)
        .await
        .map_err(err("control"))?;
    let (shell_tx, shell_rx) = shell.split();
    let (control_tx, control_rx) = control.split();
    Ok(Sockets {
        shell: shell_tx,
        control: control_tx,
        readers: vec![
            tokio::spawn(read_loop(iopub, routes.clone(), "iopub")),
            tokio::spawn(read_loop(shell_rx, routes.clone(), "shell")),
            tokio::spawn(read_loop(control_rx, routes.clone(), "control")),
        ],
    })
}
