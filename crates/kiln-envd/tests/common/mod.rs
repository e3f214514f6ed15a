//! Test harness: starts the real `kiln-envd` binary on a temporary Unix socket, with
//! a generated passwd file whose only users map to the current uid/gid, so the tests
//! need no root (as root they also exercise the uid/gid switch to uid 0).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_proto::connect::{encode_envelope, EnvelopeDecoder};
use serde_json::Value;
use tokio::net::UnixStream;

pub struct Envd {
    child: Child,
    pub socket: PathBuf,
    pub home: PathBuf,
    pub dir: tempfile::TempDir,
}

pub fn uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

pub fn gid() -> u32 {
    // SAFETY: getegid has no preconditions.
    unsafe { libc::getegid() }
}

impl Envd {
    /// Starts envd with default user `tester` (home in the temp dir).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home/tester");
        std::fs::create_dir_all(&home).unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            format!(
                "tester:x:{uid}:{gid}:Tester:{home}:/bin/sh\nother:x:{uid}:{gid}::/:/bin/sh\n",
                uid = uid(),
                gid = gid(),
                home = home.display()
            ),
        )
        .unwrap();
        std::fs::write(&group, format!("testers:x:{}:tester\n", gid())).unwrap();
        let socket = dir.path().join("run/envd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln-envd"))
            .arg("--socket")
            .arg(&socket)
            .arg("--default-user")
            .arg("tester")
            .arg("--passwd-file")
            .arg(&passwd)
            .arg("--group-file")
            .arg(&group)
            .args(extra)
            .env(
                "KILN_ENVD_LOG",
                std::env::var("KILN_ENVD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kiln-envd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "kiln-envd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            home,
            dir,
        }
    }

    /// The envd process's pid (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Sends one request on a fresh connection (upgrades enabled).
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Response<Incoming> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .expect("connect socket");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        sender.send_request(request).await.expect("send request")
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, hyper::HeaderMap, Bytes) {
        let req = Request::get(uri)
            .header("host", "envd")
            .body(Full::default())
            .unwrap();
        collect(self.send(req).await).await
    }

    /// A unary RPC; returns status and the JSON body.
    pub async fn unary(&self, method: &str, body: Value) -> (StatusCode, Value) {
        self.unary_with(method, body, &[]).await
    }

    pub async fn unary_with(
        &self,
        method: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::post(format!("/{method}"))
            .header("host", "envd")
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let (status, headers, body) = collect(self.send(req).await).await;
        if status == StatusCode::OK {
            assert_eq!(headers["content-type"], "application/json");
        }
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, value)
    }

    /// Opens a server stream.
    pub async fn stream(&self, method: &str, body: Value, headers: &[(&str, &str)]) -> EventReader {
        let payload = encode_envelope(0, body.to_string().as_bytes());
        let mut req = Request::post(format!("/{method}"))
            .header("host", "envd")
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.send(req.body(Full::new(payload)).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/connect+json");
        EventReader {
            body: resp.into_body(),
            decoder: EnvelopeDecoder::new(1 << 24),
            end: None,
        }
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn collect(resp: Response<Incoming>) -> (StatusCode, hyper::HeaderMap, Bytes) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

/// Reads a Connect stream message by message.
pub struct EventReader {
    body: Incoming,
    decoder: EnvelopeDecoder,
    /// The end-of-stream payload, once seen.
    pub end: Option<Value>,
}

impl EventReader {
    /// The next data message; `None` after the end-of-stream envelope.
    pub async fn next(&mut self) -> Option<Value> {
        match self.try_next().await {
            Ok(v) => v,
            Err(e) => panic!("stream error: {e}"),
        }
    }

    /// Like `next`, but a broken stream is an `Err` instead of a panic.
    pub async fn try_next(&mut self) -> Result<Option<Value>, hyper::Error> {
        loop {
            if let Some(env) = self.decoder.next_envelope().expect("valid envelopes") {
                let value: Value = serde_json::from_slice(&env.payload).expect("json payload");
                if env.is_end_stream() {
                    self.end = Some(value);
                    return Ok(None);
                }
                return Ok(Some(value));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    /// Like `next`, failing the test after `secs` seconds.
    pub async fn next_within(&mut self, secs: u64) -> Option<Value> {
        tokio::time::timeout(Duration::from_secs(secs), self.next())
            .await
            .expect("stream event timed out")
    }

    /// Reads everything up to the end of the stream.
    pub async fn drain(&mut self, secs: u64) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next_within(secs).await {
            out.push(v);
        }
        out
    }
}

/// Concatenated base64-decoded output of `kind` (`stdout`, `stderr`, `pty`) events.
pub fn output(events: &[Value], kind: &str) -> String {
    use base64::Engine as _;
    let mut out = Vec::new();
    for e in events {
        if let Some(data) = e["event"]["data"][kind].as_str() {
            out.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap(),
            );
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn end_event(events: &[Value]) -> Value {
    events
        .iter()
        .find_map(|e| e["event"].get("end").cloned())
        .expect("end event")
}

pub fn shell(cmd: &str) -> Value {
    serde_json::json!({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}, "stdin": false})
}

pub fn write(path: &Path, data: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap();
}
