//! Test harness: starts the real `kiln-interpreter` binary on a free local port with
//! temporary kernelspecs for real kernels.
//!
//! Privilege tier: unprivileged, but needs `python3` with `ipykernel` (or
//! `KILN_TEST_PYTHON=/path/to/python` with it). Without one the tests print SKIP and pass,
//! except under `CI`, where they fail and say what to install. The tslab tests need
//! tslab's `tslab` command from a global npm install (`npm install -g tslab@1.0.22`, or
//! `KILN_TEST_TSLAB=/path/to/bin/tslab`) and skip without it, except under `CI`.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The Python that has ipykernel, or `None` (after printing why) when the test should skip.
pub fn python_with_ipykernel(test: &str) -> Option<PathBuf> {
    let candidate = std::env::var_os("KILN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let why = format!(
        "{} cannot import ipykernel (install it with `pip install ipykernel`, or set KILN_TEST_PYTHON to a python that has it)",
        candidate.display()
    );
    runs_or_skip(
        test,
        candidate,
        &["-c", "import ipykernel"],
        "a real Jupyter kernel",
        &why,
    )
}

/// `candidate` when `candidate args` exits 0; otherwise `None` after printing SKIP and
/// `why` (a panic under `CI`, where nothing may skip).
fn runs_or_skip(
    test: &str,
    candidate: PathBuf,
    args: &[&str],
    needs: &str,
    why: &str,
) -> Option<PathBuf> {
    let ok = Command::new(&candidate)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(candidate);
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set and {test} needs {needs}: {why}");
    }
    // Straight to stderr: libtest would swallow eprintln! output of a passing test.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    None
}

pub struct Interpreter {
    child: Child,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// tslab's `tslab` command, or `None` (after printing why) when the test should skip.
pub fn tslab_bin(test: &str) -> Option<PathBuf> {
    let candidate = std::env::var_os("KILN_TEST_TSLAB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tslab"));
    let why = format!(
        "{} does not run (install with `npm install -g tslab@1.0.22`, or set KILN_TEST_TSLAB \
         to its bin/tslab; scripts/test installs it)",
        candidate.display()
    );
    runs_or_skip(test, candidate, &["--version"], "tslab", &why)
}

impl Interpreter {
    /// Starts the interpreter with an ipykernel `python3` kernelspec; `None` = skip.
    pub async fn start(test: &str, extra: &[&str]) -> Option<Self> {
        let python = python_with_ipykernel(test)?;
        let spec = json!({
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)",
            "language": "python",
        });
        let mut args = vec!["--warm", "python", "--warm-background", ""];
        args.extend_from_slice(extra);
        Some(Self::start_with(&[("python3", spec)], &args).await)
    }

    /// Starts the interpreter with tslab's `jslab` and `tslab` kernelspecs (as
    /// `tslab install` writes them) and no warm contexts; `None` = skip.
    pub async fn start_tslab(test: &str) -> Option<Self> {
        let tslab = tslab_bin(test)?;
        let spec = |js: bool| {
            let mut argv = vec![
                json!(tslab),
                json!("kernel"),
                json!("--config-path"),
                json!("{connection_file}"),
            ];
            if js {
                argv.push(json!("--js"));
            }
            json!({
                "argv": argv,
                "display_name": if js { "JavaScript" } else { "TypeScript" },
                "language": if js { "javascript" } else { "typescript" },
            })
        };
        let specs = [("jslab", spec(true)), ("tslab", spec(false))];
        Some(Self::start_with(&specs, &["--warm", "", "--warm-background", ""]).await)
    }

    /// Starts the interpreter with these kernelspecs (name, kernel.json) and only them.
    pub async fn start_with(specs: &[(&str, Value)], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, spec) in specs {
            let spec_dir = dir.path().join("jupyter/kernels").join(name);
            std::fs::create_dir_all(&spec_dir).unwrap();
            std::fs::write(spec_dir.join("kernel.json"), spec.to_string()).unwrap();
        }
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln-interpreter"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--kernelspec-dir")
            .arg(dir.path().join("jupyter"))
            .arg("--default-cwd")
            .arg(&home)
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .args(["--envd", "off"])
            .args(extra)
            // Only the test's kernelspec: no user or system kernels.
            .env("JUPYTER_PATH", dir.path().join("jupyter"))
            .env("HOME", &home)
            .env(
                "KILN_INTERPRETER_LOG",
                std::env::var("KILN_INTERPRETER_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kiln-interpreter");
        let interp = Interpreter {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = interp.http.get(interp.url("/health")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kiln-interpreter did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        interp
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Runs `/execute` and returns (status, lines). Asserts the NDJSON framing.
    pub async fn execute(&self, body: Value) -> (u16, Vec<Value>) {
        let response = self
            .http
            .post(self.url("/execute"))
            .json(&body)
            .send()
            .await
            .expect("POST /execute");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        if status != 200 {
            return (status, vec![Value::String(text)]);
        }
        assert!(
            text.ends_with('\n'),
            "stream must end with a newline: {text:?}"
        );
        let lines: Vec<Value> = text
            .split_terminator('\n')
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect();
        assert_eq!(
            lines.last(),
            Some(&json!({"type": "end_of_execution"})),
            "{lines:?}"
        );
        (status, lines)
    }

    /// Runs `code` in the default context and returns the lines.
    pub async fn run(&self, code: &str) -> Vec<Value> {
        self.run_in(None, code).await
    }

    /// Runs `code` in the default context of `language` (`None`: Python's).
    pub async fn run_in(&self, language: Option<&str>, code: &str) -> Vec<Value> {
        let (status, lines) = self
            .execute(
                json!({"code": code, "context_id": null, "language": language, "env_vars": null}),
            )
            .await;
        assert_eq!(status, 200, "{lines:?}");
        lines
    }
}

impl Drop for Interpreter {
    /// SIGTERM first: the interpreter then shuts its kernels down.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Lines of one type.
pub fn of_type<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == kind).collect()
}

/// The main result's text.
pub fn main_text(lines: &[Value]) -> Option<String> {
    lines
        .iter()
        .find(|l| l["type"] == "result" && l["is_main_result"] == true)
        .and_then(|l| l["text"].as_str())
        .map(str::to_owned)
}
