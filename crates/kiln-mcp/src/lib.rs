//! Kiln's MCP server: sandboxes as tools for any MCP client, over stdio (`kiln mcp`)
//! or Streamable HTTP (`kiln mcp --listen`), plus the seed's REST bridge on the same
//! listener. A client of the Kiln API (`kiln-client`), acting with the caller's API
//! key: it reaches nothing the key could not reach itself.
//!
//! Layers, bottom up: `error`, `args` (typed arguments and their schemas), `shape`
//! (tool answers), `tools` (the catalog), `reaper` and `session` (what a session owns),
//! `ops` (the tools: one implementation), then the faces: `server` (MCP, stdio),
//! `bridge` (REST) and `listen` (the HTTP listener and its authentication).

#![forbid(unsafe_code)]

mod args;
mod bridge;
mod error;
mod listen;
mod ops;
mod reaper;
mod server;
mod session;
mod shape;
mod signal;
mod tools;

pub use error::{AuthError, ToolError};
pub use listen::{serve_http, DEFAULT_LISTEN};
pub use reaper::Reaper;
pub use server::{serve_stdio, KilnMcp};
pub use session::Shared;
