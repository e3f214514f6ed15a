//! The server side of Connect (JSON codec): request extractors, unary replies, and
//! server streams with keepalives and deadlines.
//!
//! Unary errors are answered with the Connect HTTP status and `{"code","message"}`.
//! Streams always answer 200 `application/connect+json`; an error after the handler
//! started goes into the end-of-stream envelope, as connect-go does.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use kiln_proto::connect::{
    self, encode_end_stream, encode_message, ConnectError, CONTENT_TYPE_STREAM, CONTENT_TYPE_UNARY,
    HEADER_KEEPALIVE_INTERVAL, HEADER_TIMEOUT_MS,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::basic_auth_user;

/// Keepalive interval when the client sends no `Keepalive-Ping-Interval`.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);
/// Largest request message accepted (uploads go through `/files`, not RPC).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Per-call context taken from the headers.
#[derive(Debug, Clone)]
pub struct RpcContext {
    /// The Basic-auth user, if the caller named one.
    pub user: Option<String>,
    /// `Connect-Timeout-Ms`.
    pub timeout: Option<Duration>,
    /// `Keepalive-Ping-Interval` (seconds), or [`DEFAULT_KEEPALIVE`].
    pub keepalive: Duration,
}

impl RpcContext {
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ConnectError> {
        let user =
            basic_auth_user(headers).map_err(|e| ConnectError::unauthenticated(e.to_string()))?;
        let timeout = match headers.get(HEADER_TIMEOUT_MS).map(|v| v.to_str()) {
            None => None,
            Some(Ok(text)) => Some(
                connect::parse_timeout_ms(text)
                    .map_err(|e| ConnectError::invalid_argument(e.to_string()))?,
            ),
            Some(Err(_)) => {
                return Err(ConnectError::invalid_argument(
                    "Connect-Timeout-Ms is not ASCII",
                ))
            }
        };
        let keepalive = headers
            .get(HEADER_KEEPALIVE_INTERVAL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&secs| secs > 0)
            .map_or(DEFAULT_KEEPALIVE, Duration::from_secs);
        Ok(Self {
            user,
            timeout,
            keepalive,
        })
    }

    /// The instant `Connect-Timeout-Ms` expires, counted from now.
    pub fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RpcContext {
    type Rejection = RpcError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, RpcError> {
        Self::from_headers(&parts.headers).map_err(RpcError)
    }
}

/// A unary error reply.
#[derive(Debug)]
pub struct RpcError(pub ConnectError);

impl From<ConnectError> for RpcError {
    fn from(e: ConnectError) -> Self {
        Self(e)
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        log_error(&self.0);
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, CONTENT_TYPE_UNARY)],
            self.0.to_json(),
        )
            .into_response()
    }
}

fn log_error(error: &ConnectError) {
    use kiln_proto::Code;
    match error.code {
        Code::Internal | Code::Unknown | Code::DataLoss => {
            tracing::warn!(code = %error.code, message = %error.message, "rpc failed")
        }
        _ => tracing::debug!(code = %error.code, message = %error.message, "rpc rejected"),
    }
}

/// A unary success reply: 200 `application/json`.
pub struct Unary<T>(pub T);

/// Result of a unary handler.
pub type UnaryResult<T> = Result<Unary<T>, RpcError>;

impl<T: Serialize> IntoResponse for Unary<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, CONTENT_TYPE_UNARY)],
                body,
            )
                .into_response(),
            Err(e) => {
                RpcError(ConnectError::internal(format!("encoding reply: {e}"))).into_response()
            }
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Unary<T> {
    type Rejection = RpcError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, RpcError> {
        let body = read_body(req).await?;
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &body
        };
        serde_json::from_slice(body).map(Unary).map_err(|e| {
            RpcError(ConnectError::invalid_argument(format!(
                "invalid request message: {e}"
            )))
        })
    }
}

/// The single request message of a server-streaming call (one envelope).
pub struct StreamRequest<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StreamRequest<T> {
    type Rejection = RpcError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, RpcError> {
        let body = read_body(req).await?;
        let envelopes = connect::decode_envelopes(&body, MAX_MESSAGE_BYTES)
            .map_err(|e| RpcError(ConnectError::invalid_argument(e.to_string())))?;
        let message = envelopes
            .iter()
            .find(|e| !e.is_end_stream())
            .ok_or_else(|| {
                RpcError(ConnectError::invalid_argument(
                    "streaming request carries no message envelope",
                ))
            })?;
        serde_json::from_slice(&message.payload)
            .map(StreamRequest)
            .map_err(|e| {
                RpcError(ConnectError::invalid_argument(format!(
                    "invalid request message: {e}"
                )))
            })
    }
}

async fn read_body(req: Request) -> Result<Bytes, RpcError> {
    axum::body::to_bytes(req.into_body(), MAX_MESSAGE_BYTES)
        .await
        .map_err(|e| {
            RpcError(ConnectError::invalid_argument(format!(
                "reading request body: {e}"
            )))
        })
}

/// An item a stream producer sends: a message, or an error that ends the stream.
pub type StreamItem<T> = Result<T, ConnectError>;

/// A server-streaming reply fed by a channel. The stream sends `keepalive` after
/// `interval` without traffic, ends with `deadline_exceeded` at `deadline`, and ends
/// cleanly when every sender is dropped. Nothing is forwarded once the deadline has
/// passed, whichever of it and an item is seen first: what a deadline's own action
/// produced (a killed process's end) never replaces `deadline_exceeded`.
pub struct EventStream<T> {
    pub rx: mpsc::Receiver<StreamItem<T>>,
    pub keepalive: Option<(Duration, T)>,
    pub deadline: Option<Instant>,
}

enum Phase<T> {
    Open(EventStream<T>),
    Done,
}

impl<T: Serialize + Clone + Send + 'static> IntoResponse for EventStream<T> {
    fn into_response(self) -> Response {
        let frames = stream::unfold(Phase::Open(self), |phase| async move {
            let Phase::Open(mut s) = phase else {
                return None;
            };
            let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
            let idle_until = s
                .keepalive
                .as_ref()
                .map_or(far, |(i, _)| Instant::now() + *i);
            let deadline = s.deadline.unwrap_or(far);
            let expired = || {
                Some(Err(ConnectError::deadline_exceeded(
                    "deadline exceeded (Connect-Timeout-Ms)",
                )))
            };
            let next = tokio::select! {
                item = s.rx.recv() => item.map(|i| i.map(Some)),
                _ = tokio::time::sleep_until(idle_until) => Some(Ok(None)),
                _ = tokio::time::sleep_until(deadline) => expired(),
            };
            // A ready channel can win the select against an expired deadline (a killed
            // process's end event, say): the clock decides, not the order of wakeups.
            let next = match next {
                Some(Err(_)) => next,
                _ if Instant::now() >= deadline => expired(),
                _ => next,
            };
            let (frame, phase) = match next {
                Some(Ok(Some(message))) => (encode(&message), Phase::Open(s)),
                Some(Ok(None)) => {
                    let frame = s.keepalive.as_ref().map(|(_, k)| encode(k));
                    match frame {
                        Some(frame) => (frame, Phase::Open(s)),
                        None => (encode_end_stream(None), Phase::Done),
                    }
                }
                Some(Err(e)) => {
                    log_error(&e);
                    (encode_end_stream(Some(&e)), Phase::Done)
                }
                None => (encode_end_stream(None), Phase::Done),
            };
            Some((Ok::<_, std::convert::Infallible>(frame), phase))
        });
        stream_response(Body::from_stream(frames.boxed()))
    }
}

fn encode<T: Serialize>(message: &T) -> Bytes {
    encode_message(message).unwrap_or_else(|e| {
        encode_end_stream(Some(&ConnectError::internal(format!(
            "encoding message: {e}"
        ))))
    })
}

fn stream_response(body: Body) -> Response {
    // Exactly this content type: the Python client rejects `; charset=…` on streams.
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE_STREAM),
    );
    response
}

/// A stream that fails before its first message: 200 + an end-of-stream error.
pub fn stream_error(error: ConnectError) -> Response {
    log_error(&error);
    stream_response(Body::from(encode_end_stream(Some(&error))))
}

/// A finished stream of `messages` followed by a clean end (client-streaming replies).
pub fn stream_of<T: Serialize>(messages: &[T]) -> Response {
    let mut body = Vec::new();
    for m in messages {
        body.extend_from_slice(&encode(m));
    }
    body.extend_from_slice(&encode_end_stream(None));
    stream_response(Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn context_from_headers() {
        let mut headers = HeaderMap::new();
        let ctx = RpcContext::from_headers(&headers).unwrap();
        assert_eq!(
            (ctx.user, ctx.timeout, ctx.keepalive),
            (None, None, DEFAULT_KEEPALIVE)
        );
        headers.insert("authorization", HeaderValue::from_static("Basic cm9vdDo="));
        headers.insert("connect-timeout-ms", HeaderValue::from_static("60000"));
        headers.insert("keepalive-ping-interval", HeaderValue::from_static("50"));
        let ctx = RpcContext::from_headers(&headers).unwrap();
        assert_eq!(ctx.user.as_deref(), Some("root"));
        assert_eq!(ctx.timeout, Some(Duration::from_secs(60)));
        assert_eq!(ctx.keepalive, Duration::from_secs(50));
        headers.insert("connect-timeout-ms", HeaderValue::from_static("soon"));
        let err = RpcContext::from_headers(&headers).unwrap_err();
        assert_eq!(err.code, kiln_proto::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn event_stream_frames_keepalive_and_end() {
        let (tx, rx) = mpsc::channel(4);
        let resp = EventStream {
            rx,
            keepalive: Some((
                Duration::from_millis(30),
                serde_json::json!({"keepalive": {}}),
            )),
            deadline: None,
        }
        .into_response();
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/connect+json"
        );
        tx.send(Ok(serde_json::json!({"a": 1}))).await.unwrap();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(80)).await;
            drop(tx);
        });
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        sender.await.unwrap();
        let envs = connect::decode_envelopes(&body, 1 << 20).unwrap();
        assert_eq!(&envs[0].payload[..], br#"{"a":1}"#);
        assert!(envs.len() >= 3, "expected a keepalive: {envs:?}");
        assert_eq!(&envs[1].payload[..], br#"{"keepalive":{}}"#);
        let last = envs.last().unwrap();
        assert!(last.is_end_stream());
        assert_eq!(&last.payload[..], b"{}");
    }

    #[tokio::test]
    async fn event_stream_deadline() {
        let (_tx, rx) = mpsc::channel::<StreamItem<serde_json::Value>>(1);
        let resp = EventStream {
            rx,
            keepalive: None,
            deadline: Some(Instant::now() + Duration::from_millis(20)),
        }
        .into_response();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let envs = connect::decode_envelopes(&body, 1 << 20).unwrap();
        assert_eq!(envs.len(), 1);
        assert!(std::str::from_utf8(&envs[0].payload)
            .unwrap()
            .contains("deadline_exceeded"));
    }

    #[tokio::test]
    async fn event_stream_forwards_nothing_after_the_deadline() {
        // An item waiting when the deadline has passed (the end event of the process
        // it killed) is dropped, however the select orders the ready channel and timer.
        for _ in 0..20 {
            let (tx, rx) = mpsc::channel(4);
            let deadline = Instant::now() + Duration::from_millis(2);
            tx.send(Ok(serde_json::json!({"end": {}}))).await.unwrap();
            tokio::time::sleep_until(deadline + Duration::from_millis(2)).await;
            let resp = EventStream {
                rx,
                keepalive: None,
                deadline: Some(deadline),
            }
            .into_response();
            drop(tx);
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let envs = connect::decode_envelopes(&body, 1 << 20).unwrap();
            assert_eq!(envs.len(), 1, "{envs:?}");
            assert!(envs[0].is_end_stream());
            assert!(std::str::from_utf8(&envs[0].payload)
                .unwrap()
                .contains("deadline_exceeded"));
        }
    }
}
