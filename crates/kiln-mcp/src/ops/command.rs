//! run_command.

use std::time::Duration;

use kiln_client::{ClientError, ExecEvent, ExecRequest};
use serde_json::json;

use crate::args::*;
use crate::error::ToolError;
use crate::session::Session;
use crate::shape::{self, ToolOutput};
use crate::tools::ToolName;

/// Default limit of a command that is not in the background.
const DEFAULT_COMMAND_SECS: f64 = 60.0;

pub(super) async fn run_command(
    session: &Session,
    key: &str,
    a: RunCommandArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::RunCommand.as_str();
    if a.command.trim().is_empty() {
        return Err(ToolError::invalid(tool, "command is empty"));
    }
    let timeout = match a.timeout {
        Some(t) if t == 0.0 && a.background => None,
        Some(t) => Some(check_timeout(tool, t)?),
        None if a.background => None,
        None => Some(Duration::from_secs_f64(DEFAULT_COMMAND_SECS)),
    };
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), a.keep)
        .await?;
    let req = ExecRequest {
        command: a.command,
        user: a.user,
        cwd: a.cwd,
        envs: a.env,
        timeout,
    };
    let client = session.client(key);
    let action = format!("running a command in sandbox {}", target.id);
    if a.background {
        let pid = client
            .exec_background(&target.id, target.token.as_deref(), &req)
            .await
            .map_err(ToolError::api(action))?;
        return Ok(shape::background(&target.id, pid));
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let end = client
        .exec_request(&target.id, target.token.as_deref(), &req, |e| match e {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Started { .. } => {}
        })
        .await;
    match end {
        Ok(end) => Ok(shape::command(&target.id, &stdout, &stderr, &end)),
        Err(ClientError::Protocol(m)) if m.starts_with("deadline_exceeded") => {
            let mut out = shape::command(
                &target.id,
                &stdout,
                &stderr,
                &kiln_client::ExecOutput {
                    exit_code: -1,
                    status: format!(
                        "killed at its timeout of {}s",
                        timeout.unwrap_or_default().as_secs_f64()
                    ),
                },
            );
            out.structured["timed_out"] = json!(true);
            Ok(out)
        }
        Err(e) => Err(ToolError::api(action)(e)),
    }
}
