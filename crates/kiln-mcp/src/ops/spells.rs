//! list_spells, run_spell (and the spell_<name> tools, which call it).

use kiln_api::spell::SpellRunRequest;
use kiln_client::ClientError;
use serde_json::{json, Value};

use crate::error::ToolError;
use crate::session::Session;
use crate::shape::{self, ToolOutput};
use crate::tools::{self, ToolName};

pub(super) async fn list_spells(session: &Session, key: &str) -> Result<ToolOutput, ToolError> {
    let spells = match session.client(key).list_spells().await {
        Ok(s) => s,
        Err(ClientError::Api { status, .. }) if status.as_u16() == 404 => {
            return Err(ToolError::SpellsUnsupported)
        }
        Err(e) => return Err(ToolError::api("listing spells")(e)),
    };
    let items: Vec<Value> = spells
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "description": s.description,
                "language": s.language,
                "parameters": s.parameters,
                "source": s.source,
                "tool": tools::spell_tool(s).map(|t| t.name),
            })
        })
        .collect();
    let mut out = ToolOutput::json(json!({ "spells": items }));
    if items.is_empty() {
        out.text = "no spells defined".into();
    }
    Ok(out)
}

pub(super) async fn run_spell(
    session: &Session,
    key: &str,
    name: &str,
    args: std::collections::BTreeMap<String, Value>,
) -> Result<ToolOutput, ToolError> {
    if name.is_empty() {
        return Err(ToolError::invalid(
            ToolName::RunSpell.as_str(),
            "name the spell (see list_spells)",
        ));
    }
    let run = session
        .client(key)
        .run_spell(name, &SpellRunRequest { args })
        .await
        .map_err(|e| match e {
            ClientError::Api {
                status,
                ref message,
            } if status.as_u16() == 404 && message.is_empty() => ToolError::SpellsUnsupported,
            e => ToolError::api(format!("running spell {name}"))(e),
        })?;
    Ok(shape::spell_run(&run))
}
