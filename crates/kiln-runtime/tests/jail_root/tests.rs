//! The root-tier tests and a minimal runner.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_runtime::{Limits, NetworkMode, Runtime, SandboxConfig};

use crate::fixture::{unavailable, Fixture};
use crate::id_ranges;

pub const SMALL: Limits = Limits {
    memory_mb: 128,
    cpu_count: 1,
    pids_max: 64,
    disk_mb: kiln_runtime::DEFAULT_DISK_MB,
};

type Test = fn(&Fixture) -> Result<()>;

const TESTS: &[(&str, Test)] = &[
    ("lifecycle_and_isolation", lifecycle_and_isolation),
    ("seccomp_and_privileges", seccomp_and_privileges),
    ("memory_bomb_is_contained", memory_bomb_is_contained),
    ("fork_bomb_is_contained", fork_bomb_is_contained),
    ("internet_isolation", internet_isolation),
    (
        "private_egress_is_denied_unless_allowed",
        private_egress_is_denied_unless_allowed,
    ),
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
    (
        "debian_userland_under_the_seccomp_allow_list",
        debian_userland_under_the_seccomp_allow_list,
    ),
    (
        "disk_cap_is_enospc_and_spares_the_host",
        disk_cap_is_enospc_and_spares_the_host,
    ),
    (
        "stop_kills_every_process_and_keeps_the_layer",
        stop_kills_every_process_and_keeps_the_layer,
    ),
    (
        "each_sandbox_has_a_host_id_range_of_its_own",
        id_ranges::each_sandbox_has_a_host_id_range_of_its_own,
    ),
    (
        "start_cost_of_a_range_of_its_own",
        id_ranges::start_cost_of_a_range_of_its_own,
    ),
    (
        "debian_owners_in_a_range_of_its_own",
        id_ranges::debian_owners_in_a_range_of_its_own,
    ),
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
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.len() == crate::agent::PROBES.len(),
        "probe printed {} lines for {} probes",
        lines.len(),
        crate::agent::PROBES.len()
    );
    for (line, (probe, _, _, want)) in lines.iter().zip(crate::agent::PROBES) {
        let (name, result) = line.split_once(' ').unwrap_or((line, ""));
        ensure!(name == *probe, "probe order: {name} vs {probe}");
        ensure!(result == *want, "{name}: got {result}, want {want}");
    }
    // Ordinary programs under the allow-list: ptrace of an own child, PTYs, inotify,
    // threads, fork + exec; and a setuid-root program run by uid 1000 gains euid 0
    // (how sudo works: no_new_privs is off).
    let everyday = fx.ok(&i, "/opt/kiln/bin/probe everyday")?;
    println!("      {}", everyday.replace('\n', "; "));
    ensure!(
        everyday.lines().count() == 5 && everyday.lines().all(|l| l.ends_with(" OK")),
        "everyday work failed under the filter: {everyday}"
    );
    let euid = fx.ok(
        &i,
        "cp /opt/kiln/bin/probe /root/suid && chmod 4755 /root/suid && \
         /opt/kiln/bin/probe setuid /root/suid",
    )?;
    ensure!(euid == "euid=0", "setuid-root program as uid 1000: {euid}");
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
            disk_mb: kiln_runtime::DEFAULT_DISK_MB,
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
            disk_mb: kiln_runtime::DEFAULT_DISK_MB,
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
    let counter = fx.rt.paths(&c.id).upper().join("root/count");
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

/// A private network of the test's own: a network namespace holding 10.213.0.1 with
/// a TCP listener that answers "private", reached from the host through a veth whose
/// host end is 10.213.0.2/24. Removed on drop.
struct PrivateNet {
    ns: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

const PRIVATE_IP: &str = "10.213.0.1";
const PRIVATE_PORT: u16 = 8213;

impl PrivateNet {
    fn new() -> Result<PrivateNet> {
        let ns = format!("kilnt{}", std::process::id());
        let ip = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("ip").args(args).output()?;
            ensure!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        // Host end named outside `kv*`: Kiln's chains treat kv+ as sandboxes.
        let host_if = "kpt0";
        let _ = ip(&["link", "del", host_if]);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let net = PrivateNet {
            ns: ns.clone(),
            stop: Default::default(),
            server: None,
        };
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["addr", "add", "10.213.0.2/24", "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{PRIVATE_IP}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // The listener: a thread that enters the namespace (setns acts on the calling
        // thread only) and answers every connection.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = net.stop.clone();
        let ns_path = format!("/run/netns/{ns}");
        let server = std::thread::spawn(move || {
            let bound = std::fs::File::open(&ns_path)
                .map_err(anyhow::Error::from)
                .and_then(|f| {
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let l = TcpListener::bind((PRIVATE_IP, PRIVATE_PORT))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
            let listener = match bound {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        use std::io::Write;
                        let _ = c.write_all(b"private\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let mut net = net;
        net.server = Some(server);
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the private listener did not start")??;
        Ok(net)
    }
}

impl Drop for PrivateNet {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        // Deleting the namespace deletes the veth pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// Egress to private address space: a sandbox with Internet access cannot reach a
/// listener on 10.213.0.1 (a namespace of this test's own), can once the operator
/// allows 10.213.0.0/24, and cannot again once the allow-list is gone; an operator's
/// rule in KILN-USER applies before Kiln's and survives a reinstall of Kiln's rules.
fn private_egress_is_denied_unless_allowed(fx: &Fixture) -> Result<()> {
    let private = PrivateNet::new()?;
    // Control: the host reaches the listener.
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("{PRIVATE_IP}:{PRIVATE_PORT}").parse()?,
        Duration::from_secs(2),
    )
    .context("control: the host cannot reach the private listener")?;
    let mut hello = String::new();
    use std::io::Read;
    s.read_to_string(&mut hello)?;
    ensure!(hello == "private\n", "control: {hello:?}");

    let c = fx.config("egress", NetworkMode::Internet, SMALL);
    let i = fx.start(&c)?;
    let slot = fx
        .rt
        .read_state(&c.id)
        .and_then(|s| s.slot)
        .context("no slot")?;
    let connect = format!("timeout 5 nc -w 2 {PRIVATE_IP} {PRIVATE_PORT} </dev/null");
    let denied = |when: &str| -> Result<()> {
        let (code, out) = fx.sh(&i, &connect)?;
        ensure!(
            code != 0 && !out.contains("private"),
            "{when}: the sandbox reached {PRIVATE_IP}:{PRIVATE_PORT}: {out}"
        );
        Ok(())
    };
    let allowed = |when: &str| -> Result<()> {
        let out = fx.ok(&i, &connect)?;
        ensure!(out == "private", "{when}: {out:?}");
        Ok(())
    };
    denied("default rules")?;
    // The resolvers are often private too (10.x here): DNS still works.
    let dns = fx.ok(&i, "nslookup deb.debian.org")?;
    ensure!(
        dns.contains("Address"),
        "DNS broken by the egress rules: {dns}"
    );

    // The operator allows the range: runtime creation installs the rules.
    let mut opts = fx.rt.options().clone();
    opts.egress_allow = kiln_runtime::jail::net::parse_egress_allow("10.213.0.0/24")?;
    kiln_runtime::jail::JailRuntime::new(opts.clone())?;
    let result = allowed("10.213.0.0/24 allowed").and_then(|()| {
        opts.egress_allow.clear();
        kiln_runtime::jail::JailRuntime::new(opts.clone())?;
        denied("allow-list emptied again")
    });
    if result.is_err() {
        opts.egress_allow.clear();
        let _ = kiln_runtime::jail::JailRuntime::new(opts.clone());
    }
    result?;

    // The operator's chain: a rule there applies before Kiln's reject, and Kiln's
    // reinstall leaves it in place.
    let rule = [
        "-i", "kv+", "-d", PRIVATE_IP, "-p", "tcp", "--dport", "8213", "-j", "ACCEPT",
    ];
    let iptables = |op: &str| {
        std::process::Command::new("iptables")
            .args(["-w", op, "KILN-USER"])
            .args(rule)
            .status()
    };
    ensure!(iptables("-A")?.success(), "adding an operator rule");
    let result = (|| {
        allowed("operator's ACCEPT in KILN-USER")?;
        kiln_runtime::jail::JailRuntime::new(opts.clone())?;
        ensure!(
            iptables("-C")?.success(),
            "a reinstall of Kiln's rules flushed KILN-USER"
        );
        allowed("operator's rule after a reinstall")
    })();
    let _ = iptables("-D");
    result?;
    denied("operator's rule removed")?;
    drop(private);
    fx.kill_and_check(&c.id, Some(&slot.host_if()))
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

/// An Internet sandbox on the Debian rootfs at `KILN_TEST_DEBIAN_ROOTFS` (owned by
/// 100000+, with `needs`); `None` (skipped, with the reason printed) when it is unset,
/// an error under CI.
pub fn debian_config(fx: &Fixture, name: &str, needs: &str) -> Result<Option<SandboxConfig>> {
    let Some(rootfs) = std::env::var_os("KILN_TEST_DEBIAN_ROOTFS") else {
        if std::env::var_os("CI").is_some() {
            anyhow::bail!("CI is set but KILN_TEST_DEBIAN_ROOTFS is not (scripts/test sets it)");
        }
        println!("    SKIPPED: set KILN_TEST_DEBIAN_ROOTFS to a Debian rootfs ({needs}) owned by 100000+");
        return Ok(None);
    };
    let mut c = fx.config(
        name,
        NetworkMode::Internet,
        Limits {
            memory_mb: 1024,
            cpu_count: 2,
            pids_max: 256,
            disk_mb: kiln_runtime::DEFAULT_DISK_MB,
        },
    );
    c.rootfs = rootfs.into();
    Ok(Some(c))
}

/// `curl https://pypi.org/simple/` and `pip download` from a Debian Internet sandbox.
fn debian_curl_and_pip(fx: &Fixture) -> Result<()> {
    let Some(c) = debian_config(fx, "deb", "with curl, python3-pip")? else {
        return Ok(());
    };
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

/// Free bytes of the filesystem holding `path` (what `df` shows as available).
fn free_bytes(path: &std::path::Path) -> Result<u64> {
    let v = nix::sys::statvfs::statvfs(path)?;
    Ok((v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64))
}

/// A sandbox with a 64 MiB disk cap: `dd` of cap + 50 MiB ends in ENOSPC, `stats`
/// shows the disk full (used ≈ total ≤ cap), the data directory lost at most about
/// the cap, a second sandbox still writes; `kill` leaves no mount, no loop device
/// (`losetup -a`) and no image. Also prints what the disk adds to a cold start.
fn disk_cap_is_enospc_and_spares_the_host(fx: &Fixture) -> Result<()> {
    const CAP_MB: u64 = 64;
    let limits = Limits {
        disk_mb: CAP_MB,
        ..SMALL
    };
    let data_dir = fx.rt.options().state_dir.clone();
    let a = fx.config("disk", NetworkMode::Loopback, limits);
    let b = fx.config("disk", NetworkMode::Loopback, limits);
    let ia = fx.start(&a)?;
    let ib = fx.start(&b)?;
    let image = fx.rt.paths(&a.id).disk_image();
    ensure!(
        !kiln_runtime::jail::disk::loop_devices_of(&image).is_empty(),
        "no loop device backs {}",
        image.display()
    );
    let free_before = free_bytes(&data_dir)?;
    let (code, out) = fx.sh(
        &ia,
        &format!(
            "dd if=/dev/zero of=/big bs=1M count={} 2>&1; sync",
            CAP_MB + 50
        ),
    )?;
    println!(
        "      dd in a: exit {code}: {}",
        out.trim().replace('\n', "; ")
    );
    ensure!(
        out.contains("No space left on device"),
        "dd past the cap did not fail with ENOSPC: {out}"
    );
    // Flush the sandbox's disk to its image before measuring the host. What the
    // data directory loses for this sandbox is the image's allocated blocks (`df` of
    // the data directory is printed too, but other work on this host moves it).
    std::process::Command::new("sync").status()?;
    let lost = free_before.saturating_sub(free_bytes(&data_dir)?);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image)?) * 512;
    println!(
        "      image allocated {} MiB; data directory free space dropped {} MiB",
        allocated >> 20,
        lost >> 20
    );
    ensure!(
        ((CAP_MB << 20) * 9 / 10..=CAP_MB << 20).contains(&allocated),
        "the image holds {allocated} bytes for a {CAP_MB} MiB cap"
    );
    let stats = fx.tokio.block_on(fx.rt.stats(&a.id))?;
    println!("      stats of a: {stats:?}");
    ensure!(
        stats.disk_total_bytes <= CAP_MB << 20 && stats.disk_total_bytes >= (CAP_MB << 20) * 9 / 10,
        "disk total {} for a {CAP_MB} MiB cap",
        stats.disk_total_bytes
    );
    ensure!(
        stats.disk_used_bytes >= stats.disk_total_bytes * 95 / 100,
        "disk used {} of {} after filling it",
        stats.disk_used_bytes,
        stats.disk_total_bytes
    );
    // The full sandbox still answers; another one still writes.
    ensure!(
        fx.ok(&ia, "echo alive")? == "alive",
        "the full sandbox died"
    );
    fx.ok(&ib, "dd if=/dev/zero of=/other bs=1M count=16 2>&1 && sync")?;
    let sb = fx.tokio.block_on(fx.rt.stats(&b.id))?;
    ensure!(
        sb.disk_used_bytes >= 16 << 20 && sb.disk_used_bytes < 24 << 20,
        "sandbox b's disk: {sb:?}"
    );
    // Removing the file frees the space again.
    fx.ok(&ia, "rm /big")?;
    let after_rm = fx.tokio.block_on(fx.rt.stats(&a.id))?;
    ensure!(
        after_rm.disk_used_bytes < 8 << 20,
        "space not freed: {after_rm:?}"
    );
    for id in [&a.id, &b.id] {
        let image = fx.rt.paths(id).disk_image();
        fx.kill_and_check(id, None)?;
        ensure!(!image.exists(), "{} left behind", image.display());
    }

    // What the disk costs a cold start (image, mkfs, loop, mount; then unmount), at
    // the default cap: median of 5.
    let dir = fx.base.join("disk-cost");
    let mut took = Vec::new();
    for n in 0..5 {
        let mnt = dir.join(format!("m{n}"));
        std::fs::create_dir_all(&mnt)?;
        let img = dir.join(format!("d{n}.img"));
        let t = Instant::now();
        kiln_runtime::jail::disk::create(&img, &mnt, kiln_runtime::DEFAULT_DISK_MB)?;
        took.push(t.elapsed());
        kiln_runtime::jail::disk::unmount(&mnt);
        ensure!(
            kiln_runtime::jail::disk::loop_devices_of(&img).is_empty(),
            "unmount left the loop device of {}",
            img.display()
        );
    }
    took.sort();
    println!(
        "      disk setup at {} MiB: median {:?} (of {took:?})",
        kiln_runtime::DEFAULT_DISK_MB,
        took[2]
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `stop` kills every process (a background writer included) but keeps the upper
/// layer readable and unchanging on the host; `adopt` no longer finds the sandbox;
/// `kill` afterwards removes everything; `stop` twice is fine.
fn stop_kills_every_process_and_keeps_the_layer(fx: &Fixture) -> Result<()> {
    let c = fx.config("stop", NetworkMode::Loopback, SMALL);
    let i = fx.start(&c)?;
    fx.ok(
        &i,
        "echo kept > /root/kept; (while :; do date +%s%N >> /root/bg; sleep 0.01; done) \
         >/dev/null 2>&1 </dev/null &",
    )?;
    let upper = fx.rt.upper_dir(&c.id).context("no upper dir")?;
    let bg = upper.join("root/bg");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bg.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    fx.tokio.block_on(fx.rt.stop(&c.id))?;
    ensure!(
        fx.rt.cgroup_dirs(&c.id).iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .map(|p| p.trim().is_empty())
                .unwrap_or(true)
        }),
        "processes left in the cgroup after stop"
    );
    ensure!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i.pid as i32), None).is_err(),
        "PID 1 alive after stop"
    );
    let size = std::fs::metadata(&bg)?.len();
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        std::fs::metadata(&bg)?.len() == size,
        "the upper layer changed after stop"
    );
    ensure!(
        std::fs::read_to_string(upper.join("root/kept"))? == "kept\n",
        "written file unreadable after stop"
    );
    ensure!(
        fx.tokio.block_on(fx.rt.adopt(&c.id))?.is_none(),
        "adopt found a stopped sandbox"
    );
    fx.tokio.block_on(fx.rt.stop(&c.id))?;
    fx.kill_and_check(&c.id, None)
}

/// The programs sandboxes run, under the allow-list: python (threads, subprocess, a
/// PTY, getaddrinfo), node (inotify through fs.watch, child processes, getifaddrs over
/// netlink), git, and sudo from the template's user (setuid; no `no_new_privs`).
/// Needs the base template's packages (python3, nodejs, git, sudo and its `user`).
fn debian_userland_under_the_seccomp_allow_list(fx: &Fixture) -> Result<()> {
    let Some(c) = debian_config(fx, "debsc", "the base template's packages")? else {
        return Ok(());
    };
    let i = fx.start(&c)?;
    let checks: [(&str, &str, &str); 6] = [
        (
            "python",
            "python3 -c 'import os, pty, socket, subprocess, threading\n\
             t = [threading.Thread(target=lambda: None) for _ in range(8)]\n\
             [x.start() for x in t]; [x.join() for x in t]\n\
             assert subprocess.run([\"true\"]).returncode == 0\n\
             pid, fd = pty.fork()\n\
             if pid == 0: os.execvp(\"echo\", [\"echo\", \"in-pty\"])\n\
             out = os.read(fd, 100); os.waitpid(pid, 0)\n\
             assert b\"in-pty\" in out, out\n\
             socket.getaddrinfo(\"deb.debian.org\", 443)\n\
             print(\"python ok\")'",
            "python ok",
        ),
        (
            "node",
            "cd /tmp && node -e '\
             const fs = require(\"fs\"), os = require(\"os\"), cp = require(\"child_process\");\
             if (!Object.keys(os.networkInterfaces()).includes(\"eth0\")) throw new Error(\"no eth0\");\
             cp.execFileSync(\"true\");\
             const w = fs.watch(\"/tmp\", () => { console.log(\"node ok\"); w.close(); });\
             fs.writeFileSync(\"/tmp/watched\", \"x\");'",
            "node ok",
        ),
        (
            "git",
            "cd /tmp && git init -q repo && cd repo && echo x > f && git add f && \
             git -c user.name=t -c user.email=t@t commit -qm init && git log --oneline | wc -l",
            "1",
        ),
        (
            "sudo",
            "su user -s /bin/sh -c 'id -u; sudo -n id -u'",
            "1000\n0",
        ),
        ("setuid bit", "stat -c %a /usr/bin/sudo", "4755"),
        (
            "no_new_privs off",
            "grep NoNewPrivs /proc/self/status | tr -d ' \\t'",
            "NoNewPrivs:0",
        ),
    ];
    for (what, cmd, want) in checks {
        let out = fx
            .ok(&i, cmd)
            .with_context(|| format!("{what} under the filter"))?;
        ensure!(out == want, "{what}: got {out:?}, want {want:?}");
        println!("    {what}: ok");
    }
    let slot = fx
        .rt
        .read_state(&c.id)
        .and_then(|s| s.slot)
        .context("no slot")?;
    fx.kill_and_check(&c.id, Some(&slot.host_if()))
}
