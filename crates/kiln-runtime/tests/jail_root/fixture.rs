//! Test fixture: a busybox root filesystem, a guest bin directory holding kiln-init and
//! this binary (as the probe), a runtime, and helpers to run commands in a sandbox and
//! to check that a killed sandbox left nothing behind.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_runtime::jail::{JailOptions, JailRuntime};
use kiln_runtime::{
    HostIdMode, Limits, NetworkMode, Runtime, SandboxConfig, SandboxInstance, ID_MAP_BASE,
};

pub struct Fixture {
    pub rt: JailRuntime,
    pub tokio: tokio::runtime::Runtime,
    pub rootfs: PathBuf,
    pub base: PathBuf,
}

/// Why the root tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/usr/bin/busybox").is_file() {
        return Some("/usr/bin/busybox missing (apt-get install busybox-static)".into());
    }
    if find_bin("kiln-init", "KILN_INIT_BIN").is_none() {
        return Some(
            "kiln-init not built (cargo build -p kiln-init) and KILN_INIT_BIN unset".into(),
        );
    }
    None
}

/// A binary of the workspace next to this test's `deps/` directory, or from `env`.
pub fn find_bin(name: &str, env: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join(name);
    p.is_file().then_some(p)
}

fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(())
}

fn busybox_rootfs(dir: &Path) -> Result<()> {
    for d in [
        "bin", "etc", "root", "tmp", "proc", "dev", "usr/bin", "sbin", "mnt",
    ] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/usr/bin/busybox", dir.join("bin/busybox"))?;
    let out = std::process::Command::new("/usr/bin/busybox")
        .arg("--list")
        .output()?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\ntty:x:5:\n")?;
    // Shift ownership into the mapped range: host 100000 is root inside.
    let status = std::process::Command::new("chown")
        .args(["-R", "-h", &format!("{ID_MAP_BASE}:{ID_MAP_BASE}")])
        .arg(dir)
        .status()?;
    if !status.success() {
        bail!("chown of the test rootfs failed");
    }
    Ok(())
}

/// Exclusive lock shared by every jail_root process on this host.
pub fn host_lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/var/tmp/kiln-jail-test.lock")?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("flock: {e}"))
}

impl Fixture {
    pub fn new() -> Result<Fixture> {
        let base = PathBuf::from(format!("/var/tmp/kiln-jail-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let rootfs = base.join("rootfs");
        let bin = base.join("bin");
        std::fs::create_dir_all(&bin)?;
        busybox_rootfs(&rootfs).context("building the busybox rootfs")?;
        let init = find_bin("kiln-init", "KILN_INIT_BIN").context("kiln-init")?;
        link_or_copy(&init, &bin.join("kiln-init"))?;
        link_or_copy(&std::env::current_exe()?, &bin.join("probe"))?;
        if let Some(envd) = find_bin("kiln-envd", "KILN_ENVD_BIN") {
            link_or_copy(&envd, &bin.join("kiln-envd"))?;
        }
        let helper = PathBuf::from(env!("CARGO_BIN_EXE_kiln-jail"));
        let mut opts = JailOptions::new(base.join("sandboxes"), bin, helper);
        opts.envd_command = Some(vec!["/opt/kiln/bin/probe".into(), "agent".into()]);
        let rt = JailRuntime::new(opts).context("creating the jail runtime")?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Fixture {
            rt,
            tokio,
            rootfs,
            base,
        })
    }

    /// The same runtime, but running the real envd (`kiln-init` default command).
    pub fn real_envd_runtime(&self) -> Result<JailRuntime> {
        let mut opts = self.rt.options().clone();
        opts.envd_command = None;
        Ok(JailRuntime::new(opts)?)
    }

    pub fn config(&self, prefix: &str, network: NetworkMode, limits: Limits) -> SandboxConfig {
        let n: u32 = rand_suffix();
        SandboxConfig {
            id: format!("{prefix}{n}"),
            rootfs: self.rootfs.clone(),
            limits,
            network,
            host_ids: HostIdMode::PerSandbox,
        }
    }

    pub fn start(&self, config: &SandboxConfig) -> Result<SandboxInstance> {
        let t = std::time::Instant::now();
        let inst = self.tokio.block_on(self.rt.start(config))?;
        println!(
            "    started {} (pid {}) in {:?}",
            config.id,
            inst.pid,
            t.elapsed()
        );
        Ok(inst)
    }

    pub fn kill(&self, id: &str) -> Result<()> {
        let t = std::time::Instant::now();
        self.tokio.block_on(self.rt.kill(id))?;
        println!("    killed {id} in {:?}", t.elapsed());
        Ok(())
    }

    /// Run `cmd` with /bin/sh inside the sandbox (through the probe agent).
    pub fn sh(&self, inst: &SandboxInstance, cmd: &str) -> Result<(i32, String)> {
        let mut s =
            UnixStream::connect(&inst.envd_socket).context("connecting to the probe agent")?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(cmd.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (code, rest) = out.split_once('\n').unwrap_or((&out, ""));
        let code = code.trim().parse().with_context(|| {
            let log = std::fs::read_to_string(self.rt.paths(&inst.id).log()).unwrap_or_default();
            format!("bad reply {out:?} to `{cmd}`; sandbox log:\n{log}")
        })?;
        Ok((code, rest.to_string()))
    }

    /// `sh` that must succeed; returns trimmed output.
    pub fn ok(&self, inst: &SandboxInstance, cmd: &str) -> Result<String> {
        let (code, out) = self.sh(inst, cmd)?;
        if code != 0 {
            bail!("`{cmd}` exited {code}: {out}");
        }
        Ok(out.trim().to_string())
    }

    /// Everything a sandbox could leave behind after kill.
    pub fn leftovers(&self, id: &str, slot_if: Option<&str>) -> Vec<String> {
        let mut left = Vec::new();
        let needle = format!("kiln/{id}");
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let p = entry.path();
            let cg = std::fs::read_to_string(p.join("cgroup")).unwrap_or_default();
            let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cg.contains(&needle) || cmd.split(' ').any(|a| a == id) {
                left.push(format!("process {}: {cmd}", p.display()));
            }
        }
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(
            mi.lines()
                .filter(|l| l.contains(id))
                .map(|l| format!("mount: {l}")),
        );
        left.extend(
            self.rt
                .cgroup_dirs(id)
                .into_iter()
                .filter(|d| d.exists())
                .map(|d| format!("cgroup {}", d.display())),
        );
        if self.rt.paths(id).dir.exists() {
            left.push(format!("dir {}", self.rt.paths(id).dir.display()));
        }
        // A host-wide claim on its id range (`jail::ids`) names its directory.
        let dir_bytes = self.rt.paths(id).dir.into_os_string().into_encoded_bytes();
        for claim in std::fs::read_dir(kiln_runtime::jail::ids::CLAIMS_DIR)
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read(claim.path()).is_ok_and(|h| h == dir_bytes) {
                left.push(format!("id range claim {}", claim.path().display()));
            }
        }
        // The disk's loop device (released with the disk's last mount).
        let dir = self.rt.paths(id).dir.display().to_string();
        let loops = std::process::Command::new("losetup")
            .arg("-a")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        left.extend(
            loops
                .lines()
                .filter(|l| l.contains(&dir))
                .map(|l| format!("loop device: {l}")),
        );
        if let Some(ifname) = slot_if {
            if Path::new("/sys/class/net").join(ifname).exists() {
                left.push(format!("link {ifname}"));
            }
            for prog in ["iptables-save", "ip6tables-save"] {
                let out = std::process::Command::new(prog)
                    .output()
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                let out = String::from_utf8_lossy(&out);
                left.extend(
                    out.lines()
                        .filter(|l| l.split_whitespace().any(|w| w == ifname) || l.contains(id))
                        .map(|l| format!("{prog}: {l}")),
                );
            }
        }
        left
    }

    pub fn kill_and_check(&self, id: &str, slot_if: Option<&str>) -> Result<()> {
        self.kill(id)?;
        let left = self.leftovers(id, slot_if);
        if !left.is_empty() {
            bail!("sandbox {id} left behind:\n  {}", left.join("\n  "));
        }
        // Idempotent.
        self.kill(id)?;
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(ids) = self.tokio.block_on(self.rt.list()) {
            for id in ids {
                let _ = self.tokio.block_on(self.rt.kill(&id));
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t % 100_000) * 100 + N.fetch_add(1, Ordering::Relaxed) % 100
}
