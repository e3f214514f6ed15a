//! Base images pulled from a real registry: Debian's `docker-registry` (distribution
//! v2) on a free 127.0.0.1 port with a throw-away config and storage, and a small
//! BusyBox image that the test pushes itself (oci-client's push): a multi-platform
//! index, layers in gzip, plain tar and zstd, whiteouts and an opaque directory.
//!
//! Privilege tier: root (file owners, the uid shift) + the `docker-registry` binary and
//! busybox-static (both installed by scripts/install-deps.sh). Without them it says so
//! and skips; under `CI` it fails instead.

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_template::build::{BuildError, BuildLog, BuildRequest, RunError, RunRequest, StepRunner};
use kiln_template::oci::{PullCause, PullEvent};
use kiln_template::recipe::{self, BuildSpec, ImageSource};
use kiln_template::TemplateStore;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageIndex, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

const BASE: u32 = kiln_runtime::ID_MAP_BASE;

/// What the test needs, or why it cannot run.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root (file owners, the uid shift)".into());
    }
    let registry = kiln_template::base::find_program("docker-registry")
        .ok_or("needs the docker-registry binary (Debian package docker-registry)")?;
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("needs busybox-static")?;
    Ok((registry, busybox))
}

/// A `docker-registry serve` of our own; stopped (its process killed) on drop.
struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    addr: String,
}

impl Registry {
    fn start(program: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A free port: bind, note, release (the registry takes it a moment later).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\nhttp:\n  addr: {addr}\n  secret: kiln-test\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(program)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut r = Self {
            child: Some(child),
            dir,
            addr,
        };
        let started = Instant::now();
        while TcpStream::connect(&r.addr).is_err() {
            if let Some(status) = r.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited ({status}):\n{}", r.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "docker-registry did not listen on {} within 20 s:\n{}",
                r.addr,
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds a layer tar from `(path, kind)` entries.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &b""[..]).unwrap();
            }
            E::File(p, data, mode, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn config(arch: &str, extra: serde_json::Value) -> Config {
    let mut c = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/bin", format!("KILN_IMAGE={arch}")],
                   "WorkingDir": "/data"},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    if let (Some(c), Some(extra)) = (c["config"].as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    Config::oci_v1(serde_json::to_vec(&c).unwrap(), None)
}

fn client(addr: &str) -> Client {
    Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![addr.to_string()]),
        ..Default::default()
    })
    .unwrap()
}

/// Pushes the test images; returns the digest of the linux/amd64 manifest of
/// `kiln-test/busybox:1` (an index of amd64 and arm64).
async fn push_images(addr: &str, busybox: &Path) -> String {
    let c = client(addr);
    let auth = RegistryAuth::Anonymous;
    let bb = fs::read(busybox).unwrap();
    let first = layer(&[
        E::Dir("bin"),
        E::File("bin/busybox", &bb, 0o755, 0),
        E::Symlink("bin/sh", "busybox"),
        E::Hardlink("bin/cat", "bin/busybox"),
        E::File("bin/su-test", b"x", 0o4755, 0),
        E::Dir("etc"),
        E::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n",
            0o644,
            0,
        ),
        E::File("etc/group", b"root:x:0:\nu:x:1000:\n", 0o644, 0),
        E::File("etc/remove-me", b"bye", 0o644, 0),
        E::Symlink("etc/mtab", "/proc/mounts"),
        E::Dir("data"),
        E::File("data/old.txt", b"old", 0o644, 0),
        E::Dir("data/sub"),
        E::File("data/sub/deep.txt", b"deep", 0o644, 0),
        E::Dir("home"),
        E::File("home/u/file", b"mine", 0o600, 1000),
    ]);
    let second = layer(&[
        E::File("etc/.wh.remove-me", b"", 0o644, 0),
        E::File("data/.wh..wh..opq", b"", 0o644, 0),
        E::File("data/new.txt", b"new", 0o644, 0),
    ]);
    let third = layer(&[E::File("etc/layer3", b"zstd", 0o644, 0)]);
    let layers = [
        ImageLayer::oci_v1_gzip(gzip(&first), None),
        ImageLayer::oci_v1(second, None),
        ImageLayer::new(
            zstd::stream::encode_all(&third[..], 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            None,
        ),
    ];
    let mut entries = Vec::new();
    for arch in ["arm64", "amd64"] {
        let r: Reference = format!("{addr}/kiln-test/busybox:1-{arch}")
            .parse()
            .unwrap();
        c.push(
            &r,
            &layers,
            config(arch, serde_json::json!({})),
            &auth,
            None,
        )
        .await
        .unwrap();
        let (bytes, digest) = c
            .pull_manifest_raw(&r, &auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .unwrap();
        entries.push(serde_json::json!({
            "mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": digest, "size": bytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let amd64 = entries[1]["digest"].as_str().unwrap().to_string();
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let r: Reference = format!("{addr}/kiln-test/busybox:1").parse().unwrap();
    c.push_manifest_list(&r, &auth, index).await.unwrap();

    // An image `FROM scratch` with no shell and no /etc/passwd.
    let r: Reference = format!("{addr}/kiln-test/noshell:1").parse().unwrap();
    let only = layer(&[E::File("hello.txt", b"hi", 0o644, 0)]);
    c.push(
        &r,
        &[ImageLayer::oci_v1(only, None)],
        config("amd64", serde_json::json!({"User": "1000:1000"})),
        &auth,
        None,
    )
    .await
    .unwrap();
    amd64
}

/// Build steps never reach a sandbox here: a runner that fails the test if asked.
struct NoSandboxes;

#[async_trait::async_trait]
impl StepRunner for NoSandboxes {
    async fn run(
        &self,
        req: RunRequest<'_>,
        _on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        panic!("no build step should run a command here: {}", req.cmd)
    }
}

fn request(data: &Path, name: &str, spec: serde_json::Value) -> BuildRequest {
    BuildRequest {
        name: name.into(),
        build_id: format!(
            "b{}",
            std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .unwrap()
                .as_nanos()
        ),
        spec: serde_json::from_value::<BuildSpec>(spec).unwrap(),
        files_dir: data.join("files"),
        scope: String::new(),
        cpu_count: 1,
        memory_mb: 256,
    }
}

async fn build(
    store: &TemplateStore,
    req: &BuildRequest,
) -> (Result<kiln_template::Template, BuildError>, Vec<String>) {
    let mut logs = Vec::new();
    let r = store
        .build(req, &NoSandboxes, &mut |l: BuildLog| logs.push(l.message))
        .await;
    (r, logs)
}

#[tokio::test]
async fn pulls_unpacks_caches_and_reports_an_unreachable_registry() {
    let (program, busybox) = match prerequisites() {
        Ok(p) => p,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but the registry test cannot run: {why} (scripts/install-deps.sh \
                 installs docker-registry and busybox-static; CI runs as root)"
            );
            eprintln!("SKIP pulls_unpacks_caches_and_reports_an_unreachable_registry: {why}");
            return;
        }
    };
    let mut registry = Registry::start(&program);
    let addr = registry.addr.clone();
    let amd64 = push_images(&addr, &busybox).await;
    let data = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(data.path()).unwrap();
    let image = format!("{addr}/kiln-test/busybox:1");

    // The pull: the amd64 manifest of the index, three layers, whiteouts applied.
    let src = ImageSource::parse(&image, None).unwrap();
    let mut logs = Vec::new();
    let pulled = store
        .pull_image(&src, false, &mut |e| {
            logs.push(match e {
                PullEvent::Log { line } => line,
                PullEvent::Warning { message } => message,
            })
        })
        .await
        .unwrap_or_else(|e| panic!("{}\n{}", kiln_template::ErrorChain(&e), registry.log()));
    assert_eq!(pulled.digest, amd64, "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("3 layers")), "{logs:?}");
    assert_eq!(pulled.config.env["KILN_IMAGE"], "amd64");
    assert_eq!(pulled.config.workdir.as_deref(), Some("/data"));
    let r = &pulled.rootfs;
    let m = |p: &str| fs::symlink_metadata(r.join(p)).unwrap();
    assert_eq!(
        m("bin/busybox").len(),
        fs::metadata(&busybox).unwrap().len()
    );
    assert_eq!(
        fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(m("bin/cat").ino(), m("bin/busybox").ino());
    assert_eq!(
        fs::read_link(r.join("etc/mtab")).unwrap(),
        Path::new("/proc/mounts")
    );
    assert!(!r.join("etc/remove-me").exists(), "whiteout");
    assert!(!r.join("data/old.txt").exists(), "opaque directory");
    assert!(!r.join("data/sub").exists(), "opaque directory");
    assert_eq!(fs::read_to_string(r.join("data/new.txt")).unwrap(), "new");
    assert_eq!(fs::read_to_string(r.join("etc/layer3")).unwrap(), "zstd");
    // Prepared like the Debian base: owners shifted, setuid kept, Kiln's files.
    assert_eq!((m("").uid(), m("").gid()), (BASE, BASE));
    assert_eq!(m("bin/busybox").uid(), BASE);
    assert_eq!(m("home/u/file").uid(), BASE + 1000);
    assert_eq!(m("bin/su-test").mode() & 0o7777, 0o4755);
    assert!(m("opt/kiln/bin").is_dir() && m("run/kiln").is_dir());
    assert_eq!(
        fs::read_to_string(r.join("etc/hostname")).unwrap(),
        "kiln\n"
    );

    // A template from it: the image config starts the build; the digest is in the
    // hash chain. The image is not pulled again.
    let env_step = serde_json::json!({"type": "ENV", "args": ["X", "1"]});
    let spec = serde_json::json!({"fromImage": image, "steps": [env_step.clone()]});
    let (t, logs) = build(&store, &request(data.path(), "from-image", spec.clone())).await;
    let t = t.unwrap();
    assert!(logs.iter().any(|l| l.contains("CACHED")), "{logs:?}");
    assert!(!logs.iter().any(|l| l.contains("pulling")), "{logs:?}");
    assert_eq!(t.meta.default_user, "root");
    assert_eq!(t.meta.default_workdir, "/data");
    assert_eq!(t.meta.envs["KILN_IMAGE"], "amd64");
    assert_eq!(t.meta.envs["X"], "1");
    let step: recipe::StepSpec = serde_json::from_value(env_step).unwrap();
    assert_eq!(
        t.meta.build_hash,
        recipe::layer_hash(&pulled.base_hash(), &step)
    );
    assert_eq!(
        fs::canonicalize(&t.rootfs).unwrap(),
        fs::canonicalize(r).unwrap()
    );

    // An image without a shell or /etc/passwd: root is added for envd, and its first
    // RUN fails clearly (no sandbox is started).
    let spec_noshell = serde_json::json!({"fromImage": format!("{addr}/kiln-test/noshell:1"),
        "steps": [{"type": "RUN", "args": ["echo hi"]}]});
    let (e, logs) = build(&store, &request(data.path(), "noshell", spec_noshell)).await;
    let e = e.unwrap_err();
    assert_eq!(e.step().as_deref(), Some("1"), "{e}");
    assert!(
        e.to_string().contains("neither /bin/bash nor /bin/sh"),
        "{e}"
    );
    // Its User "1000:1000" has no passwd entry: a warning, and the build runs as root.
    assert!(logs.iter().any(|l| l.contains("\"1000:1000\"")), "{logs:?}");
    let noshell = ImageSource::parse(&format!("{addr}/kiln-test/noshell:1"), None).unwrap();
    let p = store
        .pull_image(&noshell, false, &mut |_| {})
        .await
        .unwrap();
    let passwd = fs::read_to_string(p.rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    // Its WorkingDir was made, owned by sandbox root.
    assert_eq!(fs::metadata(p.rootfs.join("data")).unwrap().uid(), BASE);

    // The registry goes away: the tag falls back to what was pulled (with a warning),
    // a digest reference needs no registry, a forced build fails at `base` naming the
    // registry and the cause, and the template built before stays.
    registry.stop();
    let (t2, logs) = build(&store, &request(data.path(), "from-image", spec.clone())).await;
    assert_eq!(t2.unwrap().meta.build_hash, t.meta.build_hash);
    assert!(
        logs.iter()
            .any(|l| l.contains("unreachable") && l.contains("pulled before")),
        "{logs:?}"
    );
    let pinned = ImageSource::parse(&format!("{addr}/kiln-test/busybox@{amd64}"), None).unwrap();
    let p = store.pull_image(&pinned, true, &mut |_| {}).await.unwrap();
    assert_eq!(p.rootfs, pulled.rootfs);

    let mut forced = spec.clone();
    forced["force"] = true.into();
    let (e, _) = build(&store, &request(data.path(), "from-image", forced)).await;
    let e = e.unwrap_err();
    assert_eq!(e.step().as_deref(), Some("base"));
    let message = kiln_template::ErrorChain(&e).to_string();
    assert!(
        message.starts_with(&format!(
            "cannot pull {image}: registry {addr} unreachable: "
        )),
        "{message}"
    );
    let BuildError::Pull(pull) = &e else {
        panic!("{e:?}")
    };
    assert!(matches!(*pull.cause, PullCause::Unreachable { .. }));
    let served = store.get("from-image").unwrap().unwrap();
    assert_eq!(served.meta.build_hash, t.meta.build_hash);

    // Never pulled: no fallback.
    let other = ImageSource::parse(&format!("{addr}/kiln-test/other:1"), None).unwrap();
    let e = store
        .pull_image(&other, false, &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(*e.cause, PullCause::Unreachable { .. }), "{e}");
}
