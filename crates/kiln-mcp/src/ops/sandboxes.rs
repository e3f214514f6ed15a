//! create_sandbox, list_sandboxes, kill_sandbox.

use kiln_api::NewSandbox;
use serde_json::{json, Value};

use crate::args::*;
use crate::error::ToolError;
use crate::session::{Lifetime, Session};
use crate::shape::ToolOutput;
use crate::tools::ToolName;

pub async fn create_sandbox(
    session: &Session,
    key: &str,
    a: CreateSandboxArgs,
) -> Result<ToolOutput, ToolError> {
    a.check(ToolName::CreateSandbox.as_str())?;
    let template = a.template.unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    let req = NewSandbox {
        template_id: template.clone(),
        timeout: Some(a.timeout.unwrap_or(300) as i64),
        secure: Some(true),
        allow_internet_access: Some(a.internet.unwrap_or(true)),
        metadata: Some(a.metadata),
        memory_mb: a.memory_mb,
        cpu_count: a.cpu_count,
        ..NewSandbox::default()
    };
    // A bridge request has no session to end: its sandboxes live to their timeout.
    let keep = a.keep || session.lifetime == Lifetime::Request;
    let client = session.client(key);
    let target = session.create(&client, &req, keep).await?;
    let detail = client.get(&target.id).await.ok();
    let mut out = ToolOutput::json(json!({
        "sandbox_id": target.id,
        "template": template,
        "kept_after_session": keep,
        "end_at": detail.as_ref().map(|d| d.end_at.to_rfc3339()),
        "cpu_count": detail.as_ref().map(|d| d.cpu_count),
        "memory_mb": detail.as_ref().map(|d| d.memory_mb),
    }));
    out.text = format!(
        "sandbox {} started from {template}{}",
        target.id,
        if keep {
            " (kept after this session)"
        } else {
            " (killed when this session ends)"
        }
    );
    Ok(out)
}

pub(super) async fn list_sandboxes(
    session: &Session,
    key: &str,
    a: ListSandboxesArgs,
) -> Result<ToolOutput, ToolError> {
    let list = session
        .client(key)
        .list(&a.metadata)
        .await
        .map_err(ToolError::api("listing sandboxes"))?;
    let items: Vec<Value> = list
        .iter()
        .map(|s| {
            json!({
                "sandbox_id": s.sandbox_id,
                "template": s.template_id,
                "state": s.state.as_str(),
                "started_at": s.started_at.to_rfc3339(),
                "end_at": s.end_at.to_rfc3339(),
                "cpu_count": s.cpu_count,
                "memory_mb": s.memory_mb,
                "metadata": s.metadata,
            })
        })
        .collect();
    let mut out = ToolOutput::json(json!({ "sandboxes": items }));
    if items.is_empty() {
        out.text = "no sandboxes running".into();
    }
    Ok(out)
}

pub async fn kill_sandbox(
    session: &Session,
    key: &str,
    a: KillSandboxArgs,
) -> Result<ToolOutput, ToolError> {
    check_sandbox_id(ToolName::KillSandbox.as_str(), &a.sandbox_id)?;
    session
        .client(key)
        .kill(&a.sandbox_id)
        .await
        .map_err(ToolError::api(format!("killing sandbox {}", a.sandbox_id)))?;
    session.forget(&a.sandbox_id).await;
    let mut out = ToolOutput::json(json!({"sandbox_id": a.sandbox_id, "killed": true}));
    out.text = format!("sandbox {} killed", a.sandbox_id);
    Ok(out)
}
