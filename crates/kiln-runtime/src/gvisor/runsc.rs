//! Driving the `runsc` binary: finding it, global flags, platform choice, the
//! start-up probe, and the short commands (`state`, `delete`, `checkpoint`, `restore`).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Platforms tried in order when none is requested: `systrap` (seccomp traps, runsc
/// ≥ 2023; faster than ptrace) then `ptrace`. `kvm` is never chosen on its own: it
/// hangs on PVM hosts (see [`kvm_unusable`]).
pub const PLATFORM_PREFERENCE: [&str; 2] = ["systrap", "ptrace"];
const PLATFORMS: [&str; 3] = ["ptrace", "kvm", "systrap"];

#[derive(Debug, thiserror::Error)]
pub enum RunscError {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runsc {args} failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("runsc {args} did not finish within {timeout:?}")]
    Timeout { args: String, timeout: Duration },
    #[error("unexpected output of runsc {args}: {output:?}")]
    Output { args: String, output: String },
    #[error("platform {0:?} is not one of ptrace, kvm, systrap")]
    UnknownPlatform(String),
    #[error("platform kvm is unusable here: {0}")]
    KvmUnusable(String),
    #[error("no runsc on PATH (install it with scripts/install-deps.sh, or set KILN_RUNSC)")]
    NotOnPath,
    #[error("no platform works ({0})")]
    NoPlatform(String),
}

/// Why the KVM platform cannot be used, if it cannot. Opening `/dev/kvm` proves
/// nothing: under PVM (`kvm_pvm`) guest kernel mode is emulated and runsc hangs.
pub fn kvm_unusable(sys_module: &Path, dev_kvm: &Path) -> Option<String> {
    if sys_module.join("kvm_pvm").exists() {
        return Some("/dev/kvm is PVM (module kvm_pvm): guest kernel mode is emulated".into());
    }
    if !dev_kvm.exists() {
        return Some(format!("{} does not exist", dev_kvm.display()));
    }
    None
}

/// The platforms to probe, best first: the `requested` one (checked), else
/// [`PLATFORM_PREFERENCE`].
pub fn platform_candidates(requested: Option<&str>) -> Result<Vec<String>, RunscError> {
    let Some(p) = requested else {
        return Ok(PLATFORM_PREFERENCE.iter().map(|p| p.to_string()).collect());
    };
    if !PLATFORMS.contains(&p) {
        return Err(RunscError::UnknownPlatform(p.to_string()));
    }
    if p == "kvm" {
        if let Some(why) = kvm_unusable(Path::new("/sys/module"), Path::new("/dev/kvm")) {
            return Err(RunscError::KvmUnusable(why));
        }
    }
    Ok(vec![p.to_string()])
}

/// The first executable `name` in the directories of `path` (a `PATH` value), as
/// a shell would find it: `/usr/local/bin/runsc` before `/usr/bin/runsc`.
pub fn find_in_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The `runsc` to use: `explicit` (an option or `KILN_RUNSC`), else the first on `PATH`.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, RunscError> {
    match explicit {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            find_in_path("runsc", std::env::var_os("PATH").as_deref()).ok_or(RunscError::NotOnPath)
        }
    }
}

/// What `runsc state` reports about a container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ContainerState {
    pub id: String,
    /// `created`, `running`, `stopped`, ...
    pub status: String,
    /// Host pid of the sandbox process (the gVisor Sentry); `-1` once stopped.
    #[serde(default)]
    pub pid: i64,
}

impl ContainerState {
    /// The Sentry's pid, if it has one.
    pub fn sentry_pid(&self) -> Option<u32> {
        u32::try_from(self.pid).ok().filter(|p| *p > 0)
    }
}

/// One `runsc` installation with a state root and a platform.
#[derive(Debug, Clone)]
pub struct Runsc {
    pub exe: PathBuf,
    pub root: PathBuf,
    pub platform: String,
    /// `--debug --debug-log=<dir>/` on `run`/`restore` when set.
    pub debug_log_dir: Option<PathBuf>,
}

impl Runsc {
    /// Global flags of every invocation. `--host-uds=all` lets the sandbox create
    /// Unix sockets on gofer-backed mounts as real host sockets (that is how envd's
    /// socket reaches the host) and open them again (envd chmods its socket; with
    /// `create` alone that walk fails with EPERM). `--overlay2=none`: the root is
    /// already the host overlay whose upper directory holds the sandbox's writes
    /// (template builds and disk usage read it); runsc ≥ 2023 would otherwise keep
    /// them in a Sentry-internal overlay (default `root:self`). See docs/gvisor.md.
    pub fn global_args(&self, network: Network) -> Vec<String> {
        let mut args = vec![
            format!("--root={}", self.root.display()),
            format!("--platform={}", self.platform),
            format!("--network={}", network.flag()),
            "--host-uds=all".into(),
            "--overlay2=none".into(),
        ];
        if let Some(dir) = &self.debug_log_dir {
            args.push("--debug".into());
            args.push(format!("--debug-log={}/", dir.display()));
        }
        args
    }

    /// Run a short `runsc` command, bounded by `timeout`; its stdout on success.
    pub fn output(&self, args: &[&str], timeout: Duration) -> Result<String, RunscError> {
        let mut all = vec![format!("--root={}", self.root.display())];
        all.extend(args.iter().map(|s| s.to_string()));
        run(&self.exe, &all, timeout)
    }

    /// `runsc state <id>`; `None` when runsc does not know the container.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, RunscError> {
        match self.output(&["state", id], Duration::from_secs(10)) {
            Ok(out) => serde_json::from_str(&out)
                .map(Some)
                .map_err(|_| RunscError::Output {
                    args: format!("state {id}"),
                    output: out,
                }),
            Err(RunscError::Failed { stderr, .. }) if not_found(&stderr) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `runsc delete --force <id>`: kills the sandbox and removes runsc's state.
    /// A container runsc does not know is already deleted.
    /// On a loaded host runsc's own wait for the sandbox to stop can run out
    /// ("context deadline exceeded"): the sandbox is then still going down, and a
    /// second delete finishes the job.
    pub fn delete(&self, id: &str) -> Result<(), RunscError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.output(&["delete", "--force", id], Duration::from_secs(15)) {
                Ok(_) => return Ok(()),
                Err(RunscError::Failed { stderr, .. }) if not_found(&stderr) => return Ok(()),
                Err(RunscError::Failed { stderr, .. })
                    if tries < 3 && stderr.contains("context deadline exceeded") =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `runsc kill --pid=<pid> <id> <signal>`: signal one process of the sandbox
    /// (`pid` in the sandbox's own pid namespace).
    pub fn kill(&self, id: &str, pid: u32, signal: &str) -> Result<(), RunscError> {
        let pid = format!("--pid={pid}");
        self.output(&["kill", &pid, id, signal], Duration::from_secs(10))
            .map(|_| ())
    }
}

fn not_found(stderr: &str) -> bool {
    stderr.contains("does not exist") || stderr.contains("not found")
}

/// `--network` of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// gVisor's own network stack on the interfaces of the namespace in config.json.
    Sandbox,
    /// Loopback only (inside the Sentry).
    None,
}

impl Network {
    pub fn flag(self) -> &'static str {
        match self {
            Network::Sandbox => "sandbox",
            Network::None => "none",
        }
    }
}

/// Run `exe args` with a deadline; stdout on success, stderr in the error.
pub fn run(exe: &Path, args: &[String], timeout: Duration) -> Result<String, RunscError> {
    let joined = args.join(" ");
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunscError::Spawn {
            program: exe.display().to_string(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunscError::Timeout {
                    args: joined,
                    timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(source) => {
                return Err(RunscError::Spawn {
                    program: exe.display().to_string(),
                    source,
                })
            }
        }
    }
    // The child has exited: its pipes hold everything it wrote (short outputs only).
    let out = child
        .wait_with_output()
        .map_err(|source| RunscError::Spawn {
            program: exe.display().to_string(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(RunscError::Failed {
        args: joined,
        status: out.status.to_string(),
        stderr: clip(String::from_utf8_lossy(&out.stderr).trim()),
    })
}

/// runsc's errors can carry goroutine dumps of many KiB (a failed `checkpoint`);
/// the first lines say what went wrong.
fn clip(stderr: &str) -> String {
    const MAX: usize = 2048;
    if stderr.len() <= MAX {
        return stderr.to_string();
    }
    let mut end = MAX;
    while !stderr.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} […{} more bytes]", &stderr[..end], stderr.len() - end)
}

/// `runsc --version`, first line.
pub fn version(exe: &Path) -> Result<String, RunscError> {
    let out = run(exe, &["--version".into()], Duration::from_secs(5))?;
    out.lines()
        .next()
        .map(str::to_string)
        .filter(|l| l.starts_with("runsc version"))
        .ok_or(RunscError::Output {
            args: "--version".into(),
            output: out,
        })
}

/// Whether runsc can run a process on `platform` here: `runsc do /bin/true` with the
/// host root (≈ 200 ms). A success is cached in `state_dir/runsc-probe-<platform>`
/// (keyed by the version line and the platform) so later server starts skip it.
pub fn probe(
    exe: &Path,
    platform: &str,
    version: &str,
    state_dir: &Path,
) -> Result<(), RunscError> {
    let cache = state_dir.join(format!("runsc-probe-{platform}"));
    let key = format!("{version}\nplatform={platform}\nok\n");
    if std::fs::read_to_string(&cache).ok().as_deref() == Some(key.as_str()) {
        return Ok(());
    }
    let root = cache.with_extension("root");
    let args = vec![
        format!("--root={}", root.display()),
        format!("--platform={platform}"),
        "--network=none".into(),
        "do".into(),
        "/bin/true".into(),
    ];
    let result = run(exe, &args, Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&root);
    result?;
    // A failed cache write only costs the next start another probe.
    let _ = std::fs::write(&cache, key);
    Ok(())
}

/// The first of `candidates` that passes [`probe`]; every failure in the error.
pub fn choose_platform(
    exe: &Path,
    candidates: &[String],
    version: &str,
    state_dir: &Path,
) -> Result<String, RunscError> {
    let mut failures = Vec::new();
    for p in candidates {
        match probe(exe, p, version, state_dir) {
            Ok(()) => return Ok(p.clone()),
            Err(e) => {
                tracing::debug!(platform = %p, error = %e, "runsc platform probe failed");
                failures.push(format!("{p}: {e}"));
            }
        }
    }
    Err(RunscError::NoPlatform(failures.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_candidates_prefer_systrap_and_check_requests() {
        assert_eq!(platform_candidates(None).unwrap(), ["systrap", "ptrace"]);
        assert_eq!(platform_candidates(Some("ptrace")).unwrap(), ["ptrace"]);
        assert!(matches!(
            platform_candidates(Some("bogus")),
            Err(RunscError::UnknownPlatform(_))
        ));
    }

    #[test]
    fn path_lookup_takes_the_first_executable() {
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        // Not executable: skipped, as a shell would.
        std::fs::write(a.join("runsc"), "").unwrap();
        for d in [&b, &c] {
            std::fs::write(d.join("runsc"), "").unwrap();
            std::fs::set_permissions(d.join("runsc"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let path = std::env::join_paths([&a, &b, &c]).unwrap();
        assert_eq!(find_in_path("runsc", Some(&path)), Some(b.join("runsc")));
        let path = std::env::join_paths([&c, &b]).unwrap();
        assert_eq!(find_in_path("runsc", Some(&path)), Some(c.join("runsc")));
        assert_eq!(find_in_path("runsc", Some(OsStr::new("relative:"))), None);
        assert_eq!(find_in_path("runsc", None), None);
        assert_eq!(
            locate(Some(Path::new("/opt/runsc"))).unwrap(),
            Path::new("/opt/runsc")
        );
    }

    #[test]
    fn platform_choice_falls_back_and_caches_successes() {
        let t = tempfile::tempdir().unwrap();
        // A fake runsc that knows only ptrace and counts its runs.
        let exe = t.path().join("runsc");
        let count = t.path().join("count");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho x >> {}\ncase \"$*\" in *--platform=ptrace*) exit 0;; esac\n\
                 echo 'unknown platform' >&2; exit 1\n",
                count.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runs = || {
            std::fs::read_to_string(&count)
                .unwrap_or_default()
                .lines()
                .count()
        };
        let all = platform_candidates(None).unwrap();
        let v = "runsc version test";
        assert_eq!(choose_platform(&exe, &all, v, t.path()).unwrap(), "ptrace");
        assert_eq!(runs(), 2);
        // ptrace's success is cached; systrap is probed again.
        assert_eq!(choose_platform(&exe, &all, v, t.path()).unwrap(), "ptrace");
        assert_eq!(runs(), 3);
        // Another version is probed afresh.
        let only = vec!["ptrace".to_string()];
        choose_platform(&exe, &only, "runsc version other", t.path()).unwrap();
        assert_eq!(runs(), 4);
        let only = vec!["systrap".to_string()];
        let err = choose_platform(&exe, &only, v, t.path()).unwrap_err();
        assert!(err.to_string().contains("systrap"), "{err}");
    }

    #[test]
    fn kvm_checks_pvm_not_just_the_device() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("kvm");
        std::fs::write(&dev, "").unwrap();
        assert!(kvm_unusable(t.path(), &dev).is_none());
        std::fs::create_dir(t.path().join("kvm_pvm")).unwrap();
        assert!(kvm_unusable(t.path(), &dev).unwrap().contains("PVM"));
        assert!(kvm_unusable(&t.path().join("x"), &t.path().join("none")).is_some());
    }

    #[test]
    fn global_flags() {
        let r = Runsc {
            exe: "/usr/bin/runsc".into(),
            root: "/d/runsc-root".into(),
            platform: "ptrace".into(),
            debug_log_dir: None,
        };
        assert_eq!(
            r.global_args(Network::None),
            vec![
                "--root=/d/runsc-root",
                "--platform=ptrace",
                "--network=none",
                "--host-uds=all",
                "--overlay2=none"
            ]
        );
        assert_eq!(r.global_args(Network::Sandbox)[2], "--network=sandbox");
    }

    #[test]
    fn state_json() {
        let s: ContainerState = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","id":"a1","status":"running","pid":42,"bundle":"/b"}"#,
        )
        .unwrap();
        assert_eq!(s.sentry_pid(), Some(42));
        assert_eq!(s.status, "running");
        let s: ContainerState =
            serde_json::from_str(r#"{"id":"a1","status":"stopped","pid":-1}"#).unwrap();
        assert_eq!(s.sentry_pid(), None);
    }

    #[test]
    fn run_reports_failures_and_timeouts() {
        let sh = Path::new("/bin/sh");
        let ok = run(sh, &["-c".into(), "echo hi".into()], Duration::from_secs(5)).unwrap();
        assert_eq!(ok, "hi\n");
        let err = run(
            sh,
            &["-c".into(), "echo bad >&2; exit 3".into()],
            Duration::from_secs(5),
        );
        assert!(matches!(err, Err(RunscError::Failed { ref stderr, .. }) if stderr == "bad"));
        let slow = run(
            sh,
            &["-c".into(), "sleep 5".into()],
            Duration::from_millis(50),
        );
        assert!(matches!(slow, Err(RunscError::Timeout { .. })));
        let long = "é".repeat(3000);
        let clipped = clip(&long);
        assert!(
            clipped.len() < 2100 && clipped.ends_with("more bytes]"),
            "{clipped}"
        );
    }
}
