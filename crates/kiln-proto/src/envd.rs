//! envd's plain-HTTP surface: version, headers, well-known paths and `POST /init`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pbjson::double_option;

/// The envd version Kiln's daemon implements (report it as `envdVersion`).
pub const ENVD_VERSION: &str = "0.6.13";
/// The port E2B clients address envd by (`E2b-Sandbox-Port`).
pub const ENVD_PORT: u16 = 49983;
/// Default path of envd's Unix socket inside a sandbox.
pub const DEFAULT_SOCKET_PATH: &str = "/run/kiln/envd.sock";

/// Response header of `POST /init`.
pub const HEADER_ENVD_VERSION: &str = "x-envd-version";
/// Request header carrying the sandbox's access token.
pub const HEADER_ACCESS_TOKEN: &str = "x-access-token";
/// Upload headers `X-Metadata-<key>` become xattrs `user.e2b.<key>`.
pub const HEADER_METADATA_PREFIX: &str = "x-metadata-";

pub const PATH_HEALTH: &str = "/health";
pub const PATH_INIT: &str = "/init";
pub const PATH_FILES: &str = "/files";
pub const PATH_ENVS: &str = "/envs";
pub const PATH_METRICS: &str = "/metrics";

/// Body of `POST /init` (every field optional). Answered with 204 and
/// `X-Envd-Version`.
///
/// ```
/// use kiln_proto::InitRequest;
/// let req = InitRequest {
///     env_vars: Some([("E2B_SANDBOX".to_string(), "true".to_string())].into()),
///     access_token: Some(Some("secret".into())), // set; `Some(None)` clears; `None` keeps
///     ..Default::default()
/// };
/// assert_eq!(
///     serde_json::to_string(&req).unwrap(),
///     r#"{"envVars":{"E2B_SANDBOX":"true"},"accessToken":"secret"}"#
/// );
/// ```
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct InitRequest {
    /// Replaces the sandbox default environment (`E2B_SANDBOX=true`, `E2B_SANDBOX_ID`,
    /// `E2B_TEMPLATE_ID` and the create-time `envVars`). `None` keeps the current one.
    #[serde(
        rename = "envVars",
        alias = "env_vars",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// `None`: keep the current token; `Some(None)` (JSON `null`) or an empty string:
    /// clear it; `Some(Some(t))`: require `X-Access-Token: t` from now on.
    #[serde(
        rename = "accessToken",
        alias = "access_token",
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub access_token: Option<Option<String>>,
    /// User that requests without an explicit user run as.
    #[serde(
        rename = "defaultUser",
        alias = "default_user",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_user: Option<String>,
    /// Working directory for requests with an empty path or cwd.
    #[serde(
        rename = "defaultWorkdir",
        alias = "default_workdir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_workdir: Option<String>,
    /// Host clock, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// The JSON error body envd's plain-HTTP routes answer with: `{"code":401,"message":"…"}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub code: u16,
    pub message: String,
}

/// Message of the 401 answered when `X-Access-Token` is missing or wrong.
pub const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_request_token_states() {
        let keep: InitRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(keep.access_token, None);
        let clear: InitRequest = serde_json::from_str(r#"{"accessToken":null}"#).unwrap();
        assert_eq!(clear.access_token, Some(None));
        let set: InitRequest =
            serde_json::from_str(r#"{"accessToken":"t","envVars":{"A":"1"},"defaultUser":"root","defaultWorkdir":"/w","timestamp":"2026-01-01T00:00:00Z","volumeMounts":[]}"#)
                .unwrap();
        assert_eq!(set.access_token, Some(Some("t".into())));
        assert_eq!(set.default_user.as_deref(), Some("root"));
        assert_eq!(set.default_workdir.as_deref(), Some("/w"));
        assert_eq!(
            set.env_vars.unwrap().get("A").map(String::as_str),
            Some("1")
        );
        let cleared = InitRequest {
            access_token: Some(None),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&cleared).unwrap(),
            r#"{"accessToken":null}"#
        );
    }
}
