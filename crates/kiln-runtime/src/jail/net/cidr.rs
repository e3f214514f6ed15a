//! IPv4 networks in CIDR notation and the operator's egress allow-list.

use std::net::Ipv4Addr;

/// An IPv4 network in CIDR notation (`10.1.2.0/24`; a bare address is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why an egress allow-list entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("empty entry in the egress allow-list {list:?} (expected CIDR[,CIDR...], like 10.1.2.0/24,192.168.5.7)")]
    Empty { list: String },
    #[error("{input:?} is not an IPv4 network in CIDR notation (like 10.1.2.0/24, or 192.168.5.7 for one address)")]
    Syntax { input: String },
    #[error("{input:?} is an IPv6 network: sandboxes have no IPv6 and all their IPv6 traffic is dropped; only IPv4 ranges can be allowed")]
    Ipv6 { input: String },
    #[error("{input:?}: prefix length {prefix} is over 32")]
    Prefix { input: String, prefix: u32 },
    #[error("{input:?} has bits set after its /{prefix} prefix: write the network, {network}")]
    HostBits {
        input: String,
        prefix: u8,
        network: Ipv4Cidr,
    },
}

impl Ipv4Cidr {
    /// `addr/prefix`; refuses a prefix over 32 and an address with host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, CidrError> {
        let input = format!("{addr}/{prefix}");
        if prefix > 32 {
            return Err(CidrError::Prefix {
                input,
                prefix: prefix.into(),
            });
        }
        let network = Ipv4Cidr::containing(addr, prefix);
        if network.addr != addr {
            return Err(CidrError::HostBits {
                input,
                prefix,
                network,
            });
        }
        Ok(network)
    }

    /// The network of `prefix` bits that holds `addr` (host bits cleared).
    pub(super) fn containing(addr: Ipv4Addr, prefix: u8) -> Ipv4Cidr {
        let prefix = prefix.min(32);
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & Ipv4Cidr::mask(prefix)),
            prefix,
        }
    }

    const fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix as u32)
        }
    }

    pub(super) const fn of(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::new(a, b, c, d),
            prefix,
        }
    }

    pub fn addr(self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Ipv4Cidr::mask(self.prefix) == u32::from(self.addr)
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Ipv4Cidr, CidrError> {
        let input = s.trim();
        let syntax = || CidrError::Syntax {
            input: input.to_string(),
        };
        let (addr, prefix) = match input.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (input, None),
        };
        if addr.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(CidrError::Ipv6 {
                input: input.to_string(),
            });
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix: u32 = match prefix {
            None => 32,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
        };
        let prefix = u8::try_from(prefix)
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| CidrError::Prefix {
                input: input.to_string(),
                prefix,
            })?;
        Ipv4Cidr::new(addr, prefix).map_err(|e| match e {
            CidrError::HostBits {
                prefix, network, ..
            } => CidrError::HostBits {
                input: input.to_string(),
                prefix,
                network,
            },
            other => other,
        })
    }
}

/// Parses the operator's egress allow-list, `CIDR[,CIDR...]` (`10.1.2.0/24,192.168.5.7`;
/// spaces around entries are ignored, an empty string is an empty list). The result
/// goes into `JailOptions::egress_allow` / `GvisorOptions::egress_allow`; sandboxes
/// with Internet access may then reach those ranges although they are private.
pub fn parse_egress_allow(list: &str) -> Result<Vec<Ipv4Cidr>, CidrError> {
    if list.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<Ipv4Cidr> = Vec::new();
    for entry in list.split(',') {
        if entry.trim().is_empty() {
            return Err(CidrError::Empty {
                list: list.to_string(),
            });
        }
        let cidr: Ipv4Cidr = entry.parse()?;
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_egress_allow_list() {
        let got = parse_egress_allow(" 10.1.2.0/24, 192.168.5.7 ,10.1.2.0/24").unwrap();
        assert_eq!(
            got,
            vec![
                "10.1.2.0/24".parse::<Ipv4Cidr>().unwrap(),
                Ipv4Cidr::new(Ipv4Addr::new(192, 168, 5, 7), 32).unwrap(),
            ]
        );
        assert_eq!(got[1].to_string(), "192.168.5.7/32");
        assert_eq!(parse_egress_allow("").unwrap(), vec![]);
        assert_eq!(
            parse_egress_allow("0.0.0.0/0").unwrap()[0].to_string(),
            "0.0.0.0/0"
        );
        let err = |s: &str| parse_egress_allow(s).unwrap_err();
        assert!(matches!(err("10.1.2.3/24"), CidrError::HostBits { .. }));
        assert!(err("10.1.2.3/24").to_string().contains("10.1.2.0/24"));
        assert!(matches!(err("10.0.0.0/33"), CidrError::Prefix { .. }));
        assert!(matches!(err("10.0.0.0/99"), CidrError::Prefix { .. }));
        assert!(matches!(err("fd00::/8"), CidrError::Ipv6 { .. }));
        assert!(matches!(
            err("10.0.0.0/8,,1.2.3.4"),
            CidrError::Empty { .. }
        ));
        for bad in [
            "10.0.0/8",
            "example.com",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8/9",
        ] {
            assert!(matches!(err(bad), CidrError::Syntax { .. }), "{bad}");
        }
        let net: Ipv4Cidr = "10.1.2.0/24".parse().unwrap();
        assert!(net.contains(Ipv4Addr::new(10, 1, 2, 200)));
        assert!(!net.contains(Ipv4Addr::new(10, 1, 3, 0)));
    }
}
