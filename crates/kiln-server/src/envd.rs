//! HTTP to a sandbox's envd over the Unix socket the runtime hands out. The socket is
//! the only way into a sandbox: envd has no TCP listener the rest of the host could
//! reach.

use std::path::Path;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("cannot connect to envd")]
    Connect(#[source] kiln_runtime::guest::GuestFileError),
    #[error("HTTP exchange with envd failed")]
    Http(#[source] hyper::Error),
    #[error("envd answered {status} to {what}: {body}")]
    Status {
        what: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("envd did not answer {what} within {} s", .after.as_secs())]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error("port {port} tunnel refused: {status} {body}")]
    Tunnel {
        port: u16,
        status: StatusCode,
        body: String,
    },
}

/// Open one HTTP/1.1 connection to envd and send `req` on it. The connection task
/// keeps running (with upgrades) until the response body and any upgrade are done.
pub async fn send(socket: &Path, req: Request<Body>) -> Result<Response<Incoming>, EnvdError> {
    // The socket's directory is guest-writable: connect only to the socket inode
    // found there, never through a link the guest planted.
    let stream = kiln_runtime::guest::connect_envd(socket)
        .await
        .map_err(EnvdError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(EnvdError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "envd connection ended with an error");
        }
    });
    sender.send_request(req).await.map_err(EnvdError::Http)
}

/// The most of an envd error body the host reads: envd is guest code, and a hostile
/// one could answer with an endless body.
const ERROR_BODY_CAP: usize = 16 * 1024;

async fn read_body(resp: Response<Incoming>) -> String {
    use http_body_util::{BodyExt, Limited};
    match Limited::new(resp.into_body(), ERROR_BODY_CAP)
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("<body unreadable: {e}>"),
    }
}

/// How long `/init` may take: envd answers it at once unless the sandbox is wedged.
const INIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /init`: hand envd its environment, access token and default user; an envd
/// that does not answer within [`INIT_TIMEOUT`] is an error, never a hang.
pub async fn init(socket: &Path, body: &kiln_proto::InitRequest) -> Result<(), EnvdError> {
    tokio::time::timeout(INIT_TIMEOUT, init_once(socket, body))
        .await
        .unwrap_or(Err(EnvdError::Timeout {
            what: "POST /init",
            after: INIT_TIMEOUT,
        }))
}

async fn init_once(socket: &Path, body: &kiln_proto::InitRequest) -> Result<(), EnvdError> {
    let req = Request::post("/init")
        .header(http::header::HOST, "envd")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .expect("static request parts are valid");
    let resp = send(socket, req).await?;
    if resp.status().is_success() {
        return Ok(());
    }
    let status = resp.status();
    Err(EnvdError::Status {
        what: "POST /init",
        status,
        body: read_body(resp).await,
    })
}

/// Open a raw byte stream to `port` inside the sandbox through envd's tunnel.
pub async fn tunnel(socket: &Path, port: u16) -> Result<hyper::upgrade::Upgraded, EnvdError> {
    let req = Request::get(format!("{}{port}", kiln_proto::tunnel::PATH_PREFIX))
        .header(http::header::HOST, "envd")
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, kiln_proto::tunnel::UPGRADE)
        .body(Body::empty())
        .expect("static request parts are valid");
    let resp = send(socket, req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        return Err(EnvdError::Tunnel {
            port,
            status,
            body: read_body(resp).await,
        });
    }
    hyper::upgrade::on(resp).await.map_err(EnvdError::Http)
}

/// How a command run through envd ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit status; -1 when killed by a signal.
    pub code: i32,
    /// Tail of what it wrote to stdout and stderr, for error messages.
    pub output: String,
}

const OUTPUT_TAIL: usize = 4096;

/// Run `bash -l -c command` in the sandbox as `user` through envd's `Start`.
/// With `wait`, read the stream to the end event and return the exit; without, return
/// once the process has started (it keeps running: closing the stream does not kill
/// it, and no `Connect-Timeout-Ms` is sent, so it has no deadline).
pub async fn run(
    socket: &Path,
    command: &str,
    user: &str,
    wait: bool,
) -> Result<Option<Exit>, EnvdError> {
    run_with_token(socket, command, user, wait, None, None).await
}

/// How long after a command's deadline the host stops waiting for envd to report
/// the kill.
const DEADLINE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// [`run`] in a sandbox whose envd requires `access_token` (a secure sandbox), and,
/// with `deadline`, a command envd kills when the deadline passes (its
/// `Connect-Timeout-Ms`); the host stops waiting shortly after it in any case.
pub async fn run_with_token(
    socket: &Path,
    command: &str,
    user: &str,
    wait: bool,
    access_token: Option<&str>,
    deadline: Option<std::time::Duration>,
) -> Result<Option<Exit>, EnvdError> {
    let run = run_once(socket, command, user, wait, access_token, deadline);
    match deadline {
        None => run.await,
        Some(d) => tokio::time::timeout(d + DEADLINE_GRACE, run)
            .await
            .unwrap_or(Err(EnvdError::Timeout {
                what: "process Start",
                after: d + DEADLINE_GRACE,
            })),
    }
}

async fn run_once(
    socket: &Path,
    command: &str,
    user: &str,
    wait: bool,
    access_token: Option<&str>,
    deadline: Option<std::time::Duration>,
) -> Result<Option<Exit>, EnvdError> {
    let process = serde_json::json!({"cmd": "/bin/bash", "args": ["-l", "-c", command]});
    let resp = start(socket, process, Some(user), access_token, deadline).await?;
    let mut output = Vec::new();
    for_each_event(resp, |event| {
        if event.get("start").is_some() && !wait {
            return Some(None);
        }
        if let Some(data) = event.get("data") {
            for stream in ["stdout", "stderr"] {
                output.extend(decode_chunk(&data[stream]));
            }
            if output.len() > OUTPUT_TAIL {
                output.drain(..output.len() - OUTPUT_TAIL);
            }
        }
        event.get("end").map(|end| {
            Some(Exit {
                code: end["exitCode"].as_i64().unwrap_or(0) as i32,
                output: String::from_utf8_lossy(&output).into_owned(),
            })
        })
    })
    .await
}

/// A process to start through envd's `Start` (no shell unless `cmd` is one).
#[derive(Debug, Clone, Default)]
pub struct Exec {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: std::collections::BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// `None`: the sandbox's default user.
    pub user: Option<String>,
}

/// What a process wrote and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `None` when it did not end by itself (killed at its deadline).
    pub exit_code: Option<i32>,
    /// Some output was dropped: each stream keeps its last `cap` bytes.
    pub truncated: bool,
    pub timed_out: bool,
}

/// Run `exec` to its end, keeping the last `cap` bytes of each stream. With
/// `deadline`, envd kills it when the deadline passes (`timed_out`).
pub async fn exec(
    socket: &Path,
    exec: &Exec,
    access_token: Option<&str>,
    deadline: std::time::Duration,
    cap: usize,
) -> Result<Collected, EnvdError> {
    let mut process = serde_json::json!({"cmd": exec.cmd, "args": exec.args, "envs": exec.envs});
    if let Some(cwd) = &exec.cwd {
        process["cwd"] = cwd.clone().into();
    }
    let started = std::time::Instant::now();
    let run = async {
        let resp = start(
            socket,
            process,
            exec.user.as_deref(),
            access_token,
            Some(deadline),
        )
        .await?;
        let mut out = Collected::default();
        let ended = for_each_event(resp, |event| {
            if let Some(data) = event.get("data") {
                for (stream, buf) in [("stdout", &mut out.stdout), ("stderr", &mut out.stderr)] {
                    buf.extend(decode_chunk(&data[stream]));
                    if buf.len() > cap {
                        buf.drain(..buf.len() - cap);
                        out.truncated = true;
                    }
                }
            }
            event.get("end").map(|end| {
                let exited = end["exited"].as_bool().unwrap_or(true);
                exited.then(|| end["exitCode"].as_i64().unwrap_or(0) as i32)
            })
        })
        .await;
        match ended {
            Ok(code) => {
                out.exit_code = code;
                // Killed with its deadline passed: envd's kill at the deadline can end
                // the stream before its `deadline_exceeded` does.
                out.timed_out = code.is_none() && started.elapsed() >= deadline;
                Ok(out)
            }
            // envd ends a process past its deadline with `deadline_exceeded`.
            Err(EnvdError::Status { body, .. }) if body.contains("deadline_exceeded") => {
                out.timed_out = true;
                Ok(out)
            }
            Err(e) => Err(e),
        }
    };
    tokio::time::timeout(deadline + DEADLINE_GRACE, run)
        .await
        .unwrap_or(Err(EnvdError::Timeout {
            what: "process Start",
            after: deadline + DEADLINE_GRACE,
        }))
}

/// Send envd's `Start` for `process` and check the answer's status.
async fn start(
    socket: &Path,
    process: serde_json::Value,
    user: Option<&str>,
    access_token: Option<&str>,
    deadline: Option<std::time::Duration>,
) -> Result<Response<Incoming>, EnvdError> {
    use base64::Engine;
    use kiln_proto::connect;

    let body = serde_json::json!({ "process": process, "stdin": false });
    let payload = connect::encode_message(&body).expect("a JSON value always serializes");
    let mut req = Request::post("/process.Process/Start")
        .header(http::header::HOST, "envd")
        .header(http::header::CONTENT_TYPE, connect::CONTENT_TYPE_STREAM)
        .header(connect::HEADER_PROTOCOL_VERSION, "1");
    if let Some(user) = user {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
        req = req.header(http::header::AUTHORIZATION, format!("Basic {basic}"));
    }
    if let Some(token) = access_token {
        req = req.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
    }
    if let Some(d) = deadline {
        req = req.header("connect-timeout-ms", d.as_millis().max(1).to_string());
    }
    let req = req
        .body(Body::from(payload))
        .expect("static request parts are valid");
    let resp = send(socket, req).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(EnvdError::Status {
            what: "process Start",
            status,
            body: read_body(resp).await,
        });
    }
    Ok(resp)
}

fn decode_chunk(v: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    v.as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_default()
}

/// Feed each `event` of a `Start` stream to `f` until it returns an answer. A stream
/// that ends first, or with an error, is an error.
async fn for_each_event<R>(
    resp: Response<Incoming>,
    mut f: impl FnMut(&serde_json::Value) -> Option<R>,
) -> Result<R, EnvdError> {
    use http_body_util::BodyExt;
    use kiln_proto::connect;

    let mut decoder = connect::EnvelopeDecoder::new(16 << 20);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(EnvdError::Http)?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        decoder.push(data);
        while let Some(env) = decoder.next_envelope().map_err(|e| EnvdError::Status {
            what: "process Start stream",
            status: StatusCode::OK,
            body: e.to_string(),
        })? {
            let v: serde_json::Value = serde_json::from_slice(&env.payload).unwrap_or_default();
            if env.is_end_stream() {
                if let Some(err) = v.get("error") {
                    return Err(EnvdError::Status {
                        what: "process Start",
                        status: StatusCode::OK,
                        body: err.to_string(),
                    });
                }
                continue;
            }
            if let Some(answer) = f(&v["event"]) {
                return Ok(answer);
            }
        }
    }
    Err(EnvdError::Status {
        what: "process Start",
        status: StatusCode::OK,
        body: "stream ended without an end event".into(),
    })
}

fn files_uri(path: &str) -> String {
    let path = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
    format!("/files?path={path}")
}

/// Write `data` to `path` in the sandbox as its default user (envd's `POST /files`).
pub async fn write_file(
    socket: &Path,
    path: &str,
    data: Vec<u8>,
    access_token: Option<&str>,
) -> Result<(), EnvdError> {
    let mut req = Request::post(files_uri(path))
        .header(http::header::HOST, "envd")
        .header(http::header::CONTENT_TYPE, "application/octet-stream");
    if let Some(token) = access_token {
        req = req.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
    }
    let req = req
        .body(Body::from(data))
        .expect("static request parts are valid");
    let resp = send(socket, req).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(EnvdError::Status {
            what: "POST /files",
            status,
            body: read_body(resp).await,
        });
    }
    Ok(())
}

/// Read `path` from the sandbox, at most `cap` bytes: `Ok(None)` when the file is
/// longer (whatever size the guest claims, no more than `cap + 1` bytes are read).
pub async fn read_file(
    socket: &Path,
    path: &str,
    access_token: Option<&str>,
    cap: usize,
) -> Result<Option<Vec<u8>>, EnvdError> {
    use http_body_util::BodyExt;

    let mut req = Request::get(files_uri(path)).header(http::header::HOST, "envd");
    if let Some(token) = access_token {
        req = req.header(kiln_proto::envd::HEADER_ACCESS_TOKEN, token);
    }
    let req = req
        .body(Body::empty())
        .expect("static request parts are valid");
    let resp = send(socket, req).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(EnvdError::Status {
            what: "GET /files",
            status,
            body: read_body(resp).await,
        });
    }
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.map_err(EnvdError::Http)?.data_ref() {
            if out.len() + data.len() > cap {
                return Ok(None);
            }
            out.extend_from_slice(data);
        }
    }
    Ok(Some(out))
}
