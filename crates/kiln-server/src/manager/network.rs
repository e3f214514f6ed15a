//! A sandbox's network policy on the host: its firewall chains (through the runtime's
//! network slot), its entry in the egress proxy, and `PUT /sandboxes/{id}/network`.
//! Applied at create before the guest runs anything, again after a restart (the proxy
//! listens on a new port) and after a resume (a resumed gVisor sandbox gets its network
//! rebuilt), and removed with the sandbox's veth.

use std::sync::Arc;

use kiln_api::{NetworkUpdate, SandboxNetwork};
use kiln_runtime::jail::net::{self, egress, Ipv4Cidr};

use super::{SandboxError, SandboxManager};
use crate::authz::Caller;
use crate::egress::proxy::{Denial, EgressProxy, SandboxEgress};
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
    let parsed = Network::parse(net)?;
    if !allow_internet && parsed.egress.allow != Default::default() {
        return Err(PolicyError::NoInternet("allowOut").into());
    }
    Ok(parsed)
}

impl SandboxManager {
    /// The operator's exceptions to the ranges no sandbox reaches (`--egress-allow`);
    /// the egress proxy honours them as the firewall does.
    pub fn set_operator_egress_allow(&self, allow: Vec<Ipv4Cidr>) {
        *self
            .operator_egress_allow
            .write()
            .unwrap_or_else(|e| e.into_inner()) = allow;
    }

    /// The egress proxy, started on first use.
    async fn egress_proxy(&self) -> Result<&Arc<EgressProxy>, SandboxError> {
        self.egress
            .get_or_try_init(|| async {
                let mut blocked: Vec<Ipv4Cidr> =
                    net::BLOCKED_EGRESS.iter().map(|(n, _)| *n).collect();
                blocked.extend(net::host_networks());
                let allow = self
                    .operator_egress_allow
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
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
                EgressProxy::start(blocked, allow, on_denied)
                    .await
                    .map_err(|source| SandboxError::EgressProxy { source })
            })
            .await
    }

    /// Makes the host enforce `network` for sandbox `id`.
    pub(super) async fn apply_network(
        &self,
        id: &str,
        team_id: i64,
        network: &Network,
    ) -> Result<(), SandboxError> {
        let Some(slot) = self.runtime.network_slot(id) else {
            // Loopback only: there is no egress to filter.
            return Ok(());
        };
        let policy = &network.egress;
        let port = if policy.needs_proxy() {
            Some(self.egress_proxy().await?.port())
        } else {
            None
        };
        let rules = policy.firewall(port.unwrap_or_default());
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || egress::apply(slot, &rules))
            .await?
            .map_err(|source| SandboxError::Firewall {
                id: id_owned,
                source,
            })?;
        if let Some(proxy) = self.egress.get() {
            let entry = policy.needs_proxy().then(|| {
                Arc::new(SandboxEgress {
                    sandbox_id: id.to_string(),
                    team_id,
                    policy: policy.clone(),
                })
            });
            proxy.set(slot.guest_ip(), entry);
        }
        Ok(())
    }

    /// [`Self::apply_network`] for a sandbox that already runs (adopted after a
    /// restart, resumed): a failure is logged, not fatal, since the sandbox exists.
    pub(super) async fn reapply_network(&self, rec: &SandboxRecord) {
        if rec.network.is_none() {
            return;
        }
        if let Err(e) = self
            .apply_network(&rec.id, rec.team_id, &network_of(rec))
            .await
        {
            tracing::error!(id = %rec.id, error = %crate::report::chain(&e), "re-applying the sandbox's network policy failed");
        }
    }

    /// Drops the sandbox from the egress proxy (its chains go with its veth).
    pub(super) fn forget_network(&self, id: &str) {
        self.proxy_denied
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

    /// `PUT /sandboxes/{id}/network`: replaces the egress lists (the private-port
    /// settings stay as created); new connections follow the new rules at once, and
    /// open ones a deny now covers are cut.
    pub async fn update_network(
        &self,
        caller: &Caller,
        id: &str,
        update: NetworkUpdate,
    ) -> Result<(), SandboxError> {
        let entry = self.require(caller, id)?;
        refuse_unsupported(&update.rules, &update.egress_proxy)?;
        let mut deny = update.deny_out.clone().unwrap_or_default();
        if update.allow_internet_access == Some(false) && !deny.iter().any(|d| d == "0.0.0.0/0") {
            deny.push("0.0.0.0/0".to_string());
        }
        let mut rec = entry.record();
        let mut stored = rec.network.clone().unwrap_or_default();
        stored.allow_out = update.allow_out.clone().filter(|a| !a.is_empty());
        stored.deny_out = (!deny.is_empty()).then_some(deny);
        let network = Network::parse(&stored)?;
        if !rec.allow_internet_access && network.egress.allow != Default::default() {
            return Err(PolicyError::NoInternet("allowOut").into());
        }
        self.apply_network(id, rec.team_id, &network).await?;
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
