//! Running a spell: a fresh sandbox of the caller's team, the script and its arguments
//! written in, packages installed, the script run under the spell's deadline, its
//! output and the files it left collected, and the sandbox killed whatever happened.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_api::spell::{Spell, SpellFile, SpellLanguage, SpellRun};
use kiln_api::NewSandbox;
use serde_json::Value;

use super::{SpellError, SpellLimits};
use crate::authz::Caller;
use crate::envd::{self, Exec};
use crate::manager::SandboxManager;
use crate::report::chain;

/// Where a spell's files live in its sandbox.
const WORK_DIR: &str = "/tmp/kiln-spell";
const OUTPUT_DIR: &str = "/tmp/kiln-spell/out";
/// Each of stdout and stderr keeps its last this many bytes.
const OUTPUT_CAP: usize = 1 << 20;
/// Output files returned (the first ones found), and the largest returned whole.
const MAX_FILES: usize = 100;
const FILE_CAP: usize = 1 << 20;
/// How long after the spell's own deadline its sandbox is left to live, as a backstop
/// should the host fail to kill it at the end.
const SANDBOX_GRACE_SECS: u64 = 60;

/// Python and JavaScript scripts get `args` from this wrapper; tracebacks still name
/// the script's own file and lines.
const PYTHON_WRAPPER: &str = r#"import json, os
with open(os.environ["KILN_SPELL_ARGS"]) as f:
    args = json.load(f)
path = "/tmp/kiln-spell/main.py"
with open(path) as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path, "args": args})
"#;
const JS_WRAPPER: &str = r#"const fs = require("fs");
globalThis.args = JSON.parse(fs.readFileSync(process.env.KILN_SPELL_ARGS, "utf8"));
require("/tmp/kiln-spell/main.js");
"#;

/// Run `spell` (already looked up for `caller`) with `given` arguments.
pub async fn run(
    manager: &Arc<SandboxManager>,
    limits: SpellLimits,
    caller: Caller,
    spell: &Spell,
    given: BTreeMap<String, Value>,
    agent_id: Option<&str>,
) -> Result<SpellRun, SpellError> {
    let args = super::resolve_args(spell, given)?;
    let began = Instant::now();
    let timeout = Duration::from_secs(spell.timeout_secs.unwrap_or(limits.timeout_secs));
    let mut metadata = BTreeMap::from([("kiln.spell".to_string(), spell.name.clone())]);
    if let Some(agent) = agent_id {
        metadata.insert("agent_id".to_string(), agent.to_string());
    }
    let req = NewSandbox {
        template_id: spell.template.clone().unwrap_or_else(|| "base".into()),
        timeout: Some((timeout.as_secs() + SANDBOX_GRACE_SECS) as i64),
        secure: Some(true),
        allow_internet_access: Some(spell.internet),
        metadata: Some(metadata),
        memory_mb: Some(
            spell
                .memory_mb
                .unwrap_or(limits.max_memory_mb)
                .min(limits.max_memory_mb),
        ),
        ..Default::default()
    };
    let sandbox = manager.clone().create_detached(req, caller).await?;
    let id = sandbox.sandbox_id.clone();
    let ran = match manager.get(&id) {
        Some(entry) => {
            let guest = Guest {
                socket: &entry.envd_socket,
                token: sandbox.envd_access_token.as_deref(),
            };
            // The spell's time is its own: it starts once its sandbox is there (a
            // cold create on a busy host must not eat it).
            run_in(&guest, spell, &args, Instant::now() + timeout).await
        }
        None => Err(SpellError::SandboxGone(id.clone())),
    };
    if let Err(e) = manager.kill(&Caller::OPERATOR, &id).await {
        tracing::warn!(%id, error = %chain(&e), "killing a spell's sandbox failed");
    }
    let out = ran?;
    Ok(SpellRun {
        spell: spell.name.clone(),
        sandbox_id: id,
        exit_code: out.collected.exit_code,
        stdout: String::from_utf8_lossy(&out.collected.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.collected.stderr).into_owned(),
        result: out.result,
        files: out.files,
        duration_ms: began.elapsed().as_millis() as u64,
        timed_out: out.collected.timed_out,
        truncated: out.collected.truncated,
    })
}

struct Guest<'a> {
    socket: &'a std::path::Path,
    token: Option<&'a str>,
}

impl Guest<'_> {
    async fn write(&self, path: &str, data: Vec<u8>) -> Result<(), SpellError> {
        envd::write_file(self.socket, path, data, self.token)
            .await
            .map_err(|source| SpellError::Guest {
                what: "writing the script",
                source,
            })
    }

    async fn exec(
        &self,
        what: &'static str,
        exec: &Exec,
        until: Instant,
    ) -> Result<envd::Collected, SpellError> {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        envd::exec(self.socket, exec, self.token, left, OUTPUT_CAP)
            .await
            .map_err(|source| SpellError::Guest { what, source })
    }
}

struct Outcome {
    collected: envd::Collected,
    result: Option<Value>,
    files: Vec<SpellFile>,
}

async fn run_in(
    guest: &Guest<'_>,
    spell: &Spell,
    args: &BTreeMap<String, Value>,
    until: Instant,
) -> Result<Outcome, SpellError> {
    let args_json = serde_json::to_vec(args).expect("JSON values always serialize");
    guest
        .write(&format!("{WORK_DIR}/args.json"), args_json)
        .await?;
    guest
        .write(&format!("{OUTPUT_DIR}/.keep"), Vec::new())
        .await?;
    let (script, wrapper, interpreter) = match spell.language {
        SpellLanguage::Python => ("main.py", Some(("run.py", PYTHON_WRAPPER)), "python3"),
        SpellLanguage::Javascript => ("main.js", Some(("run.js", JS_WRAPPER)), "node"),
        SpellLanguage::Bash => ("main.sh", None, "bash"),
    };
    guest
        .write(
            &format!("{WORK_DIR}/{script}"),
            spell.code.clone().into_bytes(),
        )
        .await?;
    if let Some((name, text)) = wrapper {
        guest
            .write(&format!("{WORK_DIR}/{name}"), text.as_bytes().to_vec())
            .await?;
    }
    let mut envs = BTreeMap::from([
        (
            "KILN_SPELL_ARGS".to_string(),
            format!("{WORK_DIR}/args.json"),
        ),
        ("KILN_SPELL_OUTPUT".to_string(), OUTPUT_DIR.to_string()),
    ]);
    if spell.language == SpellLanguage::Bash {
        for (name, value) in args {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            envs.insert(format!("ARG_{}", name.to_ascii_uppercase()), text);
        }
    }

    if !spell.packages.is_empty() {
        let (cmd, mut install_args) = match spell.language {
            SpellLanguage::Python => (
                "python3",
                vec![
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--break-system-packages",
                ],
            ),
            _ => (
                "npm",
                vec![
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "--prefix",
                    WORK_DIR,
                ],
            ),
        };
        install_args.extend(spell.packages.iter().map(String::as_str));
        let install = Exec {
            cmd: cmd.into(),
            args: install_args.into_iter().map(str::to_string).collect(),
            cwd: Some(WORK_DIR.into()),
            ..Exec::default()
        };
        let done = guest.exec("installing packages", &install, until).await?;
        if done.exit_code != Some(0) {
            let mut output = String::from_utf8_lossy(&done.stderr).into_owned();
            if output.len() > 4096 {
                output = output[output.len() - 4096..].to_string();
            }
            return Err(SpellError::Install {
                code: done.exit_code.unwrap_or(-1),
                output,
            });
        }
    }

    let main = Exec {
        cmd: interpreter.into(),
        args: vec![format!("{WORK_DIR}/{}", wrapper.map_or(script, |w| w.0))],
        envs,
        cwd: Some(WORK_DIR.into()),
        user: None,
    };
    let collected = guest.exec("running the script", &main, until).await?;
    let (result, files) = collect_output(guest).await;
    Ok(Outcome {
        collected,
        result,
        files,
    })
}

/// The files the script left in the output directory (a listing the guest makes, so
/// sizes are its word; the contents read are capped whatever it claims).
async fn collect_output(guest: &Guest<'_>) -> (Option<Value>, Vec<SpellFile>) {
    let list = Exec {
        cmd: "find".into(),
        args: [
            OUTPUT_DIR,
            "-maxdepth",
            "4",
            "-type",
            "f",
            "!",
            "-name",
            ".keep",
            "-printf",
            "%s\\t%P\\n",
        ]
        .into_iter()
        .map(str::to_string)
        .collect(),
        ..Exec::default()
    };
    let listed = match envd::exec(
        guest.socket,
        &list,
        guest.token,
        Duration::from_secs(20),
        64 << 10,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "listing a spell's output failed");
            return (None, Vec::new());
        }
    };
    let mut result = None;
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&listed.stdout)
        .lines()
        .take(MAX_FILES)
    {
        let Some((size, path)) = line.split_once('\t') else {
            continue;
        };
        if path.is_empty() || path.split('/').any(|c| c == "..") {
            continue;
        }
        let full = format!("{OUTPUT_DIR}/{path}");
        let contents = envd::read_file(guest.socket, &full, guest.token, FILE_CAP)
            .await
            .unwrap_or(None);
        if path == "result.json" {
            result = contents
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok());
        }
        files.push(SpellFile {
            path: path.to_string(),
            size: contents
                .as_ref()
                .map(|c| c.len() as u64)
                .unwrap_or_else(|| size.parse().unwrap_or(0)),
            mime: mime_of(path).to_string(),
            base64: contents.map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
        });
    }
    (result, files)
}

fn mime_of(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("svg") => "image/svg+xml",
        Some("gif") => "image/gif",
        Some("json") => "application/json",
        Some("csv") => "text/csv",
        Some("txt" | "log" | "md") => "text/plain",
        Some("html" | "htm") => "text/html",
        Some("pdf") => "application/pdf",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_follow_the_extension() {
        assert_eq!(mime_of("chart.PNG"), "image/png");
        assert_eq!(mime_of("a/b/result.json"), "application/json");
        assert_eq!(mime_of("noext"), "application/octet-stream");
    }
}
