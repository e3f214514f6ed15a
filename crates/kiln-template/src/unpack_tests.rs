//! Layer application tests. Privilege tier: none (owners go through a recording
//! [`Chown`]; modes are set for real on files the test owns).

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

/// Records owner changes, applies modes.
#[derive(Default)]
struct FakeChown {
    owners: Vec<(PathBuf, u32, u32)>,
}

impl Chown for FakeChown {
    fn lchown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.owners.push((path.to_path_buf(), uid, gid));
        Ok(())
    }

    fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    }
}

/// A layer archive under construction. Names are written raw (no validation), so a
/// test can put `..` in them.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn entry(&mut self, kind: tar::EntryType, name: &str, link: &str, mode: u32, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
    }

    fn dir(mut self, name: &str) -> Self {
        self.entry(tar::EntryType::Directory, name, "", 0o755, b"");
        self
    }

    fn file(mut self, name: &str, data: &str) -> Self {
        self.entry(tar::EntryType::Regular, name, "", 0o644, data.as_bytes());
        self
    }

    fn file_mode(mut self, name: &str, mode: u32) -> Self {
        self.entry(tar::EntryType::Regular, name, "", mode, b"x");
        self
    }

    fn owned(mut self, name: &str, uid: u64) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path(name).unwrap();
        h.set_mode(0o600);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_size(0);
        h.set_cksum();
        self.0.append(&h, &b""[..]).unwrap();
        self
    }

    fn symlink(mut self, name: &str, target: &str) -> Self {
        self.entry(tar::EntryType::Symlink, name, target, 0o777, b"");
        self
    }

    fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.entry(tar::EntryType::Link, name, target, 0o644, b"");
        self
    }

    fn whiteout(self, name: &str) -> Self {
        self.file(name, "")
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }

    fn apply(self, root: &Path, chown: &mut FakeChown) -> Result<LayerStats, UnpackError> {
        apply_layer(root, &self.bytes()[..], chown)
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn root_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    (dir, root)
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
    let (_dir, root) = root_dir();
    let mut chown = FakeChown::default();
    let first = Layer::new()
        .dir("./")
        .dir("bin/")
        .file_mode("bin/busybox", 0o755)
        .symlink("bin/sh", "busybox")
        .hardlink("bin/cat", "bin/busybox")
        .file_mode("bin/su", 0o4755)
        .dir("etc/")
        .file("etc/keep", "keep")
        .file("etc/gone", "gone")
        .dir("data/")
        .file("data/old", "old")
        .dir("data/sub/")
        .file("data/sub/deep", "deep")
        .owned("home/u/file", 1000)
        .apply(&root, &mut chown)
        .unwrap();
    assert_eq!(first.entries, 13);
    assert_eq!(first.whiteouts, 0);

    let second = Layer::new()
        .whiteout("etc/.wh.gone")
        .whiteout("etc/.wh.never-existed")
        // Written before the opaque marker, in the same layer: it stays.
        .file("data/early", "early")
        .whiteout("data/.wh..wh..opq")
        .file("data/new", "new")
        // A whiteout never deletes what its own layer wrote.
        .file("etc/fresh", "fresh")
        .whiteout("etc/.wh.fresh")
        .apply(&root, &mut chown)
        .unwrap();
    assert_eq!(second.whiteouts, 4);

    assert_eq!(read(&root.join("etc/keep")), "keep");
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists());
    assert_eq!(read(&root.join("etc/fresh")), "fresh");
    let mut data: Vec<String> = fs::read_dir(root.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    data.sort();
    assert_eq!(data, ["early", "new"]);

    // Links, modes, owners, times.
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let ino = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("bin/cat"), ino("bin/busybox"));
    assert_eq!(mode(&root.join("bin/busybox")), 0o755);
    assert_eq!(mode(&root.join("bin/su")), 0o4755);
    assert_eq!(mode(&root.join("home/u/file")), 0o600);
    assert!(chown
        .owners
        .iter()
        .any(|(p, u, g)| p == &root.join("home/u/file") && (*u, *g) == (1000, 1000)));
    assert_eq!(
        fs::metadata(root.join("etc/keep")).unwrap().mtime(),
        1_600_000_000
    );
    // An implicit parent (`home/`, `home/u/`) is created 0755.
    assert_eq!(mode(&root.join("home/u")), 0o755);
}

#[test]
fn entries_replace_what_is_there_and_directories_merge() {
    let (_dir, root) = root_dir();
    let mut chown = FakeChown::default();
    Layer::new()
        .file("a", "file")
        .dir("d/")
        .file("d/one", "1")
        .dir("s/")
        .apply(&root, &mut chown)
        .unwrap();
    Layer::new()
        .dir("a/")
        .file("a/inside", "x")
        .dir("d/")
        .file("d/two", "2")
        .symlink("s", "d")
        .apply(&root, &mut chown)
        .unwrap();
    assert!(root.join("a").is_dir());
    assert_eq!(read(&root.join("d/one")), "1");
    assert_eq!(read(&root.join("d/two")), "2");
    assert!(fs::symlink_metadata(root.join("s"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn paths_that_leave_the_root_are_refused() {
    let (dir, root) = root_dir();
    let mut chown = FakeChown::default();
    for layer in [
        Layer::new().file("../evil", "x"),
        Layer::new().file("a/../../evil", "x"),
        Layer::new().file("ok", "x").hardlink("link", "../evil"),
    ] {
        let e = layer.apply(&root, &mut chown).unwrap_err();
        assert!(matches!(e, UnpackError::Escape { .. }), "{e}");
        assert!(e.to_string().contains("leave the root"), "{e}");
    }
    assert!(!dir.path().join("evil").exists());
    // A whiteout naming `..` is no deletion either.
    let e = Layer::new()
        .dir("x/")
        .whiteout("x/.wh..")
        .apply(&root, &mut chown)
        .unwrap_err();
    assert!(matches!(e, UnpackError::Invalid { .. }), "{e}");
    assert!(root.exists());
}

#[test]
fn symlinks_lead_back_into_the_root() {
    let (dir, root) = root_dir();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("passwd"), "host").unwrap();
    let mut chown = FakeChown::default();
    let abs = outside.to_str().unwrap();
    Layer::new()
        .symlink("escape", abs)
        .symlink("up", "../../../../../..")
        .dir("etc/")
        .symlink("etc/passwd", &format!("{abs}/passwd"))
        .apply(&root, &mut chown)
        .unwrap();
    Layer::new()
        .file("escape/planted", "x")
        .file("up/up-planted", "y")
        // A file over a symlink replaces the link; it is not written through it.
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        // A hard link through a symlinked directory resolves inside too.
        .hardlink("etc/linked", "escape/planted")
        .apply(&root, &mut chown)
        .unwrap();
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(read(&outside.join("passwd")), "host");
    let inner = root.join(outside.strip_prefix("/").unwrap());
    assert_eq!(read(&inner.join("planted")), "x");
    assert_eq!(read(&root.join("up-planted")), "y");
    assert_eq!(read(&root.join("etc/linked")), "x");
    assert!(fs::symlink_metadata(root.join("etc/passwd"))
        .unwrap()
        .is_file());
}

#[test]
fn devices_are_left_out_and_fifos_kept() {
    let (_dir, root) = root_dir();
    let mut layer = Layer::new().dir("dev/");
    layer.entry(tar::EntryType::Char, "dev/null", "", 0o666, b"");
    layer.entry(tar::EntryType::Fifo, "fifo", "", 0o600, b"");
    let stats = layer.apply(&root, &mut FakeChown::default()).unwrap();
    assert_eq!(stats.skipped_devices, 1);
    assert!(!root.join("dev/null").exists());
    assert!(fs::symlink_metadata(root.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn compressed_layers_are_recognized() {
    let tar = Layer::new().file("hello", "compressed").bytes();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
    for (name, bytes) in [("tar", tar.clone()), ("gz", gz), ("zst", zst)] {
        let (dir, root) = root_dir();
        let blob = dir.path().join(name);
        fs::write(&blob, bytes).unwrap();
        apply_layer_file(&root, &blob, &mut FakeChown::default()).unwrap();
        assert_eq!(read(&root.join("hello")), "compressed", "{name}");
    }
}
