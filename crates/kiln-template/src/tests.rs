//! Store tests. Privilege tier: none, except `fake_build_installs_atomically` (root, for
//! the real ownership shift), which says so and skips without root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

fn meta(hash: &str) -> TemplateMeta {
    crate::meta::test_meta(BASE, hash)
}

/// Privilege tier of a test that needs root: true when the test runs as root. Without
/// root it says the test is skipped and returns false, except under CI (which runs as
/// root), where a missing privilege fails the test instead of skipping it.
pub(crate) fn has_root(test: &str, needs: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root ({needs}) and CI runs as root"
    );
    eprintln!("SKIP {test}: needs root ({needs})");
    false
}

/// A stand-in for mmdebstrap: finds the target after the suite argument, refuses a
/// non-empty target (as mmdebstrap does), builds a tiny tree and prints on both streams.
const FAKE_MMDEBSTRAP: &str = r#"#!/bin/sh
prev=""
for a in "$@"; do
  [ "$prev" = "bookworm" ] && target="$a"
  prev="$a"
done
if [ -d "$target" ] && [ -n "$(ls -A "$target")" ]; then
  echo "E: target $target is not empty" >&2; exit 1
fi
mkdir -p "$target/usr/bin" "$target/home/user" "$target/etc"
echo hi > "$target/usr/bin/hello"
echo sudo > "$target/usr/bin/sudo"
chmod 4755 "$target/usr/bin/sudo"
chown 1000:1000 "$target/home/user"
ln -s /usr/bin/hello "$target/usr/bin/hello-link"
echo "I: fake mmdebstrap on stdout"
echo "W: fake mmdebstrap on stderr" >&2
"#;

fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn names_are_validated() {
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    for bad in [
        "",
        "../etc",
        "a/b",
        "Base",
        ".hidden",
        "-x",
        &"a".repeat(65),
    ] {
        assert!(
            matches!(store.get(bad), Err(TemplateError::InvalidName { .. })),
            "{bad:?}"
        );
    }
    assert!(store.get("code-interpreter-v1").unwrap().is_none());
}

#[test]
fn half_built_templates_are_never_served() {
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let dir = store.templates_dir().join(BASE);
    // A build in progress: only the temporary tree.
    fs::create_dir_all(dir.join(BUILD_DIR).join("usr")).unwrap();
    assert_eq!(store.get(BASE).unwrap(), None);
    // Renamed into place but no metadata yet.
    fs::rename(dir.join(BUILD_DIR), dir.join(ROOTFS_DIR)).unwrap();
    assert_eq!(store.get(BASE).unwrap(), None);
    assert!(store.list().unwrap().is_empty());
    // Metadata without a root filesystem is not complete either.
    let other = store.templates_dir().join("other");
    fs::create_dir_all(&other).unwrap();
    meta("x").write(&other).unwrap();
    assert_eq!(store.get("other").unwrap(), None);

    install(&dir, &meta("h")).unwrap();
    let t = store.get(BASE).unwrap().unwrap();
    assert_eq!(t.rootfs, dir.join(ROOTFS_DIR));
    assert_eq!(t.meta.build_hash, "h");
    // Hidden and corrupt entries are left out of the list.
    fs::create_dir_all(store.templates_dir().join("broken/rootfs")).unwrap();
    fs::write(store.templates_dir().join("broken").join(META_FILE), b"{").unwrap();
    let names: Vec<_> = store.list().unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec![BASE.to_string()]);
}

#[tokio::test]
async fn complete_base_is_returned_without_building() {
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let dir = store.templates_dir().join(BASE);
    fs::create_dir_all(dir.join(ROOTFS_DIR)).unwrap();
    install(&dir, &meta(&base::BOOKWORM.recipe_hash())).unwrap();
    let mut events = Vec::new();
    let t = store
        .ensure_base_with(
            Some(Path::new("/nonexistent/mmdebstrap")),
            Path::new("/nonexistent"),
            |e| events.push(e),
        )
        .await
        .unwrap();
    assert_eq!(t.name, BASE);
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn failed_build_reports_tool_output_and_serves_nothing() {
    let data = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let tool = write_script(
        bin.path(),
        "mmdebstrap",
        "#!/bin/sh\necho 'I: starting'\necho 'E: boom' >&2\nexit 3\n",
    );
    let store = TemplateStore::open(data.path()).unwrap();
    let mut events = Vec::new();
    let err = store
        .ensure_base_with(Some(&tool), bin.path(), |e| events.push(e))
        .await
        .unwrap_err();
    let chain = ErrorChain(&err).to_string();
    assert!(chain.contains("mmdebstrap failed"), "{chain}");
    assert!(chain.contains("E: boom"), "{chain}");
    assert!(events.contains(&BuildEvent::Log {
        line: "E: boom".into()
    }));
    assert!(matches!(events[0], BuildEvent::Started { .. }));
    assert_eq!(store.get(BASE).unwrap(), None);

    let missing = store
        .ensure_base_with(Some(&bin.path().join("nope")), bin.path(), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(
        missing,
        TemplateError::Mmdebstrap {
            source: base::MmdebstrapError::Spawn { .. },
            ..
        }
    ));
    let text = base::MmdebstrapError::Missing.to_string();
    assert!(
        text.contains("install the Debian packages `mmdebstrap`"),
        "{text}"
    );
}

/// Privilege tier: root (the build shifts ownership with real `lchown`).
#[tokio::test]
async fn fake_build_installs_atomically() {
    if !has_root("fake_build_installs_atomically", "CAP_CHOWN") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let tool = write_script(bin.path(), "mmdebstrap", FAKE_MMDEBSTRAP);
    fs::write(bin.path().join("kiln-envd"), b"envd").unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let dir = store.templates_dir().join(BASE);
    // A stale build from a crashed run and an outdated template are both replaced.
    fs::create_dir_all(dir.join(BUILD_DIR).join("junk")).unwrap();
    fs::create_dir_all(dir.join(ROOTFS_DIR).join("old")).unwrap();
    install(&dir, &meta("outdated")).unwrap();

    let mut events = Vec::new();
    let t = store
        .ensure_base_with(Some(&tool), bin.path(), |e| events.push(e))
        .await
        .unwrap();

    assert!(
        matches!(&events[0], BuildEvent::Started { reason, .. } if reason.contains("recipe changed"))
    );
    assert!(matches!(events.last(), Some(BuildEvent::Finished { .. })));
    let steps = events
        .iter()
        .filter(|e| matches!(e, BuildEvent::Step { .. }))
        .count();
    assert_eq!(steps, 5);
    for line in [
        "I: fake mmdebstrap on stdout",
        "W: fake mmdebstrap on stderr",
    ] {
        assert!(
            events.contains(&BuildEvent::Log { line: line.into() }),
            "{line}"
        );
    }
    // kiln-init was missing: a warning, not an error.
    assert!(events
        .iter()
        .any(|e| matches!(e, BuildEvent::Warning { message } if message.contains("kiln-init"))));

    assert_eq!(store.get(BASE).unwrap().as_ref(), Some(&t));
    assert_eq!(t.meta.build_hash, base::BOOKWORM.recipe_hash());
    assert_eq!(t.meta.default_user, "user");
    assert!(!dir.join(BUILD_DIR).exists());
    assert!(!t.rootfs.join("old").exists());
    let m = |p: &str| fs::symlink_metadata(t.rootfs.join(p)).unwrap();
    assert_eq!(m("").uid(), 100_000);
    assert_eq!(
        (m("home/user").uid(), m("home/user").gid()),
        (101_000, 101_000)
    );
    assert_eq!(m("usr/bin/sudo").mode() & 0o7777, 0o4755);
    assert_eq!(m("usr/bin/hello-link").uid(), 100_000);
    assert_eq!(m("opt/kiln/bin/kiln-envd").uid(), 100_000);
    assert_eq!(
        fs::read(t.rootfs.join("opt/kiln/bin/kiln-envd")).unwrap(),
        b"envd"
    );

    // Second call: cached, no events.
    let mut again = Vec::new();
    store
        .ensure_base_with(Some(&tool), bin.path(), |e| again.push(e))
        .await
        .unwrap();
    assert!(again.is_empty());
}
