//! Garbage collection over fake caches: layer, upload, image and base directories made
//! by hand, with their "last used" mtimes set. Privilege tier: none.

use std::os::unix::fs::symlink;

use super::*;
use crate::LayerChain;

const DAY: Duration = Duration::from_secs(86400);

fn hash(c: char) -> String {
    c.to_string().repeat(64)
}

/// Sets `path`'s mtime to `ago` before now.
fn age(path: &Path, ago: Duration) {
    fs::File::open(path)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

/// A layer directory holding one file, last used `ago`.
fn layer(t: &Path, name: &str, ago: Duration) -> PathBuf {
    let dir = t.join(LAYERS_DIR).join(name);
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/f"), name).unwrap();
    age(&dir, ago);
    dir
}

fn meta(name: &str, chain: Option<LayerChain>) -> TemplateMeta {
    TemplateMeta {
        id_map_base: 0,
        chain,
        ..crate::meta::test_meta(name, "h")
    }
}

/// An installed template whose rootfs points at `target`.
fn template(t: &Path, name: &str, target: &Path, chain: Option<LayerChain>) {
    let dir = t.join(name);
    fs::create_dir_all(&dir).unwrap();
    symlink(target, dir.join(crate::ROOTFS_DIR)).unwrap();
    meta(name, chain).write(&dir).unwrap();
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

#[test]
fn reachable_layers_stay_and_old_unreachable_ones_go() {
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let t = store.templates_dir();
    let old = 30 * DAY;
    // `chained` records its whole chain; `legacy` (no chain) keeps only its final layer.
    let (a1, a2) = (layer(t, &hash('a'), old), layer(t, &hash('b'), old));
    let (l1, l2) = (layer(t, &hash('c'), old), layer(t, &hash('d'), old));
    let unused_old = layer(t, &hash('e'), old);
    let unused_recent = layer(t, &hash('f'), DAY);
    let moved_aside = layer(t, ".old-x-123", old);
    let tmp = layer(t, &format!(".tmp-{}", hash('1')), Duration::ZERO);
    let ctx = layer(t, &format!("{}.ctx", hash('2')), Duration::ZERO);
    let unknown = layer(t, "not-a-layer", old);
    template(
        t,
        "chained",
        &a2,
        Some(LayerChain {
            layers: vec![hash('a'), hash('b')],
            ..Default::default()
        }),
    );
    template(t, "legacy", &l2, None);

    let report = collect(t, &GcPolicy::default(), SystemTime::now()).unwrap();

    for kept in [&a1, &a2, &l2, &unused_recent, &unknown] {
        assert!(kept.is_dir(), "{} was removed", kept.display());
    }
    for gone in [&l1, &unused_old, &moved_aside, &tmp, &ctx] {
        assert!(!exists(gone), "{} was kept", gone.display());
    }
    assert_eq!(report.removed_layers, 3, "{report:?}"); // l1, unused_old, .old-
    assert_eq!(report.removed_temporary, 2, "{report:?}");
    assert_eq!(report.kept_layers, 3, "{report:?}"); // a1, a2, l2
    assert_eq!(report.kept_recent, 1, "{report:?}");
    assert_eq!(report.failed, 0);
    assert!(report.freed_bytes > 0);

    // With a zero period everything unreachable goes; reachable layers never do.
    let report = collect(t, &GcPolicy::days(0.0).unwrap(), SystemTime::now()).unwrap();
    assert_eq!(report.removed_layers, 1, "{report:?}");
    assert!(!exists(&unused_recent));
    for kept in [&a1, &a2, &l2] {
        assert!(kept.is_dir());
    }
    // A second run finds nothing to do.
    let again = collect(t, &GcPolicy::days(0.0).unwrap(), SystemTime::now()).unwrap();
    assert_eq!(
        again,
        GcReport {
            kept_layers: 3,
            ..Default::default()
        }
    );
}

#[test]
fn uploads_images_and_bases_follow_the_chains() {
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let t = store.templates_dir();
    let old = 30 * DAY;
    let files = t.join(FILES_DIR);
    fs::create_dir_all(&files).unwrap();
    let upload = |name: String, ago: Duration| {
        let p = files.join(name);
        fs::write(&p, b"tar").unwrap();
        age(&p, ago);
        p
    };
    let used_upload = upload(hash('a'), old);
    let old_upload = upload(hash('b'), old);
    // Uploaded a minute ago, its build not started yet: kept even with a zero period.
    let fresh_upload = upload(hash('c'), Duration::from_secs(60));
    let stale_part = upload(format!(".{}.tok.part", hash('d')), 2 * DAY);
    let live_part = upload(format!(".{}.tok2.part", hash('e')), Duration::ZERO);

    let images = t.join(IMAGES_DIR);
    let image = |key: &str| {
        let dir = images.join(key);
        fs::create_dir_all(dir.join("rootfs/bin")).unwrap();
        age(&dir, old);
        dir
    };
    let (chained_img, linked_img, unused_img) = (image("v1-a"), image("v1-b"), image("v1-c"));
    fs::create_dir_all(images.join("refs")).unwrap();
    fs::write(
        images.join("refs/r1.json"),
        r#"{"reference":"x","key":"v1-c"}"#,
    )
    .unwrap();
    fs::write(
        images.join("refs/r2.json"),
        r#"{"reference":"y","key":"v1-a"}"#,
    )
    .unwrap();
    fs::create_dir_all(images.join(".tmp-v1-z")).unwrap();

    let bases = t.join(BASES_DIR);
    let base = |name: &str| {
        let dir = bases.join(name);
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        age(&dir, old);
        dir
    };
    let (used_base, unused_base) = (base("base-trixie"), base("base-sid"));

    let top = layer(t, &hash('9'), old);
    template(
        t,
        "from-image",
        &top,
        Some(LayerChain {
            layers: vec![hash('9')],
            files: vec![hash('a')],
            image: Some("v1-a".into()),
            base: None,
        }),
    );
    template(
        t,
        "on-trixie",
        &used_base.join("rootfs"),
        Some(LayerChain {
            base: Some("base-trixie".into()),
            ..Default::default()
        }),
    );
    // No steps made a layer: the rootfs is the image's own, which keeps it.
    template(t, "bare-image", &linked_img.join("rootfs"), None);

    let report = collect(t, &GcPolicy::days(0.0).unwrap(), SystemTime::now()).unwrap();

    for kept in [
        &used_upload,
        &fresh_upload,
        &live_part,
        &chained_img,
        &linked_img,
        &used_base,
        &top,
    ] {
        assert!(exists(kept), "{} was removed", kept.display());
    }
    for gone in [&old_upload, &stale_part, &unused_img, &unused_base] {
        assert!(!exists(gone), "{} was kept", gone.display());
    }
    assert_eq!(report.removed_uploads, 1, "{report:?}");
    assert_eq!(report.removed_images, 1, "{report:?}");
    assert_eq!(report.removed_bases, 1, "{report:?}");
    assert_eq!(report.removed_temporary, 2, "{report:?}"); // the .part and .tmp-v1-z
    assert!(!images.join(".tmp-v1-z").exists());
    // The reference record of the removed image goes, the other stays.
    assert!(!images.join("refs/r1.json").exists());
    assert!(images.join("refs/r2.json").exists());

    // Deleting the templates makes the rest collectable.
    for name in ["from-image", "on-trixie", "bare-image"] {
        assert!(store.remove(name).unwrap());
    }
    let report = collect(t, &GcPolicy::days(0.0).unwrap(), SystemTime::now()).unwrap();
    assert_eq!(
        (
            report.removed_layers,
            report.removed_uploads,
            report.removed_images,
            report.removed_bases
        ),
        (1, 1, 2, 1),
        "{report:?}"
    );
    assert!(exists(&fresh_upload), "still within the upload grace");
}

#[test]
fn freed_bytes_count_shared_files_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("big"), vec![7u8; 256 * 1024]).unwrap();
    fs::hard_link(a.join("big"), b.join("big")).unwrap();
    let blocks = |p: &Path| fs::symlink_metadata(p).unwrap().blocks() * 512;
    let file = blocks(&a.join("big"));
    assert!(file >= 256 * 1024);
    // The first tree shares its file: only its directory is freed.
    assert_eq!(freed_by_removing(&a), blocks(&a));
    fs::remove_dir_all(&a).unwrap();
    // The second now holds the last link.
    assert_eq!(freed_by_removing(&b), blocks(&b) + file);
}

#[test]
fn policy_from_days() {
    assert_eq!(GcPolicy::default().keep_unused, 7 * DAY);
    assert_eq!(GcPolicy::days(0.5).unwrap().keep_unused, DAY / 2);
    assert!(GcPolicy::days(-1.0).is_err());
    assert!(GcPolicy::days(f64::NAN).is_err());
    let e = GcPolicy::days(1e9).unwrap_err().to_string();
    assert!(e.contains("number of days"), "{e}");
}

/// `gc` waits for a build: the store lock is held shared while one runs.
#[tokio::test]
async fn gc_waits_for_builds_in_progress() {
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let building = store.lock_store(false).await.unwrap();
    // Another build may run alongside (shared).
    let other = tokio::time::timeout(Duration::from_secs(5), store.lock_store(false))
        .await
        .expect("builds share the lock")
        .unwrap();
    drop(other);
    let policy = GcPolicy::default();
    let gc = store.gc(&policy);
    tokio::pin!(gc);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut gc)
            .await
            .is_err(),
        "gc ran during a build"
    );
    drop(building);
    let report = tokio::time::timeout(Duration::from_secs(5), gc)
        .await
        .expect("gc runs once the build is done")
        .unwrap();
    assert_eq!(report, GcReport::default());
}

#[test]
fn overlay_lower_dirs_come_from_mountinfo() {
    let text = "\
36 35 0:31 / / rw,relatime - ext4 /dev/vda rw\n\
120 36 0:52 / /var/lib/kiln/sandboxes/x/rootfs rw - overlay overlay rw,lowerdir=/var/lib/kiln/templates/.layers/abc:/other\\040dir,upperdir=/u,workdir=/w\n\
121 36 0:53 / /proc rw - proc proc rw\n";
    assert_eq!(
        super::overlay_lower_dirs(text),
        [
            PathBuf::from("/var/lib/kiln/templates/.layers/abc"),
            PathBuf::from("/other dir")
        ]
    );
    assert_eq!(super::unescape_octal("a\\134b\\999\\"), "a\\b\\999\\");
}

/// The line a gVisor sandbox with a range of its own leaves in the host's mountinfo
/// (measured): the helper mounted the overlay over the idmapped layer in a private
/// namespace and moved it to the host's; the options still name the template's path.
#[test]
fn a_moved_gvisor_overlay_names_the_template() {
    let text = "\
111 27 0:47 / /var/lib/kiln/sandboxes-gvisor/x/rootfs rw,nosuid,nodev,relatime - overlay overlay rw,lowerdir=/var/lib/kiln/templates/base/rootfs,upperdir=/var/lib/kiln/sandboxes-gvisor/x/disk/upper,workdir=/var/lib/kiln/sandboxes-gvisor/x/disk/work,uuid=on\n";
    assert_eq!(
        super::overlay_lower_dirs(text),
        [PathBuf::from("/var/lib/kiln/templates/base/rootfs")]
    );
}
