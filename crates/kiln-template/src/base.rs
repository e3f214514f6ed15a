//! The Debian base templates: root filesystems made by mmdebstrap, with the E2B-style
//! user `user` and the Kiln guest binaries. [`BOOKWORM`] is the built-in `base` (built
//! at server start); [`TRIXIE`] is built the same way on the first build that asks for
//! it (`fromImage: "debian:trixie"`) and cached as the internal template `base-trixie`.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::fsutil;

/// Lines of mmdebstrap output kept for the error message.
const TAIL_LINES: usize = 40;

/// A Debian release Kiln builds a base template from with mmdebstrap. Everything
/// except the suite (packages, hooks, user, finalize, uid shift) is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DebianBase {
    /// Name of the template in the store (`base`, `base-trixie`).
    pub template: &'static str,
    /// Debian suite (codename) given to mmdebstrap.
    pub suite: &'static str,
    /// Debian major version.
    pub version: &'static str,
}

/// Debian 12, the built-in `base` template.
pub const BOOKWORM: DebianBase = DebianBase {
    template: crate::BASE,
    suite: "bookworm",
    version: "12",
};
/// Debian 13, the internal template `base-trixie` (built on first use).
pub const TRIXIE: DebianBase = DebianBase {
    template: "base-trixie",
    suite: "trixie",
    version: "13",
};
/// Every Debian base Kiln builds.
pub const DEBIAN_BASES: &[DebianBase] = &[BOOKWORM, TRIXIE];

/// The Debian base whose template is named `template`.
pub fn debian_base(template: &str) -> Option<DebianBase> {
    DEBIAN_BASES
        .iter()
        .copied()
        .find(|b| b.template == template)
}

/// Mirror used when the machine's apt sources name none for the suite.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Packages installed on top of `--variant=minbase` (E2B's base image has the same
/// tools: a shell, Python with pip and venv, Node with npm, git, curl, sudo).
pub const PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "procps",
    "python3",
    // `python` as well as `python3`, which many snippets assume (E2B's base has both).
    "python-is-python3",
    "python3-pip",
    "python3-venv",
    "nodejs",
    "npm",
    "git",
    "curl",
    "ca-certificates",
    "sudo",
    "iproute2",
    "netbase",
];
/// Guest binaries copied into `/opt/kiln/bin` of the root filesystem.
pub const GUEST_BINARIES: &[&str] = &["kiln-init", "kiln-envd"];
/// The default user of the base template, as in E2B's.
pub const USER: &str = "user";
/// uid and gid of [`USER`] inside the sandbox.
pub const USER_ID: u32 = 1000;
/// Home and default working directory of [`USER`].
pub const USER_HOME: &str = "/home/user";

/// Shell commands run by mmdebstrap after the packages are installed (`$1` is the
/// root). Part of the build hash, so changing one rebuilds the template.
pub fn customize_hooks() -> Vec<String> {
    vec![
        format!("chroot \"$1\" groupadd --gid {USER_ID} {USER}"),
        format!(
            "chroot \"$1\" useradd --uid {USER_ID} --gid {USER_ID} --create-home \
             --home-dir {USER_HOME} --shell /bin/bash {USER}"
        ),
        format!(
            "printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\\n' {USER} > \"$1/etc/sudoers.d/{USER}\" \
             && chmod 0440 \"$1/etc/sudoers.d/{USER}\""
        ),
        // As on E2B, `pip install` works without a venv (PEP 668 marker removed).
        "rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED".to_string(),
        // Trust the CAs the host added locally, so sandboxes get through the same
        // TLS-inspecting egress proxy as the host (curl, pip and git use this store).
        format!(
            "if [ -n \"$(ls -A {HOST_CA_DIR} 2>/dev/null)\" ]; then \
             mkdir -p \"$1{HOST_CA_DIR}\" && cp -rL {HOST_CA_DIR}/. \"$1{HOST_CA_DIR}/\" \
             && chroot \"$1\" update-ca-certificates; fi"
        ),
    ]
}

/// Where Debian keeps locally added CA certificates (host and template alike).
pub const HOST_CA_DIR: &str = "/usr/local/share/ca-certificates";

/// Digest of the names and contents of the files under `dir` (sorted, recursive);
/// empty input for a missing directory. Part of the recipe hash, so adding a CA to the
/// host rebuilds the template.
pub fn dir_digest(dir: &Path) -> String {
    fn walk(dir: &Path, rel: &Path, h: &mut Sha256) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = rel.join(e.file_name());
            if path.is_dir() {
                walk(&path, &rel, h);
            } else if let Ok(bytes) = fs::read(&path) {
                h.update(rel.to_string_lossy().as_bytes());
                h.update(b"\0");
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
        }
    }
    let mut h = Sha256::new();
    walk(dir, Path::new(""), &mut h);
    hex::encode(h.finalize())
}

impl DebianBase {
    /// Hash of everything that decides the content of the root filesystem (the host's
    /// local CAs included), except the mirror (a machine's mirror choice should not
    /// force a rebuild) and the guest binaries (the runtime binds the current ones at
    /// start). Bookworm's is the same as before suites were a parameter.
    pub fn recipe_hash(&self) -> String {
        recipe_hash_for(self.suite)
    }

    /// One-line apt source entries (`deb URI SUITE COMPONENTS`) for the suite and its
    /// `-updates`/`-security` suites, as the machine's apt configuration names them;
    /// [`FALLBACK_MIRROR`] for the suite itself when it names none (a bookworm host
    /// building trixie).
    pub fn configured_mirrors(&self) -> Vec<String> {
        let deb822 =
            fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
        let one_line = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
        mirrors_from(self.suite, &deb822, &one_line)
    }

    /// The mmdebstrap arguments for building this base's root filesystem into `target`.
    pub fn mmdebstrap_args(&self, target: &Path, mirrors: &[String]) -> Vec<String> {
        let mut args = vec![
            "--variant=minbase".to_string(),
            "--mode=root".to_string(),
            "--format=directory".to_string(),
            format!("--include={}", PACKAGES.join(",")),
        ];
        args.extend(
            customize_hooks()
                .into_iter()
                .map(|h| format!("--customize-hook={h}")),
        );
        args.push(self.suite.to_string());
        args.push(target.display().to_string());
        args.extend(mirrors.iter().cloned());
        args
    }
}

fn recipe_hash_for(suite: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln base template recipe v1\n");
    h.update(format!("suite={suite}\nvariant=minbase\n"));
    h.update(format!("packages={}\n", PACKAGES.join(",")));
    for hook in customize_hooks() {
        h.update(format!("hook={hook}\n"));
    }
    h.update(format!("finalize={FINALIZE_VERSION}\n"));
    h.update(format!("host_cas={}\n", dir_digest(Path::new(HOST_CA_DIR))));
    h.update(format!("id_map_base={}\n", kiln_runtime::ID_MAP_BASE));
    hex::encode(h.finalize())
}

fn mirrors_from(wanted_suite: &str, deb822: &str, one_line: &str) -> Vec<String> {
    let wanted = |suite: &str| {
        suite == wanted_suite
            || suite
                .strip_prefix(wanted_suite)
                .is_some_and(|rest| matches!(rest, "-updates" | "-security" | "/updates"))
    };
    let mut out = Vec::new();
    for stanza in deb822.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        let types = field("Types").unwrap_or_default();
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        if field("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        let components = field("Components").unwrap_or_else(|| "main".into());
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace().filter(|s| wanted(s)) {
                out.push(format!("deb {uri} {suite} {components}"));
            }
        }
    }
    for line in one_line.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        // Skip an options block `[ ... ]`.
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        if let [uri, suite, components @ ..] = rest.as_slice() {
            if wanted(suite) && !components.is_empty() {
                out.push(format!("deb {uri} {suite} {}", components.join(" ")));
            }
        }
    }
    let has_main_suite = out
        .iter()
        .any(|l| l.split_whitespace().nth(2) == Some(wanted_suite));
    if !has_main_suite {
        out.insert(0, format!("deb {FALLBACK_MIRROR} {wanted_suite} main"));
    }
    out.dedup();
    out
}

/// Running mmdebstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum MmdebstrapError {
    #[error(
        "mmdebstrap is not installed (needed to build the base template); \
         install the Debian packages `mmdebstrap` and `debian-archive-keyring`"
    )]
    Missing,
    #[error("cannot start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mmdebstrap failed ({status}); last output:\n{tail}")]
    Failed { status: String, tail: String },
}

/// Finds an executable named `name` on `PATH` (plus the sbin directories, which root's
/// `PATH` may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Runs `program` (mmdebstrap) for `base` into `target` (which must not exist or be
/// empty), passing each line it prints to `on_line`.
pub async fn run_mmdebstrap(
    program: &Path,
    base: &DebianBase,
    target: &Path,
    mirrors: &[String],
    on_line: &mut (dyn FnMut(String) + Send),
) -> Result<(), MmdebstrapError> {
    let mut child = Command::new(program)
        .args(base.mmdebstrap_args(target, mirrors))
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A dropped build (server shutdown) must not leave mmdebstrap running; the mounts
        // it leaves in the half-built tree are detached by the next build.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| MmdebstrapError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    let spawn_err = |source| MmdebstrapError::Spawn {
        program: program.to_path_buf(),
        source,
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(spawn_err(io::Error::other("child pipes missing")));
    };
    // Both streams feed one channel; it closes when both reach EOF.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    forward_lines(stdout, tx.clone());
    forward_lines(stderr, tx);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    while let Some(line) = rx.recv().await {
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        on_line(line);
    }
    let status = child.wait().await.map_err(spawn_err)?;
    if status.success() {
        Ok(())
    } else {
        Err(MmdebstrapError::Failed {
            status: status.to_string(),
            tail: Vec::from(tail).join("\n"),
        })
    }
}

fn forward_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    reader: R,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        // Read to EOF even when the receiver is gone, so the child never blocks on a
        // full pipe; bytes that are not UTF-8 are replaced, not fatal.
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    let _ = tx.send(line).await;
                }
            }
        }
    });
}

/// Bump when [`finalize_rootfs`] changes what it writes (part of the recipe hash).
const FINALIZE_VERSION: u32 = 1;
/// What `/etc/resolv.conf` holds until the runtime provides the sandbox's own (mmdebstrap
/// leaves the build host's there, which must not leak into sandboxes).
const RESOLV_CONF_PLACEHOLDER: &str = "# Written by the Kiln runtime when a sandbox starts.\n";

/// Finishes the tree after mmdebstrap (which empties `/run` and copies the build host's
/// `/etc/resolv.conf` and `/etc/hostname`): creates the mount points the runtime binds
/// onto (`/opt/kiln/bin`, `/run/kiln`) and replaces the host's files with neutral ones.
pub fn finalize_rootfs(rootfs: &Path) -> Result<(), InjectError> {
    let err = |to: PathBuf| {
        move |source| InjectError {
            from: rootfs.to_path_buf(),
            to: to.clone(),
            source,
        }
    };
    // Paths are resolved inside the tree: an image's symlinks (`etc -> /etc`) must not
    // lead these writes onto the host.
    for dir in [kiln_runtime::GUEST_BIN_DIR, "/run/kiln"] {
        let rel = Path::new(dir.trim_start_matches('/'));
        let path = fsutil::resolve_dir(rootfs, rel, true).map_err(err(rootfs.join(rel)))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(err(path))?;
    }
    let etc =
        fsutil::resolve_dir(rootfs, Path::new("etc"), true).map_err(err(rootfs.join("etc")))?;
    for (file, text) in [
        ("hostname", "kiln\n"),
        ("resolv.conf", RESOLV_CONF_PLACEHOLDER),
    ] {
        let path = etc.join(file);
        // A symlink (e.g. to systemd-resolved's file) is replaced, not followed.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(err(path)(source)),
        }
        fs::write(&path, text).map_err(err(path.clone()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(err(path))?;
    }
    Ok(())
}

/// A guest binary to inject was not there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBinary {
    pub path: PathBuf,
}

/// Copying a guest binary into the root filesystem, or preparing the files Kiln
/// needs there, failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {to} (from {from})")]
pub struct InjectError {
    pub from: PathBuf,
    pub to: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Copies [`GUEST_BINARIES`] from `guest_bin_dir` into `<rootfs>/opt/kiln/bin` (mode
/// 0755). Missing binaries are returned, not an error: the runtime binds the current
/// ones over that directory at start anyway.
pub fn inject_guest_binaries(
    rootfs: &Path,
    guest_bin_dir: &Path,
) -> Result<Vec<MissingBinary>, InjectError> {
    let rel = Path::new(kiln_runtime::GUEST_BIN_DIR.trim_start_matches('/'));
    let dest_dir = fsutil::resolve_dir(rootfs, rel, true).map_err(|source| InjectError {
        from: guest_bin_dir.to_path_buf(),
        to: rootfs.join(rel),
        source,
    })?;
    let mut missing = Vec::new();
    for name in GUEST_BINARIES {
        let from = guest_bin_dir.join(name);
        if !from.is_file() {
            missing.push(MissingBinary { path: from });
            continue;
        }
        let to = dest_dir.join(name);
        let err = |source| InjectError {
            from: from.clone(),
            to: to.clone(),
            source,
        };
        fs::copy(&from, &to).map_err(err)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main contrib
";

    #[test]
    fn mirrors_from_deb822() {
        assert_eq!(
            mirrors_from("bookworm", DEB822, ""),
            vec![
                "deb http://mirror.example/debian bookworm main",
                "deb http://mirror.example/debian bookworm-updates main",
                "deb http://mirror.example/debian-security bookworm-security main contrib",
            ]
        );
    }

    #[test]
    fn mirrors_from_one_line_and_fallback() {
        let list = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main non-free\n\
                    deb http://m.example/debian trixie main\n";
        assert_eq!(
            mirrors_from("bookworm", "", list),
            vec!["deb http://m.example/debian bookworm main non-free"]
        );
        assert_eq!(
            mirrors_from("bookworm", "", "deb http://m.example/debian trixie main\n"),
            vec![format!("deb {FALLBACK_MIRROR} bookworm main")]
        );
        // A bookworm host building trixie: only the fallback for trixie itself.
        assert_eq!(
            mirrors_from("trixie", DEB822, ""),
            vec![format!("deb {FALLBACK_MIRROR} trixie main")]
        );
        assert_eq!(
            mirrors_from("trixie", "", list),
            vec!["deb http://m.example/debian trixie main"]
        );
        // Only a security suite configured: the main suite still comes from the fallback.
        assert_eq!(
            mirrors_from(
                "bookworm",
                "",
                "deb http://s.example/debian-security bookworm-security main\n"
            )[0],
            format!("deb {FALLBACK_MIRROR} bookworm main")
        );
    }

    #[test]
    fn args_and_hash_are_stable() {
        let args = BOOKWORM.mmdebstrap_args(
            Path::new("/t"),
            &["deb http://m/debian bookworm main".into()],
        );
        assert_eq!(args[0], "--variant=minbase");
        assert!(args
            .iter()
            .any(|a| a.starts_with("--include=bash,") && a.contains(",sudo,")));
        let n = args.len();
        assert_eq!(
            &args[n - 3..],
            ["bookworm", "/t", "deb http://m/debian bookworm main"]
        );
        assert_eq!(BOOKWORM.recipe_hash(), BOOKWORM.recipe_hash());
        assert_eq!(BOOKWORM.recipe_hash().len(), 64);
    }

    #[test]
    fn trixie_args_name_trixie_and_share_everything_else() {
        let mirrors = ["deb http://deb.debian.org/debian trixie main".to_string()];
        let args = TRIXIE.mmdebstrap_args(Path::new("/t"), &mirrors);
        let n = args.len();
        assert_eq!(&args[n - 3..], ["trixie", "/t", mirrors[0].as_str()]);
        assert!(!args.iter().any(|a| a == "bookworm"), "{args:?}");
        let book = BOOKWORM.mmdebstrap_args(Path::new("/t"), &mirrors);
        // Same packages, hooks (user, sudo, CAs) and options; only the suite differs.
        assert_eq!(args[..n - 3], book[..n - 3]);
        assert_ne!(TRIXIE.recipe_hash(), BOOKWORM.recipe_hash());
        assert_eq!(debian_base("base-trixie"), Some(TRIXIE));
        assert_eq!(debian_base("base"), Some(BOOKWORM));
        assert_eq!(debian_base("mine"), None);
    }

    #[test]
    fn inject_copies_and_reports_missing() {
        let bins = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        fs::write(bins.path().join("kiln-envd"), b"\x7fELF").unwrap();
        let missing = inject_guest_binaries(root.path(), bins.path()).unwrap();
        assert_eq!(
            missing,
            vec![MissingBinary {
                path: bins.path().join("kiln-init")
            }]
        );
        let copied = root.path().join("opt/kiln/bin/kiln-envd");
        assert_eq!(fs::read(&copied).unwrap(), b"\x7fELF");
        assert_eq!(
            fs::metadata(&copied).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn finalize_replaces_host_files_and_creates_mount_points() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::set_permissions(r.join("etc/resolv.conf"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", r.join("etc/hostname")).unwrap();
        finalize_rootfs(r).unwrap();
        assert!(r.join("opt/kiln/bin").is_dir());
        assert!(r.join("run/kiln").is_dir());
        assert_eq!(
            fs::read_to_string(r.join("etc/resolv.conf")).unwrap(),
            RESOLV_CONF_PLACEHOLDER
        );
        let meta = fs::symlink_metadata(r.join("etc/hostname")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "kiln\n"
        );
    }

    #[test]
    fn finalize_stays_inside_an_image_with_absolute_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let (root, host) = (dir.path().join("root"), dir.path().join("host"));
        fs::create_dir_all(root.join("real-etc")).unwrap();
        fs::create_dir_all(host.join("etc")).unwrap();
        // `etc` and `opt` point at absolute paths that exist on the host side.
        std::os::unix::fs::symlink("/real-etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink(host.join("etc"), root.join("opt")).unwrap();
        finalize_rootfs(&root).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("real-etc/hostname")).unwrap(),
            "kiln\n"
        );
        assert_eq!(fs::read_dir(host.join("etc")).unwrap().count(), 0);
        let inner = root
            .join(host.strip_prefix("/").unwrap())
            .join("etc/kiln/bin");
        assert!(inner.is_dir(), "{}", inner.display());
    }

    #[test]
    fn dir_digest_sees_names_and_contents() {
        let d = tempfile::tempdir().unwrap();
        let empty = dir_digest(d.path());
        assert_eq!(empty, dir_digest(&d.path().join("missing")));
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/a.crt"), "A").unwrap();
        let one = dir_digest(d.path());
        assert_ne!(one, empty);
        fs::write(d.path().join("sub/a.crt"), "B").unwrap();
        assert_ne!(dir_digest(d.path()), one);
    }

    #[test]
    fn find_program_finds_sh() {
        assert!(find_program("sh").is_some());
        assert!(find_program("definitely-not-a-program-kiln").is_none());
    }
}
