//! Host id ranges per sandbox (`jail::ids`) and idmapped template layers.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_runtime::idmap::HostIds;
use kiln_runtime::jail::JailRuntime;
use kiln_runtime::{HostIdMode, NetworkMode, Runtime, SandboxInstance, ID_MAP_BASE};

use crate::fixture::Fixture;
use crate::tests::SMALL;

fn owner(path: &Path) -> Result<(u32, u32)> {
    let m = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((m.uid(), m.gid()))
}

/// The `Uid:` line of a host process: real, effective, saved, fs.
fn host_uids(pid: u32) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "))
}

/// What the host sees of one sandbox's ids: its record, PID 1's id maps and host
/// uids, and the owners of files created inside as root and as uid 1000.
fn check_own_range(fx: &Fixture, inst: &SandboxInstance, ids: HostIds) -> Result<()> {
    let want_map = format!("0 {} 65536", ids.root());
    for file in ["uid_map", "gid_map"] {
        let map = std::fs::read_to_string(format!("/proc/{}/{file}", inst.pid))?;
        let map = map.split_whitespace().collect::<Vec<_>>().join(" ");
        ensure!(
            map == want_map,
            "{file} of {}: {map:?}, want {want_map:?}",
            inst.id
        );
    }
    let r = ids.root();
    ensure!(
        host_uids(inst.pid)? == format!("{r} {r} {r} {r}"),
        "PID 1 of {} runs as host {:?}, want {r}",
        inst.id,
        host_uids(inst.pid)?
    );
    // Template files appear owned by root inside (stored as host 100000).
    ensure!(
        fx.ok(inst, "stat -c '%u:%g' /etc/passwd /bin/busybox / | sort -u")? == "0:0",
        "template files are not root's inside"
    );
    // Root writes a new file and changes template files (copied up), adding the
    // user 1000 the busybox template lacks.
    fx.ok(
        inst,
        "echo x > /root/new && echo 'user:x:1000:1000::/:/bin/sh' >> /etc/passwd && \
         echo 'user:x:1000:' >> /etc/group && mkdir -m 1777 /shared && \
         su -s /bin/sh user -c 'echo u > /shared/by-user' && stat -c '%u:%g' /shared/by-user",
    )
    .and_then(|o| {
        ensure!(o == "1000:1000", "file of uid 1000 is {o} inside");
        Ok(())
    })?;
    let upper = fx.rt.paths(&inst.id).upper();
    for (path, want) in [
        ("root/new", ids.host(0)),
        ("etc/group", ids.host(0)),
        ("etc/passwd", ids.host(0)),
        ("shared", ids.host(0)),
        ("shared/by-user", ids.host(1000)),
    ] {
        let got = owner(&upper.join(path))?;
        ensure!(
            got == (want, want),
            "{path} of {} is host {got:?}, want {want}",
            inst.id
        );
    }
    // The template itself is untouched.
    let tpl = owner(&fx.rootfs.join("etc/group"))?;
    ensure!(
        tpl == (ID_MAP_BASE, ID_MAP_BASE),
        "template's /etc/group is {tpl:?}"
    );
    ensure!(
        !std::fs::read_to_string(fx.rootfs.join("etc/group"))?.contains("user"),
        "the template was written through"
    );
    Ok(())
}

/// Two sandboxes get disjoint host ranges of their own (neither the canonical one),
/// their processes and files carry them; a build-mode sandbox keeps 100000; a kill
/// frees the range; a new runtime object (a server restart) finds each range again.
pub fn each_sandbox_has_a_host_id_range_of_its_own(fx: &Fixture) -> Result<()> {
    let a = fx.config("ida", NetworkMode::Loopback, SMALL);
    let b = fx.config("idb", NetworkMode::Loopback, SMALL);
    let ia = fx.start(&a)?;
    let ib = fx.start(&b)?;
    let (ra, rb) = (fx.rt.host_ids(&a.id), fx.rt.host_ids(&b.id));
    println!(
        "    {}: host {}.., {}: host {}..",
        a.id,
        ra.root(),
        b.id,
        rb.root()
    );
    ensure!(
        ra.index().is_some() && rb.index().is_some(),
        "{ra:?} {rb:?}"
    );
    ensure!(
        !ra.contains(rb.root()) && !rb.contains(ra.root()),
        "ranges overlap: {ra:?} {rb:?}"
    );
    check_own_range(fx, &ia, ra)?;
    check_own_range(fx, &ib, rb)?;
    // Neither sees the other's root as its own: b's file, seen from a's ids, is not
    // root's (a's ids do not contain it).
    ensure!(!ra.contains(owner(&fx.rt.paths(&b.id).upper().join("root/new"))?.0));

    // A template build step keeps the canonical range: its layer becomes a template's.
    let mut c = fx.config("build", NetworkMode::Loopback, SMALL);
    c.host_ids = HostIdMode::Canonical;
    let ic = fx.start(&c)?;
    ensure!(
        fx.rt.host_ids(&c.id) == HostIds::CANONICAL,
        "build sandbox range"
    );
    check_own_range(fx, &ic, HostIds::CANONICAL)?;
    fx.kill_and_check(&c.id, None)?;

    // A new runtime object (what a restarted server makes) adopts b with its range and
    // never hands that range out again while b lives.
    let restarted = JailRuntime::new(fx.rt.options().clone())?;
    let adopted = fx
        .tokio
        .block_on(restarted.adopt(&b.id))?
        .context("adopt found nothing")?;
    ensure!(adopted.pid == ib.pid && restarted.host_ids(&b.id) == rb);
    fx.ok(&ib, "true")?;

    // Killing a frees its range: the next sandbox may get it, never b's.
    fx.kill_and_check(&a.id, None)?;
    let d = fx.config("idd", NetworkMode::Loopback, SMALL);
    let id_ = fx.tokio.block_on(restarted.start(&d))?;
    let rd = restarted.host_ids(&d.id);
    ensure!(
        rd.index().is_some() && rd != rb,
        "d got {rd:?}, b has {rb:?}"
    );
    ensure!(
        rd == ra,
        "a's range {ra:?} was not the lowest free one: d got {rd:?}"
    );
    fx.ok(&id_, "true")?;
    fx.kill_and_check(&d.id, None)?;
    fx.kill_and_check(&b.id, None)
}

/// Start time with and without a range of its own (the idmapped mount and the
/// allocation are the difference); printed, not asserted.
pub fn start_cost_of_a_range_of_its_own(fx: &Fixture) -> Result<()> {
    let mut opts = fx.rt.options().clone();
    opts.per_sandbox_ids = false;
    let shared = JailRuntime::new(opts)?;
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..4 {
        for (k, rt) in [&fx.rt, &shared].into_iter().enumerate() {
            let c = fx.config("cost", NetworkMode::Loopback, SMALL);
            let t = Instant::now();
            fx.tokio.block_on(rt.start(&c))?;
            let took = t.elapsed();
            let want_own = k == 0;
            ensure!(
                rt.host_ids(&c.id).index().is_some() == want_own,
                "round {round}: {:?}",
                rt.host_ids(&c.id)
            );
            times[k].push(took);
            fx.kill_and_check(&c.id, None)?;
        }
    }
    for t in &mut times {
        t.sort();
    }
    println!(
        "    start, own range (idmapped lower): {:?}; canonical range: {:?}",
        times[0], times[1]
    );
    Ok(())
}

/// The Debian template in a range of its own: owners by name (`root`, `user`), a
/// file `user` writes is host `base + 1000`, and setuid `sudo` (a file of the
/// idmapped lower layer) still makes `user` root.
pub fn debian_owners_in_a_range_of_its_own(fx: &Fixture) -> Result<()> {
    let Some(mut c) = crate::tests::debian_config(fx, "debids", "with sudo and user 1000")? else {
        return Ok(());
    };
    c.network = NetworkMode::Loopback;
    let i = fx.start(&c)?;
    let ids = fx.rt.host_ids(&c.id);
    ensure!(ids.index().is_some(), "{ids:?}");
    let owners = fx.ok(
        &i,
        "stat -c '%U:%G %n' /etc/passwd /usr/bin/sudo /home/user | tr '\\n' ' '",
    )?;
    ensure!(
        owners == "root:root /etc/passwd root:root /usr/bin/sudo user:user /home/user",
        "owners inside: {owners}"
    );
    let who = fx.ok(
        &i,
        "su -s /bin/sh user -c 'echo hi > /home/user/written; id -un; sudo -n id -u'",
    )?;
    ensure!(who == "user\n0", "as user, then sudo: {who:?}");
    let written = owner(&fx.rt.paths(&c.id).upper().join("home/user/written"))?;
    ensure!(
        written == (ids.host(1000), ids.host(1000)),
        "user's file is host {written:?}, want {}",
        ids.host(1000)
    );
    fx.kill_and_check(&c.id, None)
}
