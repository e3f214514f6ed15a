//! What a tool answers: readable text for the model, structured content for programs
//! (E2B's `{results, logs: {stdout, stderr}, error}` for code), and images.

use kiln_api::spell::SpellRun;
use kiln_client::{ExecOutput, Execution};
use serde_json::{json, Value};

/// One tool's answer, whatever carries it (MCP or the bridge).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub text: String,
    pub structured: Value,
    pub images: Vec<Image>,
    /// The tool ran but what it ran failed (code raised, command exited non-zero).
    pub is_error: bool,
}

/// An image result: base64 data and its MIME type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub data: String,
    pub mime: &'static str,
}

impl ToolOutput {
    /// A plain answer whose text is the pretty-printed value.
    pub fn json(structured: Value) -> Self {
        ToolOutput {
            text: serde_json::to_string_pretty(&structured).unwrap_or_default(),
            structured,
            images: Vec::new(),
            is_error: false,
        }
    }
}

/// The images among E2B results (`png`, `jpeg` keys hold base64).
fn result_images(results: &[Value]) -> Vec<Image> {
    let mut out = Vec::new();
    for r in results {
        for (key, mime) in [("png", "image/png"), ("jpeg", "image/jpeg")] {
            if let Some(data) = r[key].as_str() {
                out.push(Image {
                    data: data.to_string(),
                    mime,
                });
            }
        }
    }
    out
}

/// A code-interpreter run.
pub fn execution(sandbox_id: &str, exec: &Execution) -> ToolOutput {
    let stdout = exec.stdout.concat();
    let stderr = exec.stderr.concat();
    let error = exec
        .error
        .as_ref()
        .map(|e| json!({"name": e.name, "value": e.value, "traceback": e.traceback}));
    let structured = json!({
        "sandbox_id": sandbox_id,
        "results": exec.results,
        "logs": {"stdout": exec.stdout, "stderr": exec.stderr},
        "error": error,
        "execution_count": exec.execution_count,
        "text": exec.text(),
        "stdout": stdout,
        "stderr": stderr,
    });
    let mut text = String::new();
    push_section(&mut text, "", &stdout);
    push_section(&mut text, "stderr:\n", &stderr);
    for r in &exec.results {
        let is_image = r.get("png").is_some() || r.get("jpeg").is_some();
        match r["text"].as_str() {
            Some(t) if !is_image || r["is_main_result"] == true => {
                let label = if r["is_main_result"] == true {
                    "result: "
                } else {
                    "display: "
                };
                push_section(&mut text, label, t);
            }
            _ if is_image => push_section(&mut text, "", "[image]"),
            _ => {
                // Only other formats (html, json, ...): show their names.
                let keys: Vec<&str> = r
                    .as_object()
                    .map(|o| {
                        o.keys()
                            .map(String::as_str)
                            .filter(|k| !matches!(*k, "extra" | "is_main_result"))
                            .collect()
                    })
                    .unwrap_or_default();
                push_section(&mut text, "result formats: ", &keys.join(", "));
            }
        }
    }
    if let Some(e) = &exec.error {
        push_section(&mut text, "", &format!("{}: {}", e.name, e.value));
        push_section(&mut text, "", &e.traceback);
    }
    if text.is_empty() {
        text.push_str("(no output)");
    }
    ToolOutput {
        text,
        images: result_images(&exec.results),
        structured,
        is_error: exec.error.is_some(),
    }
}

/// A command run to its end.
pub fn command(sandbox_id: &str, stdout: &[u8], stderr: &[u8], end: &ExecOutput) -> ToolOutput {
    let stdout = String::from_utf8_lossy(stdout).into_owned();
    let stderr = String::from_utf8_lossy(stderr).into_owned();
    let mut text = String::new();
    push_section(&mut text, "", &stdout);
    push_section(&mut text, "stderr:\n", &stderr);
    if end.exit_code != 0 {
        push_section(
            &mut text,
            "",
            &format!("exit code {} ({})", end.exit_code, end.status),
        );
    } else if text.is_empty() {
        text.push_str("(no output; exit code 0)");
    }
    ToolOutput {
        text,
        structured: json!({
            "sandbox_id": sandbox_id,
            "stdout": stdout,
            "stderr": stderr,
            "exit_code": end.exit_code,
            "status": end.status,
        }),
        images: Vec::new(),
        is_error: end.exit_code != 0,
    }
}

/// A command started in the background.
pub fn background(sandbox_id: &str, pid: u32) -> ToolOutput {
    ToolOutput {
        text: format!("started in the background in sandbox {sandbox_id}, pid {pid}"),
        structured: json!({"sandbox_id": sandbox_id, "pid": pid, "background": true}),
        images: Vec::new(),
        is_error: false,
    }
}

/// A spell run.
pub fn spell_run(run: &SpellRun) -> ToolOutput {
    let mut text = String::new();
    push_section(&mut text, "", &run.stdout);
    push_section(&mut text, "stderr:\n", &run.stderr);
    if let Some(r) = &run.result {
        push_section(&mut text, "result: ", &r.to_string());
    }
    for f in &run.files {
        push_section(
            &mut text,
            "file: ",
            &format!("{} ({}, {} bytes)", f.path, f.mime, f.size),
        );
    }
    let failed = run.timed_out || run.exit_code != Some(0);
    if run.timed_out {
        push_section(&mut text, "", "the spell was stopped at its timeout");
    } else if let Some(code) = run.exit_code.filter(|c| *c != 0) {
        push_section(&mut text, "", &format!("exit code {code}"));
    }
    if text.is_empty() {
        text.push_str("(no output)");
    }
    let images = run
        .files
        .iter()
        .filter_map(|f| {
            let mime = match f.mime.as_str() {
                "image/png" => "image/png",
                "image/jpeg" => "image/jpeg",
                _ => return None,
            };
            Some(Image {
                data: f.base64.clone()?,
                mime,
            })
        })
        .collect();
    ToolOutput {
        text,
        structured: serde_json::to_value(run).unwrap_or(Value::Null),
        images,
        is_error: failed,
    }
}

fn push_section(out: &mut String, label: &str, body: &str) {
    if body.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(label);
    out.push_str(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_client::CodeError;

    #[test]
    fn executions_take_e2b_shape_with_images_apart() {
        let exec = Execution {
            stdout: vec!["a\n".into(), "b\n".into()],
            stderr: vec!["warn\n".into()],
            results: vec![
                json!({"png": "iVBOR", "text": "<Figure>", "is_main_result": false}),
                json!({"text": "42", "is_main_result": true}),
            ],
            error: None,
            execution_count: Some(2),
        };
        let out = execution("sbx1", &exec);
        assert!(!out.is_error);
        assert_eq!(
            out.structured["logs"],
            json!({"stdout": ["a\n", "b\n"], "stderr": ["warn\n"]})
        );
        assert_eq!(out.structured["stdout"], "a\nb\n");
        assert_eq!(out.structured["error"], Value::Null);
        assert_eq!(out.structured["text"], "42");
        assert_eq!(out.structured["results"].as_array().unwrap().len(), 2);
        assert_eq!(
            out.images,
            vec![Image {
                data: "iVBOR".into(),
                mime: "image/png"
            }]
        );
        assert_eq!(out.text, "a\nb\nstderr:\nwarn\n[image]\nresult: 42");
    }

    #[test]
    fn a_raised_error_is_a_tool_error_with_its_traceback() {
        let exec = Execution {
            error: Some(CodeError {
                name: "ZeroDivisionError".into(),
                value: "division by zero".into(),
                traceback: "Traceback ...".into(),
            }),
            ..Execution::default()
        };
        let out = execution("s", &exec);
        assert!(out.is_error);
        assert_eq!(out.structured["error"]["name"], "ZeroDivisionError");
        assert!(out
            .text
            .starts_with("ZeroDivisionError: division by zero\nTraceback"));
    }

    #[test]
    fn commands_report_exit_codes() {
        let end = ExecOutput {
            exit_code: 3,
            status: "exit status 3".into(),
        };
        let out = command("s", b"out\n", b"", &end);
        assert!(out.is_error);
        assert_eq!(out.structured["stdout"], "out\n");
        assert_eq!(out.structured["exit_code"], 3);
        assert_eq!(out.text, "out\nexit code 3 (exit status 3)");
        let ok = ExecOutput {
            exit_code: 0,
            status: "exit status 0".into(),
        };
        assert_eq!(command("s", b"", b"", &ok).text, "(no output; exit code 0)");
    }
}
