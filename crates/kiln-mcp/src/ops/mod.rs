//! The tools themselves: one implementation, called by MCP (`server`) and by the
//! REST bridge (`bridge`) alike. Each is a thin composition of `kiln-client` calls,
//! in a file per domain.

mod code;
mod command;
mod desktop;
mod files;
mod sandboxes;
mod spells;

use rmcp::model::Tool;
use serde_json::Value;

use kiln_client::ClientError;

use crate::args::{self, ListSpellsArgs, RunSpellArgs};
use crate::error::ToolError;
use crate::session::Session;
use crate::shape::ToolOutput;
use crate::tools::{self, ToolName, SPELL_PREFIX};

pub use code::run_code;
pub use sandboxes::{create_sandbox, kill_sandbox};

/// Every tool the caller with `key` can call now: the built-ins, then one per spell.
/// A server without spells (404) lists none; another failure to list them is logged
/// and lists none, so `tools/list` always answers.
pub async fn list_tools(session: &Session, key: &str) -> Vec<Tool> {
    let mut out = tools::builtin();
    match session.client(key).list_spells().await {
        Ok(spells) => out.extend(spells.iter().filter_map(tools::spell_tool)),
        Err(ClientError::Api { status, .. }) if status.as_u16() == 404 => {}
        Err(e) => tracing::warn!(error = %e, "listing spells for tools/list failed"),
    }
    out
}

/// Calls tool `name` with `args` for the caller with API key `key`.
pub async fn call(
    session: &Session,
    key: &str,
    name: &str,
    args: Option<Value>,
) -> Result<ToolOutput, ToolError> {
    if let Some(spell) = name.strip_prefix(SPELL_PREFIX) {
        let args = args::parse(name, args)?;
        return spells::run_spell(session, key, spell, args).await;
    }
    let Some(tool) = ToolName::parse(name) else {
        return Err(ToolError::UnknownTool {
            name: name.to_string(),
            known: ToolName::ALL.map(ToolName::as_str).join(", ")
                + ", and spell_<name> for each spell",
        });
    };
    let t = tool.as_str();
    match tool {
        ToolName::CreateSandbox => create_sandbox(session, key, args::parse(t, args)?).await,
        ToolName::ListSandboxes => {
            sandboxes::list_sandboxes(session, key, args::parse(t, args)?).await
        }
        ToolName::KillSandbox => kill_sandbox(session, key, args::parse(t, args)?).await,
        ToolName::RunCode => run_code(session, key, args::parse(t, args)?).await,
        ToolName::RunCommand => command::run_command(session, key, args::parse(t, args)?).await,
        ToolName::ReadFile => files::read_file(session, key, args::parse(t, args)?).await,
        ToolName::WriteFile => files::write_file(session, key, args::parse(t, args)?).await,
        ToolName::ListFiles => files::list_files(session, key, args::parse(t, args)?).await,
        ToolName::InstallPackage => {
            code::install_package(session, key, args::parse(t, args)?).await
        }
        ToolName::GetEnvironment => {
            code::get_environment(session, key, args::parse(t, args)?).await
        }
        ToolName::ListSpells => {
            let _: ListSpellsArgs = args::parse(t, args)?;
            spells::list_spells(session, key).await
        }
        ToolName::RunSpell => {
            let a: RunSpellArgs = args::parse(t, args)?;
            spells::run_spell(session, key, &a.name, a.args).await
        }
        ToolName::Screenshot => desktop::screenshot(session, key, args::parse(t, args)?).await,
        ToolName::Click => desktop::click(session, key, args::parse(t, args)?).await,
        ToolName::Type => desktop::type_text(session, key, args::parse(t, args)?).await,
        ToolName::Press => desktop::press(session, key, args::parse(t, args)?).await,
        ToolName::OpenUrl => desktop::open_url(session, key, args::parse(t, args)?).await,
    }
}

/// `tools/list` and the spell tools against a stand-in for the API (unit tier: no
/// server, an axum router on a loopback port answering the few routes used).
#[cfg(test)]
mod spell_tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, State};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde_json::{json, Value};

    use super::*;
    use crate::reaper::Reaper;
    use crate::session::Shared;

    type Runs = Arc<Mutex<Vec<(String, Value)>>>;

    async fn api(with_spells: bool) -> (String, Runs) {
        let runs: Runs = Arc::default();
        let mut app = Router::new();
        if with_spells {
            app = app
                .route(
                    "/spells",
                    get(|| async {
                        Json(json!([{
                            "name": "greet", "description": "Greets", "language": "python",
                            "code": "print(args['who'])",
                            "parameters": [{"name": "who", "type": "string"}],
                            "source": "team",
                        }, {
                            "name": "not a tool name", "language": "bash", "code": "true",
                        }]))
                    }),
                )
                .route(
                    "/spells/{name}/runs",
                    post(
                        |State(runs): State<Runs>,
                         Path(name): Path<String>,
                         Json(body): Json<Value>| async move {
                            runs.lock().unwrap().push((name.clone(), body.clone()));
                            Json(json!({
                                "spell": name, "sandboxID": "sbx1", "exitCode": 0,
                                "stdout": format!("hello {}\n", body["args"]["who"].as_str().unwrap_or("?")),
                                "stderr": "", "durationMs": 5,
                                "files": [{"path": "plot.png", "size": 3, "mime": "image/png", "base64": "iVBO"}],
                            }))
                        },
                    ),
                );
        }
        let app = app.with_state(runs.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, runs)
    }

    fn session(url: String) -> Session {
        let shared = Shared {
            api_url: url,
            default_key: Some("e2b_test".into()),
            reaper: Reaper::default(),
            desktop_resolution: Default::default(),
        };
        Session::new(shared, crate::session::Lifetime::Session)
    }

    #[tokio::test]
    async fn spells_become_tools_and_run_by_either_name() {
        let (url, runs) = api(true).await;
        let s = session(url);
        let names: Vec<String> = list_tools(&s, "e2b_test")
            .await
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        assert_eq!(names.len(), ToolName::ALL.len() + 1, "{names:?}");
        assert_eq!(names.last().map(String::as_str), Some("spell_greet"));

        let out = call(&s, "e2b_test", "spell_greet", Some(json!({"who": "kiln"})))
            .await
            .unwrap();
        assert_eq!(out.structured["stdout"], "hello kiln\n");
        assert_eq!(out.images.len(), 1);
        assert!(!out.is_error);
        let out = call(
            &s,
            "e2b_test",
            "run_spell",
            Some(json!({"name": "greet", "args": {"who": "mcp"}})),
        )
        .await
        .unwrap();
        assert!(out.text.starts_with("hello mcp\n"), "{}", out.text);
        let listed = call(&s, "e2b_test", "list_spells", None).await.unwrap();
        assert_eq!(listed.structured["spells"][0]["tool"], "spell_greet");
        assert_eq!(listed.structured["spells"][1]["tool"], Value::Null);
        assert_eq!(
            *runs.lock().unwrap(),
            vec![
                ("greet".to_string(), json!({"args": {"who": "kiln"}})),
                ("greet".to_string(), json!({"args": {"who": "mcp"}})),
            ]
        );
    }

    #[tokio::test]
    async fn a_server_without_spells_lists_no_spell_tools() {
        let (url, _) = api(false).await;
        let s = session(url);
        assert_eq!(list_tools(&s, "e2b_test").await.len(), ToolName::ALL.len());
        let e = call(&s, "e2b_test", "list_spells", None).await.unwrap_err();
        assert!(matches!(e, ToolError::SpellsUnsupported), "{e:?}");
        let e = call(&s, "e2b_test", "spell_greet", Some(json!({})))
            .await
            .unwrap_err();
        assert!(matches!(e, ToolError::SpellsUnsupported), "{e:?}");
        let e = call(&s, "e2b_test", "nope", None).await.unwrap_err();
        assert!(e.message().contains("run_code"), "{}", e.message());
    }
}
