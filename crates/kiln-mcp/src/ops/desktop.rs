//! Desktop tools (`screenshot`, `click`, `type`, `press`, `open_url`) on a sandbox of
//! the `desktop` template: X on display :0 (started here as e2b-desktop starts it if
//! it is not up: Xvfb, then the XFCE session), driven with xdotool, captured with
//! scrot. What the caller types, presses or opens reaches the commands as environment
//! variables, never as shell text.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_client::{Client, ExecRequest};
use serde_json::json;

use crate::args::*;
use crate::error::ToolError;
use kiln_api::desktop::Button;

use crate::session::{Session, Target};
use crate::shape::ToolOutput;
use crate::tools::ToolName;

const DISPLAY: &str = ":0";
const SCREENSHOT: &str = "/tmp/kiln-mcp-screenshot.png";
/// The largest screenshot read back.
const MAX_SCREENSHOT: usize = 16 << 20;

fn request(command: &str, envs: &[(&str, &str)]) -> ExecRequest {
    let mut all = BTreeMap::from([("DISPLAY".to_string(), DISPLAY.to_string())]);
    all.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ExecRequest {
        command: command.to_string(),
        envs: all,
        timeout: Some(Duration::from_secs(30)),
        ..ExecRequest::default()
    }
}

/// Run `command` to its end; a non-zero exit is a tool error carrying its stderr.
async fn run(
    client: &Client,
    target: &Target,
    tool: &str,
    command: &str,
    envs: &[(&str, &str)],
) -> Result<(), ToolError> {
    let mut stderr = Vec::new();
    let end = client
        .exec_request(
            &target.id,
            target.token.as_deref(),
            &request(command, envs),
            |e| {
                if let kiln_client::ExecEvent::Stderr(b) = e {
                    stderr.extend_from_slice(&b);
                }
            },
        )
        .await
        .map_err(ToolError::api(format!("{tool} in sandbox {}", target.id)))?;
    if end.exit_code == 0 {
        return Ok(());
    }
    let mut why = String::from_utf8_lossy(&stderr).trim().to_string();
    why.truncate(2000);
    Err(ToolError::invalid(
        tool,
        format!(
            "`{}` failed in sandbox {} ({}): {why} (is it a sandbox of the desktop template?)",
            command.split_whitespace().next().unwrap_or(command),
            target.id,
            end.status
        ),
    ))
}

/// The sandbox's display, started if it is not up yet.
async fn ensure_display(
    client: &Client,
    target: &Target,
    tool: &str,
    resolution: kiln_api::desktop::Resolution,
) -> Result<(), ToolError> {
    let up = "xdpyinfo -display :0 >/dev/null 2>&1";
    if run(client, target, tool, up, &[]).await.is_ok() {
        return Ok(());
    }
    let start = |command: &str| {
        let req = request(command, &[]);
        let req = ExecRequest {
            timeout: None,
            ..req
        };
        async move {
            client
                .exec_background(&target.id, target.token.as_deref(), &req)
                .await
                .map_err(ToolError::api(format!(
                    "starting the desktop of {}",
                    target.id
                )))
        }
    };
    start(&resolution.xvfb_command()).await?;
    for _ in 0..100 {
        if run(client, target, tool, up, &[]).await.is_ok() {
            start("startxfce4").await?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ToolError::invalid(
        tool,
        format!(
            "no X display came up in sandbox {} within 10 s: use a sandbox of the desktop \
             template (create_sandbox with template \"desktop\")",
            target.id
        ),
    ))
}

async fn desktop(
    session: &Session,
    key: &str,
    tool: ToolName,
    sandbox_id: &str,
) -> Result<(Client, Target), ToolError> {
    let target = session
        .target(tool.as_str(), key, Some(sandbox_id), false)
        .await?;
    let client = session.client(key);
    let resolution = session.shared().desktop_resolution;
    ensure_display(&client, &target, tool.as_str(), resolution).await?;
    Ok((client, target))
}

fn done(target: &Target, what: String) -> ToolOutput {
    let mut out = ToolOutput::json(json!({"sandbox_id": target.id, "done": what}));
    out.text = what;
    out
}

pub(super) async fn screenshot(
    session: &Session,
    key: &str,
    a: ScreenshotArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::Screenshot;
    let (client, target) = desktop(session, key, tool, &a.sandbox_id).await?;
    let command = kiln_api::desktop::screenshot(SCREENSHOT);
    run(&client, &target, tool.as_str(), &command, &[]).await?;
    let data = client
        .read_file(
            &target.id,
            target.token.as_deref(),
            SCREENSHOT,
            None,
            MAX_SCREENSHOT,
        )
        .await
        .map_err(ToolError::api(format!(
            "reading the screenshot of {}",
            target.id
        )))?;
    Ok(super::files::file_output(
        &target.id,
        SCREENSHOT,
        data,
        Encoding::Base64,
    ))
}

pub(super) async fn click(
    session: &Session,
    key: &str,
    a: ClickArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::Click;
    if a.x > 16384 || a.y > 16384 {
        return Err(ToolError::invalid(
            tool.as_str(),
            "x and y are pixels on the screen (at most 16384)",
        ));
    }
    let (client, target) = desktop(session, key, tool, &a.sandbox_id).await?;
    let button = match a.button {
        MouseButton::Left => Button::Left,
        MouseButton::Middle => Button::Middle,
        MouseButton::Right => Button::Right,
    };
    let command = kiln_api::desktop::click(a.x, a.y, button, if a.double { 2 } else { 1 });
    run(&client, &target, tool.as_str(), &command, &[]).await?;
    Ok(done(
        &target,
        format!(
            "{}{:?} click at ({}, {})",
            if a.double { "double " } else { "" },
            a.button,
            a.x,
            a.y
        )
        .to_lowercase(),
    ))
}

pub(super) async fn type_text(
    session: &Session,
    key: &str,
    a: TypeArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::Type;
    if a.text.is_empty() || a.text.len() > 10_000 {
        return Err(ToolError::invalid(
            tool.as_str(),
            "text must be 1 to 10000 bytes",
        ));
    }
    let (client, target) = desktop(session, key, tool, &a.sandbox_id).await?;
    run(
        &client,
        &target,
        tool.as_str(),
        kiln_api::desktop::TYPE_TEXT,
        &[("KILN_TEXT", &a.text)],
    )
    .await?;
    Ok(done(
        &target,
        format!("typed {} characters", a.text.chars().count()),
    ))
}

pub(super) async fn press(
    session: &Session,
    key: &str,
    a: PressArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::Press;
    if !kiln_api::desktop::valid_keys(&a.keys) {
        return Err(ToolError::invalid(
            tool.as_str(),
            format!(
                "keys {:?}: X key names joined by '+' (Return, Escape, ctrl+c, alt+F4)",
                a.keys
            ),
        ));
    }
    let (client, target) = desktop(session, key, tool, &a.sandbox_id).await?;
    run(
        &client,
        &target,
        tool.as_str(),
        kiln_api::desktop::PRESS_KEYS,
        &[("KILN_KEYS", &a.keys)],
    )
    .await?;
    Ok(done(&target, format!("pressed {}", a.keys)))
}

pub(super) async fn open_url(
    session: &Session,
    key: &str,
    a: OpenUrlArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::OpenUrl;
    let ok = (a.url.starts_with("http://") || a.url.starts_with("https://"))
        && a.url.len() <= 4096
        && !a.url.chars().any(char::is_control);
    if !ok {
        return Err(ToolError::invalid(
            tool.as_str(),
            format!("url must be an http:// or https:// URL, got {:?}", a.url),
        ));
    }
    let (client, target) = desktop(session, key, tool, &a.sandbox_id).await?;
    let req = ExecRequest {
        timeout: None,
        ..request("xdg-open \"$KILN_URL\"", &[("KILN_URL", &a.url)])
    };
    client
        .exec_background(&target.id, target.token.as_deref(), &req)
        .await
        .map_err(ToolError::api(format!(
            "opening {} in sandbox {}",
            a.url, target.id
        )))?;
    Ok(done(&target, format!("opened {}", a.url)))
}
