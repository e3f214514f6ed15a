//! Template builds, list and delete through the E2B template API (the sequence the
//! Template SDK drives: create, file links and uploads, start; then, instead of status
//! polling, Kiln's streamed build log).

use futures::StreamExt;
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

/// What `POST /templates/gc` removed and kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub removed_layers: u64,
    pub removed_uploads: u64,
    pub removed_images: u64,
    pub removed_bases: u64,
    pub removed_temporary: u64,
    pub freed_bytes: u64,
    pub kept_layers: u64,
    pub kept_recent: u64,
    pub failed: u64,
}

/// A build the server accepted.
#[derive(Debug, Clone)]
pub struct StartedBuild {
    pub template_id: String,
    pub build_id: String,
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
        on_log: impl FnMut(&BuildLogEntry),
    ) -> Result<BuildOutcome, ClientError> {
        let build = self
            .start_template_build(name, cpu_count, memory_mb, spec, uploads)
            .await?;
        self.follow_build(&build, on_log).await
    }

    /// Starts a build of template `name` from `spec` (a `TemplateBuildStartV2` body),
    /// uploading `uploads` the server does not have yet; returns at once with the ids
    /// ([`Self::follow_build`] waits for it, [`Self::cancel_build`] stops it).
    pub async fn start_template_build(
        &self,
        name: &str,
        cpu_count: u32,
        memory_mb: u64,
        spec: &serde_json::Value,
        uploads: &[ContextUpload],
    ) -> Result<StartedBuild, ClientError> {
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
        Ok(StartedBuild {
            template_id: created.template_id,
            build_id: created.build_id,
        })
    }

    /// Follows a started build to its end; each log line goes to `on_log`.
    pub async fn follow_build(
        &self,
        build: &StartedBuild,
        mut on_log: impl FnMut(&BuildLogEntry),
    ) -> Result<BuildOutcome, ClientError> {
        // Kiln streams the log (the SDK polls `/status`; the outcome is the same).
        let path = format!(
            "/templates/{}/builds/{}/logs/stream",
            enc(&build.template_id),
            enc(&build.build_id)
        );
        let resp = self.call(Method::GET, &path, None).await?;
        let mut stream = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ClientError::Protocol(format!("log stream broke: {e}")))?;
            pending.extend_from_slice(&chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let v: serde_json::Value = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Protocol(format!("bad log line: {e}")))?;
                if let Some(status) = v.get("status").and_then(|s| s.as_str()) {
                    let reason = v
                        .get("reason")
                        .and_then(|r| serde_json::from_value::<Reason>(r.clone()).ok());
                    return Ok(BuildOutcome {
                        template_id: build.template_id.clone(),
                        build_id: build.build_id.clone(),
                        status: status.to_string(),
                        reason: reason.map(|r| (r.message, r.step)),
                    });
                }
                let entry: BuildLogEntry = serde_json::from_value(v)
                    .map_err(|e| ClientError::Protocol(format!("bad log line: {e}")))?;
                on_log(&entry);
            }
        }
        Err(ClientError::Protocol(
            "the build's log stream ended without its outcome".into(),
        ))
    }

    /// Cancels a waiting or running build (`DELETE /templates/{id}/builds/{buildID}`,
    /// Kiln's own): it ends failed with the reason "cancelled".
    pub async fn cancel_build(&self, template: &str, build_id: &str) -> Result<(), ClientError> {
        let path = format!("/templates/{}/builds/{}", enc(template), enc(build_id));
        self.call(Method::DELETE, &path, None).await.map(|_| ())
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

    /// Collects the server's template caches now (`POST /templates/gc`, Kiln's own):
    /// removes layers, uploads, images and bases no template needs and nobody used in
    /// the last `keep_unused_days` days (`None`: the server's policy). Waits for builds
    /// in progress.
    pub async fn gc_templates(
        &self,
        keep_unused_days: Option<f64>,
    ) -> Result<GcReport, ClientError> {
        let body = keep_unused_days.map(|d| serde_json::json!({"keepUnusedDays": d}));
        Self::json(self.call(Method::POST, "/templates/gc", body).await?).await
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
