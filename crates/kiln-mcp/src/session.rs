//! One MCP session's view of Kiln: the API it calls, the sandboxes it made (killed when
//! it ends unless kept), and its own code-interpreter sandbox that calls without a
//! `sandbox_id` share.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_api::{NewSandbox, SandboxState};
use kiln_client::Client;

use crate::args::{check_sandbox_id, DEFAULT_TEMPLATE};
use crate::error::ToolError;
use crate::reaper::Reaper;

/// Lifetime of the session's own sandbox, renewed while the session uses it.
const SESSION_SANDBOX_SECS: i64 = 900;
/// Renew it on use when the last renewal is older than this.
const RENEW_AFTER: Duration = Duration::from_secs(60);

/// What every session of a server shares.
#[derive(Clone)]
pub struct Shared {
    /// The Kiln API (`E2B_API_URL`).
    pub api_url: String,
    /// The key of `--api-key`: stdio's, and the one `E2B_MCP_SERVER_TOKEN` stands for.
    pub default_key: Option<String>,
    pub reaper: Reaper,
    /// The screen of desktops the desktop tools start (`E2B_DESKTOP_RESOLUTION`).
    pub desktop_resolution: kiln_api::desktop::Resolution,
}

/// A sandbox to work in: its id and envd access token.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: String,
    pub token: Option<String>,
}

struct SessionSandbox {
    target: Target,
    renewed: Instant,
}

/// Whether sandboxes created in this session outlive its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// An MCP session: created sandboxes are killed when it ends, unless kept.
    Session,
    /// One bridge request: `create_sandbox` sandboxes stay (to their timeout or a
    /// DELETE); a sandbox made only to serve the call is killed after it.
    Request,
}

pub struct Session {
    shared: Shared,
    number: u64,
    pub(crate) lifetime: Lifetime,
    clients: Mutex<HashMap<String, Client>>,
    /// The key the session's first call came with; it is the only one it serves.
    bound: Mutex<Option<String>>,
    tokens: Mutex<HashMap<String, Option<String>>>,
    /// The session's own sandbox, per API key (one in practice); the async lock
    /// keeps two first calls from making two.
    own: tokio::sync::Mutex<HashMap<String, SessionSandbox>>,
}

impl Session {
    pub fn new(shared: Shared, lifetime: Lifetime) -> Self {
        let number = shared.reaper.open();
        Session {
            shared,
            number,
            lifetime,
            clients: Mutex::default(),
            bound: Mutex::default(),
            tokens: Mutex::default(),
            own: tokio::sync::Mutex::default(),
        }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Ties the session to the first key it serves; false for any other key.
    pub fn bind(&self, key: &str) -> bool {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        match bound.as_deref() {
            Some(k) => k == key,
            None => {
                *bound = Some(key.to_string());
                true
            }
        }
    }

    /// The API client acting with `key`.
    pub fn client(&self, key: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(key.to_string())
            .or_insert_with(|| Client::new(&self.shared.api_url, key))
            .clone()
    }

    /// Creates a sandbox; the session kills it at its end unless `keep`.
    pub async fn create(
        &self,
        client: &Client,
        req: &NewSandbox,
        keep: bool,
    ) -> Result<Target, ToolError> {
        let sbx = client.create(req).await.map_err(ToolError::api(format!(
            "creating a sandbox from template {}",
            req.template_id
        )))?;
        if !keep {
            self.shared
                .reaper
                .track(self.number, &sbx.sandbox_id, client);
        }
        self.remember(&sbx.sandbox_id, sbx.envd_access_token.clone());
        Ok(Target {
            id: sbx.sandbox_id,
            token: sbx.envd_access_token,
        })
    }

    fn remember(&self, id: &str, token: Option<String>) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), token);
    }

    /// The session kills `id` no more (it was killed, or the caller wants to keep it).
    pub fn release(&self, id: &str) {
        self.shared.reaper.release(self.number, id);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The sandbox a call works in: `sandbox_id` if given (resumed if paused), else
    /// the session's own code-interpreter sandbox, made on first use.
    pub async fn target(
        &self,
        tool: &str,
        key: &str,
        sandbox_id: Option<&str>,
        keep: bool,
    ) -> Result<Target, ToolError> {
        let client = self.client(key);
        match sandbox_id {
            Some(id) => {
                check_sandbox_id(tool, id)?;
                let cached = self
                    .tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .cloned();
                if let Some(token) = cached {
                    if keep {
                        self.release(id);
                        self.remember(id, token.clone());
                    }
                    return Ok(Target {
                        id: id.to_string(),
                        token,
                    });
                }
                let detail = client
                    .get(id)
                    .await
                    .map_err(ToolError::api(format!("looking up sandbox {id}")))?;
                let token = if detail.state == SandboxState::Paused {
                    client
                        .connect(id, SESSION_SANDBOX_SECS)
                        .await
                        .map_err(ToolError::api(format!("resuming paused sandbox {id}")))?
                        .envd_access_token
                } else {
                    detail.envd_access_token
                };
                self.remember(id, token.clone());
                Ok(Target {
                    id: id.to_string(),
                    token,
                })
            }
            None => self.own_sandbox(&client, key, keep).await,
        }
    }

    async fn own_sandbox(
        &self,
        client: &Client,
        key: &str,
        keep: bool,
    ) -> Result<Target, ToolError> {
        let mut own = self.own.lock().await;
        if let Some(s) = own.get_mut(key) {
            if keep {
                self.shared.reaper.release(self.number, &s.target.id);
            }
            if s.renewed.elapsed() > RENEW_AFTER {
                match client.set_timeout(&s.target.id, SESSION_SANDBOX_SECS).await {
                    Ok(()) => s.renewed = Instant::now(),
                    // Gone (killed by a tool call or its timeout): make a new one.
                    Err(kiln_client::ClientError::Api { status, .. }) if status.as_u16() == 404 => {
                        own.remove(key);
                        return self.own_sandbox_new(&mut own, client, key, keep).await;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %s.target.id, error = %e, "could not renew the session's sandbox")
                    }
                }
            }
            return Ok(s.target.clone());
        }
        self.own_sandbox_new(&mut own, client, key, keep).await
    }

    async fn own_sandbox_new(
        &self,
        own: &mut HashMap<String, SessionSandbox>,
        client: &Client,
        key: &str,
        keep: bool,
    ) -> Result<Target, ToolError> {
        let req = NewSandbox {
            template_id: DEFAULT_TEMPLATE.to_string(),
            timeout: Some(SESSION_SANDBOX_SECS),
            secure: Some(true),
            allow_internet_access: Some(true),
            metadata: Some([("kiln-mcp".to_string(), "session".to_string())].into()),
            ..NewSandbox::default()
        };
        let target = self.create(client, &req, keep).await?;
        own.insert(
            key.to_string(),
            SessionSandbox {
                target: target.clone(),
                renewed: Instant::now(),
            },
        );
        Ok(target)
    }

    /// Forgets a sandbox the session used as its own once it is killed.
    pub async fn forget(&self, id: &str) {
        self.release(id);
        self.own.lock().await.retain(|_, s| s.target.id != id);
    }

    /// Ends the session now: its sandboxes are killed; waits for the kills.
    pub async fn close(&self) {
        self.shared.reaper.close(self.number);
        self.shared.reaper.settle().await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.reaper.close(self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_serves_only_the_key_it_started_with() {
        let shared = Shared {
            api_url: "http://127.0.0.1:9".into(),
            default_key: None,
            reaper: Reaper::default(),
            desktop_resolution: Default::default(),
        };
        let s = Session::new(shared, Lifetime::Session);
        assert!(s.bind("e2b_a"));
        assert!(s.bind("e2b_a"));
        assert!(!s.bind("e2b_b"));
    }
}
