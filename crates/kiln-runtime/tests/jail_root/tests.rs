//! The root-tier tests and a minimal runner.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_runtime::{Limits, NetworkMode, Runtime};

use crate::fixture::{unavailable, Fixture};

const SMALL: Limits = Limits {
    memory_mb: 128,
    cpu_count: 1,
    pids_max: 64,
};

type Test = fn(&Fixture) -> Result<()>;

const TESTS: &[(&str, Test)] = &[
    ("lifecycle_and_isolation", lifecycle_and_isolation),
    ("seccomp_and_privileges", seccomp_and_privileges),
    ("memory_bomb_is_contained", memory_bomb_is_contained),
    ("fork_bomb_is_contained", fork_bomb_is_contained),
    ("internet_isolation", internet_isolation),
    (
        "failed_starts_are_reported_and_cleaned",
        failed_starts_are_reported_and_cleaned,
    ),
    ("real_envd_starts", real_envd_starts),
    (
        "pause_freezes_and_resume_continues",
        pause_freezes_and_resume_continues,
    ),
    ("debian_curl_and_pip", debian_curl_and_pip),
];

/// Value-taking libtest options (their value is not a filter).
const VALUE_FLAGS: &[&str] = &[
    "--format",
    "--color",
    "--test-threads",
    "--skip",
    "--logfile",
    "-Z",
    "--shuffle-seed",
];

/// A libtest-compatible command line (what `cargo test` and `cargo nextest` pass):
/// `--list [--format terse] [--ignored]`, filters, `--exact`; other flags are ignored.
pub fn run(args: &[String]) {
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if VALUE_FLAGS.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            filters.push(a.as_str());
        }
    }
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--list") {
        // No ignored tests; nextest asks for those separately.
        if !has("--ignored") {
            for (name, _) in TESTS {
                println!("{name}: test");
            }
        }
        return;
    }
    let exact = has("--exact");
    let selected: Vec<&(&str, Test)> = TESTS
        .iter()
        .filter(|(n, _)| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| if exact { n == f } else { n.contains(f) })
        })
        .collect();
    if let Some(why) = unavailable() {
        if std::env::var_os("CI").is_some() {
            eprintln!("jail_root: cannot run the root-tier jail tests: {why} (CI is set, so this is a failure)");
            std::process::exit(1);
        }
        println!(
            "jail_root: SKIPPED {} root-tier tests: {why}",
            selected.len()
        );
        return;
    }
    // One root-tier test at a time on this host, also across processes (nextest runs
    // each test in its own process): they share network slots, firewall chains and
    // two CPUs, and the bombs would disturb each other's timing.
    let _lock = match crate::fixture::host_lock() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("jail_root: taking the host-wide test lock: {e:#}");
            std::process::exit(1);
        }
    };
    let fx = match Fixture::new() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("jail_root: fixture setup failed: {e:#}");
            std::process::exit(1);
        }
    };
    let mut failed = Vec::new();
    for (name, test) in &selected {
        println!("test {name} ...");
        let t = Instant::now();
        match test(&fx) {
            Ok(()) => println!("test {name} ... ok ({:?})", t.elapsed()),
            Err(e) => {
                println!("test {name} ... FAILED ({:?})\n{e:#}", t.elapsed());
                failed.push(*name);
            }
        }
    }
    drop(fx);
    println!(
        "\njail_root: {} passed, {} failed {failed:?}",
        selected.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

fn lifecycle_and_isolation(fx: &Fixture) -> Result<()> {
    let a = fx.config("iso", NetworkMode::Loopback, SMALL);
    let ia = fx.start(&a)?;
    ensure!(fx.ok(&ia, "id -u")? == "0", "not root inside");
    ensure!(fx.ok(&ia, "hostname")? == a.id, "hostname");
    ensure!(fx.ok(&ia, "cat /etc/hostname")? == a.id, "/etc/hostname");
    ensure!(
        fx.ok(&ia, "tr '\\0' ' ' </proc/1/cmdline")?
            .contains("kiln-init"),
        "PID 1 is not kiln-init"
    );
    // Host files and processes are invisible.
    ensure!(
        fx.sh(&ia, "ls /work /var/tmp/kiln-jail-test*")?.0 != 0,
        "host paths visible"
    );
    // Only the sandbox's own processes: init, the agent and this command's pipeline.
    let comms = fx.ok(&ia, "cat /proc/[0-9]*/comm | sort -u | tr '\\n' ' '")?;
    // `exe` is seen now and then under load: a transient name of one of the sandbox's
    // own processes. The pid count below is what rules out the host's processes (the
    // host runs hundreds).
    let allowed = ["cat", "exe", "kiln-init", "probe", "sh", "sort", "tr"];
    ensure!(
        comms.contains("kiln-init") && comms.split_whitespace().all(|c| allowed.contains(&c)),
        "sandbox sees processes: {comms}"
    );
    let pids: usize = fx.ok(&ia, "ls -d /proc/[0-9]* | wc -l")?.trim().parse()?;
    ensure!(pids <= 10, "sandbox sees {pids} processes");
    let mounts = fx.ok(&ia, "cut -d' ' -f2 /proc/self/mounts | sort | tr '\\n' ' '")?;
    ensure!(
        mounts == "/ /dev /dev/full /dev/null /dev/pts /dev/random /dev/shm /dev/tty /dev/urandom /dev/zero /opt/kiln/bin /proc /run/kiln /tmp",
        "unexpected mounts: {mounts}"
    );
    // Devices, PTYs, tmpfs, read-only guest binaries, private /run/kiln.
    fx.ok(&ia, "echo x >/dev/null && head -c 8 /dev/urandom | wc -c && test -c /dev/pts/ptmx && test -L /dev/ptmx")?;
    ensure!(fx.ok(&ia, "stat -c %a /tmp")? == "1777", "/tmp mode");
    ensure!(
        fx.sh(&ia, "touch /opt/kiln/bin/x")?.0 != 0,
        "/opt/kiln/bin writable"
    );
    ensure!(
        fx.ok(&ia, "stat -c %a /run/kiln")? == "700",
        "/run/kiln mode"
    );
    ensure!(
        fx.ok(&ia, "ip link | grep -c '^[0-9]'")? == "1",
        "loopback sandbox has more than lo"
    );
    // Loopback works (busybox's ping needs the CAP_NET_RAW no sandbox has; nc instead).
    ensure!(
        fx.ok(
            &ia,
            "(nc -l -p 9000 -e echo lo >/dev/null 2>&1 </dev/null &); sleep 0.2; \
             timeout 5 nc -w 2 127.0.0.1 9000 </dev/null"
        )? == "lo",
        "loopback TCP does not work"
    );
    fx.ok(
        &ia,
        "echo secret-a > /tmp/marker && echo persisted > /root/file",
    )?;
    ensure!(
        fx.rt.paths(&a.id).upper().join("root/file").exists(),
        "write did not land in the upper layer"
    );

    // A second sandbox sees neither the first one's files nor its processes.
    let b = fx.config("iso", NetworkMode::Loopback, SMALL);
    let ib = fx.start(&b)?;
    ensure!(
        fx.sh(&ib, "cat /tmp/marker /root/file")?.0 != 0,
        "sandbox b sees a's files"
    );
    let pb = fx.ok(&ib, "cat /proc/[0-9]*/comm | sort -u | tr '\\n' ' '")?;
    ensure!(
        pb.split_whitespace().all(|c| allowed.contains(&c)),
        "sandbox b sees processes: {pb}"
    );
    ensure!(
        fx.ok(&ib, "cat /proc/1/cgroup")?
            .lines()
            .all(|l| l.ends_with(":/")),
        "cgroup namespace root"
    );

    // Runtime bookkeeping.
    let stats = fx.tokio.block_on(fx.rt.stats(&a.id))?;
    ensure!(stats.mem_total_bytes == 128 << 20, "memory limit {stats:?}");
    ensure!(
        stats.cpu_usage_ns > 0 && stats.mem_used_bytes > 0 && stats.disk_used_bytes > 0,
        "{stats:?}"
    );
    let list = fx.tokio.block_on(fx.rt.list())?;
    ensure!(
        list.contains(&a.id) && list.contains(&b.id),
        "list {list:?}"
    );
    let adopted = fx
        .tokio
        .block_on(fx.rt.adopt(&a.id))?
        .context("adopt found nothing")?;
    ensure!(adopted.pid == ia.pid, "adopt pid");
    ensure!(
        fx.tokio.block_on(fx.rt.start(&a)).is_err(),
        "duplicate id accepted"
    );

    fx.kill_and_check(&a.id, None)?;
    ensure!(
        fx.tokio.block_on(fx.rt.adopt(&a.id))?.is_none(),
        "adopt after kill"
    );
    // b is unaffected by a's kill.
    fx.ok(&ib, "true")?;
    fx.kill_and_check(&b.id, None)
}

fn seccomp_and_privileges(fx: &Fixture) -> Result<()> {
    let c = fx.config("sec", NetworkMode::Loopback, SMALL);
    let i = fx.start(&c)?;
    let status = fx.ok(
        &i,
        "grep -E '^(NoNewPrivs|Seccomp|CapBnd)' /proc/self/status",
    )?;
    ensure!(
        status.contains("NoNewPrivs:\t0") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    let capbnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd"))
        .unwrap_or_default();
    let bits = u64::from_str_radix(capbnd.split_whitespace().nth(1).unwrap_or("ffff"), 16)?;
    ensure!(
        bits & (1 << 21) == 0
            && bits & (1 << 12) == 0
            && bits & (1 << 13) == 0
            && bits & (1 << 16) == 0,
        "CAP_SYS_ADMIN/NET_ADMIN/NET_RAW/SYS_MODULE kept: {capbnd}"
    );
    let out = fx.ok(&i, "/opt/kiln/bin/probe syscalls")?;
    println!(
        "{}",
        out.lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for line in out.lines() {
        let (name, result) = line.split_once(' ').unwrap_or((line, ""));
        let want = match name {
            "clone3" => "ENOSYS",
            "unshare_bogus" => "EINVAL",
            _ => "EPERM",
        };
        ensure!(result == want, "{name}: got {result}, want {want}");
    }
    ensure!(
        fx.sh(&i, "mount -t tmpfs none /mnt")?.0 != 0,
        "mount worked"
    );
    ensure!(
        fx.sh(&i, "unshare -U true")?.0 != 0,
        "nested user namespace worked"
    );
    ensure!(
        fx.sh(&i, "hostname other")?.0 != 0,
        "sethostname worked without CAP_SYS_ADMIN"
    );
    fx.ok(&i, "sh -c 'exit 0' && (sleep 0.1 &) && wait")?;
    fx.kill_and_check(&c.id, None)
}

fn memory_bomb_is_contained(fx: &Fixture) -> Result<()> {
    let c = fx.config(
        "mem",
        NetworkMode::Loopback,
        Limits {
            memory_mb: 64,
            cpu_count: 1,
            pids_max: 64,
        },
    );
    let i = fx.start(&c)?;
    let (code, out) = fx.sh(&i, "dd if=/dev/zero of=/dev/null bs=256M count=1")?;
    ensure!(
        code != 0,
        "256 MiB allocation succeeded under a 64 MiB limit: {out}"
    );
    // tmpfs pages are charged to the sandbox; the write fails (ENOSPC at the tmpfs
    // size, or the charge fails first) instead of OOM-killing envd.
    let (code, out) = fx.sh(&i, "head -c 200m /dev/zero > /tmp/fill")?;
    ensure!(
        code != 0,
        "200 MiB written to /tmp under a 64 MiB limit: {out}"
    );
    fx.ok(&i, "rm -f /tmp/fill")?;
    let oom = std::fs::read_to_string(
        "/sys/fs/cgroup/memory/kiln/".to_string() + &c.id + "/memory.oom_control",
    )
    .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/kiln/{}/memory.events", c.id)))?;
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    ensure!(
        kills >= 1,
        "no OOM kill recorded in the sandbox's cgroup: {oom}"
    );
    ensure!(fx.ok(&i, "echo alive")? == "alive", "sandbox died");
    ensure!(
        i.pid > 0
            && fx
                .rt
                .read_state(&c.id)
                .map(|s| s.is_alive())
                .unwrap_or(false),
        "PID 1 died"
    );
    fx.kill_and_check(&c.id, None)
}

fn fork_bomb_is_contained(fx: &Fixture) -> Result<()> {
    let c = fx.config(
        "fork",
        NetworkMode::Loopback,
        Limits {
            memory_mb: 256,
            cpu_count: 1,
            pids_max: 48,
        },
    );
    let i = fx.start(&c)?;
    fx.ok(&i, "(b() { b | b & }; b) >/dev/null 2>&1 </dev/null &")?;
    let pids_dir = format!("/sys/fs/cgroup/pids/kiln/{}", c.id);
    let v2_dir = format!("/sys/fs/cgroup/kiln/{}", c.id);
    let events = || {
        std::fs::read_to_string(format!("{pids_dir}/pids.events"))
            .or_else(|_| std::fs::read_to_string(format!("{v2_dir}/pids.events")))
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let hits = loop {
        let hits: u64 = events()
            .lines()
            .find_map(|l| l.strip_prefix("max "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if hits > 0 || Instant::now() > deadline {
            break hits;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(hits > 0, "the pids limit was never hit: {}", events());
    let current: u64 = std::fs::read_to_string(format!("{pids_dir}/pids.current"))
        .or_else(|_| std::fs::read_to_string(format!("{v2_dir}/pids.current")))?
        .trim()
        .parse()?;
    ensure!(current <= 48, "pids.current {current} over the limit");
    // The host still forks fine.
    ensure!(
        std::process::Command::new("true").status()?.success(),
        "host cannot fork"
    );
    // Kill must clean up a saturated sandbox.
    fx.kill_and_check(&c.id, None)
}

/// Pause stops every process where it is (a counter stands still), resume lets it go
/// on from the same value, and a paused sandbox can still be killed cleanly.
fn pause_freezes_and_resume_continues(fx: &Fixture) -> Result<()> {
    let c = fx.config("pause", NetworkMode::Loopback, SMALL);
    let i = fx.start(&c)?;
    fx.ok(
        &i,
        // Written with a rename, so the host never reads a half-written file.
        "(i=0; while :; do i=$((i+1)); echo $i > /root/count.new; mv /root/count.new /root/count; \
         sleep 0.02; done) >/dev/null 2>&1 </dev/null &",
    )?;
    let counter = fx.rt.paths(&c.id).dir.join("upper/root/count");
    let read = || -> u64 {
        std::fs::read_to_string(&counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(300));
    ensure!(read() > 0, "the counter never started");
    fx.tokio.block_on(fx.rt.pause(&c.id))?;
    let frozen_at = read();
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        read() == frozen_at,
        "the counter moved while paused: {frozen_at} -> {}",
        read()
    );
    fx.tokio.block_on(fx.rt.resume(&c.id))?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(read() > frozen_at, "the counter did not go on after resume");
    // Still alive and answering, and kill works on a paused sandbox too.
    fx.ok(&i, "true")?;
    fx.tokio.block_on(fx.rt.pause(&c.id))?;
    fx.kill_and_check(&c.id, None)
}

fn host_ipv4() -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "route", "get", "1.1.1.1"])
        .output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let mut words = s.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            return words.next().map(str::to_string).context("no src");
        }
    }
    bail!("cannot find the host's address in {s:?}")
}

fn internet_isolation(fx: &Fixture) -> Result<()> {
    let listener = TcpListener::bind("0.0.0.0:0")?;
    let port = listener.local_addr()?.port();
    let host = host_ipv4()?;
    let a = fx.config("net", NetworkMode::Internet, SMALL);
    let b = fx.config("net", NetworkMode::Internet, SMALL);
    let ia = fx.start(&a)?;
    let ib = fx.start(&b)?;
    let slot_a = fx
        .rt
        .read_state(&a.id)
        .and_then(|s| s.slot)
        .context("a has no slot")?;
    let slot_b = fx
        .rt
        .read_state(&b.id)
        .and_then(|s| s.slot)
        .context("b has no slot")?;
    let addr = fx.ok(&ia, "ip -4 -o addr show eth0")?;
    ensure!(
        addr.contains(&format!("{}/30", slot_a.guest_ip())),
        "{addr}"
    );
    ensure!(
        fx.ok(&ia, "cat /etc/resolv.conf")?.contains("nameserver"),
        "no resolv.conf"
    );

    // Outside world: DNS and HTTP work through the NAT. (busybox-static's wget cannot
    // resolve names: static glibc has no NSS, so resolve with nslookup and use nc,
    // whose stdin stays open a while: busybox nc quits at stdin EOF.)
    let dns = fx.ok(&ia, "nslookup deb.debian.org")?;
    ensure!(dns.contains("Address"), "{dns}");
    let http = fx.ok(
        &ia,
        "ip=$(nslookup -type=a deb.debian.org | awk '/^Address: /{print $2; exit}'); \
         (printf 'GET /debian/ HTTP/1.0\\r\\nHost: deb.debian.org\\r\\n\\r\\n'; sleep 2) \
         | timeout 10 nc -w 5 $ip 80 | head -1",
    )?;
    ensure!(
        http.starts_with("HTTP/1."),
        "no HTTP answer from deb.debian.org: {http:?}"
    );

    // The host: neither its own address, nor the veth's host end, nor 127.0.0.1.
    let hip = slot_a.host_ip().to_string();
    for target in [host.as_str(), hip.as_str(), "127.0.0.1"] {
        let (code, out) = fx.sh(
            &ia,
            &format!("timeout 5 nc -w 2 {target} {port} </dev/null"),
        )?;
        ensure!(
            code != 0,
            "host port {target}:{port} reachable from the sandbox: {out}"
        );
    }
    let host_v6 = std::fs::read_to_string(format!(
        "/proc/sys/net/ipv6/conf/{}/disable_ipv6",
        slot_a.host_if()
    ))?;
    ensure!(host_v6.trim() == "1", "IPv6 enabled on the host end");

    // Another sandbox: b serves, b itself can connect (control), a cannot.
    let serve = "(nc -l -p 8080 -e echo hi >/dev/null 2>&1 </dev/null &); sleep 0.2";
    let bip = slot_b.guest_ip();
    let connect = format!("timeout 5 nc -w 2 {bip} 8080 </dev/null");
    fx.ok(&ib, serve)?;
    ensure!(
        fx.ok(&ib, &connect)? == "hi",
        "control: b cannot reach its own server"
    );
    fx.ok(&ib, serve)?;
    let (code, out) = fx.sh(&ia, &connect)?;
    ensure!(
        code != 0 && !out.contains("hi"),
        "sandbox b reachable from a: {out}"
    );
    drop(listener);

    fx.kill_and_check(&a.id, Some(&slot_a.host_if()))?;
    fx.kill_and_check(&b.id, Some(&slot_b.host_if()))
}

fn failed_starts_are_reported_and_cleaned(fx: &Fixture) -> Result<()> {
    // The helper fails (bad overlay layer path): its error reaches the caller.
    let bad_root = fx.base.join("bad,root");
    std::fs::create_dir_all(&bad_root)?;
    let mut c = fx.config("fail", NetworkMode::Internet, SMALL);
    c.rootfs = bad_root;
    let err = fx
        .tokio
        .block_on(fx.rt.start(&c))
        .err()
        .context("start with a bad rootfs succeeded")?;
    println!("    error: {err}");
    ensure!(
        err.to_string().contains("overlay layer"),
        "unhelpful error: {err}"
    );
    ensure!(
        fx.leftovers(&c.id, None).is_empty(),
        "{:?}",
        fx.leftovers(&c.id, None)
    );

    // envd exits at once: the error says so and carries the sandbox's log.
    let mut opts = fx.rt.options().clone();
    opts.envd_command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo envd-is-broken; exit 3".into(),
    ]);
    let rt = kiln_runtime::jail::JailRuntime::new(opts)?;
    let c = fx.config("fail", NetworkMode::Loopback, SMALL);
    let err = fx
        .tokio
        .block_on(rt.start(&c))
        .err()
        .context("start with a dying envd succeeded")?;
    let msg = err.to_string();
    println!("    error: {}", msg.lines().next().unwrap_or_default());
    ensure!(
        msg.contains("sandbox exited") && msg.contains("envd-is-broken"),
        "unhelpful error: {msg}"
    );
    ensure!(
        fx.leftovers(&c.id, None).is_empty(),
        "{:?}",
        fx.leftovers(&c.id, None)
    );
    Ok(())
}

/// The production path: kiln-init's default command, the real kiln-envd.
fn real_envd_starts(fx: &Fixture) -> Result<()> {
    if !fx.rt.options().guest_bin_dir.join("kiln-envd").is_file() {
        if std::env::var_os("CI").is_some() {
            bail!("kiln-envd not built (cargo build -p kiln-envd)");
        }
        println!("    SKIPPED: kiln-envd not built (cargo build -p kiln-envd)");
        return Ok(());
    }
    let rt = fx.real_envd_runtime()?;
    let c = fx.config("envd", NetworkMode::Loopback, SMALL);
    let i = fx.tokio.block_on(rt.start(&c))?;
    let mut s = std::os::unix::net::UnixStream::connect(&i.envd_socket)?;
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.lines().next().unwrap_or_default().to_string();
    println!("    envd /health: {status}");
    ensure!(
        status.starts_with("HTTP/1.1 2"),
        "envd /health answered {resp:?}"
    );
    fx.tokio.block_on(rt.kill(&c.id))?;
    ensure!(
        fx.leftovers(&c.id, None).is_empty(),
        "{:?}",
        fx.leftovers(&c.id, None)
    );
    Ok(())
}

/// `curl https://pypi.org/simple/` and `pip download` from a Debian Internet sandbox.
fn debian_curl_and_pip(fx: &Fixture) -> Result<()> {
    let Some(rootfs) = std::env::var_os("KILN_TEST_DEBIAN_ROOTFS") else {
        if std::env::var_os("CI").is_some() {
            anyhow::bail!("CI is set but KILN_TEST_DEBIAN_ROOTFS is not (scripts/test sets it)");
        }
        println!("    SKIPPED: set KILN_TEST_DEBIAN_ROOTFS to a Debian rootfs (with curl, python3-pip) owned by 100000+");
        return Ok(());
    };
    let mut c = fx.config(
        "deb",
        NetworkMode::Internet,
        Limits {
            memory_mb: 1024,
            cpu_count: 2,
            pids_max: 256,
        },
    );
    c.rootfs = rootfs.into();
    let i = fx.start(&c)?;
    let code = fx.ok(
        &i,
        "curl -sS -o /dev/null -w '%{http_code}' https://pypi.org/simple/",
    )?;
    ensure!(
        code == "200",
        "curl https://pypi.org/simple/ answered {code}"
    );
    let pip = fx.ok(
        &i,
        "cd /tmp && pip download --no-deps -q -d /tmp/dl six 2>&1 && ls /tmp/dl",
    )?;
    ensure!(pip.contains("six"), "pip download: {pip}");
    println!("    curl: {code}; pip download: {pip}");
    let slot = fx
        .rt
        .read_state(&c.id)
        .and_then(|s| s.slot)
        .context("no slot")?;
    fx.kill_and_check(&c.id, Some(&slot.host_if()))
}
