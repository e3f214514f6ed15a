//! The Kiln control-plane API definition: the E2B REST subset Kiln serves, as
//! request and response types and a route table. No implementation lives here: the
//! server (`kiln-server`) implements it and the client (`kiln-client`) calls it.
//!
//! Field names follow E2B's OpenAPI document as the official SDKs send and parse them
//! (note the snake_case `allow_internet_access` among camelCase keys).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod desktop;
pub mod spell;

/// The envd version Kiln reports; the SDK gates features on it (spec §1.6).
pub const ENVD_VERSION: &str = "0.6.13";
/// E2B's public API always answers this client id.
pub const CLIENT_ID: &str = "6532622b";
/// Port on which envd is reached through the proxy.
pub const ENVD_PORT: u16 = 49983;
/// Header that carries an API key on REST calls.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Headers that route envd and port traffic to a sandbox.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// Pagination header of `GET /v2/sandboxes`.
pub const NEXT_TOKEN_HEADER: &str = "x-next-token";
/// Private ports (`allowPublicTraffic: false`) want the sandbox's traffic access
/// token in this header.
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Compares secrets without stopping at the first difference (the length still shows).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /sandboxes` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds from now until the sandbox is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// `false`: a timeout pause keeps only the filesystem (E2B); Kiln's pause always
    /// keeps memory too, a superset (`docs/compatibility.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause_memory: Option<bool>,
    /// Wake the sandbox, once paused, when traffic reaches it (E2B's `lifecycle`
    /// `auto_resume`; only with `autoPause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<AutoResume>,
    /// Kiln's extension: memory of this sandbox in MiB instead of its template's, up to
    /// the server's cap (such a sandbox never comes from a warm pool).
    #[serde(default, rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Kiln's extension: CPUs of this sandbox instead of its template's, up to the
    /// server's cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// E2B's MCP gateway configuration (not supported: refused when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<serde_json::Value>,
    /// E2B's workload identity tokens (not supported: refused when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam: Option<serde_json::Value>,
    /// Volumes to mount (not supported yet: refused when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<serde_json::Value>,
}

/// E2B's `network` object: egress lists, private ports, the Host the sandbox's
/// servers see. Shown back by `GET /sandboxes/{id}` as it was accepted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetwork {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// `false`: every port needs the sandbox's traffic access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    /// The Host header the sandbox's servers see; `${PORT}` becomes the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// Per-host request transforms (not supported yet: refused when non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
    /// A SOCKS5 proxy for egress (not supported: refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
}

/// `PUT /sandboxes/{id}/network` body: replaces the egress configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    /// `false` is the same as `denyOut: ["0.0.0.0/0"]`.
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
}

/// Create/connect answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(default)]
    pub traffic_access_token: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }
}

/// `autoResume` of a create.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

/// E2B's `lifecycle` in a sandbox's info: what its timeout does and whether traffic
/// wakes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// `kill` or `pause`.
    pub on_timeout: String,
    pub auto_resume: bool,
}

/// `GET /sandboxes/{id}` answer; list items share its required fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(default)]
    pub allow_internet_access: Option<bool>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Kiln extension: the isolation runtime running this sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// The token private ports want; shown to the sandbox's team only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
}

/// `POST /sandboxes/{id}/timeout` body.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeoutRequest {
    pub timeout: i64,
}

/// `POST /sandboxes/{id}/connect` body.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectRequest {
    #[serde(default)]
    pub timeout: Option<i64>,
}

/// `POST /sandboxes/{id}/refreshes` body.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefreshRequest {
    #[serde(default)]
    pub duration: Option<i64>,
}

/// One sample of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    pub timestamp: DateTime<Utc>,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// The JSON error body of every REST error, in the shape the SDK maps to its
/// exceptions: `{"code": <http status>, "message": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

/// The proxy's answer for an unknown or killed sandbox (502), which the SDK reads as
/// "the sandbox is gone".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxGoneBody {
    pub sandbox_id: String,
    pub message: String,
    pub code: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn new_sandbox_parses_the_sdk_default_body() {
        let body = r#"{"templateID":"base","timeout":300,"secure":true,"allow_internet_access":true,"metadata":{},"envVars":{}}"#;
        let parsed: NewSandbox = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.template_id, "base");
        assert_eq!(parsed.timeout, Some(300));
        assert_eq!(parsed.secure, Some(true));
        assert_eq!(parsed.allow_internet_access, Some(true));
        assert_eq!(parsed.env_vars, Some(BTreeMap::new()));
    }

    #[test]
    fn sandbox_serializes_with_e2b_key_names() {
        let sbx = Sandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: CLIENT_ID.into(),
            envd_version: ENVD_VERSION.into(),
            alias: None,
            envd_access_token: Some("tok".into()),
            traffic_access_token: None,
            domain: None,
        };
        let v = serde_json::to_value(&sbx).unwrap();
        assert_eq!(v["sandboxID"], "abc");
        assert_eq!(v["templateID"], "base");
        assert_eq!(v["clientID"], CLIENT_ID);
        assert_eq!(v["envdVersion"], ENVD_VERSION);
        assert_eq!(v["envdAccessToken"], "tok");
        assert!(v["domain"].is_null());
    }

    #[test]
    fn detail_uses_uppercase_mb_keys() {
        let now = Utc::now();
        let d = SandboxDetail {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: CLIENT_ID.into(),
            envd_version: ENVD_VERSION.into(),
            started_at: now,
            end_at: now,
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            state: SandboxState::Running,
            alias: None,
            envd_access_token: None,
            allow_internet_access: Some(true),
            domain: None,
            metadata: BTreeMap::new(),
            runtime: Some("jail".into()),
            network: Some(SandboxNetwork {
                deny_out: Some(vec!["0.0.0.0/0".into()]),
                allow_public_traffic: Some(false),
                ..SandboxNetwork::default()
            }),
            traffic_access_token: Some("t".into()),
            lifecycle: Some(Lifecycle {
                on_timeout: "pause".into(),
                auto_resume: true,
            }),
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["lifecycle"]["onTimeout"], "pause");
        assert_eq!(v["lifecycle"]["autoResume"], true);
        // E2B's camelCase keys, and nothing for what was not given.
        assert_eq!(
            v["network"],
            serde_json::json!({"denyOut": ["0.0.0.0/0"], "allowPublicTraffic": false})
        );
        assert_eq!(v["trafficAccessToken"], "t");
        assert_eq!(v["memoryMB"], 512);
        assert_eq!(v["diskSizeMB"], 1024);
        assert_eq!(v["state"], "running");
        assert_eq!(v["allowInternetAccess"], true);
    }
}
