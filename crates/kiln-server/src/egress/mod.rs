//! Per-sandbox network policy: E2B's `network` object (egress allow and deny lists,
//! private ports), turned into firewall rules and the egress proxy's decisions.

pub mod ca;
mod intercept;
pub mod policy;
pub mod proxy;
pub mod rules;

pub use policy::{EgressPolicy, PolicyError, Verdict};

use kiln_api::SandboxNetwork;

/// A sandbox's `network` object, checked: what the firewall, the egress proxy and the
/// port proxy each need from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    pub egress: EgressPolicy,
    /// Header transforms per host (`network.rules`).
    pub rules: rules::Rules,
    /// Ports answer only with the traffic access token.
    pub private: bool,
    /// The Host the sandbox's servers see (`${PORT}` replaced per request).
    pub mask_request_host: Option<String>,
}

/// Whether a JSON value asks for something (`null`, `{}` and `[]` do not).
pub(crate) fn given(v: &Option<serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// Refuses what Kiln does not do rather than dropping it silently.
pub fn refuse_unsupported(egress_proxy: &Option<serde_json::Value>) -> Result<(), PolicyError> {
    if given(egress_proxy) {
        return Err(PolicyError::Unsupported {
            field: "egressProxy",
            why: "Kiln does not tunnel egress through a SOCKS5 proxy; remove `egress_proxy`",
        });
    }
    Ok(())
}

impl Network {
    pub fn parse(net: &SandboxNetwork) -> Result<Network, PolicyError> {
        refuse_unsupported(&net.egress_proxy)?;
        let rules = match &net.rules {
            Some(r) if given(&net.rules) => rules::Rules::parse(r)?,
            _ => rules::Rules::default(),
        };
        let egress = EgressPolicy::parse(
            net.allow_out.as_deref().unwrap_or_default(),
            net.deny_out.as_deref().unwrap_or_default(),
        )?;
        let mask_request_host = net
            .mask_request_host
            .as_deref()
            .filter(|m| !m.is_empty())
            .map(check_mask)
            .transpose()?;
        Ok(Network {
            egress,
            rules,
            private: net.allow_public_traffic == Some(false),
            mask_request_host,
        })
    }

    /// Whether the sandbox's web traffic goes through the egress proxy: a name decides
    /// whether it may leave, or rules change its requests.
    pub fn needs_proxy(&self) -> bool {
        self.egress.needs_proxy() || !self.rules.is_empty()
    }

    /// The firewall half; `proxy_port` is where the egress proxy listens.
    pub fn firewall(&self, proxy_port: u16) -> kiln_runtime::jail::net::egress::EgressRules {
        let mut rules = self.egress.firewall(proxy_port);
        rules.proxy_port = self.needs_proxy().then_some(proxy_port);
        rules
    }

    /// The Host header for a request to `port`, when the sandbox masks it.
    pub fn masked_host(&self, port: u16) -> Option<String> {
        self.mask_request_host
            .as_ref()
            .map(|m| m.replace("${PORT}", &port.to_string()))
    }
}

/// A mask is a host (and maybe a port) once `${PORT}` is a number: it becomes a
/// header value, so nothing else may get through.
fn check_mask(mask: &str) -> Result<String, PolicyError> {
    let probe = mask.replace("${PORT}", "1");
    let ok = probe.len() <= 253
        && !probe.is_empty()
        && probe
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':');
    if ok {
        Ok(mask.to_string())
    } else {
        Err(PolicyError::MaskHost(mask.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_object_is_checked_whole() {
        let net: SandboxNetwork = serde_json::from_value(serde_json::json!({
            "allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"],
            "allowPublicTraffic": false, "maskRequestHost": "${PORT}-x.example.com"
        }))
        .unwrap();
        let n = Network::parse(&net).unwrap();
        assert!(n.private && n.egress.restricts());
        assert_eq!(n.masked_host(8080).as_deref(), Some("8080-x.example.com"));
        let public = Network::parse(&SandboxNetwork::default()).unwrap();
        assert!(!public.private && public.masked_host(1).is_none());

        let bad_mask = SandboxNetwork {
            mask_request_host: Some("x.com\r\nEvil: 1".into()),
            ..SandboxNetwork::default()
        };
        assert!(matches!(
            Network::parse(&bad_mask),
            Err(PolicyError::MaskHost(_))
        ));
        let rules = SandboxNetwork {
            rules: Some(serde_json::json!({"api.x.com": [{"transform": {"headers": {"A": "b"}}}]})),
            ..SandboxNetwork::default()
        };
        // Rules alone send web traffic through the proxy, denying nothing.
        let n = Network::parse(&rules).unwrap();
        assert!(n.needs_proxy() && !n.egress.restricts());
        let fw = n.firewall(4242);
        assert_eq!(fw.proxy_port, Some(4242));
        assert!(fw.deny.is_empty());
        let proxy = SandboxNetwork {
            egress_proxy: Some(serde_json::json!({"address": "p.example.com:1080"})),
            ..SandboxNetwork::default()
        };
        let e = Network::parse(&proxy).unwrap_err().to_string();
        assert!(e.contains("network.egressProxy"), "{e}");
        // Empty shapes the SDK may send are not a request for anything.
        let empty = SandboxNetwork {
            rules: Some(serde_json::json!({})),
            egress_proxy: Some(serde_json::Value::Null),
            ..SandboxNetwork::default()
        };
        assert!(Network::parse(&empty).is_ok());
    }
}
