//! A sandbox's own egress rules (E2B's `allowOut`/`denyOut`, the IP half): one filter
//! chain per slot, `KILN-SBX-<n>`, reached from `KILN-EGRESS` (which KILN-FORWARD jumps
//! to after the DNS accept and before the host-wide ranges), and, when the sandbox has
//! domain rules, one nat chain `KILN-PX-<n>` that sends its ports 80 and 443 to Kiln's
//! egress proxy on the host end of its veth.
//!
//! Allowed networks `RETURN` (the host-wide rules still apply: a sandbox cannot allow
//! itself into the host's LAN); denied ones are rejected. The rules match every packet,
//! not only new connections, so a tightened policy cuts connections already open. The
//! first rule of each denied network counts new connections only: its packet counter
//! is the number of connections the policy refused ([`denied`]).

use super::{run, Ipv4Cidr, NetError, Slot};

/// Jumped to from KILN-FORWARD for every packet from a sandbox; holds one jump per
/// sandbox with rules of its own. Created when missing, never flushed by a restart.
pub const EGRESS_CHAIN: &str = "KILN-EGRESS";
/// Jumped to from nat PREROUTING; holds one jump per sandbox whose web traffic goes
/// through the egress proxy.
pub const PROXY_CHAIN: &str = "KILN-PROXY";

/// The firewall half of a sandbox's network policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressRules {
    /// Exceptions to `deny` (allow beats deny).
    pub allow: Vec<Ipv4Cidr>,
    pub deny: Vec<Ipv4Cidr>,
    /// Send TCP ports 80 and 443 to this port on the host end of the sandbox's veth
    /// (the egress proxy, which applies the domain rules).
    pub proxy_port: Option<u16>,
}

impl EgressRules {
    /// No rules: the sandbox's traffic meets only the host-wide chains.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.proxy_port.is_none()
    }
}

pub fn filter_chain(slot: Slot) -> String {
    format!("KILN-SBX-{}", slot.index)
}

pub fn nat_chain(slot: Slot) -> String {
    format!("KILN-PX-{}", slot.index)
}

/// `iptables-restore --noflush` input that replaces the sandbox's chains (declaring a
/// chain flushes it, so the swap is atomic).
pub fn restore_input(slot: Slot, rules: &EgressRules) -> String {
    let chain = filter_chain(slot);
    let mut r = format!("*filter\n:{chain} - [0:0]\n");
    for net in &rules.allow {
        r.push_str(&format!("-A {chain} -d {net} -j RETURN\n"));
    }
    for net in &rules.deny {
        r.push_str(&format!(
            "-A {chain} -d {net} -m conntrack --ctstate NEW -j REJECT --reject-with icmp-admin-prohibited\n\
             -A {chain} -d {net} -j REJECT --reject-with icmp-admin-prohibited\n"
        ));
    }
    r.push_str("COMMIT\n");
    let nat = nat_chain(slot);
    r.push_str(&format!("*nat\n:{nat} - [0:0]\n"));
    if let Some(port) = rules.proxy_port {
        r.push_str(&format!(
            "-A {nat} -p tcp -m multiport --dports 80,443 -j DNAT --to-destination {}:{port}\n",
            slot.host_ip()
        ));
    }
    r.push_str("COMMIT\n");
    r
}

/// Creates `chain` in `table` unless it exists.
fn ensure_chain(table: &str, chain: &str) -> Result<(), NetError> {
    let exists = || run("iptables", &["-w", "-t", table, "-S", chain], None).is_ok();
    if exists() {
        return Ok(());
    }
    match run("iptables", &["-w", "-t", table, "-N", chain], None) {
        Err(_) if exists() => Ok(()),
        other => other,
    }
}

/// Appends `rule` to `chain` unless it is there.
fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), NetError> {
    let with = |op: &'static str| {
        let mut args = vec!["-w", "-t", table, op, chain];
        args.extend_from_slice(rule);
        args
    };
    if run("iptables", &with("-C"), None).is_ok() {
        return Ok(());
    }
    run("iptables", &with("-A"), None)
}

/// The dispatch chains, created empty when missing (host setup calls this before the
/// KILN-FORWARD rules that jump to them are restored).
pub fn ensure_dispatch_chains() -> Result<(), NetError> {
    ensure_chain("filter", EGRESS_CHAIN)?;
    ensure_chain("nat", PROXY_CHAIN)?;
    let hook = ["-j", PROXY_CHAIN];
    if run(
        "iptables",
        &["-w", "-t", "nat", "-C", "PREROUTING", hook[0], hook[1]],
        None,
    )
    .is_err()
    {
        run(
            "iptables",
            &["-w", "-t", "nat", "-I", "PREROUTING", "1", hook[0], hook[1]],
            None,
        )?;
    }
    Ok(())
}

/// Installs (or replaces) the rules of the sandbox on `slot`; empty rules remove them.
pub fn apply(slot: Slot, rules: &EgressRules) -> Result<(), NetError> {
    if rules.is_empty() {
        return clear(slot);
    }
    ensure_dispatch_chains()?;
    run(
        "iptables-restore",
        &["-w", "--noflush"],
        Some(&restore_input(slot, rules)),
    )?;
    let hif = slot.host_if();
    ensure_rule(
        "filter",
        EGRESS_CHAIN,
        &["-i", &hif, "-j", &filter_chain(slot)],
    )?;
    ensure_rule("nat", PROXY_CHAIN, &["-i", &hif, "-j", &nat_chain(slot)])?;
    Ok(())
}

/// Removes the sandbox's chains and their jumps (nothing to do when it has none).
pub fn clear(slot: Slot) -> Result<(), NetError> {
    let hif = slot.host_if();
    for (table, dispatch, chain) in [
        ("filter", EGRESS_CHAIN, filter_chain(slot)),
        ("nat", PROXY_CHAIN, nat_chain(slot)),
    ] {
        if run("iptables", &["-w", "-t", table, "-S", &chain], None).is_err() {
            continue;
        }
        // Every copy of the jump (a crash between -C and -A cannot make two, but
        // an operator's hand might).
        while run(
            "iptables",
            &["-w", "-t", table, "-D", dispatch, "-i", &hif, "-j", &chain],
            None,
        )
        .is_ok()
        {}
        run("iptables", &["-w", "-t", table, "-F", &chain], None)?;
        run("iptables", &["-w", "-t", table, "-X", &chain], None)?;
    }
    Ok(())
}

/// Connections the sandbox's deny rules refused so far (0 without rules).
pub fn denied(slot: Slot) -> u64 {
    let out = std::process::Command::new("iptables")
        .args([
            "-w",
            "-t",
            "filter",
            "-L",
            &filter_chain(slot),
            "-v",
            "-x",
            "-n",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => count_denied(&String::from_utf8_lossy(&o.stdout)),
        _ => 0,
    }
}

/// Sums the packet counters of the `ctstate NEW` REJECT rules in `iptables -L -v -x -n`
/// output.
pub fn count_denied(listing: &str) -> u64 {
    listing
        .lines()
        .filter(|l| l.contains("REJECT") && l.contains("ctstate NEW"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_returns_before_deny_and_deny_counts_new_connections() {
        let slot = Slot::new(5).unwrap();
        let rules = EgressRules {
            allow: vec!["198.51.100.10/32".parse().unwrap()],
            deny: vec!["0.0.0.0/0".parse().unwrap()],
            proxy_port: None,
        };
        let r = restore_input(slot, &rules);
        let allow = r
            .find("-A KILN-SBX-5 -d 198.51.100.10/32 -j RETURN")
            .unwrap();
        let new = r
            .find("-A KILN-SBX-5 -d 0.0.0.0/0 -m conntrack --ctstate NEW -j REJECT")
            .unwrap();
        let all = r
            .find("-A KILN-SBX-5 -d 0.0.0.0/0 -j REJECT --reject-with icmp-admin-prohibited")
            .unwrap();
        assert!(allow < new && new < all);
        // The nat chain is declared (so emptied) even without a proxy.
        assert!(r.contains("*nat\n:KILN-PX-5 - [0:0]\nCOMMIT\n"));
        assert!(!r.contains("DNAT"));
    }

    #[test]
    fn domain_rules_send_web_ports_to_the_proxy_on_the_host_end() {
        let slot = Slot::new(3).unwrap();
        let rules = EgressRules {
            proxy_port: Some(40123),
            ..EgressRules::default()
        };
        assert!(!rules.is_empty());
        let r = restore_input(slot, &rules);
        assert!(r.contains(
            "-A KILN-PX-3 -p tcp -m multiport --dports 80,443 -j DNAT --to-destination 10.77.0.13:40123\n"
        ));
        assert!(EgressRules::default().is_empty());
    }

    #[test]
    fn counts_only_refused_new_connections() {
        let listing = "Chain KILN-SBX-5 (1 references)\n\
            pkts bytes target prot opt in out source destination\n\
               4   240 RETURN all -- * * 0.0.0.0/0 198.51.100.10\n\
               3   180 REJECT all -- * * 0.0.0.0/0 0.0.0.0/0 ctstate NEW reject-with icmp-admin-prohibited\n\
               9   540 REJECT all -- * * 0.0.0.0/0 0.0.0.0/0 reject-with icmp-admin-prohibited\n\
               2   120 REJECT all -- * * 0.0.0.0/0 10.0.0.0/8 ctstate NEW reject-with icmp-admin-prohibited\n";
        assert_eq!(count_denied(listing), 5);
    }
}
