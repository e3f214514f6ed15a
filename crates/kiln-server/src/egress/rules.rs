//! E2B's per-host request rules (`network.rules`): for requests to a host, headers to
//! set, whose values may name the team's secrets as `${e2b.secrets.NAME}`. The egress
//! proxy applies them (terminating TLS with the sandbox's own CA for HTTPS); the
//! sandbox only ever holds the placeholder.

use http::{HeaderName, HeaderValue};

use super::policy::{DomainPattern, PolicyError};

/// Hosts with rules, per sandbox.
pub const MAX_HOSTS: usize = 64;
/// Headers set per host.
pub const MAX_HEADERS: usize = 32;
/// A header template's length (before secrets are filled in).
pub const MAX_TEMPLATE: usize = 8 * 1024;

const SECRET_OPEN: &str = "${e2b.secrets.";

/// One header a rule sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    pub name: HeaderName,
    /// The value, with `${e2b.secrets.NAME}` placeholders.
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    pub host: DomainPattern,
    pub headers: Vec<HeaderRule>,
}

/// Every rule of a sandbox, by host (JSON objects carry no order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(pub Vec<HostRules>);

/// Where the proxy gets a secret's value from (the team's secret store).
pub trait SecretSource: Send + Sync {
    /// The current value of the team's secret `name` (`Ok(None)`: no such secret).
    fn value(&self, team_id: i64, name: &str) -> Result<Option<String>, String>;
}

/// Why a rule's header could not be filled in. Never carries a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    #[error("the rule names secret {0:?}, which this sandbox's team does not have")]
    Unknown(String),
    #[error("reading secret {name:?} failed: {reason}")]
    Store { name: String, reason: String },
    #[error("an unterminated ${{e2b.secrets...}} placeholder")]
    Unterminated,
    #[error("the filled-in value of header {0} is not a valid header value")]
    BadValue(String),
}

impl Rules {
    /// `rules` as the SDK sends it: `{host: [{"transform": {"headers": {k: v}}}]}`.
    pub fn parse(value: &serde_json::Value) -> Result<Rules, PolicyError> {
        let bad = |detail: String| PolicyError::Rules(detail);
        let serde_json::Value::Object(hosts) = value else {
            return Err(bad("expected an object of host → list of rules".into()));
        };
        if hosts.len() > MAX_HOSTS {
            return Err(bad(format!("at most {MAX_HOSTS} hosts")));
        }
        let mut out = Vec::new();
        for (host, list) in hosts {
            if host.contains('/') || host.parse::<std::net::Ipv4Addr>().is_ok() {
                return Err(bad(format!(
                    "{host:?}: rules are matched by the name a request announces (TLS SNI or Host); give a domain name, not an address"
                )));
            }
            let pattern = DomainPattern::parse(host).map_err(|e| bad(format!("{host:?}: {e}")))?;
            let serde_json::Value::Array(list) = list else {
                return Err(bad(format!("{host:?}: expected a list of rules")));
            };
            let mut headers = Vec::new();
            for rule in list {
                let transform = rule.get("transform");
                let Some(map) = transform
                    .and_then(|t| t.get("headers"))
                    .and_then(|h| h.as_object())
                else {
                    if transform.is_none_or(|t| t.as_object().is_some_and(|o| o.is_empty())) {
                        continue;
                    }
                    return Err(bad(format!(
                        "{host:?}: a rule is {{\"transform\": {{\"headers\": {{name: value}}}}}}"
                    )));
                };
                for (name, value) in map {
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| bad(format!("{host:?}: {name:?} is not a header name")))?;
                    let Some(template) = value.as_str() else {
                        return Err(bad(format!("{host:?}: header {name} must be a string")));
                    };
                    if template.len() > MAX_TEMPLATE {
                        return Err(bad(format!(
                            "{host:?}: header {name} is over {MAX_TEMPLATE} bytes"
                        )));
                    }
                    // Checked now, without secrets: placeholders closed, the rest a
                    // valid header value.
                    let probe = fill_with(template, |_| Ok(Some(String::new())))
                        .map_err(|e| bad(format!("{host:?}: header {name}: {e}")))?;
                    HeaderValue::from_str(&probe).map_err(|_| {
                        bad(format!(
                            "{host:?}: header {name} is not a valid header value"
                        ))
                    })?;
                    headers.push(HeaderRule {
                        name,
                        template: template.to_string(),
                    });
                }
            }
            if headers.len() > MAX_HEADERS {
                return Err(bad(format!("{host:?}: at most {MAX_HEADERS} headers")));
            }
            out.push(HostRules {
                host: pattern,
                headers,
            });
        }
        Ok(Rules(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers to set on a request to `host` (every matching entry's, in order).
    pub fn for_host(&self, host: &str) -> Vec<&HeaderRule> {
        self.0
            .iter()
            .filter(|r| r.host.matches(host))
            .flat_map(|r| r.headers.iter())
            .collect()
    }

    /// The hosts with rules, as given (shown back by `get_info`).
    pub fn hosts(&self) -> Vec<String> {
        self.0.iter().map(|r| r.host.to_string()).collect()
    }
}

impl HeaderRule {
    /// The header's value for a request of `team_id`'s sandbox.
    pub fn fill(&self, team_id: i64, secrets: &dyn SecretSource) -> Result<HeaderValue, FillError> {
        let value = fill_with(&self.template, |name| {
            secrets
                .value(team_id, name)
                .map_err(|reason| FillError::Store {
                    name: name.to_string(),
                    reason,
                })
        })?;
        let mut v = HeaderValue::from_str(&value)
            .map_err(|_| FillError::BadValue(self.name.to_string()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

/// `template` with each `${e2b.secrets.NAME}` replaced by `lookup(NAME)`.
fn fill_with(
    template: &str,
    mut lookup: impl FnMut(&str) -> Result<Option<String>, FillError>,
) -> Result<String, FillError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find(SECRET_OPEN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + SECRET_OPEN.len()..];
        let end = after.find('}').ok_or(FillError::Unterminated)?;
        let name = &after[..end];
        match lookup(name)? {
            Some(v) => out.push_str(&v),
            None => return Err(FillError::Unknown(name.to_string())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl SecretSource for Fixed {
        fn value(&self, team_id: i64, name: &str) -> Result<Option<String>, String> {
            Ok((team_id == 7 && name == "key").then(|| "s3cr3t".to_string()))
        }
    }

    #[test]
    fn rules_parse_match_and_fill_secrets_per_team() {
        let rules = Rules::parse(&serde_json::json!({
            "api.example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.key}", "X-A": "1"}}}],
            "*.example.org": [{"transform": {"headers": {"X-B": "2"}}}, {}]
        }))
        .unwrap();
        assert_eq!(rules.hosts(), vec!["*.example.org", "api.example.com"]);
        let h = rules.for_host("API.example.com");
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].fill(7, &Fixed).unwrap(), "Bearer s3cr3t");
        assert!(h[0].fill(7, &Fixed).unwrap().is_sensitive());
        // Another team's sandbox does not get this team's secret.
        assert_eq!(h[0].fill(8, &Fixed), Err(FillError::Unknown("key".into())));
        assert_eq!(rules.for_host("a.example.org").len(), 1);
        assert!(rules.for_host("example.org").is_empty());
        assert!(Rules::parse(&serde_json::json!({})).unwrap().is_empty());
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (rules, want) in [
            (serde_json::json!([]), "expected an object"),
            (serde_json::json!({"10.0.0.0/8": []}), "not an address"),
            (serde_json::json!({"1.2.3.4": []}), "not an address"),
            (serde_json::json!({"a.com": {}}), "list of rules"),
            (
                serde_json::json!({"a.com": [{"transform": {"headers": {"Bad Name": "x"}}}]}),
                "not a header name",
            ),
            (
                serde_json::json!({"a.com": [{"transform": {"headers": {"X": 1}}}]}),
                "must be a string",
            ),
            (
                serde_json::json!({"a.com": [{"transform": {"headers": {"X": "a\r\nEvil: 1"}}}]}),
                "not a valid header value",
            ),
            (
                serde_json::json!({"a.com": [{"transform": {"headers": {"X": "${e2b.secrets.k"}}}]}),
                "unterminated",
            ),
            (
                serde_json::json!({"a.com": [{"transform": {"body": "x"}}]}),
                "a rule is",
            ),
        ] {
            let e = Rules::parse(&rules).unwrap_err().to_string();
            assert!(
                e.contains("network.rules") && e.contains(want),
                "{rules}: {e}"
            );
        }
    }
}
