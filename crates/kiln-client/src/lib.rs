//! A typed Rust client of the Kiln control-plane API (the E2B REST subset), used by
//! the CLI and tests. Sandbox commands go through the same proxy the E2B SDKs use.

#![forbid(unsafe_code)]

mod cdp;
mod exec;
mod files;
mod interpreter;
mod spells;
mod templates;

use std::collections::BTreeMap;

use kiln_api::{
    ErrorBody, NewSandbox, Sandbox, SandboxDetail, TimeoutRequest, API_KEY_HEADER,
    NEXT_TOKEN_HEADER,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

pub use cdp::Cdp;
pub use exec::{ExecEvent, ExecOutput, ExecRequest};
pub use interpreter::{
    check_package_spec, CodeError, CodeEvent, Execution, RunCode, INTERPRETER_PORT,
};
pub use kiln_proto::filesystem::{EntryInfo, FileType};
pub use templates::{BuildLogEntry, BuildOutcome, ContextUpload, GcReport, StartedBuild};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Kiln server at {url}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The request was refused before anything was sent.
    #[error("{0}")]
    Invalid(String),
}

/// A connection to one Kiln server.
#[derive(Clone)]
pub struct Client {
    base: String,
    api_key: String,
    http: reqwest::Client,
}

impl Client {
    /// `base` is the API URL (`E2B_API_URL`), `api_key` an `e2b_…` key.
    pub fn new(base: &str, api_key: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header(API_KEY_HEADER, &self.api_key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Transport { url, source })?;
        checked(resp).await
    }

    async fn json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn create(&self, req: &NewSandbox) -> Result<Sandbox, ClientError> {
        let body = serde_json::to_value(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Self::json(self.call(Method::POST, "/sandboxes", Some(body)).await?).await
    }

    /// Every running sandbox, following pagination.
    pub async fn list(
        &self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxDetail>, ClientError> {
        let filter: Vec<String> = metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100".to_string())];
            if !filter.is_empty() {
                query.push(("metadata", filter.join("&")));
            }
            if let Some(t) = &token {
                query.push(("nextToken", t.clone()));
            }
            let qs = query
                .iter()
                .map(|(k, v)| format!("{k}={}", percent_encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            let resp = self
                .call(Method::GET, &format!("/v2/sandboxes?{qs}"), None)
                .await?;
            token = resp
                .headers()
                .get(NEXT_TOKEN_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string);
            out.extend(Self::json::<Vec<SandboxDetail>>(resp).await?);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<SandboxDetail, ClientError> {
        Self::json(
            self.call(Method::GET, &format!("/sandboxes/{id}"), None)
                .await?,
        )
        .await
    }

    pub async fn kill(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await
            .map(drop)
    }

    pub async fn set_timeout(&self, id: &str, timeout: i64) -> Result<(), ClientError> {
        let body = serde_json::to_value(TimeoutRequest { timeout })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call(
            Method::POST,
            &format!("/sandboxes/{id}/timeout"),
            Some(body),
        )
        .await
        .map(drop)
    }

    /// Pause a sandbox (`POST /sandboxes/{id}/pause`); [`connect`](Self::connect)
    /// resumes it.
    pub async fn pause(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::POST, &format!("/sandboxes/{id}/pause"), None)
            .await
            .map(drop)
    }

    /// Connect to a sandbox: its identity, including the envd access token.
    pub async fn connect(&self, id: &str, timeout: i64) -> Result<Sandbox, ClientError> {
        let body = serde_json::json!({ "timeout": timeout });
        Self::json(
            self.call(
                Method::POST,
                &format!("/sandboxes/{id}/connect"),
                Some(body),
            )
            .await?,
        )
        .await
    }
}

/// `resp` when it succeeded, else the API's (or envd's) error: its status and the
/// `message` of its JSON body, or the body as it is.
pub(crate) async fn checked(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.message)
        .unwrap_or(text);
    Err(ClientError::Api { status, message })
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("a b=c&d"), "a%20b%3Dc%26d");
        assert_eq!(percent_encode("plain-1.2_~"), "plain-1.2_~");
    }
}
