//! Build executor tests with a fake [`StepRunner`]: it "runs" a command by writing it
//! into an upper directory, which is then applied like a sandbox's. Privilege tier:
//! none (files are owned by the test's user; COPY uses id base 0 only in copy.rs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;

/// What one run was asked: command, user, cwd, env.
type Seen = (String, String, Option<String>, BTreeMap<String, String>);

#[derive(Default)]
struct FakeRunner {
    calls: AtomicUsize,
    ready_checks: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

#[async_trait::async_trait]
impl StepRunner for FakeRunner {
    async fn run(
        &self,
        req: RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        assert_eq!(req.shell, "/bin/bash");
        self.seen.lock().unwrap().push((
            req.cmd.to_string(),
            req.user.to_string(),
            req.cwd.map(str::to_string),
            req.env.clone(),
        ));
        on_line(format!("running {}", req.cmd));
        if req.cmd.starts_with("fail") {
            on_line("boom".into());
            return Err(RunError::Exit { code: 3 });
        }
        let upper = req.out.with_extension("upper");
        fs::create_dir_all(upper.join("steps")).unwrap();
        fs::write(upper.join(format!("steps/{n}")), req.cmd).unwrap();
        layer::link_tree(req.lower, req.out).unwrap();
        layer::apply_upper(&upper, req.out).unwrap();
        fs::remove_dir_all(&upper).unwrap();
        Ok(())
    }

    async fn check_ready(
        &self,
        check: ReadyCheck<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        self.ready_checks.fetch_add(1, Ordering::SeqCst);
        on_line(format!("checking {}", check.ready_cmd));
        if check.ready_cmd == "false" {
            return Err(RunError::Failed("never ready".into()));
        }
        Ok(())
    }
}

fn store_with_base(dir: &Path) -> TemplateStore {
    let store = TemplateStore::open(dir).unwrap();
    let base = store.templates_dir().join(BASE);
    fs::create_dir_all(base.join("rootfs/etc")).unwrap();
    fs::create_dir_all(base.join("rootfs/usr/bin")).unwrap();
    fs::write(base.join("rootfs/etc/os-release"), "debian").unwrap();
    // A shell for RUN steps, behind Debian's /bin -> usr/bin.
    fs::write(base.join("rootfs/usr/bin/bash"), "").unwrap();
    std::os::unix::fs::symlink("usr/bin", base.join("rootfs/bin")).unwrap();
    let meta = TemplateMeta {
        format: META_FORMAT,
        name: BASE.into(),
        created_at: chrono::Utc::now(),
        default_user: "user".into(),
        default_workdir: "/home/user".into(),
        cpu_count: 2,
        memory_mb: 512,
        disk_size_mb: 4096,
        envd_version: crate::ENVD_VERSION.into(),
        kiln_version: "test".into(),
        build_hash: "b".repeat(64),
        id_map_base: kiln_runtime::ID_MAP_BASE,
        rootfs_bytes: 0,
        start_cmd: None,
        ready_cmd: None,
        envs: Default::default(),
    };
    meta.write(&base).unwrap();
    store
}

fn request(dir: &Path, json: &str) -> BuildRequest {
    BuildRequest {
        name: "mine".into(),
        build_id: uuid_like(),
        spec: serde_json::from_str(json).unwrap(),
        files_dir: dir.join("files"),
        cpu_count: 2,
        memory_mb: 1024,
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    format!(
        "{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

const RECIPE: &str = r#"{"fromImage":"debian:bookworm","steps":[
  {"type":"RUN","args":["echo one"]},
  {"type":"ENV","args":["A","1"]},
  {"type":"USER","args":["root"]},
  {"type":"WORKDIR","args":["app"]},
  {"type":"RUN","args":["echo two","user"]}],
  "startCmd":"sleep infinity","readyCmd":"true"}"#;

async fn build(
    store: &TemplateStore,
    req: &BuildRequest,
    runner: &FakeRunner,
) -> (Result<Template, BuildError>, Vec<BuildLog>) {
    let mut logs = Vec::new();
    let r = store.build(req, runner, &mut |l| logs.push(l)).await;
    (r, logs)
}

#[tokio::test]
async fn builds_caches_and_forces() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let (t, logs) = build(&store, &request(dir.path(), RECIPE), &runner).await;
    let t = t.unwrap();
    assert_eq!(runner.calls.load(Ordering::SeqCst), 4, "{logs:?}");
    assert_eq!(t.meta.default_user, "root");
    assert_eq!(t.meta.default_workdir, "/app");
    assert_eq!(t.meta.envs.get("A").map(String::as_str), Some("1"));
    assert_eq!(t.meta.start_cmd.as_deref(), Some("sleep infinity"));
    let served = store.get("mine").unwrap().unwrap();
    assert_eq!(
        fs::read_to_string(served.rootfs.join("etc/os-release")).unwrap(),
        "debian"
    );
    assert!(served.rootfs.join("steps/0").exists());
    assert!(served.rootfs.join("steps/3").exists());
    {
        let seen = runner.seen.lock().unwrap();
        // The first RUN: the base's user and workdir, no env yet.
        assert_eq!(seen[0].1, "user");
        assert_eq!(seen[0].2, None);
        assert!(seen[0].3.is_empty());
        // USER and WORKDIR run as root; the last RUN names its user and sees ENV.
        assert_eq!(seen[1].1, "root");
        assert!(seen[2].0.contains("'/app'"), "{}", seen[2].0);
        assert_eq!(seen[3].1, "user");
        assert_eq!(seen[3].2.as_deref(), Some("/app"));
        assert_eq!(seen[3].3.get("A").map(String::as_str), Some("1"));
    }
    // The ready command was checked once.
    assert_eq!(runner.ready_checks.load(Ordering::SeqCst), 1);
    assert!(logs.iter().any(|l| l.message == "Template is ready"));
    // Step tags are E2B's: base, 1..N, finalize.
    assert_eq!(logs[0].step.as_deref(), Some("base"));
    assert!(logs.iter().any(|l| l.step.as_deref() == Some("5")));

    // The same recipe again: every step is cached, and the unchanged version is not
    // checked again.
    let (t2, logs) = build(&store, &request(dir.path(), RECIPE), &runner).await;
    assert_eq!(runner.calls.load(Ordering::SeqCst), 4);
    assert_eq!(runner.ready_checks.load(Ordering::SeqCst), 1);
    assert_eq!(t2.unwrap().meta.build_hash, t.meta.build_hash);
    assert_eq!(
        logs.iter()
            .filter(|l| l.message.starts_with("CACHED"))
            .count(),
        5
    );

    // A changed later step rebuilds only from there.
    let changed = RECIPE.replace("echo two", "echo three");
    let (r, _) = build(&store, &request(dir.path(), &changed), &runner).await;
    r.unwrap();
    assert_eq!(runner.calls.load(Ordering::SeqCst), 5);

    // force rebuilds everything, into new layers.
    let forced = RECIPE.replace("\"steps\"", "\"force\":true,\"steps\"");
    let (r, _) = build(&store, &request(dir.path(), &forced), &runner).await;
    assert_ne!(r.unwrap().meta.build_hash, t.meta.build_hash);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 9);
    // Of the forced layers only the installed one is kept.
    let layers = || fs::read_dir(store.layers_dir()).unwrap().count();
    let before = layers();
    let (r, _) = build(&store, &request(dir.path(), &forced), &runner).await;
    r.unwrap();
    assert_eq!(layers(), before + 1);
}

#[tokio::test]
async fn a_failing_run_names_the_step_and_keeps_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let (t, _) = build(&store, &request(dir.path(), RECIPE), &runner).await;
    let old = t.unwrap();
    let bad = RECIPE.replace("echo two", "fail now");
    let (r, _) = build(&store, &request(dir.path(), &bad), &runner).await;
    let e = r.unwrap_err();
    assert_eq!(e.step().as_deref(), Some("5"));
    assert!(
        e.to_string()
            .contains("failed to run command 'fail now': exit status 3"),
        "{e}"
    );
    let BuildError::Step { tail, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(tail.last().map(String::as_str), Some("boom"));
    let served = store.get("mine").unwrap().unwrap();
    assert_eq!(served.meta.build_hash, old.meta.build_hash);
    // No temporary layer is left behind.
    let leftovers: Vec<_> = fs::read_dir(store.layers_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test]
async fn a_ready_command_that_never_succeeds_fails_in_finalize() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let never = RECIPE.replace("\"readyCmd\":\"true\"", "\"readyCmd\":\"false\"");
    let (r, _) = build(&store, &request(dir.path(), &never), &runner).await;
    let e = r.unwrap_err();
    assert_eq!(e.step().as_deref(), Some("finalize"));
    assert!(e.to_string().contains("never ready"), "{e}");
    assert!(store.get("mine").unwrap().is_none());
}

#[tokio::test]
async fn bad_recipes_fail_before_any_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let (r, _) = build(
        &store,
        &request(dir.path(), r#"{"fromImage":"python:3.13","steps":[]}"#),
        &runner,
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.step().as_deref(), Some("base"));
    assert!(e.to_string().contains("python:3.13"));
    let (r, _) = build(
        &store,
        &request(dir.path(), r#"{"fromTemplate":"nope","steps":[]}"#),
        &runner,
    )
    .await;
    assert_eq!(r.unwrap_err().step().as_deref(), Some("base"));
    let mut req = request(dir.path(), RECIPE);
    req.name = BASE.into();
    assert!(matches!(
        build(&store, &req, &runner).await.0,
        Err(BuildError::BuiltIn { .. })
    ));
    // A COPY whose files were never uploaded.
    let copy = r#"{"fromTemplate":"base","steps":[{"type":"COPY","args":["a","/a"],
        "filesHash":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}]}"#;
    let e = build(&store, &request(dir.path(), copy), &runner)
        .await
        .0
        .unwrap_err();
    assert_eq!(e.step().as_deref(), Some("1"));
    assert!(e.to_string().contains("not uploaded"), "{e}");
    assert_eq!(runner.calls.load(Ordering::SeqCst), 0);
    // Removal.
    assert!(!store.remove("mine").unwrap());
}

#[tokio::test]
async fn a_base_without_a_shell_fails_at_its_first_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let rootfs = store.templates_dir().join("base/rootfs");
    fs::remove_file(rootfs.join("bin")).unwrap();
    // `sh` alone is enough (Alpine, BusyBox).
    fs::create_dir(rootfs.join("bin")).unwrap();
    fs::write(rootfs.join("bin/sh"), "").unwrap();
    assert_eq!(shell_of(&rootfs), Some("/bin/sh"));
    fs::remove_file(rootfs.join("bin/sh")).unwrap();
    assert_eq!(shell_of(&rootfs), None);
    let recipe = r#"{"fromTemplate":"base","steps":[
        {"type":"ENV","args":["A","1"]},{"type":"RUN","args":["echo hi"]}]}"#;
    let e = build(&store, &request(dir.path(), recipe), &runner)
        .await
        .0
        .unwrap_err();
    assert_eq!(e.step().as_deref(), Some("2"));
    assert!(
        e.to_string().contains("failed to run command 'echo hi'")
            && e.to_string().contains("neither /bin/bash nor /bin/sh"),
        "{e}"
    );
    assert_eq!(runner.calls.load(Ordering::SeqCst), 0);
}
