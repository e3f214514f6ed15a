//! run_command.

use std::time::{Duration, Instant};

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
    let started = Instant::now();
    let end = client
        .exec_request(&target.id, target.token.as_deref(), &req, |e| match e {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Started { .. } => {}
        })
        .await;
    // envd kills a command at its deadline and ends the stream with
    // deadline_exceeded, or (when the kill's end event wins the race) with the end
    // of a killed process: both are the timeout.
    let timed_out = |killed: bool| {
        killed && timeout.is_some_and(|t| started.elapsed() + Duration::from_millis(50) >= t)
    };
    match end {
        Ok(end) if !timed_out(end.exit_code < 0) => {
            return Ok(shape::command(&target.id, &stdout, &stderr, &end))
        }
        Ok(_) => {}
        Err(ClientError::Protocol(m)) if m.starts_with("deadline_exceeded") => {}
        Err(e) => return Err(ToolError::api(action)(e)),
    }
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
