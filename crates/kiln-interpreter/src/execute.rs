//! One `/execute` run (spec A.6): environment set-up, the cell itself with its kernel
//! messages turned into NDJSON lines, keepalives, interrupt when the client goes away,
//! and restoring per-run environment variables afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::context::Context;
use crate::envd::{fetch_envs, EnvdTarget};
use crate::kernel::{Incoming, Kernel, KernelEvent};
use crate::output::{OutputLine, ResultFields};

/// Server-wide execution settings.
#[derive(Debug, Clone)]
pub struct ExecSettings {
    pub keepalive: Duration,
    /// Longest a cell may run (`None`: until the client gives up).
    pub max_duration: Option<Duration>,
    /// After an interrupt, how long the kernel has to go idle before it is killed (the
    /// next execution then gets a fresh kernel instead of waiting forever).
    pub interrupt_grace: Duration,
    pub envd: EnvdTarget,
}

/// A validated `/execute` request.
#[derive(Debug, Clone)]
pub struct Job {
    pub code: String,
    pub env_vars: BTreeMap<String, String>,
    pub access_token: Option<String>,
}

const SILENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause before sending a request the kernel aborted unstarted again.
const ABORT_RETRY_DELAY: Duration = Duration::from_millis(300);

/// Runs `job` in `context`, writing lines to `tx`. Returns when the cell is over and the
/// per-run variables are restored; the stream ends when `tx` is dropped (before the
/// restore, so the client does not wait for it).
pub async fn run(
    context: Arc<Context>,
    job: Job,
    settings: Arc<ExecSettings>,
    tx: mpsc::Sender<Bytes>,
) {
    let _turn = context.exec_lock.lock().await;
    let kernel = match context.kernel().await {
        Ok(kernel) => kernel,
        Err(e) => {
            let text = crate::report::chain(&e);
            tracing::warn!(context = %context.id, error = %text, "no kernel for execution");
            let _ = tx
                .send(OutputLine::error("KernelError", text).to_bytes())
                .await;
            let _ = tx.send(OutputLine::EndOfExecution.to_bytes()).await;
            return;
        }
    };
    let sandbox_envs = apply_sandbox_envs(&context, &kernel, &job, &settings).await;
    let per_run = job.env_vars.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    if let Some(code) = context.language.set_env_code(per_run) {
        if let Err(e) = kernel.run_silent(&code, SILENT_TIMEOUT).await {
            tracing::warn!(context = %context.id, error = %crate::report::chain(&e), "setting per-run env vars failed");
        }
    }

    let mut cell = Cell::new(&context, &kernel, &settings, tx);
    cell.run(&job.code).await;
    // Ends the HTTP stream now; the restore below happens while we still hold the turn.
    drop(cell);

    if !job.env_vars.is_empty() && kernel.is_alive() {
        let restore = job
            .env_vars
            .keys()
            .map(|k| (k.as_str(), sandbox_envs.get(k).map(String::as_str)));
        if let Some(code) = context.language.restore_env_code(restore) {
            if let Err(e) = kernel.run_silent(&code, SILENT_TIMEOUT).await {
                tracing::warn!(context = %context.id, error = %crate::report::chain(&e), "restoring env vars failed");
            }
        }
    }
}

/// On a kernel's first execution, sets the sandbox-level variables from envd. Returns
/// them (empty when envd is off or unreachable).
async fn apply_sandbox_envs(
    context: &Context,
    kernel: &Kernel,
    job: &Job,
    settings: &ExecSettings,
) -> BTreeMap<String, String> {
    let mut env = kernel.env.lock().await;
    if let Some(applied) = &env.sandbox {
        return applied.clone();
    }
    let envs = match fetch_envs(&settings.envd, job.access_token.as_deref()).await {
        Ok(envs) => envs,
        Err(e) => {
            tracing::warn!(error = %crate::report::chain(&e), "cannot read sandbox env vars from envd");
            BTreeMap::new()
        }
    };
    let pairs = envs.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    if let Some(code) = context.language.set_env_code(pairs) {
        if let Err(e) = kernel.run_silent(&code, SILENT_TIMEOUT).await {
            tracing::warn!(context = %context.id, error = %crate::report::chain(&e), "setting sandbox env vars failed");
        }
    }
    // Applied once per kernel, even after a failure, so one bad envd does not slow
    // every execution down.
    env.sandbox = Some(envs.clone());
    envs
}

/// Why the client stopped listening, or the server stopped the cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    ClientGone,
    Deadline,
}

struct Cell<'a> {
    context: &'a Context,
    kernel: &'a Kernel,
    settings: &'a ExecSettings,
    tx: mpsc::Sender<Bytes>,
    last_write: Instant,
    client_gone: bool,
    input_accepted: bool,
    reply_seen: bool,
    idle_seen: bool,
    error_sent: bool,
    /// An error `execute_reply` held until IOPub goes idle (see [`Cell::on_message`]).
    reply_error: Option<Value>,
    /// Whether an abort of a request the kernel never started may be retried.
    retry_allowed: bool,
    /// The kernel answered `aborted` without having started the request (no
    /// `execute_input`): nothing ran, so it is safe to send again. IRkernel aborts
    /// whatever reaches its shell socket in the instant after a failed or interrupted
    /// cell (its `abort_queued_messages`, after the reply we end the cell on).
    aborted_unstarted: bool,
}

impl<'a> Cell<'a> {
    fn new(
        context: &'a Context,
        kernel: &'a Kernel,
        settings: &'a ExecSettings,
        tx: mpsc::Sender<Bytes>,
    ) -> Self {
        Self {
            context,
            kernel,
            settings,
            tx,
            last_write: Instant::now(),
            client_gone: false,
            input_accepted: false,
            reply_seen: false,
            idle_seen: false,
            error_sent: false,
            reply_error: None,
            retry_allowed: false,
            aborted_unstarted: false,
        }
    }

    async fn send(&mut self, line: OutputLine) {
        if self.client_gone {
            return;
        }
        self.last_write = Instant::now();
        if self.tx.send(line.to_bytes()).await.is_err() {
            self.client_gone = true;
        }
    }

    /// Runs the cell; a request the kernel aborted before starting it is sent once more
    /// (see [`Cell::aborted_unstarted`]).
    async fn run(&mut self, code: &str) {
        self.retry_allowed = true;
        self.attempt(code).await;
        if self.aborted_unstarted {
            tracing::info!(context = %self.context.id, "kernel aborted the request before running it; sending it again");
            tokio::time::sleep(ABORT_RETRY_DELAY).await;
            self.retry_allowed = false;
            self.aborted_unstarted = false;
            self.input_accepted = false;
            self.reply_seen = false;
            self.idle_seen = false;
            self.reply_error = None;
            self.attempt(code).await;
        }
        self.send(OutputLine::EndOfExecution).await;
    }

    async fn attempt(&mut self, code: &str) {
        let mut pending = match self.kernel.execute(code, false).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(context = %self.context.id, error = %crate::report::chain(&e), "execute_request failed");
                self.send(OutputLine::error(
                    "WebSocketError",
                    "Failed to send execution request",
                ))
                .await;
                return;
            }
        };
        let settings = self.settings;
        let probe = self.tx.clone();
        let deadline = settings.max_duration.map(|d| Instant::now() + d);
        let mut stopped: Option<(Stop, Instant)> = None;
        loop {
            let keepalive_at = self.last_write + settings.keepalive;
            let client_gone = self.client_gone;
            let stop_check = async {
                match (stopped, deadline) {
                    (Some(_), _) => std::future::pending::<Stop>().await,
                    (None, Some(deadline)) => tokio::select! {
                        _ = probe.closed() => Stop::ClientGone,
                        _ = tokio::time::sleep_until(deadline) => Stop::Deadline,
                    },
                    (None, None) => {
                        probe.closed().await;
                        Stop::ClientGone
                    }
                }
            };
            let grace_over = async {
                match stopped {
                    Some((_, at)) => tokio::time::sleep_until(at + settings.interrupt_grace).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                event = pending.events.recv() => match event {
                    Some(KernelEvent::Message(m)) => {
                        if self.on_message(m).await {
                            break;
                        }
                    }
                    Some(KernelEvent::Exited(status)) => {
                        tracing::warn!(context = %self.context.id, %status, "kernel exited during execution");
                        self.send(OutputLine::error("ContextRestarting", "Context was restarted")).await;
                        break;
                    }
                    None => {
                        self.send(OutputLine::error("ContextRestarting", "Context was restarted")).await;
                        break;
                    }
                },
                stop = stop_check => {
                    stopped = Some((stop, Instant::now()));
                    if stop == Stop::ClientGone {
                        self.client_gone = true;
                        tracing::info!(context = %self.context.id, "client went away; interrupting the cell");
                    } else {
                        tracing::info!(context = %self.context.id, "execution time limit reached; interrupting the cell");
                    }
                    if let Err(e) = self.kernel.interrupt().await {
                        tracing::warn!(error = %crate::report::chain(&e), "interrupt failed");
                    }
                    if stop == Stop::Deadline {
                        let secs = settings.max_duration.unwrap_or_default().as_secs();
                        self.send(OutputLine::error(
                            "ExecutionTimeout",
                            format!("Execution exceeded the server's limit of {secs} s and was interrupted"),
                        )).await;
                        // Later kernel errors (KeyboardInterrupt) are the consequence.
                        self.error_sent = true;
                    }
                }
                () = grace_over => {
                    tracing::warn!(context = %self.context.id, "kernel ignored the interrupt; killing it");
                    self.kernel.kill();
                    self.send(OutputLine::error("ContextRestarting", "Context was restarted")).await;
                    break;
                }
                () = tokio::time::sleep_until(keepalive_at), if !client_gone => {
                    self.send(OutputLine::Keepalive).await;
                }
            }
        }
    }

    /// Handles one kernel message; true when the cell is over.
    async fn on_message(&mut self, m: Incoming) -> bool {
        match m.msg_type.as_str() {
            "execute_input" => {
                self.input_accepted = true;
                let count = m
                    .content
                    .get("execution_count")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                self.send(OutputLine::NumberOfExecutions {
                    execution_count: count,
                })
                .await;
            }
            "stream" => {
                let text = m.str_field("text").unwrap_or_default().to_owned();
                let timestamp = m.date.clone();
                let line = if m.str_field("name") == Some("stderr") {
                    OutputLine::Stderr { text, timestamp }
                } else {
                    OutputLine::Stdout { text, timestamp }
                };
                self.send(line).await;
            }
            "display_data" | "execute_result" => {
                let bundle = m.content.get("data").cloned().unwrap_or(Value::Null);
                let main = m.msg_type == "execute_result";
                self.send(OutputLine::Result(ResultFields::from_bundle(&bundle, main)))
                    .await;
            }
            // Only the first error of a cell is reported (spec A.6).
            "error" if !self.error_sent => {
                self.error_sent = true;
                self.reply_error = None;
                let line = error_line(&m.content);
                self.send(line).await;
            }
            "execute_reply" => {
                self.reply_seen = true;
                let count = m.content.get("execution_count").and_then(Value::as_i64);
                if let (false, Some(count)) = (self.input_accepted, count) {
                    // Kernels that never broadcast execute_input (tslab).
                    self.input_accepted = true;
                    self.send(OutputLine::NumberOfExecutions {
                        execution_count: count,
                    })
                    .await;
                }
                if matches!(m.str_field("status"), Some("abort" | "aborted")) {
                    if self.retry_allowed && !self.input_accepted {
                        self.aborted_unstarted = true;
                        return true;
                    }
                    self.send(OutputLine::error(
                        "ExecutionAborted",
                        "Execution was aborted",
                    ))
                    .await;
                    return true;
                }
                if m.str_field("status") == Some("error") && !self.error_sent {
                    // Kernels that report errors only in the reply. The reply comes on
                    // the shell socket and can overtake IOPub's `error`, which is the
                    // kernel's own rendering (jjava's holds the compiler's diagnostics,
                    // its reply a Java stack): until IOPub is idle, the reply's waits.
                    if self.idle_seen {
                        self.error_sent = true;
                        self.send(error_line(&m.content)).await;
                    } else {
                        self.reply_error = Some(m.content.clone());
                    }
                }
                return self.idle_seen;
            }
            "status" if m.str_field("execution_state") == Some("idle") => {
                self.idle_seen = true;
                // IOPub is in order: an `error` of this cell came before its idle.
                if let Some(content) = self.reply_error.take() {
                    if !self.error_sent {
                        self.error_sent = true;
                        self.send(error_line(&content)).await;
                    }
                }
                return self.input_accepted || self.reply_seen;
            }
            _ => {}
        }
        false
    }
}

fn error_line(content: &Value) -> OutputLine {
    let text = |key: &str| {
        content
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let traceback = match content.get("traceback") {
        Some(Value::Array(lines)) => lines.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let mut name = text("ename");
    if name.is_empty() {
        // Some kernels (tslab) report compile errors with no name; the SDK shows it.
        name = "Error".to_owned();
    }
    OutputLine::Error {
        name,
        value: text("evalue"),
        traceback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_lines_join_the_traceback() {
        let line = error_line(&json!({
            "ename": "ZeroDivisionError",
            "evalue": "division by zero",
            "traceback": ["a\n", "b"],
        }));
        assert_eq!(
            line,
            OutputLine::Error {
                name: "ZeroDivisionError".into(),
                value: "division by zero".into(),
                traceback: "a\nb".into(),
            }
        );
        let line = error_line(&json!({}));
        assert_eq!(line, OutputLine::error("Error", ""));
    }
}
