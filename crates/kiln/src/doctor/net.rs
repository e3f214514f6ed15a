//! The network tools the firewall and the veth setup run (`jail::net`): iptables (and
//! its backend), ip6tables when the host has IPv6, `ip`.

use std::ffi::OsStr;
use std::process::Command;

use kiln_runtime::gvisor::runsc::find_in_path;

use super::{Check, INSTALL_DEPS};

/// `iptables --version` says `iptables v1.8.9 (nf_tables)` or `(legacy)`.
fn iptables_backend(version: &str) -> &str {
    version
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or("backend unknown", |(backend, _)| backend)
}

pub(super) fn check_iptables(path: Option<&OsStr>, ipv6: bool) -> Check {
    const NAME: &str = "iptables";
    let mut needed = vec!["iptables", "iptables-restore"];
    if ipv6 {
        needed.extend(["ip6tables", "ip6tables-restore"]);
    }
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|n| find_in_path(n, path).is_none())
        .collect();
    if !missing.is_empty() {
        return Check::fail(
            NAME,
            format!(
                "{} not on PATH: sandboxes' network isolation and NAT cannot be set up",
                missing.join(", ")
            ),
            format!("{INSTALL_DEPS} (or apt-get install iptables), with /usr/sbin on PATH"),
        );
    }
    let Some(exe) = find_in_path("iptables", path) else {
        return Check::fail(NAME, "iptables not on PATH", INSTALL_DEPS);
    };
    match Command::new(&exe).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout);
            let line = version.lines().next().unwrap_or("").trim();
            let release = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("(version unknown)");
            Check::ok(
                NAME,
                format!(
                    "{} {release}, backend {}; Kiln adds KILN-* chains and never flushes \
                     KILN-USER",
                    exe.display(),
                    iptables_backend(line)
                ),
            )
        }
        Ok(out) => Check::fail(
            NAME,
            format!(
                "{} --version failed: {}",
                exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "apt-get install --reinstall iptables",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("running {}: {e}", exe.display()),
            "apt-get install --reinstall iptables",
        ),
    }
}

pub(super) fn check_iproute(path: Option<&OsStr>) -> Check {
    const NAME: &str = "iproute2";
    match find_in_path("ip", path) {
        Some(exe) => Check::ok(NAME, format!("{} (veth pairs, addresses)", exe.display())),
        None => Check::fail(
            NAME,
            "`ip` not on PATH: sandboxes with internet access cannot get a veth pair",
            format!("{INSTALL_DEPS} (or apt-get install iproute2), with /usr/sbin on PATH"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn iptables_backend_and_missing_tools() {
        assert_eq!(iptables_backend("iptables v1.8.9 (nf_tables)"), "nf_tables");
        assert_eq!(iptables_backend("iptables v1.8.7 (legacy)"), "legacy");
        assert_eq!(iptables_backend("iptables v1.4"), "backend unknown");
        let empty = tempfile::tempdir().unwrap();
        let c = check_iptables(Some(empty.path().as_os_str()), true);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.detail
                .starts_with("iptables, iptables-restore, ip6tables, ip6tables-restore not"),
            "{c}"
        );
        assert_eq!(
            check_iproute(Some(empty.path().as_os_str())).level,
            Level::Fail
        );
    }
}
