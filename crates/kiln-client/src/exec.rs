//! Run a command in a sandbox through the proxy, the way the E2B SDK does:
//! `process.Process/Start` over Connect streaming JSON, routed by `E2b-Sandbox-Id`.

use base64::Engine;
use futures::StreamExt;
use kiln_proto::connect::{self, EnvelopeDecoder};

use crate::{Client, ClientError};

const MAX_ENVELOPE: usize = 16 << 20;

/// One event of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started { pid: u32 },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// A command to run with `bash -l -c`, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: String,
    /// The sandbox user (default: the template's).
    pub user: Option<String>,
    /// Working directory (default: the user's home).
    pub cwd: Option<String>,
    /// Added to the sandbox's environment for this command.
    pub envs: std::collections::BTreeMap<String, String>,
    /// envd kills the command after this long.
    pub timeout: Option<std::time::Duration>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; -1 when killed by a signal.
    pub exit_code: i32,
    pub status: String,
}

fn b64(v: &serde_json::Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

impl Client {
    /// Run `command` with `bash -l -c` as `user` in sandbox `id`, calling `on_event`
    /// for every start and output event as it arrives.
    pub async fn exec(
        &self,
        id: &str,
        command: &str,
        user: Option<&str>,
        on_event: impl FnMut(ExecEvent),
    ) -> Result<ExecOutput, ClientError> {
        let sandbox = self.connect(id, 300).await?;
        self.exec_with_token(
            id,
            sandbox.envd_access_token.as_deref(),
            command,
            user,
            on_event,
        )
        .await
    }

    /// [`exec`](Self::exec) for a caller that already holds the sandbox's envd access
    /// token (from create or connect): one request, no REST call first.
    pub async fn exec_with_token(
        &self,
        id: &str,
        access_token: Option<&str>,
        command: &str,
        user: Option<&str>,
        on_event: impl FnMut(ExecEvent),
    ) -> Result<ExecOutput, ClientError> {
        let req = ExecRequest {
            command: command.to_string(),
            user: user.map(str::to_string),
            ..ExecRequest::default()
        };
        self.exec_request(id, access_token, &req, on_event).await
    }

    /// Runs `req` to its end, calling `on_event` for every start and output event.
    pub async fn exec_request(
        &self,
        id: &str,
        access_token: Option<&str>,
        req: &ExecRequest,
        on_event: impl FnMut(ExecEvent),
    ) -> Result<ExecOutput, ClientError> {
        let resp = self.start_process(id, access_token, req).await?;
        read_events(resp, on_event, false)
            .await?
            .ok_or_else(|| ClientError::Protocol("command ended without an end event".into()))
    }

    /// Starts `req` and returns its pid as soon as it runs; the command goes on in the
    /// sandbox (envd keeps a process whose client went away) until it ends or reaches
    /// `req.timeout`.
    pub async fn exec_background(
        &self,
        id: &str,
        access_token: Option<&str>,
        req: &ExecRequest,
    ) -> Result<u32, ClientError> {
        let resp = self.start_process(id, access_token, req).await?;
        let mut pid = None;
        read_events(
            resp,
            |e| {
                if let ExecEvent::Started { pid: p } = e {
                    pid = Some(p);
                }
            },
            true,
        )
        .await?;
        pid.ok_or_else(|| ClientError::Protocol("the command did not start".into()))
    }

    async fn start_process(
        &self,
        id: &str,
        access_token: Option<&str>,
        req: &ExecRequest,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}/process.Process/Start", self.base);
        let mut process = serde_json::json!({
            "cmd": "/bin/bash",
            "args": ["-l", "-c", req.command],
        });
        if !req.envs.is_empty() {
            process["envs"] = serde_json::json!(req.envs);
        }
        if let Some(cwd) = &req.cwd {
            process["cwd"] = serde_json::json!(cwd);
        }
        let body = serde_json::json!({"process": process, "stdin": false});
        let envelope =
            connect::encode_message(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut http = self
            .http
            .post(&url)
            .header(kiln_api::SANDBOX_ID_HEADER, id)
            .header(
                kiln_api::SANDBOX_PORT_HEADER,
                kiln_api::ENVD_PORT.to_string(),
            )
            .header("content-type", connect::CONTENT_TYPE_STREAM)
            .header(connect::HEADER_PROTOCOL_VERSION, "1")
            .body(envelope);
        if let Some(token) = access_token {
            http = http.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
        }
        if let Some(user) = &req.user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            http = http.header("authorization", format!("Basic {basic}"));
        }
        if let Some(t) = req.timeout {
            // envd kills the command at this deadline, as for the SDK's `timeout`.
            http = http.header("connect-timeout-ms", t.as_millis().to_string());
        }
        let resp = http
            .send()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        crate::checked(resp).await
    }
}

/// Reads a `Start` stream, reporting events; returns the end, or `None` when
/// `stop_at_start` ended the reading at the start event.
async fn read_events(
    resp: reqwest::Response,
    mut on_event: impl FnMut(ExecEvent),
    stop_at_start: bool,
) -> Result<Option<ExecOutput>, ClientError> {
    let mut decoder = EnvelopeDecoder::new(MAX_ENVELOPE);
    let mut stream = resp.bytes_stream();
    let mut end: Option<ExecOutput> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Protocol(format!("stream broke: {e}")))?;
        decoder.push(&chunk);
        while let Some(env) = decoder
            .next_envelope()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            let v: serde_json::Value = serde_json::from_slice(&env.payload)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            if env.is_end_stream() {
                if let Some(err) = v.get("error") {
                    return Err(ClientError::Protocol(format!(
                        "{}: {}",
                        err["code"].as_str().unwrap_or("unknown"),
                        err["message"].as_str().unwrap_or("")
                    )));
                }
                continue;
            }
            let event = &v["event"];
            if let Some(start) = event.get("start") {
                on_event(ExecEvent::Started {
                    pid: start["pid"].as_u64().unwrap_or(0) as u32,
                });
                if stop_at_start {
                    return Ok(None);
                }
            } else if let Some(data) = event.get("data") {
                if let Some(out) = data.get("stdout") {
                    on_event(ExecEvent::Stdout(b64(out)));
                } else if let Some(err) = data.get("stderr") {
                    on_event(ExecEvent::Stderr(b64(err)));
                }
            } else if let Some(e) = event.get("end") {
                end = Some(ExecOutput {
                    exit_code: e["exitCode"].as_i64().unwrap_or(0) as i32,
                    status: e["status"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
    }
    Ok(end)
}
