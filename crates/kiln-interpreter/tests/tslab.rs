//! JavaScript and TypeScript on tslab's real kernels, with Kiln's preload (see `common`
//! for the privilege tier; these tests skip without tslab, and fail under `CI`).

mod common;

use std::time::Duration;

use common::{main_text, of_type, Interpreter};
use serde_json::{json, Value};

fn error_of(lines: &[Value]) -> (String, String) {
    let errors = of_type(lines, "error");
    assert_eq!(errors.len(), 1, "{lines:?}");
    (
        errors[0]["name"].as_str().unwrap_or_default().to_owned(),
        errors[0]["value"].as_str().unwrap_or_default().to_owned(),
    )
}

fn count_of(lines: &[Value]) -> Value {
    of_type(lines, "number_of_executions")
        .first()
        .map(|l| l["execution_count"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn javascript_results_errors_and_counts() {
    let Some(interp) = Interpreter::start_tslab("javascript_results_errors_and_counts").await
    else {
        return;
    };
    let js = Some("js");
    // The last expression is the main result, and the count starts at 1.
    let lines = interp.run_in(js, "1 + 1").await;
    assert_eq!(count_of(&lines), json!(1), "{lines:?}");
    assert_eq!(main_text(&lines).as_deref(), Some("2"));
    assert!(of_type(&lines, "stdout").is_empty(), "{lines:?}");

    // Top-level await; a string result loses its quotes (spec A.4).
    let lines = interp
        .run_in(js, "await Promise.resolve('Hello World!')")
        .await;
    assert_eq!(count_of(&lines), json!(2), "{lines:?}");
    assert_eq!(main_text(&lines).as_deref(), Some("Hello World!"));

    // ES imports, the working directory, console output.
    std::fs::write(interp.home().join("note.txt"), "kiln").unwrap();
    let lines = interp
        .run_in(
            js,
            "import {readFileSync} from 'fs'\nreadFileSync('note.txt', 'utf8')",
        )
        .await;
    assert_eq!(main_text(&lines).as_deref(), Some("kiln"), "{lines:?}");
    let lines = interp
        .run_in(js, "console.log('out'); console.error('err')")
        .await;
    let stdout = of_type(&lines, "stdout");
    assert_eq!(stdout.len(), 1, "{lines:?}");
    assert_eq!(stdout[0]["text"], "out\n");
    assert_eq!(of_type(&lines, "stderr")[0]["text"], "err\n");
    assert_eq!(main_text(&lines), None);

    // A thrown error is reported by name, and the next cell, sent at once, runs
    // (tslab alone aborts requests that arrive within 200 ms of a failure).
    let lines = interp.run_in(js, "throw new TypeError('bad')").await;
    assert_eq!(error_of(&lines), ("TypeError".to_owned(), "bad".to_owned()));
    assert!(of_type(&lines, "stderr").is_empty(), "{lines:?}");
    let lines = interp.run_in(js, "let kept = 40; kept + 2").await;
    assert_eq!(main_text(&lines).as_deref(), Some("42"), "{lines:?}");
    let lines = interp.run_in(js, "missing").await;
    let (name, value) = error_of(&lines);
    assert_eq!(name, "CompileError");
    assert!(value.contains("Cannot find name 'missing'"), "{value}");

    // Per-run env vars are set for that run only; silent cells do not count.
    let (status, lines) = interp
        .execute(
            json!({"code": "process.env.KILN_T", "language": "js", "env_vars": {"KILN_T": "v"}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(main_text(&lines).as_deref(), Some("v"), "{lines:?}");
    let lines = interp
        .run_in(js, "process.env.KILN_T === undefined && kept")
        .await;
    assert_eq!(main_text(&lines).as_deref(), Some("40"), "{lines:?}");
    assert_eq!(count_of(&lines), json!(9), "{lines:?}");

    // The client leaving interrupts a busy loop; the context keeps its state.
    let request = interp
        .http
        .post(interp.url("/execute"))
        .json(&json!({"code": "while (true) {}", "language": "js"}))
        .timeout(Duration::from_secs(2))
        .send();
    let _ = async { request.await?.text().await }.await;
    let lines = interp.run_in(js, "kept").await;
    assert_eq!(main_text(&lines).as_deref(), Some("40"), "{lines:?}");
}

#[tokio::test]
async fn typescript_has_its_own_context_and_types() {
    let Some(interp) = Interpreter::start_tslab("typescript_has_its_own_context_and_types").await
    else {
        return;
    };
    let lines = interp
        .run_in(
            Some("ts"),
            "function twice(n: number): number { return n * 2 }\ntwice(21)",
        )
        .await;
    assert_eq!(main_text(&lines).as_deref(), Some("42"), "{lines:?}");
    let lines = interp.run_in(Some("ts"), "let s: string = 5").await;
    let (name, value) = error_of(&lines);
    assert_eq!(name, "CompileError");
    assert!(value.contains("not assignable"), "{value}");
    // JavaScript is another kernel: `twice` does not exist there.
    let lines = interp.run_in(Some("js"), "twice(1)").await;
    let (name, value) = error_of(&lines);
    assert_eq!(name, "CompileError");
    assert!(value.contains("Cannot find name 'twice'"), "{value}");

    let contexts: Value = interp
        .http
        .get(interp.url("/contexts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let languages: Vec<&str> = contexts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["language"].as_str())
        .collect();
    assert_eq!(languages, ["typescript", "javascript"]);
}
