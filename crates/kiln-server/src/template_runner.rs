//! Build steps in sandboxes of the server's runtime (jail or gVisor): the
//! [`StepRunner`] of template builds. Each RUN (and USER, WORKDIR) gets a fresh
//! sandbox on the parent layer; when its command exits 0, the sandbox's overlay upper
//! directory ([`Runtime::upper_dir`]) is applied to a hard-link farm of the parent
//! (see `kiln_template::layer`) before the sandbox is removed. A step dropped half-way
//! (a timeout, a cancel) still removes its sandbox ([`BuildSandbox`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use base64::Engine;
use http::Request;
use http_body_util::BodyExt;
use kiln_proto::connect;
use kiln_runtime::{Limits, NetworkMode, Runtime, SandboxConfig};
use kiln_template::build::{ReadyCheck, RunError, RunRequest, StepRunner};

use crate::report::chain;

/// Runs build steps with the server's runtime.
pub struct SandboxStepRunner {
    pub runtime: Arc<dyn Runtime>,
    /// Build sandboxes count against `E2B_MAX_SANDBOXES` like every other.
    pub manager: Arc<crate::manager::SandboxManager>,
}

/// How long a build step waits for room under `E2B_MAX_SANDBOXES`.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

#[async_trait::async_trait]
impl StepRunner for SandboxStepRunner {
    async fn run(
        &self,
        req: RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        let _slot = self
            .manager
            .reserve_build_sandbox(SLOT_WAIT)
            .await
            .map_err(RunError::Failed)?;
        let mut sandbox = BuildSandbox::new(self.runtime.clone());
        let socket = self
            .start(
                &mut sandbox,
                req.lower,
                req.cpu_count,
                req.memory_mb,
                req.runtime,
            )
            .await?;
        let result = self.run_in(&socket, &sandbox.id, &req, on_line).await;
        sandbox.remove().await;
        result
    }

    async fn check_ready(
        &self,
        check: ReadyCheck<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        let _slot = self
            .manager
            .reserve_build_sandbox(SLOT_WAIT)
            .await
            .map_err(RunError::Failed)?;
        let mut sandbox = BuildSandbox::new(self.runtime.clone());
        let socket = self
            .start(
                &mut sandbox,
                check.lower,
                check.cpu_count,
                check.memory_mb,
                check.runtime,
            )
            .await?;
        let result = Self::wait_ready(&socket, &check, on_line).await;
        sandbox.remove().await;
        result
    }
}

/// A build sandbox, removed when its step is done, and also when the step is dropped
/// half-way (a step or build timeout, a cancel): then from a task of its own, since
/// `Drop` cannot wait.
pub struct BuildSandbox {
    pub id: String,
    runtime: Arc<dyn Runtime>,
    /// Whether it may exist and is still to be removed.
    armed: bool,
}

impl BuildSandbox {
    /// A fresh id for a build sandbox about to be started.
    pub fn new(runtime: Arc<dyn Runtime>) -> Self {
        BuildSandbox {
            id: format!("build{}", hex::encode(rand::random::<[u8; 6]>())),
            runtime,
            armed: true,
        }
    }

    /// Removes it now.
    pub async fn remove(mut self) {
        self.armed = false;
        remove(self.runtime.as_ref(), &self.id).await;
    }

    /// It never started (the runtime cleans up after a failed start).
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for BuildSandbox {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (runtime, id) = (self.runtime.clone(), std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { remove(runtime.as_ref(), &id).await });
            }
            Err(_) => {
                tracing::error!(%id, "a build sandbox was dropped outside the runtime; it is left running")
            }
        }
    }
}

async fn remove(runtime: &dyn Runtime, id: &str) {
    if let Err(e) = runtime.kill(id).await {
        tracing::error!(%id, error = %chain(&e), "removing a build sandbox failed");
    }
}

impl SandboxStepRunner {
    /// Starts `sandbox`; returns its envd socket.
    async fn start(
        &self,
        sandbox: &mut BuildSandbox,
        lower: &Path,
        cpu_count: u32,
        memory_mb: u64,
        runtime: Option<&str>,
    ) -> Result<PathBuf, RunError> {
        let config = SandboxConfig {
            id: sandbox.id.clone(),
            rootfs: lower.to_path_buf(),
            limits: Limits {
                memory_mb: memory_mb.max(512),
                cpu_count: cpu_count.max(1),
                pids_max: 4096,
                // A step's own writes (its upper dir) are capped like a sandbox's.
                disk_mb: kiln_runtime::DEFAULT_DISK_MB,
            },
            network: NetworkMode::Internet,
            // A step's upper dir becomes a template layer: it must be owned by the
            // canonical range every template uses.
            host_ids: kiln_runtime::HostIdMode::Canonical,
        };
        // The template's own runtime when it names one (validated with the recipe).
        let kind = runtime.and_then(kiln_runtime::RuntimeKind::parse);
        match self.runtime.start_on(kind, &config).await {
            Ok(instance) => Ok(instance.envd_socket),
            Err(e) => {
                // The runtime cleans up after a start that failed.
                sandbox.disarm();
                Err(RunError::Failed(format!(
                    "build sandbox did not start: {}",
                    chain(&e)
                )))
            }
        }
    }

    async fn wait_ready(
        socket: &Path,
        check: &ReadyCheck<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        let init = kiln_proto::InitRequest {
            env_vars: Some(check.env.clone()),
            access_token: Some(None),
            default_user: Some(check.user.to_string()),
            default_workdir: Some(check.cwd.to_string()),
            timestamp: Some(chrono::Utc::now().to_rfc3339()),
        };
        crate::envd::init(socket, &init)
            .await
            .map_err(|e| RunError::Failed(chain(&e)))?;
        if let Some(start) = check.start_cmd {
            crate::envd::run(socket, start, check.user, false)
                .await
                .map_err(|e| RunError::Failed(format!("start command: {}", chain(&e))))?;
        }
        let started = std::time::Instant::now();
        loop {
            let mut lines = Vec::new();
            let code = run_logged(
                socket,
                check.shell,
                check.ready_cmd,
                check.user,
                Some(check.cwd),
                check.env,
                &mut |l| lines.push(l),
            )
            .await?;
            if code == 0 {
                return Ok(());
            }
            if started.elapsed() >= check.timeout {
                for l in lines {
                    on_line(l);
                }
                return Err(RunError::Failed(format!(
                    "ready command {:?} did not exit 0 within {} s (last exit status {code})",
                    check.ready_cmd,
                    check.timeout.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

impl SandboxStepRunner {
    async fn run_in(
        &self,
        socket: &Path,
        id: &str,
        req: &RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        let init = kiln_proto::InitRequest {
            env_vars: Some(req.env.clone()),
            access_token: Some(None),
            default_user: Some(req.user.to_string()),
            default_workdir: None,
            timestamp: Some(chrono::Utc::now().to_rfc3339()),
        };
        crate::envd::init(socket, &init)
            .await
            .map_err(|e| RunError::Failed(chain(&e)))?;
        let code = run_logged(
            socket, req.shell, req.cmd, req.user, req.cwd, req.env, on_line,
        )
        .await?;
        if code != 0 {
            return Err(RunError::Exit { code });
        }
        // The upper dir is the guest's: a process the step left behind could swap its
        // directories for symlinks while the host walks it. Stop every process of the
        // sandbox first; the walk (by directory fds) then reads a tree nothing changes.
        self.runtime.stop(id).await.map_err(|e| {
            RunError::Failed(format!("stopping the build sandbox failed: {}", chain(&e)))
        })?;
        let upper = self.runtime.upper_dir(id).ok_or_else(|| {
            RunError::Failed(format!(
                "the {} runtime keeps no upper directory to build a layer from",
                self.runtime.kind().as_str()
            ))
        })?;
        let (lower, out) = (req.lower.to_path_buf(), req.out.to_path_buf());
        tokio::task::spawn_blocking(move || {
            kiln_template::layer::link_tree(&lower, &out)?;
            kiln_template::layer::apply_upper(&upper, &out)
        })
        .await
        .map_err(|e| RunError::Failed(format!("layer task failed: {e}")))?
        .map_err(|e| RunError::Failed(format!("saving the step's changes failed: {}", chain(&e))))
    }
}

/// The longest build log line kept whole; longer output is cut into lines this long.
const MAX_LINE: usize = 16 * 1024;

/// Runs `<shell> -l -c cmd` through envd's process `Start`, handing each output line
/// to `on_line`; returns the exit code.
async fn run_logged(
    socket: &Path,
    shell: &str,
    cmd: &str,
    user: &str,
    cwd: Option<&str>,
    envs: &BTreeMap<String, String>,
    on_line: &mut (dyn FnMut(String) + Send),
) -> Result<i32, RunError> {
    let failed = |e: &dyn std::error::Error| RunError::Failed(e.to_string());
    let mut process = serde_json::json!({
        "cmd": shell, "args": ["-l", "-c", cmd], "envs": envs,
    });
    if let Some(cwd) = cwd {
        process["cwd"] = cwd.into();
    }
    let body = serde_json::json!({"process": process, "stdin": false});
    let payload = connect::encode_message(&body).map_err(|e| failed(&e))?;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    let request = Request::post("/process.Process/Start")
        .header(http::header::HOST, "envd")
        .header(http::header::CONTENT_TYPE, connect::CONTENT_TYPE_STREAM)
        .header(connect::HEADER_PROTOCOL_VERSION, "1")
        .header(http::header::AUTHORIZATION, format!("Basic {basic}"))
        .body(Body::from(payload))
        .map_err(|e| failed(&e))?;
    let resp = crate::envd::send(socket, request)
        .await
        .map_err(|e| RunError::Failed(chain(&e)))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        // envd is guest code: read at most 16 KiB of its error.
        let bytes = http_body_util::Limited::new(body, 16 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(RunError::Failed(connect_error(&bytes)));
    }
    let mut decoder = connect::EnvelopeDecoder::new(16 << 20);
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| failed(&e))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        decoder.push(data);
        while let Some(env) = decoder.next_envelope().map_err(|e| failed(&e))? {
            if env.is_end_stream() {
                let v: serde_json::Value = serde_json::from_slice(&env.payload).unwrap_or_default();
                if v.get("error").is_some() {
                    return Err(RunError::Failed(connect_error(&env.payload)));
                }
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&env.payload).unwrap_or_default();
            let event = &v["event"];
            if let Some(data) = event.get("data") {
                for (i, stream) in ["stdout", "stderr"].into_iter().enumerate() {
                    if let Some(b) = data[stream].as_str() {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .unwrap_or_default();
                        pending[i].extend(bytes);
                        while let Some(pos) = pending[i].iter().position(|&c| c == b'\n') {
                            let line: Vec<u8> = pending[i].drain(..=pos).collect();
                            on_line(format!(
                                "[{stream}]: {}",
                                String::from_utf8_lossy(&line).trim_end()
                            ));
                        }
                        // Output without newlines: cut it into lines of at most
                        // MAX_LINE bytes rather than buffer it without bound.
                        while pending[i].len() >= MAX_LINE {
                            let line: Vec<u8> = pending[i].drain(..MAX_LINE).collect();
                            on_line(format!("[{stream}]: {}", String::from_utf8_lossy(&line)));
                        }
                    }
                }
            }
            if let Some(end) = event.get("end") {
                for (i, stream) in ["stdout", "stderr"].into_iter().enumerate() {
                    if !pending[i].is_empty() {
                        on_line(format!(
                            "[{stream}]: {}",
                            String::from_utf8_lossy(&pending[i])
                        ));
                    }
                }
                return Ok(end["exitCode"].as_i64().unwrap_or(0) as i32);
            }
        }
    }
    Err(RunError::Failed(
        "envd's stream ended without an end event".into(),
    ))
}

/// `code: message` of a Connect error body (`{"code","message"}` or `{"error":{..}}`).
fn connect_error(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let e = v.get("error").unwrap_or(&v);
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}
