//! Wire types shared by the Kiln host and the in-sandbox daemon (`kiln-envd`).
//!
//! - [`connect`]: the JSON-only Connect protocol layer (envelopes, error codes, headers).
//! - [`process`] and [`filesystem`]: protobuf-JSON messages of E2B's envd services
//!   (`process.Process`, `filesystem.Filesystem`), as documented in `proto/*.proto`.
//! - [`envd`]: envd's HTTP surface (version, headers, `POST /init` body).
//! - [`tunnel`]: Kiln's own TCP tunnel route through envd.
//!
//! Encoding follows protobuf's canonical JSON mapping: lowerCamelCase names on output
//! (snake_case accepted on input), int64 as strings, bytes as standard base64, enums by
//! name (numbers accepted), default values omitted.
#![forbid(unsafe_code)]

pub mod connect;
pub mod envd;
pub mod filesystem;
pub mod pbjson;
pub mod process;
pub mod tunnel;

pub use connect::{Code, ConnectError};
pub use envd::InitRequest;
