//! Commands in a session's sandbox, on its display, through the API's proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_api::desktop;
use kiln_client::{Client, ExecRequest};

/// A sandbox to work in: its id and envd access token.
pub(crate) struct Target<'a> {
    pub client: &'a Client,
    pub id: String,
    pub token: Option<String>,
}

impl Target<'_> {
    fn request(&self, command: &str, timeout: Option<Duration>) -> ExecRequest {
        ExecRequest {
            command: command.to_string(),
            envs: BTreeMap::from([("DISPLAY".to_string(), desktop::DISPLAY.to_string())]),
            timeout,
            ..ExecRequest::default()
        }
    }

    /// Runs `command` to its end; its exit code.
    pub async fn run(&self, command: &str) -> Result<i32, String> {
        self.run_with(command, &[]).await
    }

    /// Runs `command` with `env` added to its environment; its exit code.
    pub async fn run_with(&self, command: &str, env: &[(&str, String)]) -> Result<i32, String> {
        let mut req = self.request(command, Some(Duration::from_secs(30)));
        req.envs
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        self.client
            .exec_request(&self.id, self.token.as_deref(), &req, |_| {})
            .await
            .map(|out| out.exit_code)
            .map_err(|e| format!("running `{command}` in sandbox {}: {e}", self.id))
    }

    /// Starts `command` in the background.
    pub async fn start(&self, command: &str) -> Result<(), String> {
        let req = self.request(command, None);
        self.client
            .exec_background(&self.id, self.token.as_deref(), &req)
            .await
            .map(|_| ())
            .map_err(|e| format!("starting `{command}` in sandbox {}: {e}", self.id))
    }

    /// Waits until `check` exits 0.
    pub async fn until(&self, check: &str, within: Duration, what: &str) -> Result<(), String> {
        let end = tokio::time::Instant::now() + within;
        loop {
            if self.run(check).await? == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= end {
                return Err(format!(
                    "{what} did not come up within {} s in sandbox {}",
                    within.as_secs(),
                    self.id
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
