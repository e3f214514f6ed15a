//! The template build API as the SDK drives it, over real sockets: create (202), the
//! file-context link (201) and upload, start (202), status polling with logs and
//! offsets, failures with their step, list/get/alias/delete. Build commands run in a
//! fake [`StepRunner`] (it writes the command into the new layer); the sandbox runtime
//! is never started. The fake runner also has commands that hang (`hang`), take a
//! second (`slow`) or flood the log (`flood N`), to test timeouts, cancels,
//! concurrency and the bounds of build logs. Tier: unprivileged.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_runtime::{
    Runtime, RuntimeError, RuntimeKind, SandboxConfig, SandboxInstance, SandboxStats,
};
use kiln_server::builds::TemplateBuilds;
use kiln_server::store::SqliteStore;
use kiln_server::templates::Templates;
use kiln_server::{AppState, BuildConfig, LimitsConfig};
use kiln_template::build::{RunError, RunRequest, StepRunner};
use serde_json::{json, Value};

mod common;
use common::fake_base;

struct NoRuntime;

#[async_trait]
impl Runtime for NoRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Jail
    }
    async fn start(&self, _: &SandboxConfig) -> Result<SandboxInstance, RuntimeError> {
        Err(RuntimeError::Unsupported("no runtime in this test".into()))
    }
    async fn kill(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        Err(RuntimeError::NotFound { id: id.into() })
    }
    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
    async fn adopt(&self, _: &str) -> Result<Option<SandboxInstance>, RuntimeError> {
        Ok(None)
    }
}

/// What the fake runner saw.
#[derive(Default)]
struct Probe {
    /// `hang` steps started.
    hanging: AtomicUsize,
    /// `hang` steps dropped: their sandbox would have been removed.
    removed: AtomicUsize,
    /// `slow` steps running now, and the most at once.
    running: AtomicUsize,
    max_running: AtomicUsize,
}

/// Counts a dropped step (its sandbox removed) when dropped.
struct Removed(Arc<Probe>);

impl Drop for Removed {
    fn drop(&mut self) {
        self.0.removed.fetch_add(1, Ordering::SeqCst);
    }
}

struct WritingRunner {
    probe: Arc<Probe>,
}

/// One line of `flood` output: 16 KiB, as the real runner cuts output without
/// newlines, numbered.
fn flood_line(i: usize) -> String {
    format!("[stdout]: {i:06} {}", "a".repeat(16 * 1024 - 18))
}

#[async_trait]
impl StepRunner for WritingRunner {
    async fn run(
        &self,
        req: RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        on_line(format!("[stdout]: running {}", req.cmd));
        if req.cmd.contains("exit 9") {
            on_line("[stderr]: oh no".into());
            return Err(RunError::Exit { code: 9 });
        }
        if req.cmd == "hang" {
            let _removed = Removed(self.probe.clone());
            self.probe.hanging.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if req.cmd.starts_with("slow") {
            let now = self.probe.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.probe.max_running.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.probe.running.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(n) = req.cmd.strip_prefix("flood ") {
            for i in 0..n.parse().unwrap() {
                on_line(flood_line(i));
            }
        }
        kiln_template::layer::link_tree(req.lower, req.out).unwrap();
        std::fs::write(req.out.join("last-cmd"), req.cmd).unwrap();
        Ok(())
    }
}

struct Harness {
    url: String,
    key: String,
    templates: Arc<Templates>,
    builds: Arc<TemplateBuilds>,
    probe: Arc<Probe>,
    _dir: tempfile::TempDir,
}

/// How a test's server builds.
#[derive(Default)]
struct Setup {
    config: BuildConfig,
    upload_ttl: Option<Duration>,
}

async fn start() -> Harness {
    start_with(Setup::default()).await
}

async fn start_with(setup: Setup) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    fake_base(dir.path());
    serve_with(dir, setup).await
}

/// A server on `dir` (a data dir with a base template), as after a (re)start.
async fn serve(dir: tempfile::TempDir) -> Harness {
    serve_with(dir, Setup::default()).await
}

async fn serve_with(dir: tempfile::TempDir, setup: Setup) -> Harness {
    let store = Arc::new(SqliteStore::open(&dir.path().join("kiln.db")).unwrap());
    let key = kiln_server::keys::generate();
    kiln_server::keys::register(store.as_ref(), "test", &key, true, 1).unwrap();
    let templates = Arc::new(Templates::default());
    let manager = kiln_server::manager::SandboxManager::new(
        Arc::new(NoRuntime),
        store.clone(),
        templates.clone(),
        LimitsConfig::default(),
    );
    let probe = Arc::new(Probe::default());
    let runner = Arc::new(WritingRunner {
        probe: probe.clone(),
    });
    let mut builds = TemplateBuilds::open(
        dir.path(),
        runner,
        templates.clone(),
        manager.clone(),
        store.clone(),
        setup.config,
    )
    .unwrap();
    if let Some(ttl) = setup.upload_ttl {
        builds = builds.with_upload_ttl(ttl);
    }
    let builds = Arc::new(builds);
    let spells = Arc::new(kiln_server::spells::Spells::new(
        store.clone(),
        dir.path().join("spells"),
        kiln_server::spells::SpellLimits::default(),
    ));
    let state = Arc::new(AppState {
        spells,
        secrets: Arc::new(
            kiln_server::secrets::Secrets::open(store.clone(), dir.path().join("secrets.key"))
                .unwrap(),
        ),
        manager,
        store,
        templates: templates.clone(),
        ready: AtomicBool::new(true),
        domain: None,
        builds: Some(builds.clone()),
        metrics_token: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, kiln_server::router(state))
            .await
            .unwrap();
    });
    Harness {
        url,
        key,
        templates,
        builds,
        probe,
        _dir: dir,
    }
}

impl Harness {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = reqwest::Client::new()
            .request(m, format!("{}{path}", self.url))
            .header("x-api-key", &self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Create + start; returns (templateID, buildID).
    async fn build(&self, name: &str, spec: Value) -> (String, String) {
        let (s, v) = self
            .call(
                "POST",
                "/v3/templates",
                Some(json!({"name": name, "cpuCount": 1, "memoryMB": 512})),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        for k in [
            "templateID",
            "buildID",
            "public",
            "names",
            "tags",
            "aliases",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        let (tid, bid) = (
            v["templateID"].as_str().unwrap().to_string(),
            v["buildID"].as_str().unwrap().to_string(),
        );
        let (s, v) = self
            .call(
                "POST",
                &format!("/v2/templates/{tid}/builds/{bid}"),
                Some(spec),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        (tid, bid)
    }

    /// Polls like the SDK until the build ends and the logs are drained.
    /// The whole NDJSON log stream of a build, as parsed lines.
    async fn stream(&self, tid: &str, bid: &str) -> Vec<Value> {
        let resp = reqwest::Client::new()
            .get(format!(
                "{}/templates/{tid}/builds/{bid}/logs/stream",
                self.url
            ))
            .header("x-api-key", &self.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
            .await
            .expect("the stream ends with the build")
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn wait(&self, tid: &str, bid: &str) -> (Value, Vec<Value>) {
        let mut entries = Vec::new();
        for _ in 0..1000 {
            let path = format!(
                "/templates/{tid}/builds/{bid}/status?logsOffset={}&limit=100",
                entries.len()
            );
            let (s, v) = self.call("GET", &path, None).await;
            assert_eq!(s, 200, "{v}");
            let new = v["logEntries"].as_array().unwrap().clone();
            assert_eq!(v["logs"].as_array().unwrap().len(), new.len());
            let done = matches!(v["status"].as_str(), Some("ready" | "error"));
            let drained = new.is_empty();
            entries.extend(new);
            if done && drained {
                return (v, entries);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("build {bid} did not finish");
    }

    /// Polls the status (without the log) until the build ends.
    async fn outcome(&self, tid: &str, bid: &str) -> Value {
        for _ in 0..1000 {
            let path = format!("/templates/{tid}/builds/{bid}/status?logsOffset=0&limit=0");
            let (s, v) = self.call("GET", &path, None).await;
            assert_eq!(s, 200, "{v}");
            if matches!(v["status"].as_str(), Some("ready" | "error")) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("build {bid} did not finish");
    }

    async fn status(&self, tid: &str, bid: &str) -> String {
        let path = format!("/templates/{tid}/builds/{bid}/status?limit=0");
        let (s, v) = self.call("GET", &path, None).await;
        assert_eq!(s, 200, "{v}");
        v["status"].as_str().unwrap().to_string()
    }

    /// Waits until `n` `hang` steps have started.
    async fn hanging(&self, n: usize) {
        for _ in 0..500 {
            if self.probe.hanging.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} hang steps did not start");
    }
}

fn run_spec(cmd: &str) -> Value {
    json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": [cmd]}]})
}

fn messages(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_sdk_sequence_builds_caches_and_registers() {
    let h = start().await;
    let hash = "c".repeat(64);
    // The files link: 201, not present, an upload URL served here without a key.
    let (s, v) = h
        .call("GET", &format!("/templates/mine/files/{hash}"), None)
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["present"], false);
    let url = v["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&h.url), "{url}");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ctx.path().join("app")).unwrap();
    std::fs::write(ctx.path().join("app/hello.txt"), "hi").unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-cz")
        .arg("-C")
        .arg(ctx.path())
        .arg("app")
        .output()
        .unwrap();
    assert!(tar.status.success());
    let resp = reqwest::Client::new()
        .put(&url)
        .body(tar.stdout.clone())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    // A link is single-use.
    let again = reqwest::Client::new()
        .put(&url)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let (_, v) = h
        .call("GET", &format!("/templates/mine/files/{hash}"), None)
        .await;
    assert_eq!(v["present"], true);

    // Owned by us (numeric ids), so that the test needs no root for the chown.
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata(ctx.path()).unwrap();
    let owner = format!("{}:{}", me.uid(), me.gid());
    let spec = json!({"fromImage": "debian:bookworm", "force": false, "steps": [
        {"type": "RUN", "args": ["echo one", "root"], "force": false},
        {"type": "COPY", "args": ["app", "/opt/app", owner, ""], "filesHash": hash, "force": false},
        {"type": "ENV", "args": ["K", "v"], "force": false},
    ], "startCmd": "sleep infinity", "readyCmd": "true"});
    let (tid, bid) = h.build("mine:v1", spec.clone()).await;
    assert_eq!(tid, "mine");
    // Starting twice is refused.
    let (s, v) = h
        .call(
            "POST",
            &format!("/v2/templates/{tid}/builds/{bid}"),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["message"], "build is not in waiting state");
    let (v, entries) = h.wait(&tid, &bid).await;
    assert_eq!(v["status"], "ready", "{entries:?}");
    let msgs = messages(&entries);
    assert!(
        msgs[0].starts_with("[base] FROM debian:bookworm"),
        "{msgs:?}"
    );
    assert!(entries.iter().any(|e| e["step"] == "1"));
    assert!(
        msgs.iter().any(|m| m.contains("running echo one")),
        "{msgs:?}"
    );

    // Registered for creates, with the recipe's defaults.
    let info = h.templates.resolve("mine").unwrap();
    assert_eq!(info.meta.start_cmd.as_deref(), Some("sleep infinity"));
    assert_eq!(info.meta.envs.get("K").map(String::as_str), Some("v"));
    assert_eq!(
        std::fs::read_to_string(info.rootfs.join("opt/app/hello.txt")).unwrap(),
        "hi"
    );

    // Again: every step cached.
    let (tid, bid) = h.build("mine", spec).await;
    let (v, entries) = h.wait(&tid, &bid).await;
    assert_eq!(v["status"], "ready");
    let steps: Vec<String> = messages(&entries)
        .into_iter()
        .filter(|m| m.contains("[builder "))
        .collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(steps.iter().all(|m| m.starts_with("CACHED")), "{steps:?}");

    // List, get, alias, delete.
    let (s, v) = h.call("GET", "/templates", None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["base", "mine"]);
    assert_eq!(h.call("GET", "/templates/mine", None).await.0, 200);
    assert_eq!(h.call("GET", "/templates/aliases/mine", None).await.0, 200);
    assert_eq!(h.call("GET", "/templates/aliases/nope", None).await.0, 404);
    assert_eq!(h.call("DELETE", "/templates/base", None).await.0, 400);
    assert_eq!(h.call("DELETE", "/templates/mine", None).await.0, 204);
    assert_eq!(h.call("GET", "/templates/mine", None).await.0, 404);
    assert!(h.templates.resolve("mine").is_err());
}

#[tokio::test]
async fn failures_name_their_step_and_bad_input_is_400() {
    let h = start().await;
    let spec = json!({"fromTemplate": "base", "steps": [
        {"type": "RUN", "args": ["true"]},
        {"type": "RUN", "args": ["echo x && exit 9"]},
    ]});
    let (tid, bid) = h.build("broken", spec).await;
    let (v, entries) = h.wait(&tid, &bid).await;
    assert_eq!(v["status"], "error");
    assert_eq!(v["reason"]["step"], "2");
    let msg = v["reason"]["message"].as_str().unwrap();
    assert!(
        msg.contains("step 2: failed to run command 'echo x && exit 9': exit status 9"),
        "{msg}"
    );
    assert!(msg.contains("oh no"), "{msg}");
    assert!(messages(&entries)
        .iter()
        .any(|m| m.starts_with("Build failed")));
    assert!(h.templates.resolve("broken").is_err());

    // Bad input: clear 400s.
    let (s, v) = h
        .call("POST", "/v3/templates", Some(json!({"name": "Bad Name!"})))
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("invalid template name"));
    let (s, _) = h
        .call("POST", "/v3/templates", Some(json!({"name": "base"})))
        .await;
    assert_eq!(s, 400);
    let (s, _) = h
        .call(
            "GET",
            &format!("/templates/x/files/{}", "Z".repeat(64)),
            None,
        )
        .await;
    assert_eq!(s, 400);
    let (s, v) = h
        .call(
            "GET",
            "/templates/x/builds/00000000-0000-0000-0000-000000000000/status",
            None,
        )
        .await;
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("not found"));
    // A recipe Kiln cannot build (here: an image reference that is not one) is refused
    // at start, naming it.
    let (s, v) = h
        .call("POST", "/v3/templates", Some(json!({"name": "py"})))
        .await;
    assert_eq!(s, 202);
    let bid = v["buildID"].as_str().unwrap();
    let (s, v) = h
        .call(
            "POST",
            &format!("/v2/templates/py/builds/{bid}"),
            Some(json!({"fromImage": "Python:3.13", "steps": []})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["message"].as_str().unwrap().contains("\"Python:3.13\""),
        "{v}"
    );
    let (s, v) = h
        .call(
            "POST",
            &format!("/v2/templates/py/builds/{bid}"),
            Some(json!({"fromTemplate": "base", "steps": [{"type": "EXPOSE", "args": ["80"]}]})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("step 1"), "{v}");
}

#[tokio::test]
async fn build_logs_stream_and_outcomes_survive_a_restart() {
    let h = start().await;
    let spec = json!({"fromTemplate": "base", "steps": [
        {"type": "RUN", "args": ["echo one"]},
        {"type": "RUN", "args": ["echo two"]},
    ]});
    let (tid, bid) = h.build("streamed", spec).await;
    // The stream (opened while the build runs) carries the same lines as the polled
    // status, then the outcome, then ends.
    let lines = h.stream(&tid, &bid).await;
    let (status, entries) = h.wait(&tid, &bid).await;
    assert_eq!(status["status"], "ready", "{status}");
    let (end, logs) = lines.split_last().unwrap();
    assert_eq!(end, &json!({"status": "ready"}));
    assert_eq!(messages(logs), messages(&entries));
    assert!(messages(logs)
        .iter()
        .any(|m| m.contains("running echo two")));
    // A finished build's stream replays it.
    assert_eq!(h.stream(&tid, &bid).await, lines);
    let unknown = format!("/templates/{tid}/builds/nope/logs/stream");
    assert_eq!(h.call("GET", &unknown, None).await.0, 400);

    // A build that was running when the server stopped (its record says so).
    let data = h._dir.path().to_path_buf();
    let cut = json!({
        "template_id": "cut", "status": "building", "logs": [], "reason": null,
        "cpu_count": 1, "memory_mb": 512,
    });
    std::fs::write(
        data.join("templates/.builds/cut-build.json"),
        cut.to_string(),
    )
    .unwrap();
    let Harness { _dir: dir, .. } = h;
    let h = serve(dir).await;
    // The finished build is still reported, with its log.
    let (status, entries) = h.wait(&tid, &bid).await;
    assert_eq!(status["status"], "ready");
    assert_eq!(messages(&entries), messages(logs));
    // The cut one failed, saying why.
    let (status, _) = h.wait("cut", "cut-build").await;
    assert_eq!(status["status"], "error");
    let reason = status["reason"]["message"].as_str().unwrap();
    assert!(reason.contains("interrupted"), "{reason}");
    assert_eq!(
        h.stream("cut", "cut-build").await.last().unwrap()["status"],
        "error"
    );
}

#[tokio::test]
async fn tags_are_assigned_listed_and_removed() {
    let h = start().await;
    let spec = json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["true"]}]});
    let (tid, bid) = h.build("tagged:v1", spec).await;
    assert_eq!(tid, "tagged");
    assert_eq!(h.wait(&tid, &bid).await.0["status"], "ready");
    let tag_names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t["tag"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, v) = h.call("GET", "/templates/tagged/tags", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(tag_names(&v), ["default", "v1"]);
    let build_id = v[0]["buildID"].as_str().unwrap().to_string();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["buildID"] == build_id.as_str()));

    // Assign from an existing tag: 201, tags without the name, the version's build id.
    let (s, v) = h
        .call(
            "POST",
            "/templates/tags",
            Some(json!({"target": "tagged:v1", "tags": ["prod", "stable"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v, json!({"tags": ["prod", "stable"], "buildID": build_id}));
    let (_, v) = h.call("GET", "/templates/tagged/tags", None).await;
    assert_eq!(tag_names(&v), ["default", "prod", "stable", "v1"]);
    // Bad targets and tags.
    for (body, status) in [
        (json!({"target": "tagged:", "tags": ["x"]}), 400),
        (json!({"target": ":invalid-tag", "tags": ["x"]}), 400),
        (json!({"target": "tagged:nope", "tags": ["x"]}), 404),
        (json!({"target": "missing", "tags": ["x"]}), 404),
        (json!({"target": "tagged", "tags": ["Bad Tag!"]}), 400),
        (json!({"target": "tagged", "tags": []}), 400),
    ] {
        let (s, v) = h.call("POST", "/templates/tags", Some(body.clone())).await;
        assert_eq!(s, status, "{body} → {v}");
    }

    // Remove: never `default`; an unknown tag is named.
    let remove = |tags: Value| json!({"name": "tagged", "tags": tags});
    assert_eq!(
        h.call(
            "DELETE",
            "/templates/tags",
            Some(remove(json!(["default"])))
        )
        .await
        .0,
        400
    );
    let (s, v) = h
        .call("DELETE", "/templates/tags", Some(remove(json!(["nope"]))))
        .await;
    assert_eq!(s, 404);
    assert!(v["message"].as_str().unwrap().contains("nope"), "{v}");
    assert_eq!(
        h.call("DELETE", "/templates/tags", Some(remove(json!(["prod"]))))
            .await
            .0,
        204
    );
    let (_, v) = h.call("GET", "/templates/tagged/tags", None).await;
    assert_eq!(tag_names(&v), ["default", "stable", "v1"]);

    // Deleting the template drops its tags.
    assert_eq!(h.call("DELETE", "/templates/tagged", None).await.0, 204);
    assert_eq!(h.call("GET", "/templates/tagged/tags", None).await.0, 404);
}

#[tokio::test]
async fn gc_removes_what_no_template_needs() {
    let h = start().await;
    let layers = h._dir.path().join("templates/.layers");
    let count = || std::fs::read_dir(&layers).map(|d| d.count()).unwrap_or(0);
    let spec = |cmd: &str| {
        json!({"fromTemplate": "base", "steps": [
            {"type": "RUN", "args": ["echo one"]}, {"type": "RUN", "args": [cmd]}]})
    };
    let (tid, bid) = h.build("gcd", spec("echo two")).await;
    assert_eq!(h.wait(&tid, &bid).await.0["status"], "ready");
    assert_eq!(count(), 2);
    // A new version: the old second layer is unreachable but recently used, so the
    // collection after the build (default policy: 7 days) keeps it.
    let (tid, bid) = h.build("gcd", spec("echo three")).await;
    assert_eq!(h.wait(&tid, &bid).await.0["status"], "ready");
    assert_eq!(count(), 3);

    // Behind the API key like every route.
    let resp = reqwest::Client::new()
        .post(format!("{}/templates/gc", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    for bad in [json!({"keepUnusedDays": -1}), json!({"keepDays": 1})] {
        let (s, v) = h.call("POST", "/templates/gc", Some(bad.clone())).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
    // No body: the configured policy, which keeps the recent layer.
    let (s, v) = h.call("POST", "/templates/gc", None).await;
    assert_eq!(s, 200, "{v}");
    for k in [
        "removedLayers",
        "removedUploads",
        "removedImages",
        "removedBases",
        "freedBytes",
        "keptLayers",
    ] {
        assert!(v.get(k).is_some(), "{k} missing: {v}");
    }
    assert_eq!(
        (v["removedLayers"].as_u64(), v["keptLayers"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(count(), 3);

    // Keeping nothing unused: the old layer goes, the template is still served.
    let (s, v) = h
        .call("POST", "/templates/gc", Some(json!({"keepUnusedDays": 0})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["removedLayers"], 1, "{v}");
    assert!(v["freedBytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(count(), 2);
    let (s, _) = h.call("GET", "/templates/gcd", None).await;
    assert_eq!(s, 200);

    // Deleted, its layers are garbage.
    let (s, _) = h.call("DELETE", "/templates/gcd", None).await;
    assert_eq!(s, 204);
    let (s, v) = h
        .call("POST", "/templates/gc", Some(json!({"keepUnusedDays": 0})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(count(), 0, "{v}");
}

/// A step that never ends is stopped at the step timeout, failing its build with the
/// step and the setting named, and removing its sandbox; builds (and deletes) of other
/// templates go on meanwhile.
#[tokio::test]
async fn a_step_over_its_timeout_fails_its_build_and_others_go_on() {
    let h = start_with(Setup {
        config: BuildConfig {
            step_timeout: Duration::from_secs(2),
            ..BuildConfig::default()
        },
        upload_ttl: None,
    })
    .await;
    let (tid, bid) = h.build("hung", run_spec("hang")).await;
    h.hanging(1).await;
    let (other, other_bid) = h.build("fine", run_spec("echo ok")).await;
    let (v, _) = h.wait(&other, &other_bid).await;
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(h.status(&tid, &bid).await, "building");
    assert_eq!(h.call("DELETE", "/templates/fine", None).await.0, 204);

    let v = h.outcome(&tid, &bid).await;
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(
        v["reason"]["message"],
        "step 1 (RUN hang) did not finish within 2 s (KILN_BUILD_STEP_TIMEOUT_SEC)"
    );
    assert_eq!(v["reason"]["step"], "1");
    assert_eq!(h.probe.removed.load(Ordering::SeqCst), 1);
    assert!(h.templates.resolve("hung").is_err());
}

/// Cancel: a running build ends failed ("cancelled") with its step's sandbox removed
/// and the template's earlier version still served; a waiting one ends at once; a
/// finished one cannot be, an unknown one is 404.
#[tokio::test]
async fn cancel_stops_a_build_and_keeps_the_template() {
    let h = start().await;
    let (tid, bid) = h.build("cx", run_spec("echo one")).await;
    assert_eq!(h.wait(&tid, &bid).await.0["status"], "ready");
    let served = h.templates.resolve("cx").unwrap().rootfs;

    let (_, running) = h.build("cx", run_spec("hang")).await;
    h.hanging(1).await;
    // A second build of the template waits for the first.
    let (_, waiting) = h.build("cx", run_spec("echo two")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.status("cx", &waiting).await, "building");
    let cancel = |b: &str| format!("/templates/cx/builds/{b}");
    assert_eq!(h.call("DELETE", &cancel(&waiting), None).await.0, 204);
    let v = h.outcome("cx", &waiting).await;
    assert_eq!(
        (&v["status"], &v["reason"]["message"]),
        (&json!("error"), &json!("cancelled"))
    );
    assert_eq!(h.status("cx", &running).await, "building");

    assert_eq!(h.call("DELETE", &cancel(&running), None).await.0, 204);
    let (v, entries) = h.wait("cx", &running).await;
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["reason"]["message"], "cancelled");
    assert_eq!(
        messages(&entries).last().unwrap(),
        "Build failed: cancelled"
    );
    assert_eq!(h.probe.removed.load(Ordering::SeqCst), 1);
    let info = h.templates.resolve("cx").unwrap();
    assert_eq!(info.rootfs, served);
    assert_eq!(
        std::fs::read_to_string(info.rootfs.join("last-cmd")).unwrap(),
        "echo one"
    );

    let (s, v) = h.call("DELETE", &cancel(&running), None).await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("already finished"),
        "{v}"
    );
    assert_eq!(h.call("DELETE", &cancel(&bid), None).await.0, 409);
    assert_eq!(h.call("DELETE", &cancel("nope"), None).await.0, 404);
    // The build of another template is not this one's.
    assert_eq!(
        h.call("DELETE", &format!("/templates/other/builds/{bid}"), None)
            .await
            .0,
        404
    );
}

/// 50 MiB of output without newlines (3200 lines of 16 KiB, as the runner cuts it)
/// keeps the in-memory log bounded; polls by offset still get every entry, the old
/// ones from the log file.
#[tokio::test]
async fn a_flood_of_output_keeps_memory_bounded_and_pages_come_from_the_file() {
    let h = start().await;
    let (tid, bid) = h.build("flood", run_spec("flood 3200")).await;
    let v = h.outcome(&tid, &bid).await;
    assert_eq!(v["status"], "ready", "{v}");
    let (entries, bytes) = h.builds.log_in_memory(&bid).unwrap();
    assert!(
        entries <= 1000 && bytes <= 1 << 20,
        "{entries} entries, {bytes} bytes in memory"
    );

    let hr = &h;
    let page = |offset: usize, limit: usize| {
        let path =
            format!("/templates/{tid}/builds/{bid}/status?logsOffset={offset}&limit={limit}");
        async move {
            let (s, v) = hr.call("GET", &path, None).await;
            assert_eq!(s, 200, "{v}");
            messages(v["logEntries"].as_array().unwrap())
        }
    };
    let head = page(0, 10).await;
    let first = head
        .iter()
        .position(|m| m.contains("[stdout]: 000000 "))
        .expect("the first flood line");
    for n in [0, 1, 255, 256, 1000, 2500, 3199] {
        let got = page(first + n, 2).await;
        assert!(
            got[0].ends_with(&flood_line(n)),
            "offset {}: {}",
            first + n,
            &got[0][..60]
        );
    }
    let tail = page(first + 3199, 100).await;
    assert_eq!(tail.len(), 3);
    assert!(tail[2].starts_with("Build finished"), "{}", tail[2]);
    // The log is on disk; the record holds no log.
    let dir = h._dir.path().join("templates/.builds");
    let size = std::fs::metadata(dir.join(format!("{bid}.log")))
        .unwrap()
        .len();
    assert!(size > 50 << 20, "{size}");
    let record = std::fs::read_to_string(dir.join(format!("{bid}.json"))).unwrap();
    assert!(
        record.len() < 1024 && !record.contains("\"logs\""),
        "{record}"
    );
}

/// An upload link is refused once it expired (410, saying so).
#[tokio::test]
async fn an_expired_upload_link_is_refused() {
    let h = start_with(Setup {
        config: BuildConfig::default(),
        upload_ttl: Some(Duration::from_millis(200)),
    })
    .await;
    let hash = "d".repeat(64);
    let hr = &h;
    let link = || {
        let path = format!("/templates/mine/files/{hash}");
        async move {
            let (s, v) = hr.call("GET", &path, None).await;
            assert_eq!(s, 201, "{v}");
            v["url"].as_str().unwrap().to_string()
        }
    };
    let put = |url: String| async move {
        let resp = reqwest::Client::new()
            .put(&url)
            .body("x")
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    };
    let stale = link().await;
    let fresh = link().await;
    assert_eq!(put(fresh).await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (s, v) = put(stale).await;
    assert_eq!(s, 410, "{v}");
    assert!(v["message"].as_str().unwrap().contains("expired"), "{v}");
}

/// Builds of different templates run at once up to the limit; builds of one template
/// run one after the other.
#[tokio::test]
async fn builds_run_concurrently_up_to_the_limit() {
    let h = start_with(Setup {
        config: BuildConfig {
            max_concurrent: 2,
            ..BuildConfig::default()
        },
        upload_ttl: None,
    })
    .await;
    let mut started = Vec::new();
    for name in ["s1", "s2", "s3"] {
        started.push(h.build(name, run_spec(&format!("slow {name}"))).await);
    }
    for (tid, bid) in &started {
        assert_eq!(h.outcome(tid, bid).await["status"], "ready");
    }
    assert_eq!(h.probe.max_running.load(Ordering::SeqCst), 2);

    h.probe.max_running.store(0, Ordering::SeqCst);
    let a = h.build("same", run_spec("slow a")).await;
    let b = h.build("same", run_spec("slow b")).await;
    for (tid, bid) in [&a, &b] {
        assert_eq!(h.outcome(tid, bid).await["status"], "ready");
    }
    assert_eq!(h.probe.max_running.load(Ordering::SeqCst), 1);

    // Two templates reaching the same new layer at once: one makes it, the other
    // waits and finds it cached.
    h.probe.max_running.store(0, Ordering::SeqCst);
    let a = h.build("twin-a", run_spec("slow twin")).await;
    let b = h.build("twin-b", run_spec("slow twin")).await;
    let mut cached = 0;
    for (tid, bid) in [&a, &b] {
        let (v, entries) = h.wait(tid, bid).await;
        assert_eq!(v["status"], "ready", "{v}");
        cached += messages(&entries)
            .iter()
            .filter(|m| m.starts_with("CACHED [builder 1/1]"))
            .count();
    }
    assert_eq!((cached, h.probe.max_running.load(Ordering::SeqCst)), (1, 1));
}
