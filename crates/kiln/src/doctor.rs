//! `kiln doctor`: checks the host for what sandboxes need and prints one line per check
//! (`ok`, `warn` for what degrades, `FAIL` with the fix for what breaks sandboxes).
//! `kiln serve` runs the same checks before it sets up a runtime and refuses to start
//! on a FAIL. The one thing Kiln fixes itself is the search bit of the directories
//! above its data directory ([`reach`]).
//!
//! Each check is a function of what it reads (file contents, paths, a uid), so its
//! logic is unit-tested without the real host; [`run`] feeds them the real host.

mod ids;
mod kernel;
mod net;
mod reach;
mod runsc;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;

use self::ids::check_subids;
use self::kernel::{check_cgroups, check_overlay, check_userns, overlay_module};
use self::net::{check_iproute, check_iptables};
use self::runsc::check_runsc;
use crate::{Builtins, RuntimeChoice};

/// Free space in the data directory's filesystem under which a check warns...
const DISK_WARN_BYTES: u64 = 10 << 30;
/// ...and under which it fails: one template build or a few sandbox disks fill it.
const DISK_FAIL_BYTES: u64 = 2 << 30;

/// The fix for missing host tools: `scripts/install-deps.sh` installs runsc (2024-07-29,
/// as /usr/local/bin/runsc), iptables, iproute2, mmdebstrap, uidmap and e2fsprogs.
const INSTALL_DEPS: &str = "run scripts/install-deps.sh as root";

#[derive(clap::Args)]
pub(crate) struct DoctorArgs {
    /// The data directory `kiln serve` will use.
    #[arg(long, default_value = "/var/lib/kiln", env = "KILN_DATA_DIR")]
    data_dir: PathBuf,
    /// Directory holding kiln-jail and the guest binaries (default: next to kiln).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The runtime `kiln serve` will be asked for: a missing runsc fails only for gvisor.
    #[arg(long, value_enum, default_value = "auto", env = "KILN_RUNTIME")]
    runtime: RuntimeChoice,
    /// The runsc binary (default: the first `runsc` on PATH).
    #[arg(long, env = "KILN_RUNSC")]
    runsc: Option<PathBuf>,
    /// The gVisor platform to probe (default: systrap, then ptrace).
    #[arg(long, env = "KILN_RUNSC_PLATFORM")]
    runsc_platform: Option<String>,
    /// Built-in templates `kiln serve` will build (decides whether kiln-interpreter
    /// is needed).
    #[arg(
        long,
        env = "KILN_BUILTIN_TEMPLATES",
        default_value = "code-interpreter-v1",
        value_parser = crate::parse_builtins
    )]
    builtin_templates: Builtins,
    /// Fix what Kiln can: add o+x (search, never read) to root-owned directories
    /// above the data directory that sandboxes cannot pass through.
    #[arg(long)]
    fix: bool,
}

/// How bad a check's finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Ok,
    /// Works, but worse than it could (a weaker boundary, a conflict waiting).
    Warn,
    /// Sandboxes will not start (or not on the runtime asked for).
    Fail,
}

/// One check's finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Check {
    pub level: Level,
    pub name: &'static str,
    pub detail: String,
    /// One line: what to do about a warn or a FAIL.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            level: Level::Ok,
            name,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn with_level(mut self, level: Level) -> Check {
        self.level = level;
        self
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag} {}: {}", self.name, self.detail)?;
        match &self.fix {
            Some(fix) if self.level != Level::Ok => write!(f, " — fix: {fix}"),
            _ => Ok(()),
        }
    }
}

/// Names of the checks (`serve` treats some of them specially).
pub(crate) const RUNSC: &str = "runsc";

/// What to check.
pub(crate) struct Options<'a> {
    pub data_dir: &'a Path,
    pub bin_dir: &'a Path,
    pub runtime: RuntimeChoice,
    pub runsc: Option<&'a Path>,
    pub runsc_platform: Option<&'a str>,
    pub builtins: &'a [String],
    /// Add o+x to the data directory's root-owned ancestors that lack it.
    pub fix: bool,
    /// Probe runsc's platforms (≈ 200 ms each, cached). `serve` leaves that to the
    /// gvisor runtime, which probes when it is set up.
    pub probe: bool,
}

/// The checks, in order, and what `fix` changed on the host.
pub(crate) struct Report {
    pub checks: Vec<Check>,
    pub changes: Vec<String>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.level == Level::Fail)
    }
}

/// Runs every check against this host.
pub(crate) fn run(opts: &Options) -> Report {
    let euid = nix::unistd::geteuid().as_raw();
    let (reachable, changes) = reach::check(opts.data_dir, opts.fix, reach::FIXABLE_OWNER);
    let checks = vec![
        check_root(euid),
        check_runsc(opts, euid == 0),
        check_cgroups(Path::new(kiln_runtime::jail::helper::CGROUP_ROOT)),
        check_userns(
            read_number("/proc/sys/user/max_user_namespaces"),
            read_number("/proc/sys/kernel/unprivileged_userns_clone"),
        ),
        check_subids(&[
            ("/etc/subuid", std::fs::read_to_string("/etc/subuid").ok()),
            ("/etc/subgid", std::fs::read_to_string("/etc/subgid").ok()),
        ]),
        check_iptables(
            std::env::var_os("PATH").as_deref(),
            Path::new("/proc/sys/net/ipv6").exists(),
        ),
        check_iproute(std::env::var_os("PATH").as_deref()),
        check_overlay(
            std::fs::read_to_string("/proc/filesystems").ok().as_deref(),
            overlay_module(),
        ),
        check_disk(opts.data_dir),
        reachable,
        check_guest_binaries(opts.bin_dir, opts.builtins),
    ];
    Report { checks, changes }
}

/// `kiln doctor`: prints the report; exits 1 when a check failed.
pub(crate) fn doctor(args: DoctorArgs) -> Result<()> {
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => crate::default_bin_dir()?,
    };
    let report = run(&Options {
        data_dir: &args.data_dir,
        bin_dir: &bin_dir,
        runtime: args.runtime,
        runsc: args.runsc.as_deref(),
        runsc_platform: args.runsc_platform.as_deref(),
        builtins: &args.builtin_templates.0,
        fix: args.fix,
        probe: true,
    });
    for change in &report.changes {
        println!("{change}");
    }
    for check in &report.checks {
        println!("{check}");
    }
    let failed = report.failures().count();
    if failed > 0 {
        println!("{failed} check(s) failed: kiln serve would refuse to start");
        std::process::exit(1);
    }
    Ok(())
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// A number in a `/proc/sys` file; `None` when the file is missing or unreadable.
fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn check_root(euid: u32) -> Check {
    const NAME: &str = "root";
    if euid == 0 {
        return Check::ok(NAME, "running as root");
    }
    Check::fail(
        NAME,
        format!(
            "running as uid {euid}: kiln serve needs root (namespaces, cgroups, mounts, \
             iptables), and the checks below see less"
        ),
        "run kiln as root (deploy/kiln.service does)",
    )
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The level for `available` bytes free in the data directory's filesystem.
fn disk_level(available: u64) -> Level {
    if available < DISK_FAIL_BYTES {
        Level::Fail
    } else if available < DISK_WARN_BYTES {
        Level::Warn
    } else {
        Level::Ok
    }
}

fn disk_check(shown: &Path, available: u64, total: u64) -> Check {
    const NAME: &str = "disk";
    let detail = format!(
        "{} free of {} in {}'s filesystem",
        gib(available),
        gib(total),
        shown.display()
    );
    let fix = "free space there (kiln template gc removes unused build layers), or use \
               --data-dir on a larger filesystem";
    match disk_level(available) {
        Level::Ok => Check::ok(NAME, detail),
        Level::Warn => Check::warn(
            NAME,
            format!(
                "{detail}: under {}, a template build or a few sandboxes fill it",
                gib(DISK_WARN_BYTES)
            ),
            fix,
        ),
        Level::Fail => Check::fail(
            NAME,
            format!("{detail}: under {}", gib(DISK_FAIL_BYTES)),
            fix,
        ),
    }
}

fn check_disk(data_dir: &Path) -> Check {
    let Some(existing) = reach::deepest_existing(data_dir) else {
        return Check::warn(
            "disk",
            format!("no existing directory on the way to {}", data_dir.display()),
            "give --data-dir an absolute path",
        );
    };
    match rustix::fs::statvfs(&existing) {
        Ok(st) => disk_check(
            data_dir,
            st.f_bavail.saturating_mul(st.f_frsize),
            st.f_blocks.saturating_mul(st.f_frsize),
        ),
        Err(e) => Check::warn(
            "disk",
            format!("statvfs {}: {e}", existing.display()),
            "check that the data directory's filesystem is mounted",
        ),
    }
}

/// The binaries `kiln serve` runs beside itself: the jail helper and the guest binaries
/// every sandbox gets (kiln-sudo for gVisor's `sudo`), plus kiln-interpreter when the
/// code-interpreter template is built. A missing one is a start-up error naming the
/// fix, never a silent fall-back to the jail or a template that cannot start.
fn required_binaries(builtins: &[String]) -> Vec<&'static str> {
    let mut names = vec!["kiln-jail", "kiln-init", "kiln-envd", "kiln-sudo"];
    if builtins.iter().any(|b| b == "code-interpreter-v1") {
        names.push("kiln-interpreter");
    }
    names
}

pub(crate) fn check_guest_binaries(bin_dir: &Path, builtins: &[String]) -> Check {
    const NAME: &str = "guest binaries";
    let required = required_binaries(builtins);
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|name| !bin_dir.join(name).is_file())
        .collect();
    if missing.is_empty() {
        return Check::ok(
            NAME,
            format!("{} in {}", required.join(", "), bin_dir.display()),
        );
    }
    Check::fail(
        NAME,
        format!("{} missing from {}", missing.join(", "), bin_dir.display()),
        "build every binary with `cargo build --release --bins` (./scripts/serve does), \
         or point --bin-dir at a directory that has them",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_ok_warn_fail_with_the_fix() {
        assert_eq!(
            Check::ok("disk", "50.0 GiB free").to_string(),
            "ok   disk: 50.0 GiB free"
        );
        assert_eq!(
            Check::warn("disk", "low", "free space").to_string(),
            "warn disk: low — fix: free space"
        );
        assert_eq!(
            Check::fail("overlayfs", "missing", "modprobe overlay").to_string(),
            "FAIL overlayfs: missing — fix: modprobe overlay"
        );
        // An ok line never shows a fix, even one carried over by with_level.
        let c = Check::fail("runsc", "x", "y").with_level(Level::Ok);
        assert_eq!(c.to_string(), "ok   runsc: x");
    }

    #[test]
    fn a_missing_guest_binary_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["kiln-jail", "kiln-init", "kiln-envd"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let builtins = vec!["code-interpreter-v1".to_string()];
        let c = check_guest_binaries(dir.path(), &builtins);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.detail
                .starts_with("kiln-sudo, kiln-interpreter missing from"),
            "{c}"
        );
        assert!(
            c.to_string().contains("cargo build --release --bins"),
            "{c}"
        );
        // Without the code interpreter, kiln-interpreter is not needed.
        std::fs::write(dir.path().join("kiln-sudo"), "").unwrap();
        assert_eq!(check_guest_binaries(dir.path(), &[]).level, Level::Ok);
        assert_eq!(
            check_guest_binaries(dir.path(), &builtins).level,
            Level::Fail
        );
    }

    #[test]
    fn disk_thresholds() {
        assert_eq!(disk_level(0), Level::Fail);
        assert_eq!(disk_level(DISK_FAIL_BYTES - 1), Level::Fail);
        assert_eq!(disk_level(DISK_FAIL_BYTES), Level::Warn);
        assert_eq!(disk_level(DISK_WARN_BYTES - 1), Level::Warn);
        assert_eq!(disk_level(DISK_WARN_BYTES), Level::Ok);
        let c = disk_check(Path::new("/var/lib/kiln"), 1 << 30, 100 << 30);
        assert_eq!(
            c.to_string(),
            "FAIL disk: 1.0 GiB free of 100.0 GiB in /var/lib/kiln's filesystem: under \
             2.0 GiB — fix: free space there (kiln template gc removes unused build layers), \
             or use --data-dir on a larger filesystem"
        );
        assert_eq!(
            disk_check(Path::new("/d"), 5 << 30, 9 << 30).level,
            Level::Warn
        );
        assert_eq!(
            disk_check(Path::new("/d"), 50 << 30, 90 << 30).to_string(),
            "ok   disk: 50.0 GiB free of 90.0 GiB in /d's filesystem"
        );
    }

    #[test]
    fn not_root_fails() {
        assert_eq!(check_root(0).level, Level::Ok);
        assert_eq!(check_root(1000).level, Level::Fail);
    }
}
