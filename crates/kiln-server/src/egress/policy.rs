//! A sandbox's egress policy as E2B's `allowOut`/`denyOut` say it: entries are IPv4
//! addresses, CIDR networks and domain names (`*.` for any subdomain); allow beats
//! deny; without deny entries everything is allowed. The IP half becomes firewall
//! rules ([`EgressPolicy::firewall`]); the domain half is decided by the egress proxy
//! ([`EgressPolicy::decide`]) from the TLS SNI or the HTTP Host of a connection.

use std::net::Ipv4Addr;

use kiln_runtime::jail::net::egress::EgressRules;
use kiln_runtime::jail::net::Ipv4Cidr;

/// Longest domain name (RFC 1035).
const MAX_DOMAIN: usize = 253;
/// Entries per list: each network is two firewall rules on every packet's path.
pub const MAX_ENTRIES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("network.{list}[{index}] is {entry:?}: expected an IPv4 address (1.2.3.4), an IPv4 network (10.1.0.0/16, 0.0.0.0/0 for all traffic) or a domain name (api.example.com, *.example.com); {detail}")]
    Entry {
        list: &'static str,
        index: usize,
        entry: String,
        detail: String,
    },
    #[error("network.{list} has {count} entries; at most {MAX_ENTRIES} are allowed")]
    TooMany { list: &'static str, count: usize },
    #[error("network.{field} is not supported by this server yet: {why}")]
    Unsupported {
        field: &'static str,
        why: &'static str,
    },
    #[error("network.rules: {0}")]
    Rules(String),
    #[error("network.maskRequestHost {0:?} is not a host name (letters, digits, '-', '.', an optional ${{PORT}} and :port)")]
    MaskHost(String),
    #[error("network.{0} needs Internet access: this sandbox was created with allow_internet_access false")]
    NoInternet(&'static str),
}

/// A domain entry: exactly `name`, or (`*.name`) any name under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPattern {
    /// Lowercase, without a trailing dot.
    name: String,
    subdomains: bool,
}

impl DomainPattern {
    pub fn parse(entry: &str) -> Result<DomainPattern, String> {
        let lower = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        let (subdomains, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        if name.is_empty() || name.len() > MAX_DOMAIN {
            return Err(format!("a domain name has 1 to {MAX_DOMAIN} characters"));
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!(
                    "label {label:?} is not a DNS label (letters, digits, '-' and '_', 1 to 63 characters; '*' only as a whole first label)"
                ));
            }
        }
        // All digits and dots: a malformed address, not a name.
        if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err("it is neither a valid IPv4 address nor a name".into());
        }
        Ok(DomainPattern { name, subdomains })
    }

    /// Whether `host` (a name from SNI or Host, any case, maybe with a trailing dot)
    /// is covered.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.subdomains {
            host.len() > self.name.len()
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subdomains {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// One list, split by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub nets: Vec<Ipv4Cidr>,
    pub domains: Vec<DomainPattern>,
}

impl Targets {
    fn parse(list: &'static str, entries: &[String]) -> Result<Targets, PolicyError> {
        if entries.len() > MAX_ENTRIES {
            return Err(PolicyError::TooMany {
                list,
                count: entries.len(),
            });
        }
        let mut t = Targets::default();
        for (index, entry) in entries.iter().enumerate() {
            let err = |detail: String| PolicyError::Entry {
                list,
                index,
                entry: entry.clone(),
                detail,
            };
            let looks_numeric = entry
                .trim()
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
                || entry.contains(':')
                || entry.contains('/');
            if looks_numeric {
                let net: Ipv4Cidr = entry.parse().map_err(|e| err(format!("{e}")))?;
                if !t.nets.contains(&net) {
                    t.nets.push(net);
                }
            } else {
                let d = DomainPattern::parse(entry).map_err(err)?;
                if !t.domains.contains(&d) {
                    t.domains.push(d);
                }
            }
        }
        Ok(t)
    }

    fn covers(&self, dst: Ipv4Addr, host: Option<&str>) -> bool {
        self.nets.iter().any(|n| n.contains(dst))
            || host.is_some_and(|h| self.domains.iter().any(|d| d.matches(h)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow: Targets,
    pub deny: Targets,
}

/// What the egress proxy does with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Connect to the original destination. `verify_host`: the connection was allowed
    /// by the name it announced, so the destination must be an address of that name.
    Allow {
        verify_host: Option<String>,
    },
    Deny {
        reason: String,
    },
}

impl EgressPolicy {
    pub fn parse(allow: &[String], deny: &[String]) -> Result<EgressPolicy, PolicyError> {
        Ok(EgressPolicy {
            allow: Targets::parse("allowOut", allow)?,
            deny: Targets::parse("denyOut", deny)?,
        })
    }

    /// Whether the policy refuses anything at all.
    pub fn restricts(&self) -> bool {
        !self.deny.nets.is_empty() || !self.deny.domains.is_empty()
    }

    /// Whether connections need the proxy (a name decides, not only an address).
    pub fn needs_proxy(&self) -> bool {
        self.restricts() && !(self.allow.domains.is_empty() && self.deny.domains.is_empty())
    }

    /// The firewall half; `proxy_port` is where the egress proxy listens, used when
    /// [`Self::needs_proxy`].
    pub fn firewall(&self, proxy_port: u16) -> EgressRules {
        if !self.restricts() {
            return EgressRules::default();
        }
        EgressRules {
            allow: self.allow.nets.clone(),
            deny: self.deny.nets.clone(),
            proxy_port: self.needs_proxy().then_some(proxy_port),
        }
    }

    /// The decision for a connection to `dst` that announced `host` (TLS SNI or HTTP
    /// Host; `None` when it announced nothing readable).
    pub fn decide(&self, dst: Ipv4Addr, host: Option<&str>) -> Verdict {
        if let Some(h) = host {
            if self.allow.domains.iter().any(|d| d.matches(h)) {
                return Verdict::Allow {
                    verify_host: Some(h.to_string()),
                };
            }
        }
        if self.allow.nets.iter().any(|n| n.contains(dst)) {
            return Verdict::Allow { verify_host: None };
        }
        if self.deny.covers(dst, host) {
            let what = match host {
                Some(h) => format!("{h} ({dst})"),
                None => dst.to_string(),
            };
            return Verdict::Deny {
                reason: format!("{what} is denied by the sandbox's network policy"),
            };
        }
        Verdict::Allow { verify_host: None }
    }

    /// The lists as E2B shows them back (`get_info`).
    pub fn lists(&self) -> (Vec<String>, Vec<String>) {
        let show = |t: &Targets| -> Vec<String> {
            t.nets
                .iter()
                .map(|n| {
                    if n.prefix() == 32 {
                        n.addr().to_string()
                    } else {
                        n.to_string()
                    }
                })
                .chain(t.domains.iter().map(|d| d.to_string()))
                .collect()
        };
        (show(&self.allow), show(&self.deny))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(&v(allow), &v(deny)).unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_beats_deny_and_no_deny_means_everything() {
        let p = policy(&["1.1.1.1"], &["0.0.0.0/0"]);
        assert_eq!(
            p.decide(ip("1.1.1.1"), None),
            Verdict::Allow { verify_host: None }
        );
        assert!(matches!(
            p.decide(ip("8.8.8.8"), None),
            Verdict::Deny { .. }
        ));
        let open = policy(&["1.1.1.1"], &[]);
        assert!(!open.restricts());
        assert_eq!(open.firewall(1), EgressRules::default());
        assert_eq!(
            open.decide(ip("8.8.8.8"), Some("x.com")),
            Verdict::Allow { verify_host: None }
        );
    }

    #[test]
    fn domains_allow_by_name_and_want_the_name_checked() {
        let p = policy(&["*.example.com", "api.test"], &["0.0.0.0/0"]);
        assert!(p.needs_proxy());
        assert_eq!(
            p.decide(ip("203.0.113.9"), Some("API.test.")),
            Verdict::Allow {
                verify_host: Some("API.test.".into())
            }
        );
        assert!(matches!(
            p.decide(ip("203.0.113.9"), Some("a.b.example.com")),
            Verdict::Allow {
                verify_host: Some(_)
            }
        ));
        // The wildcard does not cover the apex nor look-alikes.
        for host in ["example.com", "badexample.com", "example.com.evil.net"] {
            assert!(
                matches!(
                    p.decide(ip("203.0.113.9"), Some(host)),
                    Verdict::Deny { .. }
                ),
                "{host}"
            );
        }
        assert!(matches!(
            p.decide(ip("203.0.113.9"), None),
            Verdict::Deny { .. }
        ));
        let fw = p.firewall(4242);
        assert_eq!(fw.proxy_port, Some(4242));
        assert_eq!(fw.deny, vec!["0.0.0.0/0".parse().unwrap()]);
    }

    #[test]
    fn denied_domains_and_ip_only_policies() {
        let p = policy(&[], &["blocked.test"]);
        assert!(p.needs_proxy());
        assert!(matches!(
            p.decide(ip("198.51.100.1"), Some("blocked.test")),
            Verdict::Deny { .. }
        ));
        assert_eq!(
            p.decide(ip("198.51.100.1"), Some("other.test")),
            Verdict::Allow { verify_host: None }
        );
        let ips = policy(&["198.51.100.0/24"], &["0.0.0.0/0"]);
        assert!(!ips.needs_proxy());
        assert_eq!(ips.firewall(4242).proxy_port, None);
        assert_eq!(
            ips.lists(),
            (vec!["198.51.100.0/24".into()], vec!["0.0.0.0/0".into()])
        );
        assert_eq!(
            policy(&["1.2.3.4", "*.x.org"], &[]).lists().0,
            vec!["1.2.3.4".to_string(), "*.x.org".to_string()]
        );
    }

    #[test]
    fn bad_entries_say_which_and_why() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for bad in [
            "10.0.0.1/8",
            "300.1.1.1",
            "fd00::1",
            "exa mple.com",
            "*",
            "a.*.com",
            "-x.com",
            "",
            "1.2.3",
        ] {
            let e = EgressPolicy::parse(&v(&["1.1.1.1", bad]), &[]).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("network.allowOut[1]"), "{bad}: {text}");
        }
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("h{i}.test")).collect();
        assert!(matches!(
            EgressPolicy::parse(&[], &many),
            Err(PolicyError::TooMany {
                list: "denyOut",
                ..
            })
        ));
    }
}
