//! Template builds, list and delete through the E2B template API (the same sequence
//! the Template SDK drives: create, file links and uploads, start, status polling).

use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;

use crate::{Client, ClientError};

/// One uploaded COPY context: the step's `filesHash` and the tar(.gz) bytes.
pub struct ContextUpload {
    pub files_hash: String,
    pub archive: Vec<u8>,
}

/// A build log line as the server reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct BuildLogEntry {
    pub level: String,
    pub message: String,
    #[serde(default)]
    pub step: Option<String>,
}

/// How a build ended.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub template_id: String,
    pub build_id: String,
    /// `ready` or `error`.
    pub status: String,
    /// The failure's message and step, when it failed.
    pub reason: Option<(String, Option<String>)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
}

#[derive(Deserialize)]
struct FilesLink {
    present: bool,
    url: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    status: String,
    #[serde(default)]
    log_entries: Vec<BuildLogEntry>,
    #[serde(default)]
    reason: Option<Reason>,
}

#[derive(Deserialize)]
struct Reason {
    message: String,
    #[serde(default)]
    step: Option<String>,
}

impl Client {
    /// Builds template `name` from `spec` (a `TemplateBuildStartV2` body), uploading
    /// `uploads` the server does not have yet; each log line goes to `on_log`.
    pub async fn build_template(
        &self,
        name: &str,
        cpu_count: u32,
        memory_mb: u64,
        spec: &serde_json::Value,
        uploads: &[ContextUpload],
        mut on_log: impl FnMut(&BuildLogEntry),
    ) -> Result<BuildOutcome, ClientError> {
        let body = serde_json::json!({"name": name, "cpuCount": cpu_count, "memoryMB": memory_mb});
        let created: Created =
            Self::json(self.call(Method::POST, "/v3/templates", Some(body)).await?).await?;
        let tid = enc(&created.template_id);
        for up in uploads {
            let path = format!("/templates/{tid}/files/{}", up.files_hash);
            let link: FilesLink = Self::json(self.call(Method::GET, &path, None).await?).await?;
            if let (false, Some(url)) = (link.present, link.url) {
                let resp = self
                    .http
                    .put(&url)
                    .body(up.archive.clone())
                    .send()
                    .await
                    .map_err(|source| ClientError::Transport {
                        url: url.clone(),
                        source,
                    })?;
                if !resp.status().is_success() {
                    return Err(ClientError::Api {
                        status: resp.status(),
                        message: format!("uploading the files of {} failed", up.files_hash),
                    });
                }
            }
        }
        let path = format!("/v2/templates/{tid}/builds/{}", created.build_id);
        self.call(Method::POST, &path, Some(spec.clone())).await?;
        let mut offset = 0;
        loop {
            let path = format!(
                "/templates/{tid}/builds/{}/status?logsOffset={offset}&limit=100",
                created.build_id
            );
            let st: Status = Self::json(self.call(Method::GET, &path, None).await?).await?;
            offset += st.log_entries.len();
            let drained = st.log_entries.is_empty();
            for e in &st.log_entries {
                on_log(e);
            }
            if matches!(st.status.as_str(), "ready" | "error") && drained {
                return Ok(BuildOutcome {
                    template_id: created.template_id,
                    build_id: created.build_id,
                    status: st.status,
                    reason: st.reason.map(|r| (r.message, r.step)),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every template the server has (`GET /templates`), as JSON objects.
    pub async fn list_templates(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        Self::json(self.call(Method::GET, "/templates", None).await?).await
    }

    /// Deletes a template (`DELETE /templates/{id}`).
    pub async fn delete_template(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/templates/{}", enc(name)), None)
            .await
            .map(|_| ())
    }
}

/// Percent-encodes a path segment completely (as the SDK does).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
