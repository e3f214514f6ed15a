//! Executions seen by the proxy, for the metrics: a command is a
//! `process.Process/Start` to envd, whose Connect stream ends with the exit code; a
//! `run_code` is a `POST /execute` to the code interpreter, whose NDJSON answer has an
//! `error` line when the code raised. [`Watched`] passes the answer through untouched
//! while reading it, and records the execution when the answer ends (or the client
//! goes away: then it counts, but not as failed, since how it ended is unknown).
//!
//! The guest writes these answers: parsing is bounded (envelopes up to 16 MiB, lines
//! up to 1 MiB; beyond that the watcher stops looking) and never changes what the
//! client gets.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use hyper::body::Frame;
use kiln_proto::connect::EnvelopeDecoder;

use crate::audit::{AuditLog, Event};
use crate::metrics::{ExecKind, Metrics};

/// The code interpreter's port (`e2b-code-interpreter`).
pub const INTERPRETER_PORT: u16 = 49999;
const MAX_ENVELOPE: usize = 16 << 20;
const MAX_LINE: usize = 1 << 20;
/// How much of a `run_code` request is kept to read its language.
const MAX_REQUEST_PEEK: usize = 64 << 10;

/// The audit record an execution makes when it ends: prefilled (sandbox, team,
/// agent, origin), and for `run_code` the start of the request, to read its language.
pub struct AuditNote {
    pub log: Arc<AuditLog>,
    pub event: Event,
    pub request: Option<Arc<std::sync::Mutex<Vec<u8>>>>,
}

impl AuditNote {
    fn finish(mut self, kind: ExecKind, failed: bool, took: std::time::Duration) {
        let language = match kind {
            ExecKind::Command => "bash".to_string(),
            ExecKind::RunCode => self
                .request
                .as_ref()
                .and_then(|r| {
                    let peek = r.lock().unwrap_or_else(|e| e.into_inner());
                    serde_json::from_slice::<serde_json::Value>(&peek).ok()
                })
                .and_then(|v| v["language"].as_str().map(|l| l.chars().take(32).collect()))
                .unwrap_or_else(|| "python".to_string()),
        };
        self.event.success = !failed;
        self.log
            .record(self.event.language(&language).duration(took));
    }
}

/// Which execution, if any, a request to `port` and `path` is.
pub fn kind_of(port: u16, method: &http::Method, path: &str) -> Option<ExecKind> {
    match (port, path) {
        (kiln_api::ENVD_PORT, "/process.Process/Start") => Some(ExecKind::Command),
        (INTERPRETER_PORT, "/execute") if method == http::Method::POST => Some(ExecKind::RunCode),
        _ => None,
    }
}

/// What the answer said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Unknown,
    Succeeded,
    Failed,
}

enum Reader {
    Connect(EnvelopeDecoder),
    /// The line so far, and whether it is too long to read (skipped to its end).
    Ndjson {
        line: Vec<u8>,
        skipping: bool,
    },
    /// Gave up (an oversized envelope or line, or a malformed stream).
    Blind,
}

pub struct Watch {
    kind: ExecKind,
    metrics: Arc<Metrics>,
    began: Instant,
    reader: Reader,
    verdict: Verdict,
    recorded: bool,
    audit: Option<AuditNote>,
}

impl Watch {
    fn feed(&mut self, data: &[u8]) {
        match &mut self.reader {
            Reader::Connect(decoder) => {
                decoder.push(data);
                loop {
                    match decoder.next_envelope() {
                        Ok(Some(env)) => {
                            let v = connect_verdict(env.is_end_stream(), &env.payload);
                            if v != Verdict::Unknown {
                                self.verdict = v;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            self.reader = Reader::Blind;
                            break;
                        }
                    }
                }
            }
            Reader::Ndjson { line, skipping } => {
                let mut rest = data;
                while let Some(at) = rest.iter().position(|&b| b == b'\n') {
                    if !*skipping && line.len() + at <= MAX_LINE {
                        line.extend_from_slice(&rest[..at]);
                        if ndjson_line_failed(line) {
                            self.verdict = Verdict::Failed;
                        }
                    }
                    line.clear();
                    *skipping = false;
                    rest = &rest[at + 1..];
                }
                if *skipping || line.len() + rest.len() > MAX_LINE {
                    // Too long to be a line worth reading: skip to its end.
                    line.clear();
                    *skipping = true;
                } else {
                    line.extend_from_slice(rest);
                }
            }
            Reader::Blind => {}
        }
    }

    /// Counts the execution once: failed only when its answer said so (a command's
    /// non-zero exit or error, a run_code's error line).
    fn record(&mut self) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let failed = self.verdict == Verdict::Failed;
        let took = self.began.elapsed();
        self.metrics
            .execution(self.kind, took.as_secs_f64(), failed);
        if let Some(note) = self.audit.take() {
            note.finish(self.kind, failed, took);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.record();
    }
}

/// A command's verdict from one Connect envelope: its end event's exit code, or an
/// end-of-stream with an error (a deadline, a kill).
fn connect_verdict(end_stream: bool, payload: &[u8]) -> Verdict {
    let needle: &[u8] = if end_stream { b"\"error\"" } else { b"\"end\"" };
    if !payload.windows(needle.len()).any(|w| w == needle) {
        return Verdict::Unknown;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Verdict::Unknown;
    };
    if end_stream {
        return if v.get("error").is_some() {
            Verdict::Failed
        } else {
            Verdict::Unknown
        };
    }
    match v["event"]["end"].get("exitCode").and_then(|c| c.as_i64()) {
        Some(0) => Verdict::Succeeded,
        Some(_) => Verdict::Failed,
        // Protobuf's JSON leaves out a zero exit code.
        None if v["event"].get("end").is_some() => Verdict::Succeeded,
        None => Verdict::Unknown,
    }
}

fn ndjson_line_failed(line: &[u8]) -> bool {
    let needle: &[u8] = b"\"error\"";
    if !line.windows(needle.len()).any(|w| w == needle) {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(line)
        .is_ok_and(|v| v["type"].as_str() == Some("error"))
}

/// What a [`Tap`] tells about the body it passes through.
pub trait Observer: Send + Unpin + 'static {
    fn data(&mut self, data: &[u8]);
    /// The body ended (or failed); not called when it is dropped unread.
    fn end(&mut self) {}
}

/// A body passed through untouched while an [`Observer`] sees its bytes.
pub struct Tap<O> {
    inner: Body,
    observer: O,
}

impl<O: Observer> HttpBody for Tap<O> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.observer.data(data);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.observer.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Observer for Watch {
    fn data(&mut self, data: &[u8]) {
        self.feed(data);
    }

    fn end(&mut self) {
        self.record();
    }
}

/// An answer body that records its execution when it ends (or is dropped).
pub type Watched = Tap<Watch>;

impl Watched {
    pub fn new(
        inner: Body,
        kind: ExecKind,
        metrics: Arc<Metrics>,
        began: Instant,
        audit: Option<AuditNote>,
    ) -> Self {
        let reader = match kind {
            ExecKind::Command => Reader::Connect(EnvelopeDecoder::new(MAX_ENVELOPE)),
            ExecKind::RunCode => Reader::Ndjson {
                line: Vec::new(),
                skipping: false,
            },
        };
        Tap {
            inner,
            observer: Watch {
                kind,
                metrics,
                began,
                reader,
                verdict: Verdict::Unknown,
                recorded: false,
                audit,
            },
        }
    }
}

/// Keeps the first bytes of a body (a `run_code` request, for its language).
pub struct Peek(Arc<std::sync::Mutex<Vec<u8>>>);

impl Observer for Peek {
    fn data(&mut self, data: &[u8]) {
        let mut peek = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = MAX_REQUEST_PEEK.saturating_sub(peek.len());
        peek.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// A request body passed through untouched, its first bytes kept in `peek`.
pub type Peeked = Tap<Peek>;

impl Peeked {
    pub fn new(inner: Body, peek: Arc<std::sync::Mutex<Vec<u8>>>) -> Self {
        Tap {
            inner,
            observer: Peek(peek),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn envelope(v: serde_json::Value) -> Vec<u8> {
        kiln_proto::connect::encode_message(&v).unwrap().to_vec()
    }

    async fn drain(kind: ExecKind, chunks: Vec<Vec<u8>>) -> String {
        let metrics = Arc::new(Metrics::new());
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        let body = Watched::new(
            Body::from_stream(stream),
            kind,
            metrics.clone(),
            Instant::now(),
            None,
        );
        body.collect().await.unwrap();
        metrics.encode()
    }

    #[tokio::test]
    async fn command_exit_codes_decide_failure_across_split_chunks() {
        let mut bytes = envelope(serde_json::json!({"event": {"start": {"pid": 3}}}));
        bytes.extend(envelope(
            serde_json::json!({"event": {"end": {"exitCode": 2, "exited": true}}}),
        ));
        let (a, b) = bytes.split_at(7);
        let text = drain(ExecKind::Command, vec![a.to_vec(), b.to_vec()]).await;
        assert!(
            text.contains("e2b_executions_failed_total{kind=\"command\"} 1"),
            "{text}"
        );

        let ok = envelope(
            serde_json::json!({"event": {"end": {"exited": true, "status": "exit status 0"}}}),
        );
        let text = drain(ExecKind::Command, vec![ok]).await;
        assert!(
            text.contains("e2b_executions_total{kind=\"command\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("e2b_executions_failed_total{kind=\"command\"}"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn run_code_fails_on_an_error_line_only() {
        let ok = b"{\"type\":\"stdout\",\"text\":\"error\"}\n{\"type\":\"end_of_execution\"}\n";
        let text = drain(ExecKind::RunCode, vec![ok.to_vec()]).await;
        assert!(!text.contains("e2b_executions_failed_total"), "{text}");
        let raised = b"{\"type\":\"stdout\",\"text\":\"x\"}\n{\"type\":\"err".to_vec();
        let rest = b"or\",\"name\":\"ZeroDivisionError\"}\n".to_vec();
        let text = drain(ExecKind::RunCode, vec![raised, rest]).await;
        assert!(
            text.contains("e2b_executions_failed_total{kind=\"run_code\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_hostile_answer_is_passed_through_and_not_parsed_without_bound() {
        // One endless line: the watcher stops collecting it, the client gets it all.
        let chunk = vec![b'a'; 1 << 20];
        let text = drain(ExecKind::RunCode, vec![chunk.clone(), chunk.clone(), chunk]).await;
        assert!(
            text.contains("e2b_executions_total{kind=\"run_code\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn only_commands_and_run_code_are_executions() {
        let post = http::Method::POST;
        assert_eq!(
            kind_of(49983, &post, "/process.Process/Start"),
            Some(ExecKind::Command)
        );
        assert_eq!(kind_of(49999, &post, "/execute"), Some(ExecKind::RunCode));
        assert_eq!(kind_of(49983, &post, "/filesystem.Filesystem/Stat"), None);
        assert_eq!(kind_of(49999, &http::Method::GET, "/execute"), None);
        assert_eq!(kind_of(8080, &post, "/execute"), None);
    }
}
