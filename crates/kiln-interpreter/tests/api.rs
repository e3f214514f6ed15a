//! The HTTP API against a real ipykernel (see `common` for the privilege tier and when
//! these tests skip).

mod common;

use std::time::{Duration, Instant};

use common::{main_text, of_type, Interpreter};
use serde_json::json;

#[tokio::test]
async fn execute_streams_ndjson() {
    let Some(interp) = Interpreter::start("execute_streams_ndjson", &[]).await else {
        return;
    };
    let health = interp.http.get(interp.url("/health")).send().await.unwrap();
    assert_eq!(health.text().await.unwrap(), "\"OK\"");

    let lines = interp.run("x = 1").await;
    assert_eq!(
        lines[0],
        json!({"type": "number_of_executions", "execution_count": 1})
    );
    let lines = interp.run("print('hi'); x + 1").await;
    assert_eq!(
        lines[0],
        json!({"type": "number_of_executions", "execution_count": 2})
    );
    let stdout = of_type(&lines, "stdout");
    assert_eq!(stdout.len(), 1, "{lines:?}");
    assert_eq!(stdout[0]["text"], "hi\n");
    assert!(stdout[0]["timestamp"].is_string());
    assert_eq!(main_text(&lines).as_deref(), Some("2"));
    let result = of_type(&lines, "result")[0];
    assert_eq!(result["extra"], json!({}));

    let lines = interp.run("1/0").await;
    let errors = of_type(&lines, "error");
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert_eq!(errors[0]["name"], "ZeroDivisionError");
    assert_eq!(errors[0]["value"], "division by zero");
    let traceback = errors[0]["traceback"].as_str().unwrap();
    assert!(traceback.contains("ZeroDivisionError"), "{traceback}");
    assert!(!traceback.contains('\u{1b}'), "ANSI codes in {traceback:?}");

    let lines = interp.run("import sys; sys.stderr.write('e\\n')").await;
    assert_eq!(of_type(&lines, "stderr")[0]["text"], "e\n");

    // Uniformly indented code (the SDK tests send indented triple-quoted blocks).
    let lines = interp.run("    a = 5\n    a * 2").await;
    assert_eq!(main_text(&lines).as_deref(), Some("10"));

    // A dict gets a `json` field; strings lose one pair of quotes.
    let lines = interp.run("{'a': [1, 2]}").await;
    assert_eq!(of_type(&lines, "result")[0]["json"], json!({"a": [1, 2]}));
    let lines = interp.run("'/home/user'").await;
    assert_eq!(main_text(&lines).as_deref(), Some("/home/user"));
}

#[tokio::test]
async fn request_errors_are_plain_text() {
    let Some(interp) = Interpreter::start("request_errors_are_plain_text", &[]).await else {
        return;
    };
    let (status, body) = interp
        .execute(json!({"code": "1", "context_id": "x", "language": "python"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body[0],
        "Only one of context_id or language can be provided"
    );

    let (status, body) = interp
        .execute(json!({"code": "1", "context_id": "nope"}))
        .await;
    assert_eq!(status, 404);
    assert_eq!(body[0], "Context nope not found");

    let (status, body) = interp
        .execute(json!({"code": "1", "language": "cobol"}))
        .await;
    assert_eq!(status, 500);
    let text = body[0].as_str().unwrap();
    assert!(
        text.contains("'cobol'") && text.contains("python3"),
        "{text}"
    );

    let (status, body) = interp
        .execute(json!({"code": "1", "env_vars": {"A-B": "x"}}))
        .await;
    assert_eq!(status, 400);
    assert!(body[0].as_str().unwrap().contains("A-B"), "{body:?}");

    let (status, _) = interp.execute(json!({"nocode": 1})).await;
    assert_eq!(status, 400);

    let r = interp
        .http
        .post(interp.url("/contexts"))
        .json(&json!({"cwd": "/nonexistent/dir"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(r
        .text()
        .await
        .unwrap()
        .starts_with("Failed to set working directory"));

    for (method, path) in [
        (reqwest::Method::POST, "/contexts/nope/restart"),
        (reqwest::Method::DELETE, "/contexts/nope"),
    ] {
        let r = interp
            .http
            .request(method, interp.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.text().await.unwrap(), "Context nope not found");
    }
}

#[tokio::test]
async fn contexts_are_independent_and_restartable() {
    let Some(interp) = Interpreter::start("contexts_are_independent_and_restartable", &[]).await
    else {
        return;
    };
    interp.run("shared = 42").await;
    let cwd = interp.dir.path().to_string_lossy().into_owned();
    let ctx: serde_json::Value = interp
        .http
        .post(interp.url("/contexts"))
        .json(&json!({"cwd": cwd}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ctx["language"], "python");
    assert_eq!(ctx["cwd"], cwd);
    let id = ctx["id"].as_str().unwrap().to_owned();

    let list: Vec<serde_json::Value> = interp
        .http
        .get(interp.url("/contexts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["language"], "python");
    assert_eq!(list.last().unwrap()["id"], id);

    let in_ctx = |code: &str| json!({"code": code, "context_id": id});
    let (_, lines) = interp.execute(in_ctx("shared")).await;
    assert_eq!(of_type(&lines, "error")[0]["name"], "NameError");
    let (_, lines) = interp.execute(in_ctx("import os; os.getcwd()")).await;
    assert_eq!(main_text(&lines), Some(cwd.clone()));

    interp.execute(in_ctx("y = 5")).await;
    let r = interp
        .http
        .post(interp.url(&format!("/contexts/{id}/restart")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "null");
    let (_, lines) = interp.execute(in_ctx("y")).await;
    assert_eq!(
        of_type(&lines, "error")[0]["value"],
        "name 'y' is not defined"
    );
    let (_, lines) = interp.execute(in_ctx("import os; os.getcwd()")).await;
    assert_eq!(main_text(&lines), Some(cwd), "restart keeps the cwd");

    // The default context is untouched, and `language: python` is the same context.
    let (_, lines) = interp
        .execute(json!({"code": "shared", "language": "Python"}))
        .await;
    assert_eq!(main_text(&lines).as_deref(), Some("42"));

    let r = interp
        .http
        .delete(interp.url(&format!("/contexts/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = interp.execute(in_ctx("1")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn per_run_env_vars_are_restored() {
    let Some(interp) = Interpreter::start("per_run_env_vars_are_restored", &[]).await else {
        return;
    };
    let (_, lines) = interp
        .execute(json!({"code": "import os; print(os.environ['FOO'])", "env_vars": {"FOO": "it's \"bar\"\n"}}))
        .await;
    assert_eq!(of_type(&lines, "stdout")[0]["text"], "it's \"bar\"\n\n");
    // The env cell is silent: the user's cell is execution 1.
    assert_eq!(lines[0]["execution_count"], 1);
    let lines = interp
        .run("import os; os.environ.get('FOO', 'unset')")
        .await;
    assert_eq!(main_text(&lines).as_deref(), Some("unset"));
}

#[tokio::test]
async fn keepalives_and_interrupt_on_disconnect() {
    let Some(interp) = Interpreter::start(
        "keepalives_and_interrupt_on_disconnect",
        &["--keepalive-ms", "200"],
    )
    .await
    else {
        return;
    };
    let lines = interp.run("import time; time.sleep(1); 'done'").await;
    assert!(!of_type(&lines, "keepalive").is_empty(), "{lines:?}");
    assert_eq!(main_text(&lines).as_deref(), Some("done"));

    // Start a long cell, read its first line, then hang up.
    let mut response = interp
        .http
        .post(interp.url("/execute"))
        .json(&json!({"code": "import time; time.sleep(120)"}))
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("number_of_executions"));
    drop(response);

    let started = Instant::now();
    let lines = tokio::time::timeout(Duration::from_secs(15), interp.run("1 + 1"))
        .await
        .expect("the abandoned cell was not interrupted");
    assert_eq!(main_text(&lines).as_deref(), Some("2"));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn server_time_limit_interrupts_the_cell() {
    let Some(interp) = Interpreter::start(
        "server_time_limit_interrupts_the_cell",
        &["--max-execution-secs", "1"],
    )
    .await
    else {
        return;
    };
    let started = Instant::now();
    let lines = interp.run("while True: pass").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let errors = of_type(&lines, "error");
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert_eq!(errors[0]["name"], "ExecutionTimeout");
    let lines = interp.run("40 + 2").await;
    assert_eq!(main_text(&lines).as_deref(), Some("42"));
}

#[tokio::test]
async fn kernel_death_is_reported_and_recovered() {
    let Some(interp) = Interpreter::start("kernel_death_is_reported_and_recovered", &[]).await
    else {
        return;
    };
    let lines = interp.run("import os; os._exit(1)").await;
    let errors = of_type(&lines, "error");
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert_eq!(errors[0]["name"], "ContextRestarting");
    let lines = interp.run("3 * 3").await;
    assert_eq!(main_text(&lines).as_deref(), Some("9"));
}

#[tokio::test]
async fn restart_ends_a_running_cell() {
    let Some(interp) = Interpreter::start("restart_ends_a_running_cell", &[]).await else {
        return;
    };
    let contexts: Vec<serde_json::Value> = interp
        .http
        .get(interp.url("/contexts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = contexts[0]["id"].as_str().unwrap().to_owned();
    let running = {
        let interp_url = interp.url("/execute");
        let http = interp.http.clone();
        tokio::spawn(async move {
            http.post(interp_url)
                .json(&json!({"code": "import time; time.sleep(60)"}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = interp
        .http
        .post(interp.url(&format!("/contexts/{id}/restart")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the running cell did not end")
        .unwrap();
    assert!(body.contains("ContextRestarting"), "{body}");
    assert!(
        body.ends_with("{\"type\":\"end_of_execution\"}\n"),
        "{body}"
    );
    let lines = interp.run("5").await;
    assert_eq!(main_text(&lines).as_deref(), Some("5"));
}
