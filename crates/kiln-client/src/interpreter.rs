//! Run code in a sandbox's code interpreter (`kiln-interpreter` on port 49999, E2B's
//! code-interpreter protocol) through the proxy, the way `e2b-code-interpreter` does:
//! `POST /execute`, answered with NDJSON lines. On top of it, the agent helpers: install
//! packages into the running kernel's environment, and describe that environment.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::{Client, ClientError};

/// The port the code interpreter serves inside a sandbox.
pub const INTERPRETER_PORT: u16 = 49999;

/// What to run: the body of `POST /execute`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunCode {
    pub code: String,
    /// `python` (default), `javascript`/`js`, `typescript`/`ts`, `bash`, ...; runs in
    /// that language's default context. Not together with `context_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    /// Set for this run only.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
}

/// One streamed item of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum CodeEvent {
    Stdout(String),
    Stderr(String),
    /// A result (display data or the cell's value): the SDK's `Result` fields.
    Result(Value),
    Error(CodeError),
}

/// The error a cell raised: exception name, message, traceback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeError {
    pub name: String,
    pub value: String,
    pub traceback: String,
}

/// Everything a run produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Execution {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub results: Vec<Value>,
    pub error: Option<CodeError>,
    pub execution_count: Option<u64>,
}

impl Execution {
    /// The text of the cell's value (its main result), as the SDK's `Execution.text`.
    pub fn text(&self) -> Option<&str> {
        self.results
            .iter()
            .find(|r| r["is_main_result"].as_bool() == Some(true))
            .and_then(|r| r["text"].as_str())
    }

    /// Applies one NDJSON line; returns the event to report, if any.
    fn apply(&mut self, line: &Value) -> Option<CodeEvent> {
        let text = || line["text"].as_str().unwrap_or_default().to_string();
        match line["type"].as_str()? {
            "number_of_executions" => {
                self.execution_count = line["execution_count"].as_u64();
                None
            }
            "stdout" => {
                self.stdout.push(text());
                Some(CodeEvent::Stdout(text()))
            }
            "stderr" => {
                self.stderr.push(text());
                Some(CodeEvent::Stderr(text()))
            }
            "result" => {
                let mut r = line.clone();
                if let Some(o) = r.as_object_mut() {
                    o.remove("type");
                }
                self.results.push(r.clone());
                Some(CodeEvent::Result(r))
            }
            "error" => {
                let field = |k: &str| line[k].as_str().unwrap_or_default().to_string();
                let e = CodeError {
                    name: field("name"),
                    value: field("value"),
                    traceback: field("traceback"),
                };
                self.error = Some(e.clone());
                Some(CodeEvent::Error(e))
            }
            // keepalive, end_of_execution and types added later.
            _ => None,
        }
    }
}

/// Code that pip-installs `packages` (given as a JSON list) with the kernel's own
/// interpreter, printing pip's output as it goes, then makes them importable.
const INSTALL_CODE: &str = r#"
import importlib, subprocess, sys
_kiln_pkgs = __PACKAGES__
_kiln_p = subprocess.Popen(
    [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
     "--no-color", "--root-user-action=ignore", "--break-system-packages", *_kiln_pkgs],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
for _kiln_line in _kiln_p.stdout:
    print(_kiln_line, end="", flush=True)
if _kiln_p.wait() != 0:
    raise RuntimeError(f"pip install {' '.join(_kiln_pkgs)} failed with exit status {_kiln_p.returncode}")
importlib.invalidate_caches()
del _kiln_p, _kiln_pkgs
"#;

/// Code whose value is a JSON description of the kernel's environment.
const ENV_INFO_CODE: &str = r#"
import json as _kiln_json, os as _kiln_os, platform as _kiln_pf, sys as _kiln_sys
import importlib.metadata as _kiln_md
_kiln_json.dumps({
    "python_version": _kiln_pf.python_version(),
    "implementation": _kiln_pf.python_implementation(),
    "executable": _kiln_sys.executable,
    "platform": _kiln_pf.platform(),
    "machine": _kiln_pf.machine(),
    "cwd": _kiln_os.getcwd(),
    "packages": sorted(
        ({"name": d.metadata["Name"], "version": d.version} for d in _kiln_md.distributions()
         if d.metadata["Name"]),
        key=lambda p: p["name"].lower()),
})
"#;

pub use kiln_api::spell::check_package_spec;

impl Client {
    /// Runs `req` in sandbox `id`'s code interpreter, calling `on_event` for every
    /// output as it arrives. `timeout` bounds the whole run (the interpreter
    /// interrupts the kernel when the request goes away).
    pub async fn run_code(
        &self,
        id: &str,
        access_token: Option<&str>,
        req: &RunCode,
        timeout: Option<Duration>,
        mut on_event: impl FnMut(&CodeEvent),
    ) -> Result<Execution, ClientError> {
        let url = format!("{}/execute", self.base);
        let mut http = self
            .http
            .post(&url)
            .header(kiln_api::SANDBOX_ID_HEADER, id)
            .header(kiln_api::SANDBOX_PORT_HEADER, INTERPRETER_PORT.to_string())
            .json(req);
        if let Some(token) = access_token {
            http = http.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
        }
        if let Some(t) = timeout {
            http = http.timeout(t);
        }
        let transport = |source| ClientError::Transport {
            url: url.clone(),
            source,
        };
        let resp = http.send().await.map_err(transport)?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Api { status, message });
        }
        let mut exec = Execution::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut ended = false;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                if e.is_timeout() {
                    ClientError::Protocol(format!(
                        "the code ran longer than {}s and was interrupted",
                        timeout.unwrap_or_default().as_secs_f64()
                    ))
                } else {
                    ClientError::Protocol(format!("stream broke: {e}"))
                }
            })?;
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(line).map_err(|e| {
                    ClientError::Protocol(format!("bad line from the interpreter: {e}"))
                })?;
                ended |= v["type"] == "end_of_execution";
                if let Some(event) = exec.apply(&v) {
                    on_event(&event);
                }
            }
        }
        if !ended {
            return Err(ClientError::Protocol(
                "the interpreter ended the run without end_of_execution".into(),
            ));
        }
        Ok(exec)
    }

    /// `pip install`s `packages` into the environment of sandbox `id`'s Python kernel
    /// (its own interpreter), so the next `run_code` can import them. pip's output
    /// streams to `on_event`; a failed install is the execution's error.
    pub async fn install_packages(
        &self,
        id: &str,
        access_token: Option<&str>,
        packages: &[String],
        on_event: impl FnMut(&CodeEvent),
    ) -> Result<Execution, ClientError> {
        if packages.is_empty() {
            return Err(ClientError::Invalid("name at least one package".into()));
        }
        for p in packages {
            check_package_spec(p).map_err(ClientError::Invalid)?;
        }
        let list =
            serde_json::to_string(packages).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let req = RunCode {
            code: INSTALL_CODE.replace("__PACKAGES__", &list),
            ..RunCode::default()
        };
        self.run_code(id, access_token, &req, None, on_event).await
    }

    /// The Python kernel's environment: version, implementation, executable,
    /// platform, machine, cwd and installed packages (`[{name, version}]`).
    pub async fn environment_info(
        &self,
        id: &str,
        access_token: Option<&str>,
    ) -> Result<Value, ClientError> {
        let req = RunCode {
            code: ENV_INFO_CODE.to_string(),
            ..RunCode::default()
        };
        let exec = self.run_code(id, access_token, &req, None, |_| {}).await?;
        if let Some(e) = exec.error {
            return Err(ClientError::Protocol(format!(
                "reading the environment failed: {}: {}",
                e.name, e.value
            )));
        }
        let text = exec
            .text()
            .ok_or_else(|| ClientError::Protocol("the environment query gave no value".into()))?;
        serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ndjson_lines_build_the_execution() {
        let mut exec = Execution::default();
        let lines = [
            json!({"type": "number_of_executions", "execution_count": 3}),
            json!({"type": "stdout", "text": "hi\n", "timestamp": "t"}),
            json!({"type": "keepalive"}),
            json!({"type": "result", "text": "2", "extra": {}, "is_main_result": true}),
            json!({"type": "result", "png": "iVBO", "extra": {}, "is_main_result": false}),
            json!({"type": "error", "name": "E", "value": "v", "traceback": "tb"}),
            json!({"type": "end_of_execution"}),
        ];
        let events: Vec<CodeEvent> = lines.iter().filter_map(|l| exec.apply(l)).collect();
        assert_eq!(events.len(), 4);
        assert_eq!(exec.execution_count, Some(3));
        assert_eq!(exec.stdout, ["hi\n"]);
        assert_eq!(exec.text(), Some("2"));
        assert_eq!(exec.results.len(), 2);
        assert!(exec.results[0].get("type").is_none());
        assert_eq!(exec.error.as_ref().map(|e| e.name.as_str()), Some("E"));
    }

    #[test]
    fn requests_serialize_like_the_sdk() {
        let r = RunCode {
            code: "1".into(),
            language: Some("js".into()),
            ..RunCode::default()
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"code": "1", "language": "js"})
        );
    }
}
