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
        mut on_event: impl FnMut(ExecEvent),
    ) -> Result<ExecOutput, ClientError> {
        let url = format!("{}/process.Process/Start", self.base);
        let body = serde_json::json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", command]},
            "stdin": false,
        });
        let envelope =
            connect::encode_message(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut req = self
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
            req = req.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
        }
        if let Some(user) = user {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            req = req.header("authorization", format!("Basic {basic}"));
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Api { status, message });
        }
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
        end.ok_or_else(|| ClientError::Protocol("command ended without an end event".into()))
    }
}
