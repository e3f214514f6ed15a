//! A sandbox's network policy on the host: its firewall chains (through the runtime's
//! network slot), its entry in the egress proxy, and `PUT /sandboxes/{id}/network`.
//! Applied at create before the guest runs anything, again after a restart (the proxy
//! listens on a new port) and after a resume (a resumed gVisor sandbox gets its network
//! rebuilt), and removed with the sandbox's veth. A sandbox with header rules gets a
//! CA of its own, made here, kept in memory only and added to the sandbox's trust
//! store through envd.

use std::sync::Arc;

use kiln_api::{NetworkUpdate, SandboxNetwork};
use kiln_runtime::jail::net::{self, egress, Ipv4Cidr};

use super::{SandboxError, SandboxManager};
use crate::authz::Caller;
use crate::egress::ca::SandboxCa;
use crate::egress::proxy::{Denial, EgressProxy, NoSecrets, SandboxEgress};
use crate::egress::rules::SecretSource;
use crate::egress::{refuse_unsupported, Network, PolicyError};
use crate::store::SandboxRecord;

/// The network of a record (an empty policy when it has none).
pub(crate) fn network_of(rec: &SandboxRecord) -> Network {
    rec.network
        .as_ref()
        .and_then(|n| Network::parse(n).ok())
        .unwrap_or_default()
}

/// What a create's `network` object becomes, checked against its Internet access.
pub(super) fn check_create(
    net: Option<&SandboxNetwork>,
    allow_internet: bool,
) -> Result<Network, SandboxError> {
    let Some(net) = net else {
        return Ok(Network::default());
    };
    parse_for(net, allow_internet)
}

/// `net` parsed, refused when it allows destinations to a sandbox without Internet
/// access (an allow list there would open what `allowInternetAccess: false` closed).
fn parse_for(net: &SandboxNetwork, allow_internet: bool) -> Result<Network, SandboxError> {
    let parsed = Network::parse(net)?;
    if !allow_internet && parsed.egress.allow != Default::default() {
        return Err(PolicyError::NoInternet("allowOut").into());
    }
    Ok(parsed)
}

/// What the egress proxy is started with (`kiln serve` sets it once).
pub struct EgressSetup {
    /// The operator's exceptions to the ranges no sandbox reaches (`--egress-allow`),
    /// honoured by the proxy as by the firewall.
    pub operator_allow: Vec<Ipv4Cidr>,
    /// The teams' secrets, for header rules.
    pub secrets: Arc<dyn SecretSource>,
    /// Roots the operator trusts for upstream servers besides the usual ones
    /// (`--egress-upstream-ca`).
    pub upstream_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Default for EgressSetup {
    fn default() -> Self {
        EgressSetup {
            operator_allow: Vec::new(),
            secrets: Arc::new(NoSecrets),
            upstream_roots: Vec::new(),
        }
    }
}

/// Where the sandbox's CA goes in its trust store.
pub(super) const CA_FILE: &str = "/usr/local/share/ca-certificates/kiln-egress.crt";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The environment that points common TLS clients at the bundle holding the
/// sandbox's CA (for sandboxes created with rules).
pub(super) fn trust_env() -> [(String, String); 3] {
    [
        ("SSL_CERT_FILE".into(), CA_BUNDLE.into()),
        ("REQUESTS_CA_BUNDLE".into(), CA_BUNDLE.into()),
        ("NODE_EXTRA_CA_CERTS".into(), CA_FILE.into()),
    ]
}

/// Adds `ca`'s certificate to the sandbox's trust store (as root, through envd).
pub(super) async fn install_ca(
    socket: &std::path::Path,
    access_token: Option<&str>,
    ca: &SandboxCa,
) -> Result<(), String> {
    let script = format!(
        "set -e; mkdir -p \"$(dirname {CA_FILE})\" \"$(dirname {CA_BUNDLE})\"; \
         printf '%s\\n' \"$KILN_EGRESS_CA\" > {CA_FILE}; \
         printf '%s\\n' \"$KILN_EGRESS_CA\" >> {CA_BUNDLE}"
    );
    let exec = crate::envd::Exec {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        envs: [("KILN_EGRESS_CA".to_string(), ca.cert_pem())].into(),
        cwd: Some("/".into()),
        user: Some("root".into()),
    };
    let done = crate::envd::exec(
        socket,
        &exec,
        access_token,
        std::time::Duration::from_secs(30),
        4096,
    )
    .await
    .map_err(|e| format!("installing the egress CA: {}", crate::report::chain(&e)))?;
    match done.exit_code {
        Some(0) => Ok(()),
        code => Err(format!(
            "installing the egress CA exited with {code:?}: {}",
            String::from_utf8_lossy(&done.stderr).trim()
        )),
    }
}

impl SandboxManager {
    pub fn set_egress_setup(&self, setup: EgressSetup) {
        *self.egress_setup.write().unwrap_or_else(|e| e.into_inner()) = setup;
    }

    /// The egress proxy, started on first use.
    async fn egress_proxy(&self) -> Result<&Arc<EgressProxy>, SandboxError> {
        self.egress
            .get_or_try_init(|| async {
                let mut blocked: Vec<Ipv4Cidr> =
                    net::BLOCKED_EGRESS.iter().map(|(n, _)| *n).collect();
                blocked.extend(net::host_networks());
                let (allow, secrets, roots) = {
                    let setup = self.egress_setup.read().unwrap_or_else(|e| e.into_inner());
                    (
                        setup.operator_allow.clone(),
                        setup.secrets.clone(),
                        setup.upstream_roots.clone(),
                    )
                };
                let audit = self.audit.read().unwrap_or_else(|e| e.into_inner()).clone();
                let counts = self.proxy_denied.clone();
                let on_denied = Arc::new(move |d: Denial| {
                    *counts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(d.sandbox_id.clone())
                        .or_default() += 1;
                    audit.record(
                        crate::audit::Event::new("network.denied", false)
                            .sandbox(&d.sandbox_id)
                            .user(d.team_id, 0)
                            .subject(format!(
                                "host:{} destination:{}",
                                d.host.as_deref().unwrap_or("-"),
                                d.destination
                            )),
                    );
                    tracing::info!(sandbox = %d.sandbox_id, host = ?d.host, destination = %d.destination, reason = %d.reason, "egress denied");
                });
                EgressProxy::start(blocked, allow, on_denied, secrets, roots)
                    .await
                    .map_err(|source| SandboxError::EgressProxy { source })
            })
            .await
    }

    /// Makes the host enforce `network` for sandbox `id`. Returns the sandbox's CA
    /// when this call made it (its rules need one and it had none): the caller adds it
    /// to the sandbox's trust store.
    pub(super) async fn apply_network(
        &self,
        id: &str,
        team_id: i64,
        network: &Network,
    ) -> Result<Option<Arc<SandboxCa>>, SandboxError> {
        let Some(slot) = self.runtime.network_slot(id) else {
            // Loopback only: there is no egress to filter.
            return Ok(None);
        };
        let port = if network.needs_proxy() {
            Some(self.egress_proxy().await?.port())
        } else {
            None
        };
        let (ca, made) = if network.rules.is_empty() {
            self.cas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            (None, false)
        } else {
            let existing = self
                .cas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(id)
                .cloned();
            match existing {
                Some(ca) => (Some(ca), false),
                None => {
                    let ca = Arc::new(SandboxCa::new(id).map_err(|e| SandboxError::EgressCa {
                        id: id.to_string(),
                        reason: e.to_string(),
                    })?);
                    self.cas
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.to_string(), ca.clone());
                    (Some(ca), true)
                }
            }
        };
        let rules = network.firewall(port.unwrap_or_default());
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || egress::apply(slot, &rules))
            .await?
            .map_err(|source| SandboxError::Firewall {
                id: id_owned,
                source,
            })?;
        if let Some(proxy) = self.egress.get() {
            let entry = network.needs_proxy().then(|| {
                Arc::new(SandboxEgress {
                    sandbox_id: id.to_string(),
                    team_id,
                    policy: network.egress.clone(),
                    rules: network.rules.clone(),
                    ca: ca.clone(),
                })
            });
            proxy.set(slot.guest_ip(), entry);
        }
        Ok(ca.filter(|_| made))
    }

    /// [`Self::apply_network`] for a sandbox whose envd runs (adopted after a restart,
    /// resumed): a new CA is installed at once. A failure is logged, not fatal, since
    /// the sandbox exists.
    pub(super) async fn reapply_network(&self, rec: &SandboxRecord, socket: &std::path::Path) {
        if rec.network.is_none() {
            return;
        }
        let applied = self
            .apply_network(&rec.id, rec.team_id, &network_of(rec))
            .await;
        let result = match applied {
            Ok(Some(ca)) => install_ca(socket, rec.access_token.as_deref(), &ca).await,
            Ok(None) => Ok(()),
            Err(e) => Err(crate::report::chain(&e)),
        };
        if let Err(e) = result {
            tracing::error!(id = %rec.id, error = %e, "re-applying the sandbox's network policy failed");
        }
    }

    /// Drops the sandbox from the egress proxy and its CA (its chains go with its
    /// veth).
    pub(super) fn forget_network(&self, id: &str) {
        self.proxy_denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.cas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let (Some(proxy), Some(slot)) = (self.egress.get(), self.runtime.network_slot(id)) {
            proxy.set(slot.guest_ip(), None);
        }
    }

    /// Denied connections of sandbox `id` so far (firewall and proxy).
    pub async fn egress_denied(&self, id: &str) -> u64 {
        let by_proxy = self
            .proxy_denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
            .unwrap_or_default();
        let by_firewall = match self.runtime.network_slot(id) {
            Some(slot) => tokio::task::spawn_blocking(move || egress::denied(slot))
                .await
                .unwrap_or_default(),
            None => 0,
        };
        by_proxy + by_firewall
    }

    /// `PUT /sandboxes/{id}/network`: replaces the egress lists and rules (the
    /// private-port settings stay as created); new connections follow the new rules at
    /// once, and open ones a deny now covers are cut.
    pub async fn update_network(
        &self,
        caller: &Caller,
        id: &str,
        update: NetworkUpdate,
    ) -> Result<(), SandboxError> {
        let entry = self.require(caller, id)?;
        refuse_unsupported(&update.egress_proxy)?;
        let mut deny = update.deny_out.clone().unwrap_or_default();
        if update.allow_internet_access == Some(false) && !deny.iter().any(|d| d == "0.0.0.0/0") {
            deny.push("0.0.0.0/0".to_string());
        }
        let mut rec = entry.record();
        let mut stored = rec.network.clone().unwrap_or_default();
        stored.allow_out = update.allow_out.clone().filter(|a| !a.is_empty());
        stored.deny_out = (!deny.is_empty()).then_some(deny);
        stored.rules = update.rules.clone();
        let network = parse_for(&stored, rec.allow_internet_access)?;
        if let Some(ca) = self.apply_network(id, rec.team_id, &network).await? {
            install_ca(&entry.envd_socket, rec.access_token.as_deref(), &ca)
                .await
                .map_err(|reason| SandboxError::EgressCa {
                    id: id.to_string(),
                    reason,
                })?;
        }
        rec.network = Some(stored.clone());
        self.store.upsert_sandbox(&rec)?;
        entry
            .record
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .network = Some(stored);
        Ok(())
    }
}
