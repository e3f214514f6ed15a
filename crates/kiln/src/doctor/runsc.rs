//! runsc: found, its version, and (for `kiln doctor`) which platform works, with the
//! gvisor runtime's own lookup and probe (`kiln_runtime::gvisor::runsc`).

use std::path::Path;

use anyhow::{Context, Result};
use kiln_runtime::gvisor::runsc;

use super::{chain, Check, Level, Options, RUNSC};
use crate::RuntimeChoice;

/// The fix when runsc is missing, old or does not work.
const INSTALL_RUNSC: &str = "run scripts/install-deps.sh as root (it installs runsc \
     0.0~20240729 as /usr/local/bin/runsc), or point --runsc (KILN_RUNSC) at a working runsc";

/// The `YYYYMMDD` release of a `runsc version 0.0~20240729.0` (Debian) or
/// `runsc version release-20240729.0` (upstream) line.
fn runsc_release(version_line: &str) -> Option<u32> {
    let rest = version_line.strip_prefix("runsc version")?;
    let start = rest.find(|c: char| c.is_ascii_digit() && c != '0')?;
    let digits: String = rest[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (digits.len() == 8).then(|| digits.parse().ok()).flatten()
}

/// The runsc `install-deps.sh` pins; older ones fail `statx` (`ls -l` breaks inside)
/// and lack systrap (docs/gvisor.md).
const RUNSC_GOOD_RELEASE: u32 = 20240729;

/// How bad "gVisor does not work" is for the runtime asked for: only `gvisor` breaks;
/// `auto` falls back to the jail (a weaker boundary) and `jail` loses only templates
/// that pin `runtime = "gvisor"`.
fn runsc_unusable_level(runtime: RuntimeChoice) -> Level {
    match runtime {
        RuntimeChoice::Gvisor => Level::Fail,
        RuntimeChoice::Auto | RuntimeChoice::Jail => Level::Warn,
    }
}

fn runsc_consequence(runtime: RuntimeChoice) -> &'static str {
    match runtime {
        RuntimeChoice::Gvisor => "--runtime gvisor cannot start",
        RuntimeChoice::Auto => {
            "runtime auto falls back to the jail (a container boundary sharing the host kernel)"
        }
        RuntimeChoice::Jail => "templates that pin runtime = \"gvisor\" cannot run",
    }
}

pub(super) fn check_runsc(opts: &Options, root: bool) -> Check {
    let unusable = |what: String| {
        Check::fail(
            RUNSC,
            format!("{what}; {}", runsc_consequence(opts.runtime)),
            INSTALL_RUNSC,
        )
        .with_level(runsc_unusable_level(opts.runtime))
    };
    let exe = match runsc::locate(opts.runsc) {
        Ok(exe) => exe,
        Err(_) => return unusable("no runsc on PATH".into()),
    };
    let version = match runsc::version(&exe) {
        Ok(v) => v,
        Err(e) => return unusable(format!("{} --version: {}", exe.display(), chain(&e))),
    };
    let found = format!("{} ({version})", exe.display());
    let old = runsc_release(&version).filter(|r| *r < RUNSC_GOOD_RELEASE);
    let candidates = match runsc::platform_candidates(opts.runsc_platform) {
        Ok(c) => c,
        Err(e) => return unusable(format!("{found}: {}", chain(&e))),
    };
    let platform = if !opts.probe {
        "platform probed when the gvisor runtime starts".to_string()
    } else if !root {
        "platform not probed (needs root)".to_string()
    } else {
        match probe_platform(opts.data_dir, &exe, &candidates, &version) {
            Ok(p) => format!("platform {p} works"),
            Err(e) => return unusable(format!("{found}: {e}")),
        }
    };
    let detail = format!("{found}, {platform}");
    match old {
        Some(release) => Check::warn(
            RUNSC,
            format!(
                "{detail}; release {release} is older than {RUNSC_GOOD_RELEASE}: no systrap, \
                 and `ls -l`/`stat` fail inside sandboxes (statx)"
            ),
            INSTALL_RUNSC,
        ),
        None => Check::ok(RUNSC, detail),
    }
}

/// `runsc do /bin/true` on each candidate platform, as the gvisor runtime does at set-up.
/// Uses the data directory's probe cache when it exists (a later `serve` then skips the
/// probe too), else a scratch directory removed afterwards.
fn probe_platform(
    data_dir: &Path,
    exe: &Path,
    candidates: &[String],
    version: &str,
) -> Result<String> {
    let state_dir = data_dir.join("sandboxes-gvisor");
    if state_dir.is_dir() {
        return runsc::choose_platform(exe, candidates, version, &state_dir)
            .map_err(|e| anyhow::anyhow!("{}", chain(&e)));
    }
    let scratch = std::env::temp_dir().join(format!("kiln-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let chosen = runsc::choose_platform(exe, candidates, version, &scratch)
        .map_err(|e| anyhow::anyhow!("{}", chain(&e)));
    let _ = std::fs::remove_dir_all(&scratch);
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runsc_matters_only_when_gvisor_is_asked_for() {
        assert_eq!(runsc_unusable_level(RuntimeChoice::Gvisor), Level::Fail);
        assert_eq!(runsc_unusable_level(RuntimeChoice::Auto), Level::Warn);
        assert_eq!(runsc_unusable_level(RuntimeChoice::Jail), Level::Warn);
        assert_eq!(
            runsc_release("runsc version 0.0~20240729.0"),
            Some(20240729)
        );
        assert_eq!(
            runsc_release("runsc version release-20221219.0"),
            Some(20221219)
        );
        assert_eq!(runsc_release("runsc version 1.2"), None);
        assert_eq!(runsc_release("something else"), None);
    }
}
