//! The tools themselves: one implementation, called by MCP (`server`) and by the
//! REST bridge (`bridge`) alike. Each is a thin composition of `kiln-client` calls.

use std::time::Duration;

use base64::Engine;
use kiln_api::spell::SpellRunRequest;
use kiln_api::NewSandbox;
use kiln_client::{ClientError, ExecEvent, ExecRequest, FileType, RunCode};
use rmcp::model::Tool;
use serde_json::{json, Value};

use crate::args::{self, *};
use crate::error::ToolError;
use crate::session::{Lifetime, Session};
use crate::shape::{self, Image, ToolOutput};
use crate::tools::{self, ToolName, SPELL_PREFIX};

/// Default limit of a command that is not in the background.
const DEFAULT_COMMAND_SECS: f64 = 60.0;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

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
        return run_spell(session, key, spell, args).await;
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
        ToolName::ListSandboxes => list_sandboxes(session, key, args::parse(t, args)?).await,
        ToolName::KillSandbox => kill_sandbox(session, key, args::parse(t, args)?).await,
        ToolName::RunCode => run_code(session, key, args::parse(t, args)?).await,
        ToolName::RunCommand => run_command(session, key, args::parse(t, args)?).await,
        ToolName::ReadFile => read_file(session, key, args::parse(t, args)?).await,
        ToolName::WriteFile => write_file(session, key, args::parse(t, args)?).await,
        ToolName::ListFiles => list_files(session, key, args::parse(t, args)?).await,
        ToolName::InstallPackage => install_package(session, key, args::parse(t, args)?).await,
        ToolName::GetEnvironment => get_environment(session, key, args::parse(t, args)?).await,
        ToolName::ListSpells => {
            let _: ListSpellsArgs = args::parse(t, args)?;
            list_spells(session, key).await
        }
        ToolName::RunSpell => {
            let a: RunSpellArgs = args::parse(t, args)?;
            run_spell(session, key, &a.name, a.args).await
        }
    }
}

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

async fn list_sandboxes(
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

async fn run_command(
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

fn check_path(tool: &str, path: &str) -> Result<(), ToolError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ToolError::invalid(
            tool,
            "path must be a non-empty file path (absolute, or relative to the user's home)",
        ));
    }
    Ok(())
}

async fn read_file(session: &Session, key: &str, a: ReadFileArgs) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::ReadFile.as_str();
    check_path(tool, &a.path)?;
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), false)
        .await?;
    let data = session
        .client(key)
        .read_file(
            &target.id,
            target.token.as_deref(),
            &a.path,
            a.user.as_deref(),
            MAX_FILE_BYTES,
        )
        .await
        .map_err(ToolError::api(format!(
            "reading {} in sandbox {}",
            a.path, target.id
        )))?;
    Ok(file_output(&target.id, &a.path, data, a.encoding))
}

/// A file's contents as a tool answer: an image for PNG/JPEG, UTF-8 text, or base64.
pub fn file_output(sandbox_id: &str, path: &str, data: Vec<u8>, encoding: Encoding) -> ToolOutput {
    let size = data.len();
    let image_mime = if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if data.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else {
        None
    };
    let (content, encoding_used) = match (encoding, String::from_utf8(data)) {
        (Encoding::Utf8, Ok(text)) => (text, "utf8"),
        (_, Ok(text)) => (B64.encode(text.as_bytes()), "base64"),
        (_, Err(e)) => (B64.encode(e.as_bytes()), "base64"),
    };
    let structured = json!({
        "sandbox_id": sandbox_id,
        "path": path,
        "size": size,
        "encoding": encoding_used,
        "content": content,
    });
    match image_mime {
        Some(mime) => ToolOutput {
            text: format!("{path}: {mime} image, {size} bytes"),
            images: vec![Image {
                data: if encoding_used == "base64" {
                    content
                } else {
                    B64.encode(content.as_bytes())
                },
                mime,
            }],
            structured,
            is_error: false,
        },
        None if encoding_used == "utf8" => ToolOutput {
            text: content,
            structured,
            images: Vec::new(),
            is_error: false,
        },
        None => ToolOutput {
            text: format!(
                "{path}: {size} bytes, not UTF-8 text; base64 in the structured content (content)"
            ),
            structured,
            images: Vec::new(),
            is_error: false,
        },
    }
}

async fn write_file(
    session: &Session,
    key: &str,
    a: WriteFileArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::WriteFile.as_str();
    check_path(tool, &a.path)?;
    let data = match a.encoding {
        Encoding::Utf8 => a.content.into_bytes(),
        Encoding::Base64 => B64
            .decode(a.content.trim())
            .map_err(|e| ToolError::invalid(tool, format!("content is not base64: {e}")))?,
    };
    if data.len() > MAX_FILE_BYTES {
        return Err(ToolError::invalid(
            tool,
            format!("content is {} bytes; at most {MAX_FILE_BYTES}", data.len()),
        ));
    }
    let size = data.len();
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), a.keep)
        .await?;
    session
        .client(key)
        .write_file(
            &target.id,
            target.token.as_deref(),
            &a.path,
            data,
            a.user.as_deref(),
        )
        .await
        .map_err(ToolError::api(format!(
            "writing {} in sandbox {}",
            a.path, target.id
        )))?;
    let mut out = ToolOutput::json(json!({"sandbox_id": target.id, "path": a.path, "size": size}));
    out.text = format!("wrote {size} bytes to {} in sandbox {}", a.path, target.id);
    Ok(out)
}

async fn list_files(
    session: &Session,
    key: &str,
    a: ListFilesArgs,
) -> Result<ToolOutput, ToolError> {
    let tool = ToolName::ListFiles.as_str();
    let depth = a.depth.unwrap_or(1);
    if !(1..=5).contains(&depth) {
        return Err(ToolError::invalid(
            tool,
            format!("depth must be 1 to 5, got {depth}"),
        ));
    }
    let path = a.path.unwrap_or_default();
    let target = session
        .target(tool, key, a.sandbox_id.as_deref(), false)
        .await?;
    let entries = session
        .client(key)
        .list_dir(
            &target.id,
            target.token.as_deref(),
            &path,
            depth,
            a.user.as_deref(),
        )
        .await
        .map_err(ToolError::api(format!(
            "listing {} in sandbox {}",
            if path.is_empty() {
                "the home directory"
            } else {
                &path
            },
            target.id
        )))?;
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "path": e.path,
                "type": match e.file_type {
                    FileType::Directory => "dir",
                    FileType::Symlink => "symlink",
                    _ => "file",
                },
                "size": e.size,
                "permissions": e.permissions,
                "owner": e.owner,
                "modified": e.modified_time.as_ref().map(|t| serde_json::to_value(t).unwrap_or(Value::Null)),
                "symlink_target": e.symlink_target,
            })
        })
        .collect();
    let text = entries
        .iter()
        .map(|e| {
            format!(
                "{} {:>10} {}{}",
                e.permissions,
                e.size,
                e.path,
                if e.file_type == FileType::Directory {
                    "/"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = ToolOutput::json(json!({"sandbox_id": target.id, "entries": items}));
    out.text = if text.is_empty() {
        "(empty directory)".into()
    } else {
        text
    };
    Ok(out)
}

async fn install_package(
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

async fn get_environment(
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

async fn list_spells(session: &Session, key: &str) -> Result<ToolOutput, ToolError> {
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

async fn run_spell(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_come_back_as_text_images_or_base64() {
        let out = file_output("s", "a.txt", b"hello".to_vec(), Encoding::Utf8);
        assert_eq!(out.text, "hello");
        assert_eq!(out.structured["encoding"], "utf8");
        let out = file_output("s", "a.txt", b"hello".to_vec(), Encoding::Base64);
        assert_eq!(out.structured["content"], "aGVsbG8=");
        let out = file_output("s", "b.bin", vec![0xff, 0xfe, 0x00], Encoding::Utf8);
        assert_eq!(out.structured["encoding"], "base64");
        assert!(out.text.contains("not UTF-8"));
        let png = b"\x89PNG\r\n\x1a\nrest".to_vec();
        let out = file_output("s", "c.png", png.clone(), Encoding::Utf8);
        assert_eq!(out.images.len(), 1);
        assert_eq!(out.images[0].mime, "image/png");
        assert_eq!(B64.decode(&out.images[0].data).unwrap(), png);
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
