//! The code interpreter: run_code, install_package, get_environment.

use kiln_client::RunCode;
use serde_json::json;

use crate::args::*;
use crate::error::ToolError;
use crate::session::Session;
use crate::shape::{self, ToolOutput};
use crate::tools::ToolName;

pub async fn run_code(
    session: &Session,
    key: &str,
    a: RunCodeArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::RunCode.as_str();
    let timeout = a.timeout.map(|t| check_timeout(tool, t)).transpose()?;
    if a.code.trim().is_empty() {
        return Err(ToolError::invalid(tool, "code is empty"));
    }
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), a.keep)
        .await?;
    let req = RunCode {
        code: a.code,
        language: Some(a.language.as_str().to_string()),
        context_id: None,
        env_vars: a.env,
    };
    let exec = session
        .client(key)
        .run_code(&target.id, target.token.as_deref(), &req, timeout, |_| {})
        .await
        .map_err(ToolError::api(format!(
            "running {} code in sandbox {}",
            a.language.as_str(),
            target.id
        )))?;
    Ok(shape::execution(&target.id, &exec))
}

pub(super) async fn install_package(
    session: &Session,
    key: &str,
    a: InstallPackageArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::InstallPackage.as_str();
    if a.packages.is_empty() {
        return Err(ToolError::invalid(tool, "name at least one package"));
    }
    for p in &a.packages {
        kiln_client::check_package_spec(p).map_err(|m| ToolError::invalid(tool, m))?;
    }
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), a.keep)
        .await?;
    let exec = session
        .client(key)
        .install_packages(&target.id, target.token.as_deref(), &a.packages, |_| {})
        .await
        .map_err(ToolError::api(format!(
            "installing {} in sandbox {}",
            a.packages.join(" "),
            target.id
        )))?;
    let mut out = shape::execution(&target.id, &exec);
    out.structured["packages"] = json!(a.packages);
    Ok(out)
}

pub(super) async fn get_environment(
    session: &Session,
    key: &str,
    a: GetEnvironmentArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::GetEnvironment.as_str();
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), a.keep)
        .await?;
    let mut env = session
        .client(key)
        .environment_info(&target.id, target.token.as_deref())
        .await
        .map_err(ToolError::api(format!(
            "reading the environment of sandbox {}",
            target.id
        )))?;
    env["sandbox_id"] = json!(target.id);
    Ok(ToolOutput::json(env))
}
