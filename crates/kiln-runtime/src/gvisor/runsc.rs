//! Driving the `runsc` binary: global flags, platform choice, the start-up probe, and
//! the short commands (`state`, `delete`, `checkpoint`, `restore`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Platform used unless the options name another. `kvm` hangs on PVM hosts and
/// `systrap` does not exist in the 2022 runsc Debian ships.
pub const DEFAULT_PLATFORM: &str = "ptrace";
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

/// The platform to run with: `requested`, checked, or [`DEFAULT_PLATFORM`].
pub fn choose_platform(requested: Option<&str>) -> Result<String, RunscError> {
    let Some(p) = requested else {
        return Ok(DEFAULT_PLATFORM.to_string());
    };
    if !PLATFORMS.contains(&p) {
        return Err(RunscError::UnknownPlatform(p.to_string()));
    }
    if p == "kvm" {
        if let Some(why) = kvm_unusable(Path::new("/sys/module"), Path::new("/dev/kvm")) {
            return Err(RunscError::KvmUnusable(why));
        }
    }
    Ok(p.to_string())
}

/// What `runsc state` reports about a container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ContainerState {
    pub id: String,
    /// `created`, `running`, `stopped`, ...
    pub status: String,
    /// Host pid of the sandbox process (the gVisor Sentry).
    #[serde(default)]
    pub pid: u32,
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
    /// `create` alone that walk fails with EPERM). See docs/gvisor.md.
    pub fn global_args(&self, network: Network) -> Vec<String> {
        let mut args = vec![
            format!("--root={}", self.root.display()),
            format!("--platform={}", self.platform),
            format!("--network={}", network.flag()),
            "--host-uds=all".into(),
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
    pub fn delete(&self, id: &str) -> Result<(), RunscError> {
        match self.output(&["delete", "--force", id], Duration::from_secs(15)) {
            Ok(_) => Ok(()),
            Err(RunscError::Failed { stderr, .. }) if not_found(&stderr) => Ok(()),
            Err(e) => Err(e),
        }
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
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
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
/// host root (≈ 200 ms with ptrace). The result is cached in `cache` (keyed by the
/// version line and the platform) so later server starts skip it.
pub fn probe(exe: &Path, platform: &str, version: &str, cache: &Path) -> Result<(), RunscError> {
    let key = format!("{version}\nplatform={platform}\nok\n");
    if std::fs::read_to_string(cache).ok().as_deref() == Some(key.as_str()) {
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
    let _ = std::fs::write(cache, key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_choice() {
        assert_eq!(choose_platform(None).unwrap(), "ptrace");
        assert_eq!(choose_platform(Some("ptrace")).unwrap(), "ptrace");
        assert!(matches!(
            choose_platform(Some("bogus")),
            Err(RunscError::UnknownPlatform(_))
        ));
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
                "--host-uds=all"
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
        assert_eq!(s.pid, 42);
        assert_eq!(s.status, "running");
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
    }
}
