//! Control-plane tests: the real router, store and manager over real sockets, with a
//! simulated runtime whose "sandbox" is a small HTTP server on a Unix socket standing
//! in for envd. Tier: unprivileged.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::routing::{get, post};
use kiln_api::NewSandbox;
use kiln_client::{Client, ClientError};
use kiln_runtime::{
    Runtime, RuntimeError, RuntimeKind, SandboxConfig, SandboxInstance, SandboxStats,
};
use kiln_server::store::{SqliteStore, Store};
use kiln_server::templates::{TemplateDefaults, TemplateInfo, Templates};
use kiln_server::{AppState, BuildConfig, LimitsConfig};
use serde_json::json;

mod common;

#[derive(Default)]
struct FakeRuntime {
    dir: PathBuf,
    running: Mutex<BTreeMap<String, tokio::task::JoinHandle<()>>>,
    inits: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Command lines run through the fake envd's `Start`.
    commands: Arc<Mutex<Vec<String>>>,
    killed: Mutex<Vec<String>>,
    started: Mutex<Vec<String>>,
    paused: Mutex<HashSet<String>>,
    /// Adopts that fail (a runtime that cannot answer) before they work again.
    adopt_failures: AtomicUsize,
    /// Kills that fail before they work again.
    kill_failures: AtomicUsize,
    /// Starts take up to this long.
    start_delay_ms: AtomicU64,
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Jail
    }

    async fn start(&self, config: &SandboxConfig) -> Result<SandboxInstance, RuntimeError> {
        let most = self.start_delay_ms.load(Ordering::Relaxed);
        if most > 0 {
            let spread = config.id.bytes().map(u64::from).sum::<u64>() % most;
            tokio::time::sleep(Duration::from_millis(spread)).await;
        }
        let socket = self.dir.join(format!("{}.sock", config.id));
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| RuntimeError::io("bind fake envd", e))?;
        // As a real envd's socket is: owned by the sandbox's root. (Without root the
        // chown fails and the socket stays the test's own, which the server accepts
        // when it does not run as root either.)
        let _ = std::os::unix::fs::chown(
            &socket,
            Some(kiln_runtime::ID_MAP_BASE),
            Some(kiln_runtime::ID_MAP_BASE),
        );
        let inits = self.inits.clone();
        let commands = self.commands.clone();
        let app = axum::Router::new()
            .route(
                "/process.Process/Start",
                post(move |body: axum::body::Bytes| async move {
                    let envs = kiln_proto::connect::decode_envelopes(&body, 1 << 20).unwrap();
                    let req: serde_json::Value = serde_json::from_slice(&envs[0].payload).unwrap();
                    // `bash -l -c CMD` as the server's own commands run, else the argv.
                    let args = req["process"]["args"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let cmd = match args.get(2).and_then(|a| a.as_str()) {
                        Some(c) if args.len() == 3 => c.to_string(),
                        _ => std::iter::once(&req["process"]["cmd"])
                            .chain(&args)
                            .map(|a| a.as_str().unwrap_or_default())
                            .collect::<Vec<_>>()
                            .join(" "),
                    };
                    commands.lock().unwrap().push(cmd.clone());
                    let code = if cmd == "false" { 1 } else { 0 };
                    let mut out = Vec::new();
                    for msg in [
                        serde_json::json!({"event": {"start": {"pid": 7}}}),
                        serde_json::json!({"event": {"end": {"exitCode": code, "exited": true}}}),
                    ] {
                        out.extend_from_slice(&kiln_proto::connect::encode_message(&msg).unwrap());
                    }
                    out.extend_from_slice(&kiln_proto::connect::encode_end_stream(None));
                    ([("content-type", "application/connect+json")], out)
                }),
            )
            .route(
                "/init",
                post(
                    move |axum::Json(v): axum::Json<serde_json::Value>| async move {
                        inits.lock().unwrap().push(v);
                        axum::http::StatusCode::NO_CONTENT
                    },
                ),
            )
            .route(
                "/health",
                get(|| async { axum::http::StatusCode::NO_CONTENT }),
            )
            .route(
                "/files",
                post(|| async { axum::http::StatusCode::NO_CONTENT }),
            )
            .route(
                "/echo",
                post(|body: String| async move { format!("echo:{body}") }),
            );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.running.lock().unwrap().insert(config.id.clone(), task);
        self.started.lock().unwrap().push(config.id.clone());
        Ok(SandboxInstance {
            id: config.id.clone(),
            pid: 1,
            envd_socket: socket,
        })
    }

    async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        if take_one(&self.kill_failures) {
            return Err(RuntimeError::io(
                "kill",
                std::io::Error::other("cgroup busy"),
            ));
        }
        if let Some(task) = self.running.lock().unwrap().remove(id) {
            task.abort();
        }
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.sock")));
        self.killed.lock().unwrap().push(id.to_string());
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        if !self.running.lock().unwrap().contains_key(id) {
            return Err(RuntimeError::NotFound { id: id.into() });
        }
        Ok(SandboxStats {
            cpu_usage_ns: 1_000_000,
            cpu_count: 2,
            mem_used_bytes: 10 << 20,
            mem_cache_bytes: 1 << 20,
            mem_total_bytes: 512 << 20,
            disk_used_bytes: 4096,
            disk_total_bytes: 1 << 30,
        })
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.running.lock().unwrap().keys().cloned().collect())
    }

    async fn adopt(&self, id: &str) -> Result<Option<SandboxInstance>, RuntimeError> {
        if take_one(&self.adopt_failures) {
            return Err(RuntimeError::io(
                "adopt",
                std::io::Error::other("runsc state: timeout"),
            ));
        }
        if !self.running.lock().unwrap().contains_key(id) {
            return Ok(None);
        }
        Ok(Some(SandboxInstance {
            id: id.to_string(),
            pid: 1,
            envd_socket: self.dir.join(format!("{id}.sock")),
        }))
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.paused.lock().unwrap().insert(id.to_string());
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.paused.lock().unwrap().remove(id);
        Ok(())
    }
}

/// Decrements `n` if it is above zero; true when it did.
fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

struct Harness {
    manager: Arc<kiln_server::manager::SandboxManager>,
    templates: Arc<Templates>,
    url: String,
    /// The same server, with `KILN_METRICS_TOKEN` set to `scrape-secret`.
    url_with_metrics_token: String,
    /// An admin key of the default team.
    key: String,
    /// A member key of the default team ("team A").
    member_a: String,
    /// A member key of the team "other" ("team B").
    member_b: String,
    store: Arc<SqliteStore>,
    runtime: Arc<FakeRuntime>,
    _dir: tempfile::TempDir,
}

async fn start(limits: LimitsConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    common::fake_base(dir.path());
    let runtime = Arc::new(FakeRuntime {
        dir: dir.path().to_path_buf(),
        ..Default::default()
    });
    let store = Arc::new(SqliteStore::open(&dir.path().join("kiln.db")).unwrap());
    let key = kiln_server::keys::generate();
    let team_a = kiln_server::keys::default_team(store.as_ref()).unwrap();
    kiln_server::keys::register(store.as_ref(), "test", &key, true, team_a).unwrap();
    let member_a = kiln_server::keys::generate();
    kiln_server::keys::register(store.as_ref(), "a", &member_a, false, team_a).unwrap();
    let team_b = store
        .create_team("other", kiln_server::store::Quotas::default())
        .unwrap();
    let member_b = kiln_server::keys::generate();
    kiln_server::keys::register(store.as_ref(), "b", &member_b, false, team_b.id).unwrap();
    // Built-ins: every team's.
    store.set_template_owner("base", None).unwrap();
    store.set_template_owner("served", None).unwrap();
    let templates = Arc::new(Templates::default());
    templates.insert(TemplateInfo {
        name: "base".into(),
        rootfs: dir.path().join("rootfs"),
        meta: TemplateDefaults {
            default_user: Some("user".into()),
            ..Default::default()
        },
    });
    templates.insert(TemplateInfo {
        name: "served".into(),
        rootfs: dir.path().join("rootfs"),
        meta: TemplateDefaults {
            start_cmd: Some("serve-forever".into()),
            ready_cmd: Some("true".into()),
            ..Default::default()
        },
    });
    let manager = kiln_server::manager::SandboxManager::new(
        runtime.clone(),
        store.clone(),
        templates.clone(),
        limits,
    );
    let builds = kiln_server::builds::TemplateBuilds::open(
        dir.path(),
        Arc::new(common::LinkingRunner),
        templates.clone(),
        manager.clone(),
        store.clone(),
        BuildConfig::default(),
    )
    .unwrap();
    let spells = Arc::new(kiln_server::spells::Spells::new(
        store.clone(),
        dir.path().join("spells"),
        kiln_server::spells::SpellLimits::default(),
    ));
    let secrets = Arc::new(
        kiln_server::secrets::Secrets::open(store.clone(), dir.path().join("secrets.key")).unwrap(),
    );
    let state = Arc::new(AppState {
        manager: manager.clone(),
        store: store.clone(),
        templates: templates.clone(),
        ready: AtomicBool::new(true),
        domain: None,
        builds: Some(Arc::new(builds)),
        metrics_token: None,
        spells: spells.clone(),
        secrets: secrets.clone(),
    });
    let url = serve_state(state.clone()).await;
    let token_state = Arc::new(AppState {
        manager: manager.clone(),
        store: store.clone(),
        templates: templates.clone(),
        ready: AtomicBool::new(true),
        domain: None,
        builds: state.builds.clone(),
        metrics_token: Some("scrape-secret".into()),
        spells,
        secrets,
    });
    let url_with_metrics_token = serve_state(token_state).await;
    Harness {
        manager,
        templates,
        url,
        url_with_metrics_token,
        key,
        member_a,
        member_b,
        store,
        runtime,
        _dir: dir,
    }
}

/// Serves `state` as `kiln serve` does (with the peer's address known); returns the URL.
async fn serve_state(state: Arc<AppState>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let app = kiln_server::router(state)
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(listener, app).await.unwrap();
    });
    url
}

fn new_sandbox(timeout: i64, metadata: &[(&str, &str)]) -> NewSandbox {
    NewSandbox {
        template_id: "base".into(),
        timeout: Some(timeout),
        secure: Some(true),
        allow_internet_access: Some(true),
        metadata: Some(
            metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        env_vars: Some(BTreeMap::from([("FOO".to_string(), "bar".to_string())])),
        auto_pause: None,
        ..Default::default()
    }
}

fn status_of(err: ClientError) -> u16 {
    match err {
        ClientError::Api { status, .. } => status.as_u16(),
        other => panic!("expected an API error, got {other}"),
    }
}

/// How the authorization test calls one endpoint: its path with ids filled in, a
/// body, and, for a route on one team's resource, the same call on a resource that
/// does not exist (another team's key must get exactly that answer).
struct Case {
    path: String,
    body: Option<serde_json::Value>,
    /// The path naming a resource nobody has; `None`: the route acts on the caller's
    /// own team (lists, creates).
    missing: Option<String>,
}

impl Harness {
    async fn api(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = reqwest::Client::new()
            .request(m, format!("{}{path}", self.url))
            .header("x-api-key", key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        if is_stream(&resp) {
            return (status, serde_json::Value::Null);
        }
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// A template `name` of team A, built (with the fake step runner); returns the
    /// build's id.
    async fn team_a_template(&self, name: &str) -> String {
        let build = self.team_a_waiting_build(name).await;
        let spec = serde_json::json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["true"]}]});
        let path = format!("/v2/templates/{name}/builds/{build}");
        let (s, v) = self.api("POST", &path, &self.member_a, Some(spec)).await;
        assert_eq!(s, 202, "{v}");
        for _ in 0..500 {
            let path = format!("/templates/{name}/builds/{build}/status?limit=0");
            let (_, v) = self.api("GET", &path, &self.member_a, None).await;
            match v["status"].as_str() {
                Some("ready") => return build,
                Some("error") => panic!("building {name} failed: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        panic!("building {name} did not finish");
    }

    /// A build of team A that waits for its recipe; returns its id.
    async fn team_a_waiting_build(&self, name: &str) -> String {
        let (s, v) = self
            .api(
                "POST",
                "/v3/templates",
                &self.member_a,
                Some(serde_json::json!({"name": name})),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        v["buildID"].as_str().unwrap().to_string()
    }
}

const NOBODY: &str = "nobody0000000000000a";

fn spell_body(name: &str) -> serde_json::Value {
    json!({"name": name, "language": "bash", "code": "echo hi"})
}

/// A secret of team A named `name`; its id.
async fn team_a_secret(h: &Harness, name: &str) -> String {
    let body = json!({"name": name, "value": "authz-test-value"});
    let (s, v) = h.api("POST", "/secrets", &h.member_a, Some(body)).await;
    assert_eq!(s, 201, "{v}");
    v["secretID"].as_str().unwrap().to_string()
}
const NO_BUILD: &str = "00000000-0000-0000-0000-000000000000";

/// The authorization test's table: every endpoint the router serves must be here.
/// `n` makes names unique per call; a case sets up (as team A) what it acts on.
async fn case_for(h: &Harness, method: &str, path: &str, n: usize) -> Option<Case> {
    let own = |path: &str, body| {
        Some(Case {
            path: path.into(),
            body,
            missing: None,
        })
    };
    let scoped = |real: String, missing: String, body| {
        Some(Case {
            path: real,
            body,
            missing: Some(missing),
        })
    };
    let sandbox = |h: &Harness| {
        let c = Client::new(&h.url, &h.member_a);
        async move { c.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id }
    };
    let on = |p: &str, id: &str| p.replace("{id}", id);
    match (method, path) {
        ("GET", "/healthz") | ("GET", "/health") | ("GET", "/metrics") => own(path, None),
        ("GET", "/events") => own(path, None),
        ("POST", "/sandboxes") => own(path, Some(json!({"templateID": "base", "timeout": 60}))),
        ("GET", "/sandboxes") | ("GET", "/v2/sandboxes") => own(path, None),
        ("GET", "/sandboxes/{id}")
        | ("GET", "/sandboxes/{id}/logs")
        | ("GET", "/v2/sandboxes/{id}/logs")
        | ("DELETE", "/sandboxes/{id}")
        | ("POST", "/sandboxes/{id}/pause")
        | ("GET", "/sandboxes/{id}/metrics") => {
            let id = sandbox(h).await;
            scoped(on(path, &id), on(path, NOBODY), None)
        }
        ("POST", "/sandboxes/{id}/timeout") => {
            let id = sandbox(h).await;
            scoped(
                on(path, &id),
                on(path, NOBODY),
                Some(json!({"timeout": 120})),
            )
        }
        ("POST", "/sandboxes/{id}/connect") | ("POST", "/sandboxes/{id}/resume") => {
            let id = sandbox(h).await;
            scoped(
                on(path, &id),
                on(path, NOBODY),
                Some(json!({"timeout": 120})),
            )
        }
        ("PUT", "/sandboxes/{id}/network") => {
            let id = sandbox(h).await;
            scoped(
                on(path, &id),
                on(path, NOBODY),
                Some(json!({"denyOut": ["203.0.113.0/24"]})),
            )
        }
        ("POST", "/sandboxes/{id}/refreshes") => {
            let id = sandbox(h).await;
            scoped(
                on(path, &id),
                on(path, NOBODY),
                Some(json!({"duration": 30})),
            )
        }
        ("GET", "/admin/teams") | ("GET", "/admin/keys") => own(path, None),
        ("POST", "/admin/teams") => own(path, Some(json!({"name": format!("t{n}")}))),
        ("PATCH", "/admin/teams/{name}") => {
            own("/admin/teams/other", Some(json!({"maxSandboxes": 50})))
        }
        ("POST", "/admin/keys") => own(path, Some(json!({"name": "k", "team": "other"}))),
        ("DELETE", "/admin/keys/{id}") => {
            let key = kiln_server::keys::generate();
            let id =
                kiln_server::keys::register(h.store.as_ref(), "doomed", &key, false, 1).unwrap();
            own(&format!("/admin/keys/{id}"), None)
        }
        ("POST", "/v3/templates") => own(path, Some(json!({"name": format!("new{n}")}))),
        ("GET", "/templates") => own(path, None),
        ("GET", "/templates/{id}")
        | ("DELETE", "/templates/{id}")
        | ("GET", "/templates/{id}/tags") => {
            let name = format!("tpl{n}");
            h.team_a_template(&name).await;
            scoped(on(path, &name), on(path, "nosuchtemplate"), None)
        }
        ("GET", "/templates/aliases/{alias}") => {
            let name = format!("tpl{n}");
            h.team_a_template(&name).await;
            let at = |a: &str| path.replace("{alias}", a);
            scoped(at(&name), at("nosuchtemplate"), None)
        }
        ("GET", "/templates/{id}/files/{hash}") => {
            own(&format!("/templates/x/files/{}", "a".repeat(64)), None)
        }
        ("PUT", "/_kiln/uploads/{token}") => {
            let hash = format!("{:064x}", n);
            let (_, v) = h
                .api(
                    "GET",
                    &format!("/templates/x/files/{hash}"),
                    &h.member_a,
                    None,
                )
                .await;
            let url = v["url"].as_str().unwrap();
            let token = url.rsplit('/').next().unwrap();
            own(&format!("/_kiln/uploads/{token}"), Some(json!("archive")))
        }
        ("POST", "/v2/templates/{id}/builds/{build}") => {
            let name = format!("tpl{n}");
            let build = h.team_a_waiting_build(&name).await;
            let at = |b: &str| format!("/v2/templates/{name}/builds/{b}");
            let spec =
                json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["true"]}]});
            scoped(at(&build), at(NO_BUILD), Some(spec))
        }
        ("DELETE", "/templates/{id}/builds/{build}") => {
            let name = format!("tpl{n}");
            let build = h.team_a_waiting_build(&name).await;
            let at = |b: &str| format!("/templates/{name}/builds/{b}");
            scoped(at(&build), at(NO_BUILD), None)
        }
        ("GET", "/templates/{id}/builds/{build}/status")
        | ("GET", "/templates/{id}/builds/{build}/logs/stream") => {
            let name = format!("tpl{n}");
            let build = h.team_a_template(&name).await;
            let at = |b: &str| path.replace("{id}", &name).replace("{build}", b);
            scoped(at(&build), at(NO_BUILD), None)
        }
        ("POST", "/templates/tags") => {
            let name = format!("tpl{n}");
            h.team_a_template(&name).await;
            let body = json!({"target": name, "tags": ["v1"]});
            Some(Case {
                path: path.into(),
                body: Some(body),
                missing: Some("-".into()),
            })
        }
        ("DELETE", "/templates/tags") => {
            let name = format!("tpl{n}");
            h.team_a_template(&name).await;
            let (s, v) = h
                .api(
                    "POST",
                    "/templates/tags",
                    &h.member_a,
                    Some(json!({"target": name, "tags": ["v1"]})),
                )
                .await;
            assert_eq!(s, 201, "{v}");
            let body = json!({"name": name, "tags": ["v1"]});
            Some(Case {
                path: path.into(),
                body: Some(body),
                missing: Some("-".into()),
            })
        }
        ("POST", "/templates/gc") => own(path, None),
        ("GET", "/sandboxes/metrics") => {
            // Another team's ids are left out of the answer (tested below), not refused.
            let id = sandbox(h).await;
            own(&format!("{path}?sandbox_ids={id}"), None)
        }
        ("GET", "/spells") => own(path, None),
        ("POST", "/spells") => own(path, Some(spell_body(&format!("new{n}")))),
        ("PUT", "/spells/{name}") => {
            // Another team's PUT defines a spell of its own: nothing to attack.
            let name = format!("mine{n}");
            own(&format!("/spells/{name}"), Some(spell_body(&name)))
        }
        ("GET", "/spells/{name}")
        | ("DELETE", "/spells/{name}")
        | ("POST", "/spells/{name}/runs") => {
            let name = format!("mine{n}");
            let (s, v) = h
                .api(
                    "PUT",
                    &format!("/spells/{name}"),
                    &h.member_a,
                    Some(spell_body(&name)),
                )
                .await;
            assert_eq!(s, 200, "{v}");
            let at = |x: &str| path.replace("{name}", x);
            let body = (method == "POST").then(|| json!({"args": {}}));
            scoped(at(&name), at("nosuchspell"), body)
        }
        ("GET", "/secrets") => own(path, None),
        ("POST", "/secrets") => own(path, Some(json!({"name": format!("new{n}"), "value": "v"}))),
        ("GET", "/secrets/{secretID}")
        | ("POST", "/secrets/{secretID}")
        | ("DELETE", "/secrets/{secretID}") => {
            // By id: another team's must answer as an id nobody has.
            let id = team_a_secret(h, &format!("mine{n}")).await;
            let at = |x: &str| path.replace("{secretID}", x);
            let body = (method == "POST").then(|| json!({"value": "v2"}));
            scoped(at(&id), at("sec_nosuchsecret"), body)
        }
        _ => None,
    }
}

/// A server-sent event stream never ends: its status is the answer.
fn is_stream(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The answer for a resource that does not exist, with its name taken out, to compare
/// with the answer another team gets.
fn without(v: &serde_json::Value, name: &str) -> String {
    v["message"].as_str().unwrap_or("").replace(name, "<name>")
}

/// The omicron model: walk every endpoint the router is built from and attack it. A
/// new route without a row in [`case_for`] fails here, so none ships unchecked.
#[tokio::test]
async fn every_route_enforces_authorization() {
    let h = start(LimitsConfig::default()).await;
    let bogus = "e2b_0000000000000000000000000000000000000000";
    for (n, endpoint) in kiln_server::routes::endpoints().into_iter().enumerate() {
        let (method, path) = (endpoint.method.as_str().to_string(), endpoint.path);
        let case = case_for(&h, &method, path, n).await.unwrap_or_else(|| {
            panic!(
                "{method} {path} is not in the authorization test's table (case_for): add how \
                 to call it"
            )
        });
        let call = |key: Option<&str>| {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut req = reqwest::Client::new().request(m, format!("{}{}", h.url, case.path));
            if let Some(k) = key {
                req = req.header("x-api-key", k);
            }
            if let Some(b) = &case.body {
                req = req.json(b);
            }
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                if is_stream(&resp) {
                    return (status, serde_json::Value::Null);
                }
                let text = resp.text().await.unwrap();
                (
                    status,
                    serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default(),
                )
            }
        };
        use kiln_server::endpoint::Access;
        let owner = match endpoint.access {
            Access::Public => {
                let (status, body) = call(None).await;
                assert!(status < 400, "{method} {path} is public: {status} {body}");
                continue;
            }
            Access::Member => h.member_a.clone(),
            Access::Admin => h.key.clone(),
        };
        for key in [None, Some(bogus)] {
            let (status, body) = call(key).await;
            assert_eq!(status, 401, "{method} {path} with key {key:?}");
            assert_eq!(body["code"], 401, "{method} {path}");
        }
        if endpoint.access == Access::Admin {
            for member in [&h.member_a, &h.member_b] {
                let (status, body) = call(Some(member)).await;
                assert_eq!(status, 403, "{method} {path} with a member key: {body}");
            }
        }
        if let Some(missing) = &case.missing {
            let (status, body) = call(Some(&h.member_b)).await;
            assert!(
                status >= 400,
                "{method} {path} with another team's key: {status} {body}"
            );
            if missing != "-" {
                // Exactly what a resource that does not exist gets.
                let (m_status, m_body) = h.api(&method, missing, &owner, case.body.clone()).await;
                assert_eq!(status, m_status, "{method} {path}: {body} vs {m_body}");
                let real: Vec<&str> = case.path.split('/').collect();
                let fake: Vec<&str> = missing.split('/').collect();
                let differing: Vec<(&str, &str)> = real
                    .iter()
                    .zip(&fake)
                    .filter(|(a, b)| a != b)
                    .map(|(a, b)| (*a, *b))
                    .collect();
                let (mut mine, mut theirs) =
                    (body["message"].to_string(), m_body["message"].to_string());
                for (a, b) in differing {
                    mine = without(&serde_json::json!({"message": mine}), a);
                    theirs = without(&serde_json::json!({"message": theirs}), b);
                }
                assert_eq!(
                    mine, theirs,
                    "{method} {path}: another team's answer differs from a missing one's"
                );
            } else {
                assert_eq!(
                    status, 404,
                    "{method} {path} with another team's key: {body}"
                );
            }
        }
        let (status, body) = call(Some(&owner)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} by its owner: {status} {body}"
        );
    }
}

#[tokio::test]
async fn teams_see_connect_to_and_kill_only_their_own_sandboxes() {
    let h = start(LimitsConfig::default()).await;
    let a = Client::new(&h.url, &h.member_a);
    let b = Client::new(&h.url, &h.member_b);
    let admin = Client::new(&h.url, &h.key);
    let sa = a.create(&new_sandbox(60, &[("who", "a")])).await.unwrap();
    let sb = b.create(&new_sandbox(60, &[("who", "b")])).await.unwrap();
    let ids = |list: Vec<kiln_api::SandboxDetail>| -> Vec<String> {
        list.into_iter().map(|s| s.sandbox_id).collect()
    };
    assert_eq!(
        ids(a.list(&BTreeMap::new()).await.unwrap()),
        vec![sa.sandbox_id.clone()]
    );
    assert_eq!(
        ids(b.list(&BTreeMap::new()).await.unwrap()),
        vec![sb.sandbox_id.clone()]
    );
    // The operator sees both.
    assert_eq!(admin.list(&BTreeMap::new()).await.unwrap().len(), 2);
    assert_eq!(status_of(b.get(&sa.sandbox_id).await.unwrap_err()), 404);
    assert_eq!(status_of(b.kill(&sa.sandbox_id).await.unwrap_err()), 404);
    assert!(h.manager.get(&sa.sandbox_id).is_some());
    a.kill(&sa.sandbox_id).await.unwrap();
    admin.kill(&sb.sandbox_id).await.unwrap();
}

#[tokio::test]
async fn team_quotas_answer_429_naming_the_quota() {
    let h = start(LimitsConfig::default()).await;
    let team = h.store.find_team("other").unwrap().unwrap();
    h.store
        .set_quotas(
            team.id,
            kiln_server::store::Quotas {
                max_sandboxes: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    let a = Client::new(&h.url, &h.member_a);
    let b = Client::new(&h.url, &h.member_b);
    let first = b.create(&new_sandbox(60, &[])).await.unwrap();
    let err = b.create(&new_sandbox(60, &[])).await.unwrap_err();
    assert!(err.to_string().contains("maxSandboxes"), "{err}");
    assert_eq!(status_of(err), 429);
    // Another team is not held back by it.
    a.create(&new_sandbox(60, &[])).await.unwrap();
    a.create(&new_sandbox(60, &[])).await.unwrap();
    b.kill(&first.sandbox_id).await.unwrap();
    b.create(&new_sandbox(60, &[])).await.unwrap();
    // Memory: the default sandbox takes the server's default memory.
    h.store
        .set_quotas(
            team.id,
            kiln_server::store::Quotas {
                max_memory_mb: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    let err = b.create(&new_sandbox(60, &[])).await.unwrap_err();
    assert!(err.to_string().contains("maxMemoryMB"), "{err}");
    assert_eq!(status_of(err), 429);
}

#[tokio::test]
async fn a_team_over_its_template_disk_quota_starts_no_build() {
    let h = start(LimitsConfig::default()).await;
    let quota = |mb| kiln_server::store::Quotas {
        max_template_disk_mb: mb,
        ..Default::default()
    };
    h.store.set_quotas(1, quota(Some(0))).unwrap();
    let (s, v) = h
        .api(
            "POST",
            "/v3/templates",
            &h.member_a,
            Some(json!({"name": "big"})),
        )
        .await;
    assert_eq!(s, 429, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("maxTemplateDiskMB"),
        "{v}"
    );
    // Another team is not held back, and neither is this one once the quota allows.
    let (s, v) = h
        .api(
            "POST",
            "/v3/templates",
            &h.member_b,
            Some(json!({"name": "theirs"})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    h.store.set_quotas(1, quota(Some(1024))).unwrap();
    h.team_a_template("big").await;
}

#[tokio::test]
async fn metrics_count_sandboxes_and_executions_for_loopback_or_the_token() {
    let h = start(LimitsConfig::default()).await;
    let a = Client::new(&h.url, &h.member_a);
    let sbx = a.create(&new_sandbox(60, &[])).await.unwrap();
    a.exec(&sbx.sandbox_id, "true", None, |_| {}).await.unwrap();
    a.exec(&sbx.sandbox_id, "false", None, |_| {})
        .await
        .unwrap();
    let text = reqwest::get(format!("{}/metrics", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "e2b_sandboxes_active 1".to_string(),
        "e2b_sandboxes_created_total 1".to_string(),
        "e2b_executions_total{kind=\"command\"} 2".to_string(),
        "e2b_executions_failed_total{kind=\"command\"} 1".to_string(),
        format!(
            "e2b_sandbox_memory_bytes{{sandbox_id=\"{}\",template=\"base\"}} 10485760",
            sbx.sandbox_id
        ),
        "kiln_sandbox_create_duration_seconds_count{runtime=\"jail\",pool=\"miss\"} 1".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle} missing from:\n{text}");
    }
    // With a token configured, it is wanted even from loopback.
    let url = format!("{}/metrics", h.url_with_metrics_token);
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 403);
    let wrong = http.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    let right = http
        .get(&url)
        .bearer_auth("scrape-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
}

#[tokio::test]
async fn the_audit_log_has_a_parseable_line_per_event_and_no_secrets() {
    let h = start(LimitsConfig::default()).await;
    let path = h._dir.path().join("audit/audit.log");
    h.manager
        .set_audit(Arc::new(kiln_server::audit::AuditLog::new(
            kiln_server::audit::AuditSink::File {
                path: path.clone(),
                max_bytes: 1 << 20,
                keep: 1,
            },
        )));
    let a = Client::new(&h.url, &h.member_a);
    let sbx = a
        .create(&new_sandbox(60, &[("agent_id", "planner-7")]))
        .await
        .unwrap();
    a.exec(&sbx.sandbox_id, "true", None, |_| {}).await.unwrap();
    a.kill(&sbx.sandbox_id).await.unwrap();
    let bogus = Client::new(&h.url, "e2b_0000000000000000000000000000000000000000");
    assert!(bogus.list(&BTreeMap::new()).await.is_err());
    let (s, v) = h
        .api(
            "POST",
            "/admin/keys",
            &h.key,
            Some(json!({"name": "audited", "team": "other"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let secret = v["key"].as_str().unwrap().to_string();

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains(&secret) && !text.contains(&h.member_a),
        "a key in the audit log"
    );
    assert!(
        !text.contains(sbx.envd_access_token.as_deref().unwrap()),
        "a token in the audit log"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |t: &str| lines.iter().find(|l| l["event_type"] == t).cloned();
    for l in &lines {
        for key in [
            "timestamp",
            "event_type",
            "sandbox_id",
            "user_id",
            "agent_id",
            "language",
            "duration_ms",
            "success",
            "ip_address",
        ] {
            assert!(l.get(key).is_some(), "{key} missing: {l}");
        }
        assert_eq!(l["ip_address"], "127.0.0.1", "{l}");
    }
    let created = of("sandbox.created").expect("sandbox.created");
    assert_eq!(created["sandbox_id"], sbx.sandbox_id.as_str());
    assert_eq!(created["agent_id"], "planner-7");
    assert!(created["user_id"]
        .as_str()
        .unwrap()
        .starts_with("team:1/key:"));
    let executed = of("sandbox.executed").expect("sandbox.executed");
    assert_eq!(executed["language"], "bash");
    assert_eq!(executed["success"], true);
    assert_eq!(executed["agent_id"], "planner-7");
    assert!(of("sandbox.terminated").is_some());
    assert_eq!(of("auth.failed").expect("auth.failed")["success"], false);
    assert!(of("key.created").is_some());
}

/// The next server-sent event of `resp` (its `event:` and parsed `data:`).
async fn next_event(resp: &mut reqwest::Response, buf: &mut String) -> (String, serde_json::Value) {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(kind), Some(data)) = (field("event:"), field("data:")) {
                return (kind, serde_json::from_str(&data).unwrap());
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn events_stream_a_teams_own_lifecycle() {
    let h = start(LimitsConfig::default()).await;
    let mut stream = reqwest::Client::new()
        .get(format!("{}/events", h.url))
        .header("x-api-key", &h.member_a)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let a = Client::new(&h.url, &h.member_a);
    let b = Client::new(&h.url, &h.member_b);
    // B's sandbox comes first but is not A's to see.
    let theirs = b.create(&new_sandbox(60, &[])).await.unwrap();
    let mine = a.create(&new_sandbox(60, &[])).await.unwrap();
    a.kill(&mine.sandbox_id).await.unwrap();
    let mut buf = String::new();
    let (kind, data) = next_event(&mut stream, &mut buf).await;
    assert_eq!(kind, "sandbox.created");
    assert_eq!(data["sandbox_id"], mine.sandbox_id.as_str());
    assert_eq!(data["version"], 1);
    assert_eq!(data["template_id"], "base");
    let (kind, data) = next_event(&mut stream, &mut buf).await;
    assert_eq!(kind, "sandbox.killed");
    assert_eq!(data["sandbox_id"], mine.sandbox_id.as_str());
    b.kill(&theirs.sandbox_id).await.unwrap();
}

/// A real `nats-server` (Debian's package; CI installs it): events arrive on their
/// versioned subjects.
/// A `nats-server` of the test's own on a free port, with its URL; `None` (a skip)
/// only outside CI.
fn nats_server() -> Option<(std::process::Child, String)> {
    let Some(server) = [
        "/usr/bin/nats-server",
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not installed: install Debian's nats-server package (scripts/install-deps.sh)"
        );
        eprintln!("skipping: no nats-server (CI installs it)");
        return None;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new(server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Some((child, format!("nats://127.0.0.1:{port}")))
}

async fn nats_client(url: &str) -> async_nats::Client {
    for _ in 0..100 {
        if let Ok(c) = async_nats::connect(url).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server did not start at {url}");
}

#[tokio::test]
async fn lifecycle_events_are_published_on_nats() {
    let Some((mut nats, url)) = nats_server() else {
        return;
    };
    let result = async {
        let client = nats_client(&url).await;
        let mut sub = client.subscribe("kiln.>").await.unwrap();
        client.flush().await.unwrap();
        let h = start(LimitsConfig::default()).await;
        h.manager.events().connect_nats(&url);
        // The publisher connects in the background: create until an event arrives.
        let a = Client::new(&h.url, &h.member_a);
        let mut created = None;
        for _ in 0..50 {
            let sbx = a.create(&new_sandbox(60, &[])).await.unwrap();
            if let Ok(Some(msg)) = tokio::time::timeout(
                Duration::from_millis(200),
                futures::StreamExt::next(&mut sub),
            )
            .await
            {
                created = Some((sbx, msg));
                break;
            }
        }
        let (_, msg) = created.expect("an event on NATS");
        assert_eq!(msg.subject.as_str(), "kiln.sandbox.created.v1");
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["type"], "sandbox.created");
        assert_eq!(v["version"], 1);
    }
    .await;
    let _ = nats.kill();
    let _ = nats.wait();
    result
}

#[tokio::test]
async fn a_timeout_of_zero_ends_the_sandbox_now() {
    let h = start(LimitsConfig::default()).await;
    let a = Client::new(&h.url, &h.member_a);
    let sbx = a.create(&new_sandbox(300, &[])).await.unwrap();
    let (s, v) = h
        .api(
            "POST",
            &format!("/sandboxes/{}/timeout", sbx.sandbox_id),
            &h.member_a,
            Some(json!({"timeout": 0})),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    eventually("the sandbox is gone", || {
        h.manager.get(&sbx.sandbox_id).is_none()
    })
    .await;
    eventually("its runtime sandbox is killed", || {
        h.runtime.killed.lock().unwrap().contains(&sbx.sandbox_id)
    })
    .await;
    // Negative stays an error.
    let other = a.create(&new_sandbox(300, &[])).await.unwrap();
    let path = format!("/sandboxes/{}/timeout", other.sandbox_id);
    let (s, _) = h
        .api("POST", &path, &h.member_a, Some(json!({"timeout": -1})))
        .await;
    assert_eq!(s, 400);
}

/// Shutdown while pooled sandboxes are still starting: none is left behind.
#[tokio::test]
async fn draining_the_pools_waits_for_starts_under_way() {
    let h = start(LimitsConfig::default()).await;
    h.runtime.start_delay_ms.store(300, Ordering::Release);
    let a = Client::new(&h.url, &h.member_a);
    // The create starts its sandbox, then starts the template's pool in the background.
    let sbx = a.create(&new_sandbox(60, &[])).await.unwrap();
    a.kill(&sbx.sandbox_id).await.unwrap();
    h.manager.drain_pools().await;
    // Past any start that was under way.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        h.runtime.running.lock().unwrap().is_empty(),
        "left running: {:?}",
        h.runtime.running.lock().unwrap().keys().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_template_of_another_team_is_not_found() {
    let h = start(LimitsConfig::default()).await;
    h.templates.insert(TemplateInfo {
        name: "bs-own".into(),
        rootfs: h._dir.path().join("rootfs"),
        meta: TemplateDefaults::default(),
    });
    let team_b = h.store.find_team("other").unwrap().unwrap();
    h.store
        .set_template_owner("bs-own", Some(team_b.id))
        .unwrap();
    let a = Client::new(&h.url, &h.member_a);
    let b = Client::new(&h.url, &h.member_b);
    let mut req = new_sandbox(60, &[]);
    req.template_id = "bs-own".into();
    let err = a.create(&req).await.unwrap_err();
    let message = err.to_string();
    assert_eq!(status_of(err), 404);
    assert!(
        message.contains("available templates: base, served"),
        "{message}"
    );
    assert!(!message.contains(", bs-own"), "{message}");
    b.create(&req).await.unwrap();
}

#[tokio::test]
async fn a_transient_runtime_error_during_recover_keeps_the_sandbox() {
    let h = start(LimitsConfig::default()).await;
    let a = Client::new(&h.url, &h.member_a);
    let sbx = a.create(&new_sandbox(300, &[])).await.unwrap().sandbox_id;
    // A restarted server whose runtime cannot answer at first.
    h.runtime.adopt_failures.store(2, Ordering::Release);
    let restarted = kiln_server::manager::SandboxManager::new(
        h.runtime.clone(),
        h.store.clone(),
        h.templates.clone(),
        LimitsConfig::default(),
    );
    restarted.recover().await.unwrap();
    assert!(!h.runtime.killed.lock().unwrap().contains(&sbx));
    assert!(h
        .store
        .list_sandboxes()
        .unwrap()
        .iter()
        .any(|r| r.id == sbx));
    // Asked again, it is adopted.
    eventually("the sandbox is re-adopted", || {
        restarted.get(&sbx).is_some()
    })
    .await;
    assert!(!h.runtime.killed.lock().unwrap().contains(&sbx));
}

#[tokio::test]
async fn a_failed_kill_is_retried_until_the_sandbox_is_gone() {
    let h = start(LimitsConfig::default()).await;
    let a = Client::new(&h.url, &h.member_a);
    let sbx = a.create(&new_sandbox(300, &[])).await.unwrap().sandbox_id;
    h.runtime.kill_failures.store(2, Ordering::Release);
    a.kill(&sbx).await.unwrap();
    // Gone for the client at once; the record waits in `killing` for the runtime.
    assert_eq!(status_of(a.get(&sbx).await.unwrap_err()), 404);
    let rec = h.store.list_sandboxes().unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].state, kiln_server::store::RecordState::Killing);
    eventually("the kill is retried until it works", || {
        h.runtime.killed.lock().unwrap().contains(&sbx)
    })
    .await;
    eventually("the record goes", || {
        h.store.list_sandboxes().unwrap().is_empty()
    })
    .await;
}

/// Clients that give up mid-create (an SDK's request timeout) at random points: no
/// sandbox may be left running without a record, an owner or a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_creates_leave_no_orphans() {
    let h = start(LimitsConfig {
        max_sandboxes: 100,
        // Every sandbox on the runtime is then a create's.
        pool_size: 0,
        ..LimitsConfig::default()
    })
    .await;
    h.runtime.start_delay_ms.store(60, Ordering::Release);
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let url = h.url.clone();
        let key = h.member_a.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(30 + (i * 7) % 120))
                .build()
                .unwrap();
            http.post(format!("{url}/sandboxes"))
                .header("x-api-key", key)
                .json(&serde_json::json!({"templateID": "base", "timeout": 300}))
                .send()
                .await
                .is_ok_and(|r| r.status() == 201)
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += usize::from(t.await.unwrap());
    }
    eventually("every create finishes", || {
        h.manager.creates_in_flight() == 0
    })
    .await;
    let on_runtime: HashSet<String> = h.runtime.running.lock().unwrap().keys().cloned().collect();
    let recorded: HashSet<String> = h
        .store
        .list_sandboxes()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let owned: HashSet<String> = h
        .manager
        .list(&kiln_server::authz::Caller::OPERATOR, &Default::default())
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.sandbox_id)
        .collect();
    let started: HashSet<String> = h.runtime.started.lock().unwrap().iter().cloned().collect();
    // Creates whose client left still ran to the end...
    assert!(
        on_runtime.len() > answered,
        "no create outlived its client ({answered} answered, {} sandboxes)",
        on_runtime.len()
    );
    // ...and every sandbox started is recorded, owned and counted.
    assert_eq!(on_runtime, started);
    assert_eq!(on_runtime, recorded);
    assert_eq!(on_runtime, owned);
    assert_eq!(h.manager.count(), on_runtime.len());
}

#[tokio::test]
async fn create_answers_201_and_inits_envd() {
    let h = start(LimitsConfig::default()).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/sandboxes", h.url))
        .header("x-api-key", &h.key)
        .json(
            &serde_json::json!({"templateID":"base","timeout":300,"secure":true,
            "allow_internet_access":true,"metadata":{},"envVars":{"FOO":"bar"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: serde_json::Value = resp.json().await.unwrap();
    let id = body["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 20);
    assert_eq!(body["envdVersion"], kiln_api::ENVD_VERSION);
    let token = body["envdAccessToken"].as_str().unwrap();
    let inits = h.runtime.inits.lock().unwrap().clone();
    assert_eq!(inits.len(), 1);
    assert_eq!(inits[0]["accessToken"], token);
    assert_eq!(inits[0]["envVars"]["FOO"], "bar");
    assert_eq!(inits[0]["envVars"]["E2B_SANDBOX_ID"], id.as_str());
    assert_eq!(inits[0]["defaultUser"], "user");
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let h = start(LimitsConfig::default()).await;
    let c = Client::new(&h.url, &h.key);
    let err = c.create(&new_sandbox(7200, &[])).await.unwrap_err();
    assert!(err.to_string().contains("E2B_SANDBOX_TIMEOUT_SEC"), "{err}");
    assert_eq!(status_of(err), 400);
    assert_eq!(
        status_of(c.create(&new_sandbox(0, &[])).await.unwrap_err()),
        400
    );
    let mut unknown = new_sandbox(60, &[]);
    unknown.template_id = "nope".into();
    let err = c.create(&unknown).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("available templates: base, served"),
        "{err}"
    );
    assert_eq!(status_of(c.get("doesnotexist").await.unwrap_err()), 404);
    assert_eq!(status_of(c.kill("doesnotexist").await.unwrap_err()), 404);
    let resp = reqwest::Client::new()
        .post(format!("{}/sandboxes", h.url))
        .header("x-api-key", &h.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));
}

#[tokio::test]
async fn the_sandbox_limit_answers_429_naming_the_limit() {
    let limits = LimitsConfig {
        max_sandboxes: 2,
        ..LimitsConfig::default()
    };
    let h = start(limits).await;
    let c = Client::new(&h.url, &h.key);
    let a = c.create(&new_sandbox(60, &[])).await.unwrap();
    c.create(&new_sandbox(60, &[])).await.unwrap();
    let err = c.create(&new_sandbox(60, &[])).await.unwrap_err();
    assert!(err.to_string().contains("E2B_MAX_SANDBOXES"), "{err}");
    assert_eq!(status_of(err), 429);
    c.kill(&a.sandbox_id).await.unwrap();
    c.create(&new_sandbox(60, &[])).await.unwrap();
}

#[tokio::test]
async fn list_filters_by_metadata_and_paginates() {
    let h = start(LimitsConfig::default()).await;
    let c = Client::new(&h.url, &h.key);
    let mut ids = HashSet::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "even" } else { "odd" };
        ids.insert(
            c.create(&new_sandbox(60, &[("team", team)]))
                .await
                .unwrap()
                .sandbox_id,
        );
    }
    let even = c
        .list(&BTreeMap::from([("team".into(), "even".into())]))
        .await
        .unwrap();
    assert_eq!(even.len(), 3);
    assert!(even.iter().all(|s| s.metadata["team"] == "even"));
    // Raw pagination with limit=2 visits every sandbox exactly once.
    let http = reqwest::Client::new();
    let mut seen = HashSet::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{}/v2/sandboxes?limit=2", h.url);
        if let Some(t) = &token {
            url.push_str(&format!("&nextToken={t}"));
        }
        let resp = http
            .get(url)
            .header("x-api-key", &h.key)
            .send()
            .await
            .unwrap();
        token = resp
            .headers()
            .get("x-next-token")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<serde_json::Value> = resp.json().await.unwrap();
        assert!(page.len() <= 2);
        for s in page {
            assert_eq!(s["state"], "running");
            assert!(seen.insert(s["sandboxID"].as_str().unwrap().to_string()));
        }
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn timeouts_kill_at_the_deadline_and_can_be_moved() {
    let h = start(LimitsConfig::default()).await;
    let c = Client::new(&h.url, &h.key);
    let short = c.create(&new_sandbox(1, &[])).await.unwrap().sandbox_id;
    let moved = c.create(&new_sandbox(1, &[])).await.unwrap().sandbox_id;
    c.set_timeout(&moved, 30).await.unwrap();
    let detail = c.get(&moved).await.unwrap();
    assert!(detail.end_at > chrono::Utc::now() + chrono::Duration::seconds(20));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status_of(c.get(&short).await.unwrap_err()), 404);
    assert!(h.runtime.killed.lock().unwrap().contains(&short));
    assert!(c.get(&moved).await.is_ok());
    // Connect never shortens the deadline.
    c.connect(&moved, 5).await.unwrap();
    assert!(
        c.get(&moved).await.unwrap().end_at > chrono::Utc::now() + chrono::Duration::seconds(20)
    );
}

#[tokio::test]
async fn envd_traffic_is_proxied_until_the_sandbox_is_killed() {
    let h = start(LimitsConfig::default()).await;
    let c = Client::new(&h.url, &h.key);
    let id = c.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id;
    let http = reqwest::Client::new();
    let send = |path: &str| {
        http.post(format!("{}{path}", h.url))
            .header("e2b-sandbox-id", &id)
            .header("e2b-sandbox-port", "49983")
            .body("hello")
            .send()
    };
    let resp = send("/echo").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "echo:hello");
    let metrics: Vec<serde_json::Value> = http
        .get(format!("{}/sandboxes/{id}/metrics", h.url))
        .header("x-api-key", &h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metrics[0]["memTotal"], 512u64 << 20);
    c.kill(&id).await.unwrap();
    let resp = send("/health").await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["sandboxId"], id.as_str());
    assert_eq!(body["code"], 502);
}

#[tokio::test]
async fn routing_errors_are_json_too() {
    let h = start(LimitsConfig::default()).await;
    let http = reqwest::Client::new();
    for (method, path, status) in [
        ("GET", "/v2/sandboxes?limit=abc", 400),
        ("GET", "/no/such/route", 404),
        ("PUT", "/sandboxes", 405),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = http
            .request(m, format!("{}{path}", h.url))
            .header("x-api-key", &h.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["code"], status, "{method} {path}");
    }
}

#[tokio::test]
async fn start_and_ready_commands_run_before_create_answers() {
    // Cold starts (the pooled path is below).
    let h = start(LimitsConfig {
        pool_size: 0,
        ..LimitsConfig::default()
    })
    .await;
    let c = Client::new(&h.url, &h.key);
    let mut req = new_sandbox(60, &[]);
    req.template_id = "served".into();
    c.create(&req).await.unwrap();
    assert_eq!(
        *h.runtime.commands.lock().unwrap(),
        ["serve-forever", "true"]
    );
    // A template without them runs nothing.
    c.create(&new_sandbox(60, &[])).await.unwrap();
    assert_eq!(h.runtime.commands.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn pooled_sandboxes_run_the_start_command_before_a_claim() {
    let h = start(LimitsConfig {
        pool_size: 1,
        ..LimitsConfig::default()
    })
    .await;
    let c = Client::new(&h.url, &h.key);
    let mut req = new_sandbox(60, &[("FOO", "bar")]);
    req.template_id = "served".into();
    // Cold (and asks for the pool of "served").
    c.create(&req).await.unwrap();
    eventually("the pool to fill", || h.manager.pooled("served") == 1).await;
    // The pooled one ran start + ready while waiting (concurrently with the cold
    // create's), with the template's env only.
    let mut commands = h.runtime.commands.lock().unwrap().clone();
    commands.sort();
    assert_eq!(commands, ["serve-forever", "serve-forever", "true", "true"]);
    let inits = h.runtime.inits.lock().unwrap().clone();
    let pooled: Vec<_> = inits
        .iter()
        .filter(|i| i["envVars"].get("E2B_SANDBOX_ID").is_none())
        .collect();
    assert_eq!(pooled.len(), 1, "{inits:?}");
    let pooled_init = pooled[0];
    assert!(pooled_init["accessToken"].is_null());
    assert!(pooled_init["envVars"].get("FOO").is_none());
    assert_eq!(pooled_init["envVars"]["E2B_TEMPLATE_ID"], "served");

    // A claim only hands over the identity: no second start command.
    let claimed = c.create(&req).await.unwrap();
    let inits = h.runtime.inits.lock().unwrap().clone();
    let last = inits
        .iter()
        .find(|i| i["envVars"]["E2B_SANDBOX_ID"] == claimed.sandbox_id.as_str())
        .expect("the claim's /init");
    assert_eq!(last["envVars"]["FOO"], "bar");
    assert_eq!(
        last["accessToken"],
        claimed.envd_access_token.clone().unwrap()
    );
    eventually("the pool to refill", || h.manager.pooled("served") == 1).await;
    let commands = h.runtime.commands.lock().unwrap().clone();
    assert_eq!(
        commands.len(),
        6,
        "{commands:?}: only the refill ran them again"
    );
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn warm_pool_claims_are_fresh_and_refilled() {
    let h = start(LimitsConfig {
        pool_size: 2,
        ..LimitsConfig::default()
    })
    .await;
    let c = Client::new(&h.url, &h.key);
    // Cold create first: it also asks for the pool to be filled.
    c.create(&new_sandbox(60, &[])).await.unwrap();
    eventually("the pool to fill", || h.manager.pooled("base") == 2).await;
    let started = h.runtime.started.lock().unwrap().clone();
    assert_eq!(started.len(), 3);

    let claimed = c.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id;
    assert!(
        started[1..].contains(&claimed),
        "{claimed} should come from the pool"
    );
    // The claimant got its own identity through /init, not someone else's.
    let inits = h.runtime.inits.lock().unwrap().clone();
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[1]["envVars"]["E2B_SANDBOX_ID"], claimed.as_str());
    // A fresh sandbox replaces the claimed one; the claimed one is never pooled again.
    eventually("the pool to refill", || h.manager.pooled("base") == 2).await;
    assert_eq!(h.runtime.started.lock().unwrap().len(), 4);

    // Without internet access the pool (which has it) does not fit: a cold start.
    let mut offline = new_sandbox(60, &[]);
    offline.allow_internet_access = Some(false);
    let cold = c.create(&offline).await.unwrap().sandbox_id;
    assert!(!started.contains(&cold));
    assert_eq!(h.manager.pooled("base"), 2);
    // A new version of the template (another root filesystem): the idle sandboxes of
    // the old one are never handed out, and are killed.
    let mut v2 = h.templates.resolve("base").unwrap();
    v2.rootfs = v2.rootfs.join("v2");
    h.templates.insert(v2);
    let fresh = c.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id;
    assert!(!h.runtime.started.lock().unwrap()[..4].contains(&fresh));
    eventually("the old version's pool to be killed", || {
        h.runtime.killed.lock().unwrap().len() == 2
    })
    .await;
    eventually("the pool to refill", || h.manager.pooled("base") == 2).await;
    h.manager.drain_pools().await;
    assert_eq!(h.manager.pooled("base"), 0);
    assert_eq!(h.runtime.killed.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn pause_and_resume_through_connect() {
    let h = start(LimitsConfig::default()).await;
    let c = Client::new(&h.url, &h.key);
    let id = c.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id;
    let http = reqwest::Client::new();
    let post = |path: String| {
        http.post(format!("{}{path}", h.url))
            .header("x-api-key", &h.key)
            .json(&serde_json::json!({"memory": true}))
            .send()
    };
    assert_eq!(
        post(format!("/sandboxes/{id}/pause"))
            .await
            .unwrap()
            .status(),
        204
    );
    assert!(h.runtime.paused.lock().unwrap().contains(&id));
    // Already paused: 409, which the SDK's pause() turns into False.
    assert_eq!(
        post(format!("/sandboxes/{id}/pause"))
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        c.get(&id).await.unwrap().state,
        kiln_api::SandboxState::Paused
    );
    let paused: Vec<serde_json::Value> = http
        .get(format!("{}/v2/sandboxes?state=paused", h.url))
        .header("x-api-key", &h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(paused.len(), 1);
    // envd traffic to a paused sandbox is refused, not left hanging.
    let resp = http
        .post(format!("{}/echo", h.url))
        .header("e2b-sandbox-id", &id)
        .header("e2b-sandbox-port", "49983")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    // Connect resumes (201), then is a plain connect (200).
    assert_eq!(
        post(format!("/sandboxes/{id}/connect"))
            .await
            .unwrap()
            .status(),
        201
    );
    assert!(h.runtime.paused.lock().unwrap().is_empty());
    assert_eq!(
        c.get(&id).await.unwrap().state,
        kiln_api::SandboxState::Running
    );
    assert_eq!(
        post(format!("/sandboxes/{id}/connect"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn auto_pause_pauses_at_the_deadline_instead_of_killing() {
    let h = start(LimitsConfig::default()).await;
    let c = Client::new(&h.url, &h.key);
    let mut req = new_sandbox(1, &[]);
    req.auto_pause = Some(true);
    let id = c.create(&req).await.unwrap().sandbox_id;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        c.get(&id).await.unwrap().state,
        kiln_api::SandboxState::Paused
    );
    assert!(h.runtime.killed.lock().unwrap().is_empty());
    // A paused sandbox has no deadline; a resume gives it a new one.
    c.connect(&id, 30).await.unwrap();
    assert_eq!(
        c.get(&id).await.unwrap().state,
        kiln_api::SandboxState::Running
    );
}

/// Limits are caps: a template asking for more memory or CPUs than the server allows
/// is refused (400 naming the cap), never started, and never pooled.
#[tokio::test]
async fn a_template_over_the_servers_caps_is_refused_naming_the_cap() {
    let h = start(LimitsConfig {
        max_memory_mb: 1024,
        max_cpu_count: 2,
        ..LimitsConfig::default()
    })
    .await;
    for (name, memory_mb, cpu_count, cap) in [
        ("greedy-memory", 4096, 1, "KILN_MAX_MEMORY_MB"),
        ("greedy-cpus", 512, 16, "KILN_MAX_CPUS"),
    ] {
        h.templates.insert(TemplateInfo {
            name: name.into(),
            rootfs: h._dir.path().join("rootfs"),
            meta: TemplateDefaults {
                memory_mb: Some(memory_mb),
                cpu_count: Some(cpu_count),
                ..Default::default()
            },
        });
        let c = Client::new(&h.url, &h.key);
        let mut req = new_sandbox(60, &[]);
        req.template_id = name.into();
        let err = c.create(&req).await.unwrap_err();
        assert!(err.to_string().contains(cap), "{err}");
        assert_eq!(status_of(err), 400);
        assert!(
            h.runtime.started.lock().unwrap().is_empty(),
            "nothing started"
        );
        assert_eq!(h.manager.pooled(name), 0);
    }
}

/// `E2B_DESKTOP_MAX_DURATION` caps a desktop sandbox's whole life: a create or
/// `set_timeout` past it is refused naming the cap, and a keep-alive (`connect`) is
/// held to it; other templates are not touched.
#[tokio::test]
async fn a_desktop_lives_no_longer_than_its_cap() {
    let h = start(LimitsConfig {
        desktop_max_duration_secs: 120,
        ..LimitsConfig::default()
    })
    .await;
    h.store.set_template_owner("desktop", None).unwrap();
    h.templates.insert(TemplateInfo {
        name: "desktop".into(),
        rootfs: h._dir.path().join("rootfs"),
        meta: TemplateDefaults::default(),
    });
    let c = Client::new(&h.url, &h.member_a);
    let mut req = new_sandbox(300, &[]);
    req.template_id = "desktop".into();
    let err = c.create(&req).await.unwrap_err();
    assert!(
        err.to_string().contains("E2B_DESKTOP_MAX_DURATION"),
        "{err}"
    );
    assert_eq!(status_of(err), 400);
    assert!(
        h.runtime.started.lock().unwrap().is_empty(),
        "nothing started"
    );

    req.timeout = Some(60);
    let sbx = c.create(&req).await.unwrap();
    let started = c.get(&sbx.sandbox_id).await.unwrap().started_at;
    let err = c.set_timeout(&sbx.sandbox_id, 200).await.unwrap_err();
    assert!(err.to_string().contains("at most 120 s"), "{err}");
    c.set_timeout(&sbx.sandbox_id, 90).await.unwrap();
    c.connect(&sbx.sandbox_id, 3000).await.unwrap();
    let end = c.get(&sbx.sandbox_id).await.unwrap().end_at;
    assert!(
        end <= started + chrono::Duration::seconds(120),
        "ends {end}, started {started}"
    );
    assert!(end > started + chrono::Duration::seconds(90));

    // Another template lives as long as it is asked to.
    let other = c.create(&new_sandbox(300, &[])).await.unwrap();
    c.set_timeout(&other.sandbox_id, 3000).await.unwrap();
}

/// Every error answer carries a request id; an internal one names it in its message.
#[tokio::test]
async fn responses_carry_a_request_id() {
    let h = start(LimitsConfig::default()).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/sandboxes/nosuchsandbox", h.url))
        .header("x-api-key", &h.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");
}

/// REST bodies from anyone holding a key: arbitrary JSON to `POST /sandboxes` gets a
/// clean 4xx (or a sandbox), never a 5xx or a dropped connection.
#[tokio::test]
async fn arbitrary_create_bodies_get_clean_answers() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    let h = start(LimitsConfig::default()).await;
    let client = reqwest::Client::new();
    let mut runner = TestRunner::deterministic();
    let leaf = proptest::prop_oneof![
        proptest::strategy::Just(serde_json::Value::Null),
        proptest::num::i64::ANY.prop_map(serde_json::Value::from),
        "[ -~]{0,12}".prop_map(serde_json::Value::from),
        proptest::bool::ANY.prop_map(serde_json::Value::from),
    ];
    let keys = proptest::sample::select(vec![
        "templateID",
        "timeout",
        "metadata",
        "envVars",
        "secure",
        "allow_internet_access",
        "autoPause",
        "x",
    ]);
    let body = proptest::collection::btree_map(keys, leaf, 0..6);
    for _ in 0..64 {
        let map = body.new_tree(&mut runner).unwrap().current();
        let json = serde_json::to_vec(&map).unwrap();
        let resp = client
            .post(format!("{}/sandboxes", h.url))
            .header("x-api-key", &h.key)
            .header("content-type", "application/json")
            .body(json)
            .send()
            .await
            .unwrap();
        assert!(resp.status().as_u16() < 500, "{map:?} -> {}", resp.status());
    }
}

#[tokio::test]
async fn a_create_may_ask_for_its_own_memory_and_cpus_within_the_caps() {
    let h = start(LimitsConfig::default()).await;
    let (s, v) = h
        .api(
            "POST",
            "/sandboxes",
            &h.member_a,
            Some(json!({"templateID": "base", "memoryMB": 256, "cpuCount": 1})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["sandboxID"].as_str().unwrap();
    let (_, d) = h
        .api("GET", &format!("/sandboxes/{id}"), &h.member_a, None)
        .await;
    assert_eq!(
        (d["memoryMB"].as_u64(), d["cpuCount"].as_u64()),
        (Some(256), Some(1))
    );
    let (s, v) = h
        .api(
            "POST",
            "/sandboxes",
            &h.member_a,
            Some(json!({"templateID": "base", "memoryMB": 1 << 20})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("this create asks for") && msg.contains("KILN_MAX_MEMORY_MB"),
        "{msg}"
    );
    let (s, v) = h
        .api(
            "POST",
            "/sandboxes",
            &h.member_a,
            Some(json!({"templateID": "base", "cpuCount": 0})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
}

#[tokio::test]
async fn spell_arguments_are_checked_before_any_sandbox_starts() {
    let h = start(LimitsConfig::default()).await;
    let spell = json!({
        "name": "count", "language": "python", "code": "print(args['n'])",
        "parameters": [{"name": "n", "type": "integer"}],
    });
    let (s, v) = h
        .api("POST", "/spells", &h.member_a, Some(spell.clone()))
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["source"], "team");
    let (s, _) = h.api("POST", "/spells", &h.member_a, Some(spell)).await;
    assert_eq!(s, 409);
    let started = h.runtime.started.lock().unwrap().len();
    for (args, needle) in [
        (json!({}), "missing argument \"n\""),
        (json!({"n": "three"}), "must be an integer, got string"),
        (json!({"n": 3, "m": 1}), "unknown argument \"m\""),
    ] {
        let (s, v) = h
            .api(
                "POST",
                "/spells/count/runs",
                &h.member_a,
                Some(json!({"args": args})),
            )
            .await;
        assert_eq!(s, 400, "{v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    assert_eq!(h.runtime.started.lock().unwrap().len(), started);
    // The run itself: a sandbox of the caller's team, killed at the end.
    let (s, v) = h
        .api(
            "POST",
            "/spells/count/runs",
            &h.member_a,
            Some(json!({"args": {"n": 3}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["exitCode"], 0);
    let id = v["sandboxID"].as_str().unwrap();
    assert!(h.runtime.killed.lock().unwrap().iter().any(|k| k == id));
    let commands = h.runtime.commands.lock().unwrap().clone();
    assert!(
        commands
            .iter()
            .any(|c| c == "python3 /tmp/kiln-spell/run.py"),
        "{commands:?}"
    );
    // Shared spells are not a team's to delete; another team does not see this one.
    let (s, _) = h
        .api("DELETE", "/spells/run-python", &h.member_a, None)
        .await;
    assert_eq!(s, 403);
    let (s, _) = h.api("GET", "/spells/count", &h.member_b, None).await;
    assert_eq!(s, 404);
}

/// E2B's secrets API as the SDK drives it: values go in and never come out (no
/// answer, audit line or database page holds one), names are per team and canonical,
/// updates count versions, and another team's secret answers as a missing one.
#[tokio::test]
async fn secrets_are_write_only_versioned_and_per_team() {
    const VALUE: &str = "sk-live-never-shown-4f9a";
    const VALUE2: &str = "sk-live-never-shown-b7c1";
    let h = start(LimitsConfig::default()).await;
    let audit = h._dir.path().join("audit/secrets.log");
    h.manager
        .set_audit(Arc::new(kiln_server::audit::AuditLog::new(
            kiln_server::audit::AuditSink::File {
                path: audit.clone(),
                max_bytes: 1 << 20,
                keep: 1,
            },
        )));
    let answers = Mutex::new(Vec::<String>::new());
    let call = |method: &'static str, path: String, key: String, body| {
        let answers = &answers;
        let h = &h;
        async move {
            let (s, v) = h.api(method, &path, &key, body).await;
            answers.lock().unwrap().push(v.to_string());
            (s, v)
        }
    };
    let (a, b) = (h.member_a.clone(), h.member_b.clone());

    let (s, v) = call(
        "POST",
        "/secrets".into(),
        a.clone(),
        Some(json!({"name": "OpenAI-Key", "value": VALUE, "metadata": {"env": "prod"}})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["secretID"].as_str().unwrap().to_string();
    assert!(id.starts_with("sec_"), "{v}");
    assert_eq!(v["name"], "openai-key");
    assert_eq!(v["currentVersion"], 1);
    assert_eq!(v["metadata"], json!({"env": "prod"}));
    let created = v["createdAt"].as_str().unwrap().to_string();
    chrono::DateTime::parse_from_rfc3339(&created).unwrap();
    chrono::DateTime::parse_from_rfc3339(v["updatedAt"].as_str().unwrap()).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "createdAt",
            "currentVersion",
            "metadata",
            "name",
            "secretID",
            "updatedAt"
        ]
    );

    // By name (in any case) and by id.
    for at in ["openai-key", "OpenAI-Key", id.as_str()] {
        let (s, got) = call("GET", format!("/secrets/{at}"), a.clone(), None).await;
        assert_eq!(s, 200, "{at}: {got}");
        assert_eq!(got, v, "{at}");
    }
    let (s, dup) = call(
        "POST",
        "/secrets".into(),
        a.clone(),
        Some(json!({"name": "openai-key", "value": VALUE})),
    )
    .await;
    assert_eq!(s, 409, "{dup}");

    // Bad input: the rule is named, the value is never quoted.
    for body in [
        json!({"name": "sec_reserved", "value": VALUE}),
        json!({"name": "a{b}", "value": VALUE}),
        json!({"name": "x".repeat(129), "value": VALUE}),
        json!({"name": "empty", "value": ""}),
        json!({"name": "number", "value": 424242}),
        json!({"name": "many", "value": VALUE, "metadata": (0..33).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
    ] {
        let (s, err) = call("POST", "/secrets".into(), a.clone(), Some(body.clone())).await;
        assert_eq!(s, 400, "{body}: {err}");
        assert!(!err.to_string().contains("424242"), "{err}");
    }

    // Listing: by name, paged with x-next-token.
    for name in ["b-second", "c-third"] {
        let (s, v) = call(
            "POST",
            "/secrets".into(),
            a.clone(),
            Some(json!({"name": name, "value": VALUE})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let page = |query: String, key: String| {
        let url = format!("{}/secrets{query}", h.url);
        async move {
            let resp = reqwest::Client::new()
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap();
            let token = resp
                .headers()
                .get("x-next-token")
                .map(|t| t.to_str().unwrap().to_string());
            let v: serde_json::Value = resp.json().await.unwrap();
            let names: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect();
            (names, token, v.to_string())
        }
    };
    let (names, token, text) = page("?limit=2".into(), a.clone()).await;
    answers.lock().unwrap().push(text);
    assert_eq!(names, ["b-second", "c-third"]);
    let token = token.expect("a next page");
    let (names, token, text) = page(format!("?limit=2&nextToken={token}"), a.clone()).await;
    answers.lock().unwrap().push(text);
    assert_eq!((names, token), (vec!["openai-key".to_string()], None));
    let (names, token, _) = page(String::new(), b.clone()).await;
    assert_eq!((names.len(), token), (0, None));

    // An update is the next version; metadata stays unless given.
    let (s, v2) = call(
        "POST",
        "/secrets/openai-key".into(),
        a.clone(),
        Some(json!({"value": VALUE2})),
    )
    .await;
    assert_eq!(s, 200, "{v2}");
    assert_eq!(v2["secretID"], id.as_str());
    assert_eq!(v2["currentVersion"], 2);
    assert_eq!(v2["metadata"], json!({"env": "prod"}));
    assert_eq!(v2["createdAt"], created.as_str());
    let (s, v3) = call(
        "POST",
        format!("/secrets/{id}"),
        a.clone(),
        Some(json!({"value": VALUE2, "metadata": {}})),
    )
    .await;
    assert_eq!(s, 200, "{v3}");
    assert_eq!(
        (v3["currentVersion"].clone(), v3["metadata"].clone()),
        (json!(3), json!({}))
    );

    // Another team: exactly what a secret nobody has gets.
    for (method, body) in [
        ("GET", None),
        ("POST", Some(json!({"value": "x"}))),
        ("DELETE", None),
    ] {
        for at in [id.as_str(), "openai-key"] {
            let (s, err) = call(method, format!("/secrets/{at}"), b.clone(), body.clone()).await;
            assert_eq!(s, 404, "{method} {at}: {err}");
            let (s, missing) = call(
                method,
                "/secrets/sec_nosuchsecret".into(),
                a.clone(),
                body.clone(),
            )
            .await;
            assert_eq!(s, 404);
            assert_eq!(
                err["message"].as_str().unwrap().replace(at, "X"),
                missing["message"]
                    .as_str()
                    .unwrap()
                    .replace("sec_nosuchsecret", "X")
            );
        }
    }

    // The database holds ciphertext only.
    for file in ["kiln.db", "kiln.db-wal"] {
        let bytes = std::fs::read(h._dir.path().join(file)).unwrap_or_default();
        for value in [VALUE, VALUE2] {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "a value in {file}"
            );
        }
    }

    let (s, _) = call("DELETE", format!("/secrets/{id}"), a.clone(), None).await;
    assert_eq!(s, 204);
    let (s, _) = call("GET", "/secrets/openai-key".into(), a.clone(), None).await;
    assert_eq!(s, 404);
    let (s, _) = call("DELETE", "/secrets/openai-key".into(), a.clone(), None).await;
    assert_eq!(s, 404);

    for text in answers.lock().unwrap().iter() {
        assert!(
            !text.contains(VALUE) && !text.contains(VALUE2),
            "a value in an answer: {text}"
        );
    }
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !log.contains(VALUE) && !log.contains(VALUE2),
        "a value in the audit log"
    );
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |t: &str| {
        lines
            .iter()
            .filter(|l| l["event_type"] == t)
            .map(|l| l["subject"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of("secret.created"),
        ["secret:openai-key", "secret:b-second", "secret:c-third"]
    );
    assert_eq!(
        of("secret.updated"),
        ["secret:openai-key", "secret:openai-key"]
    );
    assert_eq!(of("secret.deleted"), ["secret:openai-key"]);
    assert!(lines
        .iter()
        .filter(|l| l["event_type"].as_str().unwrap().starts_with("secret."))
        .all(|l| l["user_id"].as_str().unwrap().starts_with("team:1/key:")));
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("an answer within 20 s")
}

/// The next message on `subject` (others, the requests included, are skipped).
async fn answer(sub: &mut async_nats::Subscriber, subject: &str) -> serde_json::Value {
    loop {
        let msg = futures::StreamExt::next(sub)
            .await
            .expect("the subscription ended");
        if msg.subject.as_str() == subject {
            return serde_json::from_slice(&msg.payload).unwrap();
        }
    }
}

#[tokio::test]
async fn spells_and_desktops_requested_over_nats_get_their_answers() {
    let Some((mut nats, url)) = nats_server() else {
        return;
    };
    let result = async {
        let client = nats_client(&url).await;
        let mut answers = client.subscribe("e2b.>").await.unwrap();
        client.flush().await.unwrap();
        let h = start(LimitsConfig::default()).await;
        let spells = Arc::new(kiln_server::spells::Spells::new(
            h.store.clone(),
            h._dir.path().join("spells"),
            kiln_server::spells::SpellLimits::default(),
        ));
        kiln_server::work::start(
            url.clone(),
            kiln_server::work::Worker {
                manager: h.manager.clone(),
                spells,
                team_id: 1,
                domain: None,
                listen_port: 3000,
                desktop_resolution: Default::default(),
            },
        );
        // The worker subscribes in the background: ask until it answers.
        let mut probed = None;
        for _ in 0..50 {
            client
                .publish(
                    "e2b.spell.execute.v1",
                    r#"{"request_id": "probe", "spell": 1}"#.into(),
                )
                .await
                .unwrap();
            let got = tokio::time::timeout(
                Duration::from_millis(300),
                answer(&mut answers, "e2b.spell.failed.v1"),
            )
            .await;
            if let Ok(v) = got {
                probed = Some(v);
                break;
            }
        }
        let v = probed.expect("the worker answers a malformed message");
        assert_eq!(v["request_id"], "probe");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("malformed e2b.spell.execute.v1"),
            "{v}"
        );
        let run = json!({"request_id": "r1", "spell": "run-python", "agent_id": "a1",
                         "args": {"code": "print(1)"}});
        client
            .publish(
                "e2b.spell.execute.v1",
                serde_json::to_vec(&run).unwrap().into(),
            )
            .await
            .unwrap();
        let v = within(answer(&mut answers, "e2b.spell.completed.v1")).await;
        assert_eq!(
            (v["request_id"].as_str(), v["agent_id"].as_str()),
            (Some("r1"), Some("a1"))
        );
        assert_eq!(v["result"]["exitCode"], 0);

        let bad = json!({"request_id": "r2", "spell": "run-python", "args": {"code": 5}});
        client
            .publish(
                "e2b.spell.execute.v1",
                serde_json::to_vec(&bad).unwrap().into(),
            )
            .await
            .unwrap();
        let v = within(answer(&mut answers, "e2b.spell.failed.v1")).await;
        assert!(
            v["error"].as_str().unwrap().contains("must be a string"),
            "{v}"
        );

        // This harness has no desktop template: the request fails, saying so.
        let desk = json!({"request_id": "d1", "agent_id": "a1", "duration": 60});
        client
            .publish(
                "e2b.desktop.request.v1",
                serde_json::to_vec(&desk).unwrap().into(),
            )
            .await
            .unwrap();
        let v = within(answer(&mut answers, "e2b.desktop.failed.v1")).await;
        assert_eq!(v["request_id"], "d1");
        assert!(v["error"].as_str().unwrap().contains("desktop"), "{v}");
    }
    .await;
    let _ = nats.kill();
    let _ = nats.wait();
    result
}

#[tokio::test]
async fn metrics_come_from_a_history_with_ranges_and_in_batches() {
    let h = start(LimitsConfig::default()).await;
    let a = Client::new(&h.url, &h.member_a);
    let b = Client::new(&h.url, &h.member_b);
    let mine = a.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id;
    let theirs = b.create(&new_sandbox(60, &[])).await.unwrap().sandbox_id;
    h.manager.sample_all().await;
    h.manager.sample_all().await;
    let (s, v) = h
        .api(
            "GET",
            &format!("/sandboxes/{mine}/metrics"),
            &h.member_a,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let samples = v.as_array().unwrap();
    assert!(samples.len() >= 2, "{v}");
    assert_eq!(samples[0]["memUsed"], 10 << 20);
    let first = samples[0]["timestampUnix"].as_i64().unwrap();
    let (_, v) = h
        .api(
            "GET",
            &format!("/sandboxes/{mine}/metrics?start={}", first + 3600),
            &h.member_a,
            None,
        )
        .await;
    assert_eq!(v, json!([]));
    let (s, v) = h
        .api(
            "GET",
            &format!("/sandboxes/{mine}/metrics?start=10&end=5"),
            &h.member_a,
            None,
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = h
        .api(
            "GET",
            &format!("/sandboxes/metrics?sandbox_ids={mine},{theirs},nosuch"),
            &h.member_a,
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let got: Vec<&String> = v["sandboxes"].as_object().unwrap().keys().collect();
    assert_eq!(
        got,
        vec![&mine],
        "another team's and unknown ids are left out"
    );
    let (s, _) = h.api("GET", "/sandboxes/metrics", &h.member_a, None).await;
    assert_eq!(s, 400);
}
