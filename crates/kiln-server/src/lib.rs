//! The Kiln control plane: the E2B REST API, API keys, the sandbox manager, the
//! proxy for envd and port traffic, and the store.

#![forbid(unsafe_code)]

pub mod admin_api;
pub mod api;
pub mod app;
pub mod authz;
pub mod builds;
pub mod builtins;
pub mod config;
pub mod envd;
pub mod error;
pub mod keys;
pub mod manager;
pub mod openapi;
pub mod progress;
pub mod proxy;
pub mod store;
pub mod template_runner;
pub mod templates;

pub use app::{router, serve, AppState, ServeError};
pub use config::{BuildConfig, LimitsConfig, ServerConfig};
