//! The host firewall: the KILN-* chains (iptables), their order, and the resolvers and
//! host networks they are built from. Written down in `docs/jail.md` ("Network").

use std::net::Ipv4Addr;
use std::path::Path;

use super::egress::EGRESS_CHAIN;
use super::{host_nameservers, run, write_sysctl, Ipv4Cidr, NetError, IF_PREFIX, POOL};

/// Destinations no sandbox reaches unless the operator allows them: the IPv4 ranges
/// that are not globally routable and that, seen from a host, are its own
/// neighbourhood (its LAN, its VPC, its provider's CGNAT, cloud metadata), plus
/// multicast and reserved space. Not listed: the documentation TEST-NETs and
/// 198.18/15 (benchmarking). Nobody's private network is numbered there by standard,
/// and where they are routed it is on purpose, to carry Internet traffic: fake-IP DNS
/// proxies hand out 198.18/15 addresses, and this project's CI host resolves public
/// names into 203.0.113/24. A host whose own network is one of them (this CI host sits
/// in 192.0.2.0/24) still has it rejected, as one of its host networks.
pub const BLOCKED_EGRESS: &[(Ipv4Cidr, &str)] = &[
    (Ipv4Cidr::of(0, 0, 0, 0, 8), "\"this network\" (RFC 791)"),
    (Ipv4Cidr::of(10, 0, 0, 0, 8), "private (RFC 1918)"),
    (
        Ipv4Cidr::of(100, 64, 0, 0, 10),
        "carrier-grade NAT (RFC 6598)",
    ),
    (Ipv4Cidr::of(127, 0, 0, 0, 8), "loopback"),
    (
        Ipv4Cidr::of(169, 254, 0, 0, 16),
        "link-local, cloud metadata",
    ),
    (Ipv4Cidr::of(172, 16, 0, 0, 12), "private (RFC 1918)"),
    (Ipv4Cidr::of(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (Ipv4Cidr::of(192, 168, 0, 0, 16), "private (RFC 1918)"),
    (Ipv4Cidr::of(224, 0, 0, 0, 4), "multicast"),
    (
        Ipv4Cidr::of(240, 0, 0, 0, 4),
        "reserved, and 255.255.255.255",
    ),
];

/// The operator's chain: created when missing, never flushed or rewritten by Kiln, and
/// jumped to first for every packet from or to a sandbox (Docker's `DOCKER-USER`).
pub const USER_CHAIN: &str = "KILN-USER";
/// Accepts DNS to the resolvers written into sandboxes' resolv.conf.
pub const DNS_CHAIN: &str = "KILN-DNS";

/// What the host firewall is built from, besides the fixed plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallPlan {
    /// The operator's allow-list: accepted before [`BLOCKED_EGRESS`] and `host_networks`.
    pub egress_allow: Vec<Ipv4Cidr>,
    /// The resolvers sandboxes are given (port 53, UDP and TCP, accepted first).
    pub nameservers: Vec<Ipv4Addr>,
    /// The networks the host's interfaces are on (other than `lo` and `kv*`).
    pub host_networks: Vec<Ipv4Cidr>,
}

/// Rules for `iptables-restore --noflush`. Declaring a user chain flushes it, so this
/// is idempotent; `KILN-USER` is referenced but not declared (so never flushed): it
/// must exist before the restore ([`install_host_rules`] creates it). The jumps from
/// the built-in chains are added separately.
///
/// Order in KILN-FORWARD: the operator's chain; sandbox to sandbox dropped; return
/// traffic into sandboxes accepted, anything else into them dropped; DNS to the
/// resolvers accepted; the operator's allowed ranges accepted; non-public ranges and
/// the host's networks rejected (`icmp-admin-prohibited`: the sandbox's connect fails
/// at once with "No route to host" instead of hanging); the rest of the egress
/// accepted. The range rules match every packet, not only new connections, so a
/// connection opened under an allow-list entry ends when a restart removes the entry.
pub fn iptables_rules(plan: &FirewallPlan) -> String {
    let kv = format!("{IF_PREFIX}+");
    let mut r = format!(
        "*filter\n\
         :KILN-INPUT - [0:0]\n\
         :KILN-FORWARD - [0:0]\n\
         :{DNS_CHAIN} - [0:0]\n\
         -A KILN-INPUT -i {kv} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
         -A KILN-INPUT -i {kv} -j {DNS_CHAIN}\n\
         -A KILN-INPUT -i {kv} -p tcp -m conntrack --ctstate DNAT -j ACCEPT\n\
         -A KILN-INPUT -i {kv} -j DROP\n\
         -A KILN-FORWARD -i {kv} -j {USER_CHAIN}\n\
         -A KILN-FORWARD -o {kv} -j {USER_CHAIN}\n\
         -A KILN-FORWARD -i {kv} -o {kv} -j DROP\n\
         -A KILN-FORWARD -o {kv} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
         -A KILN-FORWARD -o {kv} -j DROP\n\
         -A KILN-FORWARD -i {kv} -j {DNS_CHAIN}\n\
         -A KILN-FORWARD -i {kv} -j {EGRESS_CHAIN}\n"
    );
    for net in &plan.egress_allow {
        r.push_str(&format!("-A KILN-FORWARD -i {kv} -d {net} -j ACCEPT\n"));
    }
    let blocked = BLOCKED_EGRESS.iter().map(|(net, _)| net);
    let host_only = plan
        .host_networks
        .iter()
        .filter(|n| !BLOCKED_EGRESS.iter().any(|(b, _)| b.contains(n.addr())));
    for net in blocked.chain(host_only) {
        r.push_str(&format!(
            "-A KILN-FORWARD -i {kv} -d {net} -j REJECT --reject-with icmp-admin-prohibited\n"
        ));
    }
    r.push_str(&format!("-A KILN-FORWARD -i {kv} -j ACCEPT\n"));
    r.push_str(&dns_rules(&plan.nameservers));
    r.push_str(&format!(
        "COMMIT\n\
         *nat\n\
         :KILN-POSTROUTING - [0:0]\n\
         -A KILN-POSTROUTING -s {POOL} ! -o {kv} -j MASQUERADE\n\
         COMMIT\n"
    ));
    r
}

/// The KILN-DNS rules (inside a `*filter` table): port 53 of each resolver.
fn dns_rules(nameservers: &[Ipv4Addr]) -> String {
    let mut r = String::new();
    for ns in nameservers {
        for proto in ["udp", "tcp"] {
            r.push_str(&format!(
                "-A {DNS_CHAIN} -d {ns}/32 -p {proto} -m {proto} --dport 53 -j ACCEPT\n"
            ));
        }
    }
    r
}

/// `iptables-restore --noflush` input that replaces only KILN-DNS.
pub fn dns_chain_rules(nameservers: &[Ipv4Addr]) -> String {
    format!(
        "*filter\n:{DNS_CHAIN} - [0:0]\n{}COMMIT\n",
        dns_rules(nameservers)
    )
}

/// IPv6: sandboxes have none; drop anything from kv interfaces anyway.
pub fn ip6tables_rules() -> String {
    let kv = format!("{IF_PREFIX}+");
    format!(
        "*filter\n\
         :KILN-INPUT - [0:0]\n\
         :KILN-FORWARD - [0:0]\n\
         -A KILN-INPUT -i {kv} -j DROP\n\
         -A KILN-FORWARD -i {kv} -j DROP\n\
         -A KILN-FORWARD -o {kv} -j DROP\n\
         COMMIT\n"
    )
}

/// (table, built-in chain, our chain) jumps inserted first in the built-in chains.
pub const HOOKS: [(&str, &str, &str); 3] = [
    ("filter", "INPUT", "KILN-INPUT"),
    ("filter", "FORWARD", "KILN-FORWARD"),
    ("nat", "POSTROUTING", "KILN-POSTROUTING"),
];

/// Host-wide setup, idempotent: IPv4 forwarding, the operator's `KILN-USER` chain if
/// missing, and the KILN-* chains with their jumps. `egress_allow` is the operator's
/// allow-list ([`parse_egress_allow`]); the chains are host-wide, so the last runtime
/// created sets it for every sandbox on the host (give both runtimes the same list).
pub fn install_host_rules(egress_allow: &[Ipv4Cidr]) -> Result<(), NetError> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    ensure_user_chain()?;
    super::egress::ensure_dispatch_chains()?;
    let nameservers = host_nameservers().unwrap_or_default();
    let plan = FirewallPlan {
        egress_allow: egress_allow.to_vec(),
        nameservers: nameservers.clone(),
        host_networks: host_networks(),
    };
    run(
        "iptables-restore",
        &["-w", "--noflush"],
        Some(&iptables_rules(&plan)),
    )?;
    record_dns(&nameservers)?;
    for (table, chain, ours) in HOOKS {
        if run(
            "iptables",
            &["-w", "-t", table, "-C", chain, "-j", ours],
            None,
        )
        .is_err()
        {
            run(
                "iptables",
                &["-w", "-t", table, "-I", chain, "1", "-j", ours],
                None,
            )?;
        }
    }
    if Path::new("/proc/sys/net/ipv6").exists() {
        run(
            "ip6tables-restore",
            &["-w", "--noflush"],
            Some(&ip6tables_rules()),
        )?;
        for (table, chain, ours) in HOOKS.iter().filter(|h| h.0 == "filter") {
            if run(
                "ip6tables",
                &["-w", "-t", table, "-C", chain, "-j", ours],
                None,
            )
            .is_err()
            {
                run(
                    "ip6tables",
                    &["-w", "-t", table, "-I", chain, "1", "-j", ours],
                    None,
                )?;
            }
        }
    }
    Ok(())
}

/// Creates `KILN-USER` (empty) unless it exists; its rules are the operator's.
fn ensure_user_chain() -> Result<(), NetError> {
    let exists = || run("iptables", &["-w", "-t", "filter", "-S", USER_CHAIN], None).is_ok();
    if exists() {
        return Ok(());
    }
    match run("iptables", &["-w", "-t", "filter", "-N", USER_CHAIN], None) {
        // Another process created it in between: same outcome.
        Err(_) if exists() => Ok(()),
        other => other,
    }
}

/// The networks of the host's IPv4 addresses, except on `lo` and the sandboxes' `kv*`
/// (best effort: none when `ip` fails). A sandbox must not reach its host's LAN
/// neighbours even where that LAN is public address space.
pub fn host_networks() -> Vec<Ipv4Cidr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_host_networks(&out)
}

/// [`host_networks`] from `ip -4 -o addr show` output.
pub fn parse_host_networks(ip_addr: &str) -> Vec<Ipv4Cidr> {
    let mut nets = Vec::new();
    for line in ip_addr.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(ifname), Some(pos)) = (words.get(1), words.iter().position(|w| *w == "inet"))
        else {
            continue;
        };
        if *ifname == "lo" || ifname.starts_with(IF_PREFIX) {
            continue;
        }
        let Some((addr, prefix)) = words.get(pos + 1).and_then(|c| c.split_once('/')) else {
            continue;
        };
        let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
            continue;
        };
        // A /0 "network" would be the whole Internet.
        if prefix == 0 || prefix > 32 {
            continue;
        }
        let net = Ipv4Cidr::containing(addr, prefix);
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    nets
}

/// Which resolvers KILN-DNS accepts, as last installed on this host (so a sandbox
/// start compares without running iptables). `/run` is emptied by a reboot, as are
/// the chains.
const DNS_RECORD: &str = "/run/kiln-dns-rules";

fn record_text(nameservers: &[Ipv4Addr]) -> String {
    nameservers.iter().map(|n| format!("{n}\n")).collect()
}

fn record_dns(nameservers: &[Ipv4Addr]) -> Result<(), NetError> {
    let err = |source| NetError::DnsRecord {
        path: DNS_RECORD.to_string(),
        source,
    };
    let tmp = format!("{DNS_RECORD}.{}", std::process::id());
    std::fs::write(&tmp, record_text(nameservers)).map_err(err)?;
    std::fs::rename(&tmp, DNS_RECORD).map_err(err)
}

/// Makes KILN-DNS accept exactly `nameservers` (what a sandbox's resolv.conf is about
/// to hold), rewriting the chain only when the host's resolvers changed since the
/// last install (a DHCP lease, a VPN).
pub(super) fn ensure_dns_rules(nameservers: &[Ipv4Addr]) -> Result<(), NetError> {
    let installed = std::fs::read_to_string(DNS_RECORD).unwrap_or_default();
    if installed == record_text(nameservers) {
        return Ok(());
    }
    run(
        "iptables-restore",
        &["-w", "--noflush"],
        Some(&dns_chain_rules(nameservers)),
    )?;
    record_dns(nameservers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FirewallPlan {
        FirewallPlan {
            egress_allow: vec!["10.1.2.0/24".parse().unwrap()],
            nameservers: vec!["10.255.255.53".parse().unwrap()],
            host_networks: vec![
                "192.0.2.0/24".parse().unwrap(),
                "203.0.114.0/26".parse().unwrap(),
            ],
        }
    }

    /// Position of the first line of `rules` containing `needle`.
    fn line_of(rules: &str, needle: &str) -> usize {
        rules
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no rule with {needle:?} in\n{rules}"))
    }

    #[test]
    fn rules_isolate_sandboxes_and_host() {
        let r = iptables_rules(&plan());
        assert!(r.contains("-A KILN-INPUT -i kv+ -j DROP"));
        assert!(r.contains("-A KILN-FORWARD -i kv+ -o kv+ -j DROP"));
        assert!(r.contains("-s 10.77.0.0/16 ! -o kv+ -j MASQUERADE"));
        // kv->kv and new inbound drops come before any accept of egress.
        let general_accept = line_of(&r, "-A KILN-FORWARD -i kv+ -j ACCEPT");
        assert!(line_of(&r, "-i kv+ -o kv+ -j DROP") < general_accept);
        assert!(line_of(&r, "-A KILN-FORWARD -o kv+ -j DROP") < line_of(&r, "-d 10.1.2.0/24"));
        // The general accept is the last KILN-FORWARD rule.
        let last_forward = r
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with("-A KILN-FORWARD"))
            .map(|(i, _)| i)
            .last()
            .unwrap();
        assert_eq!(general_accept, last_forward);
    }

    #[test]
    fn egress_to_private_and_special_ranges_is_rejected_before_the_accept() {
        // The old rules accepted every destination but 169.254/16.
        let r = iptables_rules(&FirewallPlan::default());
        let accept = line_of(&r, "-A KILN-FORWARD -i kv+ -j ACCEPT");
        for net in [
            "127.0.0.0/8",
            "0.0.0.0/8",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "192.0.0.0/24",
            "224.0.0.0/4",
            "240.0.0.0/4",
        ] {
            let rule = format!(
                "-A KILN-FORWARD -i kv+ -d {net} -j REJECT --reject-with icmp-admin-prohibited"
            );
            assert!(r.contains(&rule), "missing {rule}");
            assert!(
                line_of(&r, &rule) < accept,
                "{net} rejected after the accept"
            );
        }
        for (net, _) in BLOCKED_EGRESS {
            assert_eq!(Ipv4Cidr::new(net.addr(), net.prefix()), Ok(*net));
        }
        // Broadcast is inside 240/4.
        assert!(BLOCKED_EGRESS
            .iter()
            .any(|(n, _)| n.contains(Ipv4Addr::BROADCAST)));
    }

    #[test]
    fn the_hosts_own_networks_are_rejected() {
        let r = iptables_rules(&plan());
        assert!(r.contains("-d 203.0.114.0/26 -j REJECT"));
        assert!(r.contains("-d 192.0.2.0/24 -j REJECT"));
        // TEST-NETs are not rejected as such (fake-IP proxies, this CI host's Internet).
        let none = iptables_rules(&FirewallPlan::default());
        for net in [
            "192.0.2.0/24",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "198.18.0.0/15",
        ] {
            assert!(
                !none.contains(net),
                "{net} rejected without being a host network"
            );
        }
        // Inside a range already rejected: no second rule.
        let inside = FirewallPlan {
            host_networks: vec!["10.9.8.0/24".parse().unwrap()],
            ..FirewallPlan::default()
        };
        assert!(!iptables_rules(&inside).contains("10.9.8.0/24"));
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                   4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\ x\n\
                   5: eth1    inet 198.100.7.9/23 scope global eth1\n\
                   9: kv3    inet 10.77.0.13/30 scope global kv3\n\
                   7: wg0    inet 0.0.0.0/0 scope global wg0\n";
        let want: Vec<Ipv4Cidr> = vec![
            "192.0.2.0/24".parse().unwrap(),
            "198.100.6.0/23".parse().unwrap(),
        ];
        assert_eq!(parse_host_networks(out), want);
    }

    #[test]
    fn the_operators_allow_list_is_accepted_before_the_private_ranges() {
        let r = iptables_rules(&plan());
        let allow = line_of(&r, "-A KILN-FORWARD -i kv+ -d 10.1.2.0/24 -j ACCEPT");
        assert!(allow < line_of(&r, "-d 10.0.0.0/8 -j REJECT"));
        assert!(
            allow > line_of(&r, "-i kv+ -o kv+ -j DROP"),
            "would open kv->kv"
        );
        let none = iptables_rules(&FirewallPlan::default());
        assert!(!none.contains("-d 10.1.2.0/24"));
    }

    #[test]
    fn the_sandboxes_resolvers_stay_reachable_on_port_53_only() {
        let r = iptables_rules(&plan());
        for proto in ["udp", "tcp"] {
            let rule = format!(
                "-A KILN-DNS -d 10.255.255.53/32 -p {proto} -m {proto} --dport 53 -j ACCEPT"
            );
            assert!(r.contains(&rule), "missing {rule}");
        }
        assert_eq!(
            r.matches("-A KILN-DNS").count(),
            2,
            "only port 53 of the resolver"
        );
        let dns_jump = line_of(&r, "-A KILN-FORWARD -i kv+ -j KILN-DNS");
        assert!(dns_jump < line_of(&r, "-d 10.0.0.0/8 -j REJECT"));
        // A resolver on a host address: INPUT consults KILN-DNS before its drop.
        assert!(
            line_of(&r, "-A KILN-INPUT -i kv+ -j KILN-DNS")
                < line_of(&r, "-A KILN-INPUT -i kv+ -j DROP")
        );
        assert_eq!(
            dns_chain_rules(&["192.168.1.1".parse().unwrap()]),
            "*filter\n:KILN-DNS - [0:0]\n\
             -A KILN-DNS -d 192.168.1.1/32 -p udp -m udp --dport 53 -j ACCEPT\n\
             -A KILN-DNS -d 192.168.1.1/32 -p tcp -m tcp --dport 53 -j ACCEPT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn each_sandboxs_own_rules_come_after_dns_and_before_the_host_wide_ranges() {
        let r = iptables_rules(&plan());
        assert!(!r.contains(":KILN-EGRESS"), "KILN-EGRESS would be flushed");
        let jump = line_of(&r, "-A KILN-FORWARD -i kv+ -j KILN-EGRESS");
        assert!(line_of(&r, "-A KILN-FORWARD -i kv+ -j KILN-DNS") < jump);
        assert!(line_of(&r, "-o kv+ -j DROP") < jump, "would open inbound");
        // A sandbox's allow only returns here: the operator's list and the
        // rejections still follow.
        assert!(jump < line_of(&r, "-d 10.1.2.0/24 -j ACCEPT"));
        assert!(jump < line_of(&r, "-d 10.0.0.0/8 -j REJECT"));
        // The egress proxy's connections (DNAT'd to the host end) are let in.
        assert!(
            line_of(
                &r,
                "-A KILN-INPUT -i kv+ -p tcp -m conntrack --ctstate DNAT -j ACCEPT"
            ) < line_of(&r, "-A KILN-INPUT -i kv+ -j DROP")
        );
    }

    #[test]
    fn the_operators_chain_comes_first_and_is_never_flushed() {
        let r = iptables_rules(&plan());
        // Declaring a chain in iptables-restore input flushes it.
        assert!(!r.contains(":KILN-USER"), "KILN-USER would be flushed");
        let first_forward = r
            .lines()
            .position(|l| l.starts_with("-A KILN-FORWARD"))
            .unwrap();
        assert_eq!(
            first_forward,
            line_of(&r, "-A KILN-FORWARD -i kv+ -j KILN-USER")
        );
        assert_eq!(
            first_forward + 1,
            line_of(&r, "-A KILN-FORWARD -o kv+ -j KILN-USER")
        );
    }
}
