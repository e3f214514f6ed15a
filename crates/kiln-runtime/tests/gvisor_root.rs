//! Root-tier integration tests of the gVisor runtime (tier: root + runsc; no KVM).
//!
//! Run: `cargo build -p kiln-init -p kiln-envd --target x86_64-unknown-linux-gnu` (static
//! guest binaries) then `cargo test -p kiln-runtime --test gvisor_root`.
//!
//! Needs: root, `runsc` on PATH (or `KILN_RUNSC`; `KILN_RUNSC_PLATFORM` forces a
//! platform, else systrap or ptrace, whichever works first), iptables, iproute2, the real
//! `kiln-init` and `kiln-envd` (found next to this test's target directory, in
//! `target/x86_64-unknown-linux-gnu/debug/`, or via `KILN_INIT_BIN` / `KILN_ENVD_BIN`;
//! `kiln-sudo` too when built, or `KILN_SUDO_BIN`),
//! and a Debian root filesystem owned by the mapped id range: `KILN_TEST_DEBIAN_ROOTFS`,
//! else `/var/lib/kiln-dev-data/templates/base/rootfs` (only read: it is the overlay's
//! lower layer). Without them every test prints why and passes, unless `CI` is set, in
//! which case it fails.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_runtime::gvisor::{GvisorOptions, GvisorRuntime};
use kiln_runtime::{Limits, NetworkMode, Runtime, SandboxConfig, SandboxInstance};
use serde_json::Value;

/// Host id ranges per sandbox and template gc (`gvisor_root/id_ranges.rs`).
#[path = "gvisor_root/id_ranges.rs"]
mod id_ranges;

const DEFAULT_ROOTFS: &str = "/var/lib/kiln-dev-data/templates/base/rootfs";

fn find_bin(name: &str, env: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    // <target>/debug/deps/<test> → <target>/x86_64-unknown-linux-gnu/debug, <target>/debug
    let exe = std::env::current_exe().ok()?;
    let debug = exe.parent()?.parent()?;
    let target = debug.parent()?;
    [
        target.join("x86_64-unknown-linux-gnu/debug").join(name),
        debug.join(name),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

fn rootfs() -> PathBuf {
    std::env::var_os("KILN_TEST_DEBIAN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS))
}

fn runsc() -> Option<PathBuf> {
    kiln_runtime::gvisor::runsc::locate(
        std::env::var_os("KILN_RUNSC").map(PathBuf::from).as_deref(),
    )
    .ok()
    .filter(|p| p.is_file())
}

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if runsc().is_none() {
        return Some("no runsc on PATH or at KILN_RUNSC (scripts/install-deps.sh)".into());
    }
    for (name, env) in [
        ("kiln-init", "KILN_INIT_BIN"),
        ("kiln-envd", "KILN_ENVD_BIN"),
    ] {
        if find_bin(name, env).is_none() {
            return Some(format!("{name} not built and {env} unset"));
        }
    }
    if !rootfs().join("bin/sh").exists() {
        return Some(format!(
            "no Debian rootfs at {} (set KILN_TEST_DEBIAN_ROOTFS)",
            rootfs().display()
        ));
    }
    None
}

/// `true` when the test may run; prints and returns `false` to skip; panics under CI.
fn runnable(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("gvisor_root::{test}: cannot run: {why} (CI is set, so this is a failure)")
        }
        Some(why) => {
            eprintln!("gvisor_root::{test}: SKIPPED: {why}");
            false
        }
    }
}

struct Fixture {
    rt: GvisorRuntime,
    tokio: tokio::runtime::Runtime,
    base: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Result<Fixture> {
        let base = PathBuf::from(format!(
            "/var/tmp/kiln-gvisor-test-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        let bin = base.join("bin");
        std::fs::create_dir_all(&bin)?;
        for (name, env) in [
            ("kiln-init", "KILN_INIT_BIN"),
            ("kiln-envd", "KILN_ENVD_BIN"),
        ] {
            let src = find_bin(name, env).context(name)?;
            std::fs::copy(&src, bin.join(name)).with_context(|| format!("copying {name}"))?;
        }
        // Required by the runtime once built (it stands in for the template's sudo).
        if let Some(src) = find_bin("kiln-sudo", "KILN_SUDO_BIN") {
            std::fs::copy(&src, bin.join("kiln-sudo")).context("copying kiln-sudo")?;
        }
        let mut opts = GvisorOptions::new(base.join("sandboxes"), bin);
        opts.runsc = runsc();
        opts.platform = std::env::var("KILN_RUNSC_PLATFORM").ok();
        opts.debug_log_dir = std::env::var_os("KILN_TEST_RUNSC_DEBUG").map(PathBuf::from);
        // Mounts the overlay over the idmapped template layer (a range per sandbox).
        opts.helper_exe = PathBuf::from(env!("CARGO_BIN_EXE_kiln-jail"));
        let rt = GvisorRuntime::new(opts).context("creating the gvisor runtime")?;
        eprintln!("runtime: {}", rt.describe());
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Fixture { rt, tokio, base })
    }

    fn config(&self, prefix: &str, network: NetworkMode, memory_mb: u64) -> SandboxConfig {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        SandboxConfig {
            id: format!("{prefix}{n}"),
            rootfs: rootfs(),
            limits: Limits {
                memory_mb,
                cpu_count: 1,
                pids_max: 128,
                disk_mb: kiln_runtime::DEFAULT_DISK_MB,
            },
            network,
            host_ids: kiln_runtime::HostIdMode::PerSandbox,
        }
    }

    fn start(&self, config: &SandboxConfig) -> Result<(SandboxInstance, Duration)> {
        let t = Instant::now();
        let inst = self.tokio.block_on(self.rt.start(config))?;
        Ok((inst, t.elapsed()))
    }

    fn kill(&self, id: &str) -> Result<()> {
        Ok(self.tokio.block_on(self.rt.kill(id))?)
    }

    /// Everything a sandbox created on the host is gone.
    fn assert_clean(&self, id: &str) -> Result<()> {
        let paths = self.rt.paths(id);
        if paths.dir.exists() {
            bail!("{} left behind", paths.dir.display());
        }
        for d in self.rt.cgroup_dirs(id) {
            if d.exists() {
                bail!("cgroup {} left behind", d.display());
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        if mounts.contains(&paths.dir.display().to_string()) {
            bail!("a mount under {} left behind", paths.dir.display());
        }
        let loops = std::process::Command::new("losetup").arg("-a").output()?;
        let loops = String::from_utf8_lossy(&loops.stdout);
        if let Some(l) = loops
            .lines()
            .find(|l| l.contains(&paths.dir.display().to_string()))
        {
            bail!("loop device left behind: {l}");
        }
        if Path::new("/run/netns").join(format!("kiln-{id}")).exists() {
            bail!("network namespace of {id} left behind");
        }
        let root = self.rt.runsc_root();
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(id) {
                    bail!("runsc state {} left behind", e.path().display());
                }
            }
        }
        let procs = std::fs::read_dir("/proc")?
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| {
                let c = String::from_utf8_lossy(c);
                c.contains("runsc") && c.contains(id)
            })
            .count();
        if procs > 0 {
            bail!("{procs} runsc processes of {id} still running");
        }
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// One HTTP/1.1 request over envd's Unix socket; (status, de-chunked body).
fn http(
    socket: &Path,
    method: &str,
    path: &str,
    ctype: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    http_as(socket, None, method, path, ctype, body)
}

/// [`http`] as the sandbox user `user` (envd's `Authorization: Basic base64(user:)`);
/// `None`: the template's default user.
fn http_as(
    socket: &Path,
    user: Option<&str>,
    method: &str,
    path: &str,
    ctype: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    use base64::Engine as _;
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = user
        .map(|u| {
            format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:"))
            )
        })
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: envd\r\nConnection: close\r\nContent-Type: {ctype}\r\nConnect-Protocol-Version: 1\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let mut rest = &raw[split + 4..];
    if !headers.contains("transfer-encoding: chunked") {
        return Ok((status, rest.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

struct Exec {
    stdout: String,
    exit_code: Option<i64>,
}

/// Run `sh -c cmd` through envd's `process.Process/Start` (Connect streaming JSON).
fn exec(socket: &Path, cmd: &str) -> Result<Exec> {
    exec_as(socket, None, cmd)
}

/// [`exec`] as the sandbox user `user` (`None`: the template's default user).
fn exec_as(socket: &Path, user: Option<&str>, cmd: &str) -> Result<Exec> {
    let req =
        serde_json::json!({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}, "stdin": false});
    let payload = serde_json::to_vec(&req)?;
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
    body.extend_from_slice(&payload);
    let (status, resp) = http_as(
        socket,
        user,
        "POST",
        "/process.Process/Start",
        "application/connect+json",
        &body,
    )?;
    if status != 200 {
        bail!(
            "Start answered {status}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    let mut rest = resp.as_slice();
    let mut out = Exec {
        stdout: String::new(),
        exit_code: None,
    };
    use base64::Engine as _;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let msg: Value = serde_json::from_slice(&rest[5..5 + len])?;
        rest = &rest[5 + len..];
        let ev = &msg["event"];
        if let Some(b64) = ev["data"]["stdout"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
            out.stdout.push_str(&String::from_utf8_lossy(&bytes));
        }
        if ev.get("end").is_some() {
            out.exit_code = Some(ev["end"]["exitCode"].as_i64().unwrap_or(0));
        }
    }
    Ok(out)
}

#[test]
fn loopback_sandbox_runs_envd_and_leaves_nothing() {
    if !runnable("loopback_sandbox_runs_envd_and_leaves_nothing") {
        return;
    }
    let f = Fixture::new("lo").expect("fixture");
    let cfg = f.config("gl", NetworkMode::Loopback, 256);
    let result = (|| -> Result<()> {
        let (inst, took) = f.start(&cfg)?;
        eprintln!(
            "gvisor start (envd accepting): {took:?}, sentry pid {}",
            inst.pid
        );
        let (status, body) = http(&inst.envd_socket, "GET", "/health", "text/plain", b"")?;
        if !(200..300).contains(&status) {
            bail!(
                "/health answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let out = exec(
            &inst.envd_socket,
            "echo hi; id -u; hostname; cat /etc/debian_version",
        )?;
        eprintln!("exec: {:?}", out.stdout);
        let lines: Vec<&str> = out.stdout.lines().collect();
        // envd runs commands as the template's default user (E2B's `user`).
        let uid_ok = lines
            .get(1)
            .map(|l| l.parse::<u32>().is_ok())
            .unwrap_or(false);
        if lines.first() != Some(&"hi") || !uid_ok {
            bail!("unexpected output {:?}", out.stdout);
        }
        if lines.get(2) != Some(&cfg.id.as_str()) {
            bail!("hostname is not the id: {:?}", out.stdout);
        }
        if out.exit_code != Some(0) {
            bail!("exit code {:?}", out.exit_code);
        }
        // Host files and processes are invisible: the host's state directory does not
        // exist inside, and the sandbox sees only its own handful of processes.
        let probe = format!(
            "test -e {} && echo visible; ls /proc | grep -c '^[0-9]'; test -w \"$HOME\" && echo homew",
            f.base.display()
        );
        let out = exec(&inst.envd_socket, &probe)?;
        if out.stdout.contains("visible") {
            bail!("host path visible inside");
        }
        let procs: u32 = out.stdout.lines().next().unwrap_or("").trim().parse()?;
        if procs > 10 {
            bail!("{procs} processes visible inside the sandbox");
        }
        if !out.stdout.contains("homew") {
            bail!("the user cannot write its home: {:?}", out.stdout);
        }
        // Files written in the sandbox land in the upper layer owned by the mapped ids.
        exec(&inst.envd_socket, "echo data > /tmp/../var/tmp/written")?;
        let meta = std::fs::metadata(f.rt.paths(&cfg.id).upper().join("var/tmp/written"))?;
        if std::os::unix::fs::MetadataExt::uid(&meta) < kiln_runtime::ID_MAP_BASE {
            bail!(
                "written file owned by host uid {}",
                std::os::unix::fs::MetadataExt::uid(&meta)
            );
        }
        let stats = f.tokio.block_on(f.rt.stats(&cfg.id))?;
        eprintln!("stats: {stats:?}");
        if stats.mem_total_bytes != 256 * 1024 * 1024 || stats.mem_used_bytes == 0 {
            bail!("unexpected stats {stats:?}");
        }
        let adopted = f.tokio.block_on(f.rt.adopt(&cfg.id))?;
        if adopted.map(|a| a.pid) != Some(inst.pid) {
            bail!("adopt did not find the running sandbox");
        }
        if !f.tokio.block_on(f.rt.list())?.contains(&cfg.id) {
            bail!("list misses the sandbox");
        }
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("loopback sandbox");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
    f.kill(&cfg.id).expect("kill is idempotent");
}

#[test]
fn memory_limit_is_enforced() {
    if !runnable("memory_limit_is_enforced") {
        return;
    }
    let f = Fixture::new("mem").expect("fixture");
    let cfg = f.config("gm", NetworkMode::Loopback, 128);
    let result = (|| -> Result<()> {
        let (inst, _) = f.start(&cfg)?;
        // 400 MiB in a 128 MiB sandbox: the allocation must not succeed.
        let out = exec(
            &inst.envd_socket,
            "python3 -c 'b = bytearray(400 * 1024 * 1024); print(\"allocated\")'; echo rc=$?",
        );
        eprintln!(
            "memory hog: {:?}",
            out.as_ref().map(|o| &o.stdout).map_err(|e| e.to_string())
        );
        if let Ok(o) = &out {
            if o.stdout.contains("allocated") {
                bail!("400 MiB allocated in a 128 MiB sandbox");
            }
        }
        // Report (not assert) whether the sandbox survived the OOM: with runsc 2022 the
        // host cgroup's OOM killer may pick the Sentry itself.
        let health = http(&inst.envd_socket, "GET", "/health", "text/plain", b"");
        let oom_kills = std::fs::read_to_string(
            std::path::Path::new("/sys/fs/cgroup/memory/kiln")
                .join(&cfg.id)
                .join("memory.oom_control"),
        )
        .unwrap_or_default();
        eprintln!(
            "after the hog: health {:?}; oom_control {:?}",
            health.map(|h| h.0).map_err(|e| e.to_string()),
            oom_kills.replace('\n', " ")
        );
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("memory limit");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
}

#[test]
fn internet_sandbox_has_dns_and_nat() {
    if !runnable("internet_sandbox_has_dns_and_nat") {
        return;
    }
    let f = Fixture::new("net").expect("fixture");
    let cfg = f.config("gn", NetworkMode::Internet, 256);
    let result = (|| -> Result<()> {
        let (inst, took) = f.start(&cfg)?;
        eprintln!("gvisor internet start: {took:?}");
        let out = exec(
            &inst.envd_socket,
            "cat /etc/resolv.conf | head -1; getent hosts deb.debian.org >/dev/null && echo dns-ok; \
             curl -s -o /dev/null -w 'http=%{http_code}\\n' --max-time 15 http://deb.debian.org/debian/ ; \
             ip -4 addr 2>/dev/null | grep -c 10.77. || cat /proc/net/dev | grep -c eth0",
        )?;
        eprintln!("net: {:?}", out.stdout);
        if !out.stdout.contains("dns-ok") {
            bail!("no DNS inside: {:?}", out.stdout);
        }
        if !out.stdout.contains("http=200") && !out.stdout.contains("http=30") {
            bail!("no HTTP through NAT: {:?}", out.stdout);
        }
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("internet sandbox");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
}

/// The counter a background loop writes to `/var/tmp/count` (the overlay's upper layer,
/// so the host reads it even while the sandbox is paused).
fn host_count(f: &Fixture, id: &str) -> Result<u64> {
    let path = f.rt.paths(id).upper().join("var/tmp/count");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(text.trim().parse()?)
}

/// Start the counting loop (a shell variable: process memory) in the background;
/// its pid inside the sandbox.
fn start_counter(socket: &Path) -> Result<u32> {
    let out = exec(
        socket,
        "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /var/tmp/count.new; \
         mv /var/tmp/count.new /var/tmp/count; sleep 0.05; done' >/dev/null 2>&1 & echo $!",
    )?;
    out.stdout
        .trim()
        .parse()
        .with_context(|| format!("counter pid {:?}", out.stdout))
}

/// The counter stands still for a while (the sandbox is paused).
fn assert_still(f: &Fixture, id: &str) -> Result<u64> {
    let at_pause = host_count(f, id)?;
    std::thread::sleep(Duration::from_millis(400));
    let later = host_count(f, id)?;
    if later != at_pause {
        bail!("the loop went on while paused: {at_pause} → {later}");
    }
    Ok(at_pause)
}

/// After a resume: the same process goes on counting from where it stopped, and envd
/// answers.
fn assert_continues(
    f: &Fixture,
    inst_socket: &Path,
    id: &str,
    at_pause: u64,
    pid: u32,
) -> Result<()> {
    std::thread::sleep(Duration::from_millis(500));
    let after = host_count(f, id)?;
    if after <= at_pause || after > at_pause + 20 {
        bail!("count {at_pause} at pause, {after} 0.5 s after resume: not continued");
    }
    let out = exec(
        inst_socket,
        &format!("test -d /proc/{pid} && echo same-process"),
    )?;
    if out.stdout.trim() != "same-process" {
        bail!("the counting process {pid} is gone: {:?}", out.stdout);
    }
    Ok(())
}

/// The process exists and is not a zombie.
fn sentry_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) S ...`: the state follows the last ')'.
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .trim_start()
        .chars()
        .next();
    pid > 0 && !matches!(state, None | Some('Z') | Some('X'))
}

fn state_json(f: &Fixture, id: &str) -> Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        f.rt.paths(id).state(),
    )?)?)
}

#[test]
fn pause_checkpoints_to_disk_and_resume_restores() {
    if !runnable("pause_checkpoints_to_disk_and_resume_restores") {
        return;
    }
    let f = Fixture::new("pause").expect("fixture");
    let cfg = f.config("gp", NetworkMode::Loopback, 256);
    let result = (|| -> Result<()> {
        let (inst, _) = f.start(&cfg)?;
        let pid = start_counter(&inst.envd_socket)?;
        std::thread::sleep(Duration::from_millis(500));
        // A connection held open across the pause: envd cuts it.
        let mut held = UnixStream::connect(&inst.envd_socket)?;
        held.set_read_timeout(Some(Duration::from_secs(10)))?;
        let t = Instant::now();
        f.tokio.block_on(f.rt.pause(&cfg.id))?;
        eprintln!("pause (checkpoint): {:?}", t.elapsed());
        let mut buf = [0u8; 8];
        if held.read(&mut buf).unwrap_or(0) != 0 {
            bail!("the held connection got data instead of being closed");
        }
        let state = state_json(&f, &cfg.id)?;
        if state["paused"] != "checkpoint" {
            bail!("state.json after pause: {state}");
        }
        let image = f.rt.snapshot_dir(&cfg.id).join("checkpoint.img");
        let size = std::fs::metadata(&image)
            .with_context(|| image.display().to_string())?
            .len();
        eprintln!("checkpoint image: {size} bytes");
        // No Sentry: memory released.
        if sentry_alive(inst.pid) {
            bail!("the Sentry {} still runs after the checkpoint", inst.pid);
        }
        let stats = f.tokio.block_on(f.rt.stats(&cfg.id))?;
        if stats.mem_used_bytes != 0 || stats.mem_total_bytes != 256 * 1024 * 1024 {
            bail!("stats of a checkpointed sandbox: {stats:?}");
        }
        let at_pause = assert_still(&f, &cfg.id)?;
        if f.tokio.block_on(f.rt.adopt(&cfg.id))?.is_none() {
            bail!("adopt lost the checkpointed sandbox");
        }
        let t = Instant::now();
        f.tokio.block_on(f.rt.resume(&cfg.id))?;
        eprintln!("resume (restore): {:?}", t.elapsed());
        assert_continues(&f, &inst.envd_socket, &cfg.id, at_pause, pid)?;
        if f.rt.snapshot_dir(&cfg.id).exists() || !state_json(&f, &cfg.id)?["paused"].is_null() {
            bail!("snapshot or paused state left after the resume");
        }
        if f.tokio
            .block_on(f.rt.adopt(&cfg.id))?
            .is_none_or(|a| !sentry_alive(a.pid))
        {
            bail!("adopt does not find the restored Sentry");
        }

        // A second cycle, then an envd that cannot quiesce (no pid file): runsc pause.
        f.tokio.block_on(f.rt.pause(&cfg.id))?;
        let at_pause = assert_still(&f, &cfg.id)?;
        f.tokio.block_on(f.rt.resume(&cfg.id))?;
        assert_continues(&f, &inst.envd_socket, &cfg.id, at_pause, pid)?;
        std::fs::remove_file(f.rt.paths(&cfg.id).run().join("envd.pid"))?;
        let t = Instant::now();
        f.tokio.block_on(f.rt.pause(&cfg.id))?;
        eprintln!("pause (fallback, runsc pause): {:?}", t.elapsed());
        if state_json(&f, &cfg.id)?["paused"] != "frozen" {
            bail!("fallback not recorded: {}", state_json(&f, &cfg.id)?);
        }
        let at_pause = assert_still(&f, &cfg.id)?;
        if f.tokio.block_on(f.rt.adopt(&cfg.id))?.is_none() {
            bail!("adopt lost the frozen sandbox");
        }
        f.tokio.block_on(f.rt.resume(&cfg.id))?;
        assert_continues(&f, &inst.envd_socket, &cfg.id, at_pause, pid)?;
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("pause and resume");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
}

/// A server restart (a new runtime object adopts the checkpointed sandbox) and a host
/// reboot as far as the host side goes (overlay unmounted, network namespace and
/// cgroups gone), on an Internet sandbox (`create` + `restore --detach`); and `kill`
/// of a checkpointed sandbox leaves nothing.
#[test]
fn checkpointed_sandbox_survives_restart_and_lost_host_side() {
    if !runnable("checkpointed_sandbox_survives_restart_and_lost_host_side") {
        return;
    }
    let f = Fixture::new("reboot").expect("fixture");
    let cfg = f.config("gr", NetworkMode::Internet, 256);
    let second = f.config("gk", NetworkMode::Loopback, 256);
    let result = (|| -> Result<()> {
        let (inst, _) = f.start(&cfg)?;
        let pid = start_counter(&inst.envd_socket)?;
        std::thread::sleep(Duration::from_millis(300));
        f.tokio.block_on(f.rt.pause(&cfg.id))?;
        if state_json(&f, &cfg.id)?["paused"] != "checkpoint" {
            bail!("not checkpointed: {}", state_json(&f, &cfg.id)?);
        }
        let at_pause = assert_still(&f, &cfg.id)?;
        // The host forgets everything outside the sandbox's directory.
        let paths = f.rt.paths(&cfg.id);
        nix::mount::umount2(&paths.rootfs(), nix::mount::MntFlags::MNT_DETACH)?;
        // ... the disk's mount and loop device too (the overlay's upper layer is on it).
        kiln_runtime::jail::disk::unmount(&paths.disk());
        if kiln_runtime::jail::disk::is_mounted(&paths.disk())
            || !kiln_runtime::jail::disk::loop_devices_of(&paths.disk_image()).is_empty()
        {
            bail!("the disk of {} is still mounted", cfg.id);
        }
        let netns = format!("kiln-{}", cfg.id);
        let ok = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .status()?
            .success();
        if !ok {
            bail!("ip netns del {netns}");
        }
        for d in f.rt.cgroup_dirs(&cfg.id) {
            let _ = std::fs::remove_dir(d);
        }
        // The server restarts: a new runtime object.
        let rt = GvisorRuntime::new(f.rt.options().clone())?;
        let adopted = f.tokio.block_on(rt.adopt(&cfg.id))?;
        if adopted.is_none() {
            bail!("a new runtime does not adopt the checkpointed sandbox");
        }
        let t = Instant::now();
        f.tokio.block_on(rt.resume(&cfg.id))?;
        eprintln!(
            "resume (restore, Internet, host side re-made): {:?}",
            t.elapsed()
        );
        assert_continues(&f, &inst.envd_socket, &cfg.id, at_pause, pid)?;
        let out = exec(
            &inst.envd_socket,
            "getent hosts deb.debian.org >/dev/null && echo dns-ok",
        )?;
        if !out.stdout.contains("dns-ok") {
            bail!("no DNS after the restore: {:?}", out.stdout);
        }
        // The overlay mounted again is idmapped to the sandbox's own range.
        id_ranges::check_remounted_range(&f, &rt, &cfg.id)?;

        // Killing a checkpointed sandbox removes its snapshot and everything else.
        let (inst2, _) = f.start(&second)?;
        f.tokio.block_on(f.rt.pause(&second.id))?;
        if !f.rt.is_checkpointed(&second.id) {
            bail!("{} is not checkpointed", second.id);
        }
        drop(inst2);
        f.kill(&second.id)?;
        f.assert_clean(&second.id)?;
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    let _ = f.kill(&second.id);
    result.expect("restart and reboot");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
}

/// A socket a user binds on the root filesystem is a host socket (`--host-uds`),
/// which runsc cannot save: pause keeps the sandbox in RAM instead of losing it.
#[test]
fn a_user_host_socket_makes_pause_fall_back() {
    if !runnable("a_user_host_socket_makes_pause_fall_back") {
        return;
    }
    let f = Fixture::new("usock").expect("fixture");
    let cfg = f.config("gu", NetworkMode::Loopback, 256);
    let result = (|| -> Result<()> {
        let (inst, _) = f.start(&cfg)?;
        exec(
            &inst.envd_socket,
            "nohup python3 -c 'import socket, time; s = socket.socket(socket.AF_UNIX); \
             s.bind(\"/var/tmp/user.sock\"); s.listen(); time.sleep(1000)' >/dev/null 2>&1 &",
        )?;
        let pid = start_counter(&inst.envd_socket)?;
        std::thread::sleep(Duration::from_millis(500));
        f.tokio.block_on(f.rt.pause(&cfg.id))?;
        if state_json(&f, &cfg.id)?["paused"] != "frozen" {
            bail!(
                "expected the runsc pause fallback: {}",
                state_json(&f, &cfg.id)?
            );
        }
        let at_pause = assert_still(&f, &cfg.id)?;
        f.tokio.block_on(f.rt.resume(&cfg.id))?;
        assert_continues(&f, &inst.envd_socket, &cfg.id, at_pause, pid)?;
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("fallback");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
}

fn free_bytes(path: &Path) -> Result<u64> {
    let v = nix::sys::statvfs::statvfs(path)?;
    Ok((v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64))
}

/// A sandbox with a 64 MiB disk cap: `dd` of cap + 50 MiB ends in ENOSPC inside the
/// Sentry, `stats` shows the disk full (used ≈ total ≤ cap), the data directory lost at
/// most about the cap, a second sandbox still writes; `kill` leaves no mount, no loop
/// device (`losetup -a`) and no image.
#[test]
fn gvisor_disk_cap_is_enospc_and_spares_the_host() {
    if !runnable("gvisor_disk_cap_is_enospc_and_spares_the_host") {
        return;
    }
    const CAP_MB: u64 = 64;
    let f = Fixture::new("disk").expect("fixture");
    let mut a = f.config("gd", NetworkMode::Loopback, 256);
    a.limits.disk_mb = CAP_MB;
    let mut b = f.config("ge", NetworkMode::Loopback, 256);
    b.limits.disk_mb = CAP_MB;
    let result = (|| -> Result<()> {
        let (ia, took_a) = f.start(&a)?;
        let (ib, took_b) = f.start(&b)?;
        eprintln!("starts with a {CAP_MB} MiB disk: {took_a:?}, {took_b:?}");
        let free_before = free_bytes(&f.base)?;
        let out = exec(
            &ia.envd_socket,
            &format!(
                "dd if=/dev/zero of=/var/tmp/big bs=1M count={} 2>&1; sync",
                CAP_MB + 50
            ),
        )?;
        eprintln!("dd in a: {:?}", out.stdout);
        if !out.stdout.contains("No space left on device") {
            bail!("dd past the cap did not fail with ENOSPC: {:?}", out.stdout);
        }
        // What the data directory loses for this sandbox is the image's allocated
        // blocks (`df` is printed too, but other work on this host moves it).
        std::process::Command::new("sync").status()?;
        let lost = free_before.saturating_sub(free_bytes(&f.base)?);
        let image = f.rt.paths(&a.id).disk_image();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image)?) * 512;
        eprintln!(
            "image allocated {} MiB; data directory free space dropped {} MiB",
            allocated >> 20,
            lost >> 20
        );
        if !((CAP_MB << 20) * 9 / 10..=CAP_MB << 20).contains(&allocated) {
            bail!("the image holds {allocated} bytes for a {CAP_MB} MiB cap");
        }
        let stats = f.tokio.block_on(f.rt.stats(&a.id))?;
        eprintln!("stats of a: {stats:?}");
        if stats.disk_total_bytes > CAP_MB << 20
            || stats.disk_total_bytes < (CAP_MB << 20) * 9 / 10
            || stats.disk_used_bytes < stats.disk_total_bytes * 95 / 100
        {
            bail!("disk stats after filling a {CAP_MB} MiB disk: {stats:?}");
        }
        let (status, _) = http(&ia.envd_socket, "GET", "/health", "text/plain", b"")?;
        if !(200..300).contains(&status) {
            bail!("the full sandbox's envd answers {status}");
        }
        let out = exec(
            &ib.envd_socket,
            "dd if=/dev/zero of=/var/tmp/other bs=1M count=16 2>&1 && sync && echo wrote",
        )?;
        if !out.stdout.contains("wrote") {
            bail!("sandbox b cannot write: {:?}", out.stdout);
        }
        Ok(())
    })();
    let images = [
        f.rt.paths(&a.id).disk_image(),
        f.rt.paths(&b.id).disk_image(),
    ];
    // a is killed (and checked) while b still runs: no process of b may hold a's disk.
    let killed_a = f.kill(&a.id);
    let clean_a = f.assert_clean(&a.id);
    let killed_b = f.kill(&b.id);
    result.expect("disk cap");
    killed_a.expect("kill a");
    clean_a.expect("a left nothing behind while b runs");
    killed_b.expect("kill b");
    f.assert_clean(&b.id).expect("b left nothing behind");
    for image in images {
        assert!(!image.exists(), "{} left behind", image.display());
    }
}

/// `stop` kills the Sentry, gofer and workload (a background writer included) and
/// deletes runsc's container, but keeps the upper layer readable and unchanging on the
/// host; `adopt` no longer finds the sandbox; `kill` afterwards removes everything.
#[test]
fn gvisor_stop_kills_the_sentry_and_keeps_the_layer() {
    if !runnable("gvisor_stop_kills_the_sentry_and_keeps_the_layer") {
        return;
    }
    let f = Fixture::new("stop").expect("fixture");
    let cfg = f.config("gs", NetworkMode::Loopback, 256);
    let result = (|| -> Result<()> {
        let (inst, _) = f.start(&cfg)?;
        exec(
            &inst.envd_socket,
            "echo kept > /var/tmp/kept; (while :; do date +%s%N >> /var/tmp/bg; sleep 0.01; done) \
             >/dev/null 2>&1 </dev/null &",
        )?;
        let upper = f.rt.upper_dir(&cfg.id).context("no upper dir")?;
        let bg = upper.join("var/tmp/bg");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !bg.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        f.tokio.block_on(f.rt.stop(&cfg.id))?;
        if sentry_alive(inst.pid) {
            bail!("the Sentry survived stop");
        }
        let size = std::fs::metadata(&bg)?.len();
        std::thread::sleep(Duration::from_millis(300));
        if std::fs::metadata(&bg)?.len() != size {
            bail!("the upper layer changed after stop");
        }
        if std::fs::read_to_string(upper.join("var/tmp/kept"))? != "kept\n" {
            bail!("written file unreadable after stop");
        }
        if f.tokio.block_on(f.rt.adopt(&cfg.id))?.is_some() {
            bail!("adopt found a stopped sandbox");
        }
        f.tokio.block_on(f.rt.stop(&cfg.id))?;
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("stop");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
}
