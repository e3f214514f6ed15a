//! The Kiln control plane: the E2B REST API, API keys, the sandbox manager, the
//! proxy for envd and port traffic, and the store.

#![forbid(unsafe_code)]

pub mod admin_api;
pub mod api;
pub mod app;
pub mod audit;
pub mod authz;
pub mod builds;
pub mod builtin_projects;
pub mod builtins;
pub mod cdp;
pub mod config;
pub mod egress;
pub mod endpoint;
pub mod envd;
pub mod error;
pub mod events;
pub mod exec_watch;
pub mod extract;
pub mod keys;
pub mod live_view;
pub mod manager;
pub mod metrics;
pub mod openapi;
pub mod private_file;
pub mod progress;
pub mod proxy;
pub mod report;
pub mod routes;
pub mod secret_api;
pub mod secrets;
pub mod spell_api;
pub mod spells;
pub mod state;
pub mod store;
pub mod template_api;
pub mod template_runner;
pub mod templates;
pub mod tls_hosts;
pub mod work;

pub use app::{router, serve, ServeError};
pub use config::{BuildConfig, LimitsConfig, ServerConfig};
pub use state::AppState;
