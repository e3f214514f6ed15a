//! Build executor tests with a fake [`StepRunner`]: it "runs" a command by writing it
//! into an upper directory, which is then applied like a sandbox's. Privilege tier:
//! none (files are owned by the test's user; COPY uses id base 0 only in copy.rs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;
use crate::BASE;

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
    let meta = crate::meta::test_meta(BASE, &"b".repeat(64));
    meta.write(&base).unwrap();
    store
}

fn request(dir: &Path, json: &str) -> BuildRequest {
    BuildRequest {
        name: "mine".into(),
        build_id: uuid_like(),
        spec: serde_json::from_str(json).unwrap(),
        files_dir: dir.join("files"),
        scope: String::new(),
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
async fn a_pinned_runtime_has_layers_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let (plain, _) = build(&store, &request(dir.path(), RECIPE), &runner).await;
    let plain = plain.unwrap();
    assert_eq!(plain.meta.runtime, None);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 4);

    // The same steps pinned to gVisor run again (on it), and the runtime is recorded.
    let pinned = RECIPE.replace("\"steps\"", "\"runtime\":\"gvisor\",\"steps\"");
    let (t, _) = build(&store, &request(dir.path(), &pinned), &runner).await;
    let t = t.unwrap();
    assert_eq!(runner.calls.load(Ordering::SeqCst), 8);
    assert_eq!(t.meta.runtime.as_deref(), Some("gvisor"));
    assert_ne!(t.meta.build_hash, plain.meta.build_hash);
    // ... and are cached for the next build pinned the same way.
    let (again, _) = build(&store, &request(dir.path(), &pinned), &runner).await;
    assert_eq!(again.unwrap().meta.build_hash, t.meta.build_hash);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 8);

    let bad = RECIPE.replace("\"steps\"", "\"runtime\":\"kvm\",\"steps\"");
    let (r, _) = build(&store, &request(dir.path(), &bad), &runner).await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("runtime \"kvm\" is not one of jail, gvisor"),
        "{e}"
    );
}

#[tokio::test]
async fn each_scope_has_layers_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let (server, _) = build(&store, &request(dir.path(), RECIPE), &runner).await;
    let server = server.unwrap();
    assert_eq!(runner.calls.load(Ordering::SeqCst), 4);
    // A team's build of the same steps runs them itself: it never picks up a layer
    // another scope made (which another tenant could have poisoned).
    let mut team = request(dir.path(), RECIPE);
    team.scope = "team7".into();
    team.name = "theirs".into();
    let (t, _) = build(&store, &team, &runner).await;
    let t = t.unwrap();
    assert_eq!(runner.calls.load(Ordering::SeqCst), 8);
    assert_ne!(t.meta.build_hash, server.meta.build_hash);
    // ...and its own layers are its cache.
    let (again, _) = build(&store, &team, &runner).await;
    assert_eq!(again.unwrap().meta.build_hash, t.meta.build_hash);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 8);
    assert_eq!(upload_name("", "ab"), "ab");
    assert_eq!(upload_name("team7", "ab"), "team7-ab");
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

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn layer_names(store: &TemplateStore) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(store.layers_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn chains_are_recorded_and_gc_keeps_what_templates_need() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_base(dir.path());
    let runner = FakeRunner::default();
    let zero = crate::GcPolicy::days(0.0).unwrap();
    let (t, _) = build(&store, &request(dir.path(), RECIPE), &runner).await;
    let first = t.unwrap().meta.chain.unwrap();
    // RUN, USER, WORKDIR, RUN make layers; ENV does not.
    assert_eq!(first.layers.len(), 4);
    assert_eq!(sorted(&first.layers), layer_names(&store));
    assert_eq!((first.image.clone(), first.base.clone()), (None, None));

    // A new version shares the first three layers; the old fourth is unreachable.
    let changed = RECIPE.replace("echo two", "echo three");
    let (t, _) = build(&store, &request(dir.path(), &changed), &runner).await;
    let second = t.unwrap().meta.chain.unwrap();
    assert_eq!(first.layers[..3], second.layers[..3]);
    assert_ne!(first.layers[3], second.layers[3]);
    // Within the default period it stays (a sandbox of the old version may run on it).
    let report = store.gc(&crate::GcPolicy::default()).await.unwrap();
    assert_eq!((report.removed_layers, report.kept_recent), (0, 1));
    let report = store.gc(&zero).await.unwrap();
    assert_eq!(report.removed_layers, 1, "{report:?}");
    assert_eq!(report.kept_layers, 4, "{report:?}");
    assert_eq!(layer_names(&store), sorted(&second.layers));
    // The template is still served and rebuilds from the cache.
    assert!(store.get("mine").unwrap().unwrap().rootfs.is_dir());
    let calls = runner.calls.load(Ordering::SeqCst);
    let (r, _) = build(&store, &request(dir.path(), &changed), &runner).await;
    r.unwrap();
    assert_eq!(runner.calls.load(Ordering::SeqCst), calls);

    // A template from an older Kiln (no chain) keeps only its final layer.
    let meta_dir = store.templates_dir().join("mine");
    let mut legacy = TemplateMeta::read(&meta_dir).unwrap().unwrap();
    legacy.chain = None;
    legacy.write(&meta_dir).unwrap();
    let report = store.gc(&zero).await.unwrap();
    assert_eq!(report.removed_layers, 3, "{report:?}");
    assert_eq!(layer_names(&store), second.layers[3..]);

    // Deleted, nothing of it is left.
    assert!(store.remove("mine").unwrap());
    let report = store.gc(&zero).await.unwrap();
    assert_eq!(report.removed_layers, 1, "{report:?}");
    assert!(report.freed_bytes > 0);
    assert!(layer_names(&store).is_empty());
}

/// A stand-in for mmdebstrap: logs its arguments (and each run into `runs`), builds a
/// tiny tree with a shell after the suite argument, or fails when the suite is not
/// trixie.
const FAKE_TRIXIE_MMDEBSTRAP: &str = r#"#!/bin/sh
echo "fake mmdebstrap $*"
echo run >> "$(dirname "$0")/runs"
prev=""
for a in "$@"; do
  [ "$prev" = "trixie" ] && target="$a"
  prev="$a"
done
[ -n "$target" ] || { echo "E: no trixie suite" >&2; exit 2; }
[ -e "$(dirname "$0")/fail" ] && { echo "E: cannot reach the mirror" >&2; exit 1; }
mkdir -p "$target/usr/bin" "$target/etc" "$target/home/user"
echo 13.0 > "$target/etc/debian_version"
: > "$target/usr/bin/bash"
ln -s usr/bin "$target/bin"
"#;

fn fake_mmdebstrap(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tools = dir.join("tools");
    fs::create_dir_all(&tools).unwrap();
    let path = tools.join("mmdebstrap");
    fs::write(&path, FAKE_TRIXIE_MMDEBSTRAP).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

const TRIXIE_RECIPE: &str = r#"{"fromImage":"debian:trixie","steps":[
  {"type":"RUN","args":["echo on trixie"]}]}"#;

#[tokio::test]
async fn a_failing_trixie_base_fails_the_base_step_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_base(dir.path());
    let tool = fake_mmdebstrap(dir.path());
    fs::write(tool.with_file_name("fail"), "").unwrap();
    store.mmdebstrap = Some(tool);
    let runner = FakeRunner::default();
    let (r, logs) = build(&store, &request(dir.path(), TRIXIE_RECIPE), &runner).await;
    let e = r.unwrap_err();
    assert_eq!(e.step().as_deref(), Some("base"));
    let chain = crate::ErrorChain(&e).to_string();
    assert!(
        chain.starts_with("building the Debian trixie base"),
        "{chain}"
    );
    assert!(chain.contains("E: cannot reach the mirror"), "{chain}");
    // mmdebstrap's output is streamed in the base step's log, and it was asked for trixie.
    let base_lines: Vec<&str> = logs
        .iter()
        .filter(|l| l.step.as_deref() == Some("base"))
        .map(|l| l.message.as_str())
        .collect();
    assert!(
        base_lines
            .iter()
            .any(|m| m.starts_with("[base] building the Debian 13 (trixie) base base-trixie")),
        "{base_lines:?}"
    );
    let all = base_lines.join("\n");
    assert!(
        all.contains("[base] fake mmdebstrap --variant=minbase") && all.contains(" trixie /"),
        "{all}"
    );
    assert!(base_lines.iter().any(|m| m.contains("apt source: deb ")));
    assert!(store.debian_template_for_tests().is_none());
    assert_eq!(runner.calls.load(Ordering::SeqCst), 0);
    // The internal base's name is not a user template's.
    let mut req = request(dir.path(), RECIPE);
    req.name = "base-trixie".into();
    assert!(matches!(
        build(&store, &req, &runner).await.0,
        Err(BuildError::BuiltIn { .. })
    ));
}

/// Privilege tier: root (the base's ownership shift chowns with real `lchown`).
#[tokio::test]
async fn a_trixie_base_is_built_on_first_use_then_cached() {
    if !crate::tests::has_root(
        "a_trixie_base_is_built_on_first_use_then_cached",
        "CAP_CHOWN",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_base(dir.path());
    let tool = fake_mmdebstrap(dir.path());
    store.mmdebstrap = Some(tool.clone());
    let runner = FakeRunner::default();
    let (r, logs) = build(&store, &request(dir.path(), TRIXIE_RECIPE), &runner).await;
    let t = r.unwrap_or_else(|e| panic!("{}: {logs:?}", crate::ErrorChain(&e)));
    assert_eq!(
        fs::read_to_string(t.rootfs.join("etc/debian_version")).unwrap(),
        "13.0\n"
    );
    assert_eq!(runner.seen.lock().unwrap()[0].1, "user");
    assert_eq!(
        t.meta.chain.as_ref().unwrap().base.as_deref(),
        Some("base-trixie")
    );
    let base = store
        .debian_template_for_tests()
        .expect("base-trixie built");
    assert_eq!(base.meta.build_hash, crate::base::TRIXIE.recipe_hash());
    assert_eq!(base.dir, store.templates_dir().join(".bases/base-trixie"));
    assert!(logs.iter().any(|l| l.step.as_deref() == Some("base")
        && l.message.starts_with("[base] [base-trixie] 5/5 install")));
    // Internal: not a listed template.
    let names: Vec<_> = store.list().unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["base".to_string(), "mine".to_string()]);

    // A second template on trixie: the base is cached, mmdebstrap does not run again.
    let mut req = request(dir.path(), TRIXIE_RECIPE);
    req.name = "mine2".into();
    let (r, logs) = build(&store, &req, &runner).await;
    r.unwrap();
    assert!(!logs
        .iter()
        .any(|l| l.message.contains("building the Debian")));
    let runs = fs::read_to_string(tool.with_file_name("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1);

    // The base stays while a template names it, and goes (after the period) when none does.
    let zero = crate::GcPolicy::days(0.0).unwrap();
    assert_eq!(store.gc(&zero).await.unwrap().removed_bases, 0);
    assert!(store.remove("mine").unwrap() && store.remove("mine2").unwrap());
    assert_eq!(store.gc(&zero).await.unwrap().removed_bases, 1);
    assert!(store.debian_template_for_tests().is_none());
}

impl TemplateStore {
    fn debian_template_for_tests(&self) -> Option<Template> {
        let b = crate::base::TRIXIE;
        crate::read_template(self.debian_dir(&b), b.template).unwrap()
    }
}
