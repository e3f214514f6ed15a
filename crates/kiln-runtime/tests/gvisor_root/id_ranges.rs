//! Host id ranges of gVisor sandboxes (tier: root + runsc, as the rest of
//! `gvisor_root`): each sandbox's Sentry and gofer run as a range of its own, the
//! template layer appears through an idmapped mount, pause/resume and a restart keep
//! the range, and template garbage collection sees the layer in use.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use kiln_runtime::gvisor::GvisorRuntime;
use kiln_runtime::idmap::HostIds;
use kiln_runtime::{HostIdMode, NetworkMode, Runtime, SandboxInstance, ID_MAP_BASE};

use super::{exec, exec_as, runnable, sentry_alive, Fixture};

fn owner(path: &Path) -> Result<(u32, u32)> {
    let m = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((m.uid(), m.gid()))
}

/// A `/proc/<pid>/status` line's ids (`Uid:` or `Gid:`: real, effective, saved, fs).
fn status_ids(pid: u32, key: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" "))
}

/// The host processes in the sandbox's cgroup (the Sentry and the gofer).
fn cgroup_procs(f: &Fixture, id: &str) -> Vec<u32> {
    let mut pids: Vec<u32> =
        f.rt.cgroup_dirs(id)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Everything the host sees of one sandbox's ids: Sentry and gofer run as its root,
/// the template is root's inside (`/`, `/root` 0700, `/etc/sudoers` 0440 readable by
/// root), files root and the user create land in `upper/` owned by the range, envd's
/// socket too, and the template on disk is untouched.
fn check_range(f: &Fixture, inst: &SandboxInstance, ids: HostIds, tag: &str) -> Result<()> {
    let r = ids.root();
    let want = format!("{r} {r} {r} {r}");
    let procs = cgroup_procs(f, &inst.id);
    ensure!(
        procs.contains(&inst.pid),
        "Sentry {} not in {procs:?}",
        inst.pid
    );
    for pid in procs {
        for key in ["Uid:", "Gid:"] {
            let got = status_ids(pid, key)?;
            ensure!(
                got == want,
                "host process {pid} of {} has {key} {got}, want {want}",
                inst.id
            );
        }
    }
    let out = exec_as(
        &inst.envd_socket,
        Some("root"),
        &format!(
            "stat -c '%u:%g %a %n' / /root /etc/sudoers; ls /root >/dev/null && echo root-dir-ok; \
             head -c 1 /etc/sudoers >/dev/null && echo sudoers-ok; echo {tag} > /root/by-root; id -u"
        ),
    )?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(
        lines.len() == 6
            && lines[0] == "0:0 755 /"
            && lines[1] == "0:0 700 /root"
            && lines[2] == "0:0 440 /etc/sudoers"
            && lines[3] == "root-dir-ok"
            && lines[4] == "sudoers-ok"
            && lines[5] == "0",
        "root inside {}: {:?}",
        inst.id,
        out.stdout
    );
    let out = exec(
        &inst.envd_socket,
        &format!("echo {tag} > \"$HOME/by-user\" && id -u && echo \"$HOME\""),
    )?;
    let mut lines = out.stdout.lines();
    let (uid, home) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let uid: u32 = uid
        .parse()
        .with_context(|| format!("id -u: {:?}", out.stdout))?;
    let upper = f.rt.paths(&inst.id).upper();
    for (path, id) in [
        ("root/by-root".to_string(), 0),
        (format!("{}/by-user", home.trim_start_matches('/')), uid),
    ] {
        let got = owner(&upper.join(&path))?;
        ensure!(
            got == (ids.host(id), ids.host(id)),
            "{path} of {} is host {got:?}, want {}",
            inst.id,
            ids.host(id)
        );
    }
    let sock = owner(&inst.envd_socket)?;
    ensure!(sock == (r, r), "envd's socket of {} is {sock:?}", inst.id);
    let tpl = owner(&super::rootfs().join("etc/sudoers"))?;
    ensure!(
        tpl == (ID_MAP_BASE, ID_MAP_BASE),
        "template's /etc/sudoers is {tpl:?}"
    );
    // What template gc reads: the overlay in the host's mount namespace names the
    // template's own path as its lower layer.
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let rootfs = f.rt.paths(&inst.id).rootfs().display().to_string();
    let line = info
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(rootfs.as_str()))
        .with_context(|| format!("no mount at {rootfs}"))?;
    let lower = format!("lowerdir={}", super::rootfs().display());
    ensure!(
        line.contains(" - overlay ") && line.contains(&lower),
        "overlay of {}: {line}",
        inst.id
    );
    Ok(())
}

/// After the host lost the overlay (a reboot) and a restore mounted it again: the
/// Sentry runs as the sandbox's recorded range and root inside reads the template's
/// `/root` and `/etc/sudoers` (the layer is idmapped again, not served as `nobody`).
pub(super) fn check_remounted_range(f: &Fixture, rt: &GvisorRuntime, id: &str) -> Result<()> {
    let ids = rt.host_ids(id);
    ensure!(
        ids.index().is_some(),
        "{id} has no range of its own: {ids:?}"
    );
    let inst = f.tokio.block_on(rt.adopt(id))?.context("adopt")?;
    let want = format!("{0} {0} {0} {0}", ids.root());
    let got = status_ids(inst.pid, "Uid:")?;
    ensure!(
        got == want,
        "restored Sentry of {id} runs as {got}, want {want}"
    );
    let out = exec_as(
        &inst.envd_socket,
        Some("root"),
        "ls /root >/dev/null && head -c 1 /etc/sudoers >/dev/null && stat -c %u /etc/passwd",
    )?;
    ensure!(
        out.stdout.trim() == "0",
        "root after the remount: {:?}",
        out.stdout
    );
    Ok(())
}

/// Two live gVisor sandboxes have disjoint host ranges of their own (Sentry and gofer
/// ids, their files, envd's socket), root inside owns `/` and reads `/root` and
/// `/etc/sudoers` from the template; a sandbox keeps its range across pause (a
/// checkpoint) and resume and across a restart (a new runtime object); a build-mode
/// sandbox keeps the canonical range; kill frees the ranges and leaves nothing.
#[test]
fn each_gvisor_sandbox_has_a_host_id_range_of_its_own() {
    if !runnable("each_gvisor_sandbox_has_a_host_id_range_of_its_own") {
        return;
    }
    let f = Fixture::new("ids").expect("fixture");
    let a = f.config("gia", NetworkMode::Loopback, 256);
    let b = f.config("gib", NetworkMode::Internet, 256);
    let mut c = f.config("gic", NetworkMode::Loopback, 256);
    c.host_ids = HostIdMode::Canonical;
    let result = (|| -> Result<()> {
        let (ia, took_a) = f.start(&a)?;
        let (ib, _) = f.start(&b)?;
        let (ra, rb) = (f.rt.host_ids(&a.id), f.rt.host_ids(&b.id));
        eprintln!(
            "{}: host {}.., {}: host {}..",
            a.id,
            ra.root(),
            b.id,
            rb.root()
        );
        ensure!(
            ra.index().is_some() && rb.index().is_some(),
            "not ranges of their own: {ra:?} {rb:?}"
        );
        ensure!(
            !ra.contains(rb.root()) && !rb.contains(ra.root()),
            "ranges overlap: {ra:?} {rb:?}"
        );
        check_range(&f, &ia, ra, "a")?;
        check_range(&f, &ib, rb, "b")?;

        // Pause (a checkpoint: no Sentry) and resume: the restored Sentry runs as the
        // same range, the files are there.
        f.tokio.block_on(f.rt.pause(&a.id))?;
        ensure!(!sentry_alive(ia.pid), "Sentry of {} still runs", a.id);
        f.tokio.block_on(f.rt.resume(&a.id))?;
        let ia2 = f
            .tokio
            .block_on(f.rt.adopt(&a.id))?
            .context("adopt after the resume")?;
        ensure!(f.rt.host_ids(&a.id) == ra, "range changed at the resume");
        let out = exec_as(&ia2.envd_socket, Some("root"), "cat /root/by-root")?;
        ensure!(
            out.stdout.trim() == "a",
            "after the resume: {:?}",
            out.stdout
        );
        check_range(&f, &ia2, ra, "a2")?;

        // A restarted server (a new runtime object) finds both ranges taken.
        let restarted = GvisorRuntime::new(f.rt.options().clone())?;
        ensure!(restarted.host_ids(&b.id) == rb);
        ensure!(f.tokio.block_on(restarted.adopt(&b.id))?.is_some());

        // A template build step keeps the canonical range.
        let (ic, took_c) = f.start(&c)?;
        eprintln!("start to envd accepting, Loopback: own range {took_a:?}, canonical {took_c:?}");
        ensure!(
            f.rt.host_ids(&c.id) == HostIds::CANONICAL,
            "build sandbox range {:?}",
            f.rt.host_ids(&c.id)
        );
        check_range(&f, &ic, HostIds::CANONICAL, "c")?;
        Ok(())
    })();
    let ranges = [&a, &b].map(|c| f.rt.host_ids(&c.id));
    let killed: Vec<_> = [&a, &b, &c].iter().map(|c| f.kill(&c.id)).collect();
    result.expect("ranges");
    for k in killed {
        k.expect("kill");
    }
    for cfg in [&a, &b, &c] {
        f.assert_clean(&cfg.id).expect("nothing left behind");
    }
    // The host-wide claims of the ranges are gone with the sandboxes.
    for ids in ranges.iter().filter_map(|r| r.index()) {
        let claim = Path::new(kiln_runtime::jail::ids::CLAIMS_DIR).join(ids.to_string());
        let holder = std::fs::read_to_string(&claim).unwrap_or_default();
        assert!(
            !holder.starts_with(&f.rt.options().state_dir.display().to_string()),
            "claim {} still held by {holder}",
            claim.display()
        );
    }
}

/// Copy `from` into `to` as hard links (same filesystem), else as a plain copy.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for flags in ["-al", "-a"] {
        let ok = std::process::Command::new("cp")
            .arg(flags)
            .arg(format!("{}/.", from.display()))
            .arg(to)
            .status()?
            .success();
        if ok {
            return Ok(());
        }
    }
    bail!("cannot copy {} to {}", from.display(), to.display())
}

/// Template gc (`kiln-template`'s `gc`, keep period 0) does not remove a layer that a
/// running gVisor sandbox with a range of its own has as its lower layer (the overlay
/// the helper moved into the host's namespace names it), and removes it once the
/// sandbox is killed (so the first half proves something).
#[test]
fn template_gc_keeps_a_layer_a_gvisor_sandbox_uses() {
    if !runnable("template_gc_keeps_a_layer_a_gvisor_sandbox_uses") {
        return;
    }
    let f = Fixture::new("gc").expect("fixture");
    let data = f.base.join("data");
    let store = kiln_template::TemplateStore::open(&data).expect("store");
    let layer = store.templates_dir().join(".layers").join("a".repeat(64));
    copy_tree(&super::rootfs(), &layer).expect("layer");
    // Unused for a month and installed by no template: only the mount keeps it.
    std::fs::File::open(&layer)
        .and_then(|d| d.set_modified(SystemTime::now() - Duration::from_secs(30 * 86400)))
        .expect("mtime");
    let mut cfg = f.config("ggc", NetworkMode::Loopback, 256);
    cfg.rootfs = layer.clone();
    let policy = kiln_template::gc::GcPolicy::days(0.0).expect("policy");
    let result = (|| -> Result<()> {
        let (inst, _) = f.start(&cfg)?;
        ensure!(
            f.rt.host_ids(&cfg.id).index().is_some(),
            "no range of its own"
        );
        let report = f.tokio.block_on(store.gc(&policy))?;
        eprintln!("gc with the sandbox running: {report:?}");
        ensure!(
            layer.join("etc/debian_version").is_file(),
            "gc removed the layer in use"
        );
        ensure!(report.removed_layers == 0, "{report:?}");
        let out = exec(&inst.envd_socket, "cat /etc/debian_version")?;
        ensure!(!out.stdout.trim().is_empty(), "{:?}", out.stdout);
        Ok(())
    })();
    let killed = f.kill(&cfg.id);
    result.expect("gc keeps the layer");
    killed.expect("kill");
    f.assert_clean(&cfg.id).expect("nothing left behind");
    let report = f.tokio.block_on(store.gc(&policy)).expect("gc");
    assert!(
        !layer.exists() && report.removed_layers == 1,
        "unused layer not collected: {report:?}"
    );
}
