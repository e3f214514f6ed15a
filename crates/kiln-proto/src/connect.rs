//! The Connect protocol, JSON codec only (what E2B's SDKs speak to envd).
//!
//! - Unary: `POST /{pkg.Service}/{Method}`, `Content-Type: application/json`, one JSON
//!   object each way. Errors: non-200 status (see [`Code::http_status`]) with body
//!   `{"code":"not_found","message":"…"}`.
//! - Server streaming: request and response are sequences of envelopes (1 flag byte,
//!   u32 big-endian length, JSON payload) under `Content-Type: application/connect+json`
//!   (exactly; the Python client rejects parameters). The response ends with an
//!   end-of-stream envelope (flag `0x02`) holding `{}` or `{"error":{…}}`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Content type of unary requests and responses.
pub const CONTENT_TYPE_UNARY: &str = "application/json";
/// Content type of streaming requests and responses. Send it with no parameters.
pub const CONTENT_TYPE_STREAM: &str = "application/connect+json";
/// Request header carrying the caller's deadline in milliseconds.
pub const HEADER_TIMEOUT_MS: &str = "connect-timeout-ms";
/// Request header carrying the Connect protocol version (`1`).
pub const HEADER_PROTOCOL_VERSION: &str = "connect-protocol-version";
/// E2B's request header: seconds of silence after which a stream sends a keepalive.
pub const HEADER_KEEPALIVE_INTERVAL: &str = "keepalive-ping-interval";

/// Envelope flag: the payload is compressed (never used by Kiln or the E2B SDKs).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Size of an envelope header (flag byte + u32 length).
pub const ENVELOPE_HEADER_LEN: usize = 5;

/// Connect error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// Every code, in gRPC numbering order.
    pub const ALL: [Code; 16] = [
        Code::Canceled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The wire name, e.g. `"invalid_argument"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// HTTP status of a unary error response with this code (Connect specification).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a Connect client infers from a non-Connect HTTP error status.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            500 => Code::Internal,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unrecognised Connect code name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown Connect error code {0:?}")]
pub struct UnknownCode(pub String);

impl FromStr for Code {
    type Err = UnknownCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Code::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCode(s.to_owned()))
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        // A client maps codes it does not know to `unknown`; so do we.
        Ok(name.parse().unwrap_or(Code::Unknown))
    }
}

/// A Connect error: what a unary error body or an end-of-stream `error` carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    pub code: Code,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    pub fn unknown(message: impl Into<String>) -> Self {
        Self::new(Code::Unknown, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(Code::Unimplemented, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(Code::DeadlineExceeded, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    /// HTTP status for a unary error response.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The unary error body: `{"code":"…","message":"…"}`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| br#"{"code":"internal"}"#.to_vec())
    }
}

/// Payload of the end-of-stream envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndOfStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConnectError>,
    /// Trailers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Vec<String>>,
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Frames `payload` as one envelope.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).expect("envelope payloads are far below 4 GiB");
    let mut out = BytesMut::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Frames `message` as a data envelope (flag 0).
pub fn encode_message<T: Serialize>(message: &T) -> Result<Bytes, serde_json::Error> {
    Ok(encode_envelope(0, &serde_json::to_vec(message)?))
}

/// The end-of-stream envelope: `{}` on success, `{"error":{…}}` on failure.
pub fn encode_end_stream(error: Option<&ConnectError>) -> Bytes {
    let end = EndOfStream {
        error: error.cloned(),
        metadata: BTreeMap::new(),
    };
    let payload = serde_json::to_vec(&end).unwrap_or_else(|_| b"{}".to_vec());
    encode_envelope(FLAG_END_STREAM, &payload)
}

/// Why a byte stream is not a valid sequence of envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside an envelope ({buffered} bytes left over)")]
    Truncated { buffered: usize },
    #[error("compressed envelopes are not supported (flags {flags:#04x})")]
    Compressed { flags: u8 },
}

/// Incremental envelope decoder: feed bytes with [`push`](Self::push), take envelopes
/// with [`next_envelope`](Self::next_envelope), and call [`finish`](Self::finish) at EOF.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max_len: usize,
}

impl EnvelopeDecoder {
    /// A decoder refusing payloads above `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_len,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete envelope, or `None` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buf.len() < ENVELOPE_HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_len {
            return Err(EnvelopeError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed { flags });
        }
        if self.buf.len() < ENVELOPE_HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(ENVELOPE_HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Checks that no partial envelope is left at end of input.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

/// Splits a complete body into envelopes.
pub fn decode_envelopes(body: &[u8], max_len: usize) -> Result<Vec<Envelope>, EnvelopeError> {
    let mut decoder = EnvelopeDecoder::new(max_len);
    decoder.push(body);
    let mut out = Vec::new();
    while let Some(envelope) = decoder.next_envelope()? {
        out.push(envelope);
    }
    decoder.finish()?;
    Ok(out)
}

/// An invalid `Connect-Timeout-Ms` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Connect-Timeout-Ms {0:?}: expected 1 to 10 ASCII digits")]
pub struct InvalidTimeout(pub String);

/// Parses `Connect-Timeout-Ms` (at most 10 digits, per the Connect specification).
pub fn parse_timeout_ms(value: &str) -> Result<Duration, InvalidTimeout> {
    let value = value.trim();
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidTimeout(value.to_owned()));
    }
    value
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| InvalidTimeout(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_map_to_statuses() {
        for code in Code::ALL {
            assert_eq!(code.as_str().parse::<Code>().unwrap(), code);
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(serde_json::from_str::<Code>(&json).unwrap(), code);
        }
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::InvalidArgument.http_status(), 400);
        assert_eq!(Code::Canceled.http_status(), 499);
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(Code::from_http_status(502), Code::Unavailable);
        assert_eq!(
            serde_json::from_str::<Code>(r#""nope""#).unwrap(),
            Code::Unknown
        );
    }

    #[test]
    fn error_body_matches_spec() {
        let err = ConnectError::not_found("file not found: /x");
        assert_eq!(
            err.to_json(),
            br#"{"code":"not_found","message":"file not found: /x"}"#
        );
        assert_eq!(err.http_status(), 404);
        assert_eq!(err.to_string(), "not_found: file not found: /x");
    }

    #[test]
    fn end_stream_envelopes() {
        assert_eq!(&encode_end_stream(None)[..], b"\x02\x00\x00\x00\x02{}");
        let err = ConnectError::new(Code::Internal, "boom");
        let env = encode_end_stream(Some(&err));
        let decoded = decode_envelopes(&env, 1024).unwrap();
        assert_eq!(decoded.len(), 1);
        assert!(decoded[0].is_end_stream());
        assert_eq!(
            &decoded[0].payload[..],
            br#"{"error":{"code":"internal","message":"boom"}}"#
        );
        let end: EndOfStream = serde_json::from_slice(&decoded[0].payload).unwrap();
        assert_eq!(end.error, Some(err));
    }

    #[test]
    fn spec_request_envelope_decodes() {
        // §4.5: `commands.run("echo hi")`, as the SDK frames it.
        let json = br#"{"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"]}, "stdin": false}"#;
        assert_eq!(json.len(), 0x52);
        let mut body = vec![0, 0, 0, 0, 0x52];
        body.extend_from_slice(json);
        let envs = decode_envelopes(&body, 1 << 20).unwrap();
        assert_eq!(
            envs,
            vec![Envelope {
                flags: 0,
                payload: Bytes::from_static(json)
            }]
        );
    }

    #[test]
    fn decoder_handles_split_input_and_errors() {
        let mut stream = encode_envelope(0, b"{\"a\":1}").to_vec();
        stream.extend_from_slice(&encode_end_stream(None));
        let mut decoder = EnvelopeDecoder::new(64);
        let mut got = Vec::new();
        for byte in &stream {
            decoder.push(std::slice::from_ref(byte));
            while let Some(env) = decoder.next_envelope().unwrap() {
                got.push(env);
            }
        }
        decoder.finish().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], b"{\"a\":1}");
        assert!(got[1].is_end_stream());

        assert_eq!(
            decode_envelopes(&stream[..7], 64),
            Err(EnvelopeError::Truncated { buffered: 7 })
        );
        assert_eq!(
            decode_envelopes(&encode_envelope(0, &[b' '; 65]), 64),
            Err(EnvelopeError::TooLarge { len: 65, max: 64 })
        );
        assert_eq!(
            decode_envelopes(&encode_envelope(1, b"{}"), 64),
            Err(EnvelopeError::Compressed { flags: 1 })
        );
    }

    #[test]
    fn timeout_header() {
        assert_eq!(parse_timeout_ms("60000").unwrap(), Duration::from_secs(60));
        assert!(parse_timeout_ms("").is_err());
        assert!(parse_timeout_ms("-1").is_err());
        assert!(parse_timeout_ms("12345678901").is_err());
    }
}
