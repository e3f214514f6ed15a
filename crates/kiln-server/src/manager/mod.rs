//! The `SandboxManager`: creates sandboxes and gives each exactly one owner task.
//!
//! Handlers never orchestrate: they validate, then call the manager. Mutations of a
//! running sandbox (deadline changes, kill) are typed [`Command`]s sent to its owner
//! task, which alone talks to the runtime and the store for that sandbox. Reads use
//! the shared snapshot the owner keeps current.

mod error;
mod list;
mod logs;
mod metrics;
mod network;
pub use logs::{Level as LogLevel, LogEntry};
mod owner;
mod pool;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use kiln_api::{NewSandbox, Sandbox, SandboxDetail, SandboxMetric, SandboxState};
use kiln_runtime::{Limits, NetworkMode, Runtime, SandboxConfig};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

pub use error::{Quota, Resource, SandboxError};
pub use list::{parse_metadata_filter, ListQuery, Page};

use crate::authz::Caller;
use crate::config::LimitsConfig;
use crate::report::chain;
use crate::store::{RecordState, SandboxRecord, Store};
use crate::templates::{TemplateInfo, Templates};

const ID_LEN: usize = 20;
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A typed request to a sandbox's owner task.
enum Command {
    /// Move the deadline. `extend_only` keeps a later deadline (connect, refresh).
    SetDeadline {
        end_at: DateTime<Utc>,
        extend_only: bool,
        reply: oneshot::Sender<Result<DateTime<Utc>, SandboxError>>,
    },
    Kill {
        reply: oneshot::Sender<Result<(), SandboxError>>,
    },
    Pause {
        reply: oneshot::Sender<Result<(), SandboxError>>,
    },
    /// Resume if paused, with a fresh deadline; `Ok(true)` when it was paused.
    Resume {
        end_at: DateTime<Utc>,
        reply: oneshot::Sender<Result<bool, SandboxError>>,
    },
}

/// One live sandbox as the rest of the server sees it.
pub struct SandboxEntry {
    record: RwLock<SandboxRecord>,
    /// envd's Unix socket on the host.
    pub envd_socket: PathBuf,
    commands: mpsc::Sender<Command>,
    /// Previous CPU sample, for the usage percentage of the metrics endpoint.
    last_cpu: Mutex<Option<(Instant, u64)>>,
    /// Recent resource samples, oldest first ([`metrics`]).
    history: Mutex<std::collections::VecDeque<SandboxMetric>>,
    /// What its template says about its ports, read once when the entry is made
    /// (the proxy asks on every request).
    pub ports: TemplatePorts,
}

/// Ports of a sandbox that the proxy treats specially, from its template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplatePorts {
    /// The browser's DevTools port (`cdp_port` in `kiln.toml`).
    pub cdp: Option<u16>,
    /// A `desktop` sandbox: port 6080 is its live view (`crate::live_view`).
    pub desktop: bool,
}

impl SandboxEntry {
    pub fn record(&self) -> SandboxRecord {
        self.record
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct SandboxManager {
    runtime: Arc<dyn Runtime>,
    store: Arc<dyn Store>,
    templates: Arc<Templates>,
    limits: LimitsConfig,
    sandboxes: RwLock<HashMap<String, Arc<SandboxEntry>>>,
    /// Creates in flight, counted against `max_sandboxes` with the running ones and
    /// against their team's quotas.
    creating: Mutex<InFlight>,
    /// Template-build sandboxes running now, counted against `max_sandboxes` too.
    building: Arc<std::sync::atomic::AtomicUsize>,
    pools: pool::Pools,
    /// Sandboxes being torn down: unrouted, their record in `Killing` until the
    /// runtime confirms every host resource is gone. They still count as on the host.
    killing: Mutex<std::collections::HashSet<String>>,
    metrics: Arc<crate::metrics::Metrics>,
    audit: RwLock<Arc<crate::audit::AuditLog>>,
    events: Arc<crate::events::EventBus>,
    /// Paused sandboxes the host lost (a reboot under a runtime whose pause lives in
    /// memory): their team, and the message a resume gets.
    lost: Mutex<HashMap<String, (i64, String)>>,
    /// The egress proxy for sandboxes with domain rules, started on first use.
    egress: tokio::sync::OnceCell<Arc<crate::egress::proxy::EgressProxy>>,
    /// What the egress proxy starts with.
    egress_setup: RwLock<network::EgressSetup>,
    /// The CA of each sandbox with header rules (in memory only).
    cas: Mutex<HashMap<String, Arc<crate::egress::ca::SandboxCa>>>,
    /// Connections the egress proxy refused, per sandbox.
    proxy_denied: Arc<Mutex<HashMap<String, u64>>>,
    /// `E2B_DESKTOP_AUTH_TOKEN`: what a public desktop's live view wants.
    desktop_token: RwLock<Option<kiln_api::desktop::ViewToken>>,
}

/// The memory and CPUs of one sandbox; `None` where the template (or the server's
/// default) decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Size {
    pub memory_mb: Option<u64>,
    pub cpu_count: Option<u32>,
}

/// What one sandbox takes from its team's quotas.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    sandboxes: u32,
    memory_mb: u64,
    cpus: u32,
}

impl Usage {
    fn add(self, other: Usage) -> Usage {
        Usage {
            sandboxes: self.sandboxes + other.sandboxes,
            memory_mb: self.memory_mb + other.memory_mb,
            cpus: self.cpus + other.cpus,
        }
    }
}

/// Creates in flight, by ticket.
#[derive(Default)]
struct InFlight {
    next: u64,
    creates: HashMap<u64, (i64, Usage)>,
}

/// Releases a create slot when a create finishes, however it finishes.
struct SlotGuard<'a>(&'a Mutex<InFlight>, u64);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.0.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.creates.remove(&self.1);
    }
}

/// A template-build sandbox's place under `E2B_MAX_SANDBOXES`, given back on drop.
pub struct BuildSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BuildSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn new_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char)
        .collect()
}

fn new_token() -> String {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

impl SandboxManager {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        store: Arc<dyn Store>,
        templates: Arc<Templates>,
        limits: LimitsConfig,
    ) -> Arc<Self> {
        let metrics: Arc<crate::metrics::Metrics> = Arc::default();
        Arc::new(SandboxManager {
            runtime,
            store,
            templates,
            limits,
            sandboxes: RwLock::new(HashMap::new()),
            creating: Mutex::default(),
            building: Arc::default(),
            pools: pool::Pools::default(),
            killing: Mutex::default(),
            metrics: metrics.clone(),
            events: Arc::new(crate::events::EventBus::new(metrics)),
            audit: RwLock::new(Arc::new(crate::audit::AuditLog::off())),
            lost: Mutex::new(HashMap::new()),
            egress: tokio::sync::OnceCell::new(),
            egress_setup: RwLock::default(),
            cas: Mutex::default(),
            proxy_denied: Arc::default(),
            desktop_token: RwLock::new(None),
        })
    }

    pub fn runtime_name(&self) -> &'static str {
        self.runtime.kind().as_str()
    }

    pub fn get(&self, id: &str) -> Option<Arc<SandboxEntry>> {
        self.sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The sandbox `id` if `caller` may see it; another team's answers 404 as a missing
    /// one does.
    fn require(&self, caller: &Caller, id: &str) -> Result<Arc<SandboxEntry>, SandboxError> {
        self.get(id)
            .filter(|e| caller.sees(e.record().team_id))
            .ok_or_else(|| not_found(id))
    }

    /// What the sandbox's template says about its ports (its DevTools port, served by
    /// the proxy's CDP route; whether it is a desktop).
    fn template_ports(&self, rec: &SandboxRecord) -> TemplatePorts {
        match self.templates.resolve(&rec.template_id) {
            Ok(t) => TemplatePorts {
                cdp: t.meta.cdp_port,
                desktop: t.name == crate::builtin_projects::DESKTOP,
            },
            Err(_) => TemplatePorts::default(),
        }
    }

    /// The caller a plain API key stands for, if it is a live key. A store that fails
    /// to answer counts as no key (logged).
    pub fn caller_for_key(&self, key: &str) -> Option<Caller> {
        match crate::keys::caller(self.store.as_ref(), key) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "looking up an API key failed");
                None
            }
        }
    }

    /// `E2B_EXECUTION_TIMEOUT_SEC`: the longest deadline one command may ask for.
    pub fn execution_timeout_secs(&self) -> u64 {
        self.limits.execution_timeout_secs
    }

    /// The server's metrics (the manager records creates; the proxy and the build
    /// service record through it too).
    pub fn meters(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Where lifecycle events go (`GET /events`, NATS).
    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        &self.events
    }

    /// The audit log (off until [`Self::set_audit`]).
    pub fn audit(&self) -> Arc<crate::audit::AuditLog> {
        self.audit.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets what public desktops' live views want (`E2B_DESKTOP_AUTH_TOKEN`).
    pub fn set_desktop_token(&self, token: Option<kiln_api::desktop::ViewToken>) {
        *self
            .desktop_token
            .write()
            .unwrap_or_else(|e| e.into_inner()) = token;
    }

    pub fn desktop_token(&self) -> Option<kiln_api::desktop::ViewToken> {
        self.desktop_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_audit(&self, log: Arc<crate::audit::AuditLog>) {
        *self.audit.write().unwrap_or_else(|e| e.into_inner()) = log;
    }

    /// Brings the gauges read at scrape time up to date: active sandboxes, each running
    /// sandbox's memory (asked of the runtime, a few seconds at most each), idle pooled
    /// sandboxes.
    pub async fn observe(&self) {
        use crate::metrics::{SandboxLabels, TemplateLabels};
        let running: Vec<SandboxRecord> = self
            .sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.record())
            .filter(|r| r.state == RecordState::Running)
            .collect();
        self.metrics.sandboxes_active.set(running.len() as i64);
        let samples = futures::future::join_all(running.iter().map(|r| async move {
            let stats = within(
                "reading the metrics",
                STATS_DEADLINE,
                self.runtime.stats(&r.id),
            );
            (r, stats.await)
        }))
        .await;
        self.metrics.sandbox_memory.clear();
        for (r, stats) in samples {
            if let Ok(Ok(stats)) = stats {
                let labels = SandboxLabels {
                    sandbox_id: r.id.clone(),
                    template: r.template_id.clone(),
                };
                self.metrics
                    .sandbox_memory
                    .get_or_create(&labels)
                    .set(stats.mem_used_bytes as f64);
            }
        }
        self.metrics.sandbox_egress_denied.clear();
        for r in running.iter().filter(|r| r.network.is_some()) {
            let labels = SandboxLabels {
                sandbox_id: r.id.clone(),
                template: r.template_id.clone(),
            };
            let denied = self.egress_denied(&r.id).await;
            self.metrics
                .sandbox_egress_denied
                .get_or_create(&labels)
                .set(denied.min(i64::MAX as u64) as i64);
        }
        self.metrics.pool_idle.clear();
        for (template, idle) in self.pools.idle_counts() {
            self.metrics
                .pool_idle
                .get_or_create(&TemplateLabels { template })
                .set(idle as i64);
        }
    }

    /// Creates that have not finished yet.
    pub fn creates_in_flight(&self) -> usize {
        self.creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .creates
            .len()
    }

    pub fn count(&self) -> usize {
        self.sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// When a sandbox of `template_id` that started at `started_at` must end at the
    /// latest: the `desktop` template's sandboxes live at most
    /// `E2B_DESKTOP_MAX_DURATION` from their start; others have no such end.
    fn lifetime_end(&self, template_id: &str, started_at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let template = self.templates.resolve(template_id).ok()?;
        (template.name == crate::builtin_projects::DESKTOP)
            .then(|| started_at + Duration::seconds(self.limits.desktop_max_duration_secs))
    }

    /// A deadline within the sandbox's lifetime: moved back to its end when
    /// `clamp` (connect, refresh: keep-alives), refused naming the cap otherwise.
    fn within_lifetime(
        &self,
        rec: &SandboxRecord,
        end_at: DateTime<Utc>,
        clamp: bool,
    ) -> Result<DateTime<Utc>, SandboxError> {
        match self.lifetime_end(&rec.template_id, rec.started_at) {
            Some(end) if end_at > end => {
                if clamp {
                    Ok(end)
                } else {
                    Err(SandboxError::DesktopOverCap {
                        got: (end_at - rec.started_at).num_seconds(),
                        max: self.limits.desktop_max_duration_secs,
                    })
                }
            }
            _ => Ok(end_at),
        }
    }

    fn validate_timeout(&self, timeout: i64) -> Result<Duration, SandboxError> {
        if timeout <= 0 {
            return Err(SandboxError::TimeoutNotPositive(timeout));
        }
        if timeout > self.limits.max_timeout_secs {
            return Err(SandboxError::TimeoutOverCap {
                got: timeout,
                max: self.limits.max_timeout_secs,
            });
        }
        Ok(Duration::seconds(timeout))
    }

    /// The sandbox a template asks for, within the server's caps: a template (or, later,
    /// a request) asking for more memory or CPUs than the operator allows is refused
    /// with the cap named, never granted.
    /// The memory (MiB) and CPUs a sandbox of `template` gets.
    /// The memory and CPUs of a sandbox of `template`: what the create asked for
    /// (Kiln's `memoryMB`/`cpuCount`), else the template's, else the server's default;
    /// never past the server's caps.
    fn sandbox_size(&self, template: &TemplateInfo, asked: Size) -> Result<Size, SandboxError> {
        if asked.memory_mb == Some(0) || asked.cpu_count == Some(0) {
            return Err(SandboxError::ZeroSize);
        }
        let memory_mb = asked
            .memory_mb
            .or(template.meta.memory_mb)
            .unwrap_or(self.limits.memory_mb);
        let cpu_count = asked
            .cpu_count
            .or(template.meta.cpu_count)
            .unwrap_or(self.limits.cpu_count);
        let over = |resource, asked: u64, max: u64, by_request: bool| SandboxError::OverServerCap {
            who: if by_request {
                "this create".to_string()
            } else {
                format!("template \"{}\"", template.name)
            },
            resource,
            asked,
            max,
        };
        if memory_mb > self.limits.max_memory_mb {
            return Err(over(
                Resource::MemoryMb,
                memory_mb,
                self.limits.max_memory_mb,
                asked.memory_mb.is_some(),
            ));
        }
        if cpu_count > self.limits.max_cpu_count {
            return Err(over(
                Resource::Cpus,
                cpu_count.into(),
                self.limits.max_cpu_count.into(),
                asked.cpu_count.is_some(),
            ));
        }
        Ok(Size {
            memory_mb: Some(memory_mb),
            cpu_count: Some(cpu_count),
        })
    }

    fn sandbox_config(
        &self,
        id: String,
        template: &TemplateInfo,
        internet: bool,
        asked: Size,
    ) -> Result<SandboxConfig, SandboxError> {
        let size = self.sandbox_size(template, asked)?;
        Ok(SandboxConfig {
            id,
            rootfs: template.rootfs.clone(),
            limits: Limits {
                memory_mb: size.memory_mb.unwrap_or(self.limits.memory_mb),
                cpu_count: size.cpu_count.unwrap_or(self.limits.cpu_count),
                pids_max: self.limits.pids_max,
                disk_mb: self.limits.disk_size_mb,
            },
            network: if internet {
                NetworkMode::Internet
            } else {
                NetworkMode::Loopback
            },
            host_ids: kiln_runtime::HostIdMode::PerSandbox,
        })
    }

    /// Every sandbox the server has on the host: running, being created, and idle or
    /// starting in a warm pool. `E2B_MAX_SANDBOXES` caps this number.
    fn sandboxes_on_host(&self, creating: usize) -> usize {
        self.count()
            + creating
            + self.killing.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.pools.held()
            + self.building.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether one more sandbox fits under `E2B_MAX_SANDBOXES` (`creating`: the count
    /// the caller holds the lock of). At the cap, warm pools yield: an idle pooled
    /// sandbox is taken out and killed in the background, and there is room.
    fn make_room(self: &Arc<Self>, creating: usize) -> bool {
        if self.sandboxes_on_host(creating) < self.limits.max_sandboxes {
            return true;
        }
        let Some(evicted) = self.pools.evict_one() else {
            return false;
        };
        let manager = self.clone();
        tokio::spawn(async move {
            if let Err(e) = manager.runtime.kill(&evicted.id).await {
                tracing::warn!(id = %evicted.id, error = %chain(&e),
                    "killing a pooled sandbox to make room failed");
            }
        });
        true
    }

    /// Room for one template-build sandbox under `E2B_MAX_SANDBOXES`, held until the
    /// returned guard drops. At the cap an idle pooled sandbox is killed to make room;
    /// without one, the step waits (up to `wait`) for a sandbox to end, then fails with
    /// the cap named.
    pub async fn reserve_build_sandbox(
        self: &Arc<Self>,
        wait: std::time::Duration,
    ) -> Result<BuildSlot, String> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let creating = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                if self.make_room(creating.creates.len()) {
                    self.building
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    return Ok(BuildSlot(self.building.clone()));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the server already runs its maximum of {} sandboxes (E2B_MAX_SANDBOXES) \
                     and none ended within {} s; kill a sandbox or raise the limit",
                    self.limits.max_sandboxes,
                    wait.as_secs()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// What `team_id`'s running sandboxes and creates in flight take now.
    fn team_usage(&self, team_id: i64, in_flight: &InFlight) -> Usage {
        let running = self
            .sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.record())
            .filter(|r| r.team_id == team_id && r.state == RecordState::Running)
            .fold(Usage::default(), |u, r| {
                u.add(Usage {
                    sandboxes: 1,
                    memory_mb: r.memory_mb,
                    cpus: r.cpu_count,
                })
            });
        in_flight
            .creates
            .values()
            .filter(|(team, _)| *team == team_id)
            .fold(running, |u, (_, c)| u.add(*c))
    }

    /// A place for one more sandbox of `want` for `team_id`: under the server's
    /// `E2B_MAX_SANDBOXES` and the team's quotas, or 429 naming what is full.
    fn reserve_slot(
        self: &Arc<Self>,
        template: &str,
        poolable: bool,
        team_id: i64,
        want: Usage,
    ) -> Result<SlotGuard<'_>, SandboxError> {
        let quotas = self
            .store
            .team(team_id)?
            .map(|t| t.quotas)
            .unwrap_or_default();
        let mut in_flight = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        let after = self.team_usage(team_id, &in_flight).add(want);
        check_quota(
            Quota::Sandboxes,
            after.sandboxes.into(),
            quotas.max_sandboxes.map(u64::from),
        )?;
        check_quota(Quota::MemoryMb, after.memory_mb, quotas.max_memory_mb)?;
        check_quota(
            Quota::Cpus,
            after.cpus.into(),
            quotas.max_cpus.map(u64::from),
        )?;
        // A create that will claim one of its template's idle pooled sandboxes moves
        // it from the pool to the running set: no new sandbox on the host.
        let claims_pooled = poolable && self.pools.idle_count(template) > 0;
        if !claims_pooled && !self.make_room(in_flight.creates.len()) {
            return Err(SandboxError::HostFull {
                max: self.limits.max_sandboxes,
            });
        }
        let ticket = in_flight.next;
        in_flight.next += 1;
        in_flight.creates.insert(ticket, (team_id, want));
        Ok(SlotGuard(&self.creating, ticket))
    }

    /// Whether `caller` may start sandboxes from the template `name`. A template with
    /// no owner row (one the store has not heard of) is the operator's alone.
    fn template_visible(&self, caller: &Caller, name: &str) -> bool {
        match self.store.template_owner(name) {
            Ok(Some(owner)) => caller.sees_template(owner),
            Ok(None) => caller.admin,
            Err(e) => {
                tracing::error!(template = name, error = %chain(&e), "reading a template's owner failed");
                false
            }
        }
    }

    /// `POST /sandboxes`, run to the end whatever happens to the request: the create
    /// runs in a task of its own, so a client that gives up (an SDK's request timeout)
    /// leaves a sandbox that is recorded, owned and counted, with its deadline, never
    /// a half-made one.
    pub async fn create_detached(
        self: Arc<Self>,
        req: NewSandbox,
        caller: Caller,
    ) -> Result<Sandbox, SandboxError> {
        let origin = crate::audit::current();
        let began = Instant::now();
        let manager = self.clone();
        let agent = req
            .metadata
            .as_ref()
            .and_then(|m| m.get("agent_id"))
            .cloned();
        let created = tokio::spawn(crate::audit::scoped(origin.clone(), async move {
            manager.create(req, caller).await
        }))
        .await?;
        // A create the server could not carry out (not one it refused) is a failure
        // of the sandbox.
        if let Err(e) = &created {
            if matches!(
                e,
                SandboxError::GuestNotReady { .. }
                    | SandboxError::Runtime { .. }
                    | SandboxError::StartTimedOut(_)
                    | SandboxError::Store(_)
            ) {
                let mut event = crate::audit::Event::new("sandbox.failed", false)
                    .user(caller.team_id, caller.key_id)
                    .agent_or(agent.as_ref())
                    .duration(began.elapsed());
                let mut lifecycle =
                    crate::events::LifecycleEvent::new("sandbox.failed", Some(caller.team_id))
                        .reason(e.to_string());
                if let SandboxError::GuestNotReady { id, .. } = e {
                    event = event.sandbox(id);
                    lifecycle.sandbox_id = Some(id.clone());
                }
                self.events.publish(lifecycle);
                crate::audit::scoped(origin, async { self.audit().record(event) }).await;
            }
        }
        created
    }

    /// `POST /sandboxes` (see [`Self::create_detached`]).
    pub async fn create(
        self: &Arc<Self>,
        req: NewSandbox,
        caller: Caller,
    ) -> Result<Sandbox, SandboxError> {
        let ttl = self.validate_timeout(req.timeout.unwrap_or(300))?;
        let auto_resume = check_lifecycle(&req)?;
        refuse_unsupported_fields(&req)?;
        for key in req.env_vars.iter().flat_map(|m| m.keys()) {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SandboxError::BadEnvName(key.clone()));
            }
        }
        let template = self.templates.resolve_visible(&req.template_id, |name| {
            self.template_visible(&caller, name)
        })?;
        let now = Utc::now();
        if let Some(end) = self.lifetime_end(&template.name, now) {
            if now + ttl > end {
                return Err(SandboxError::DesktopOverCap {
                    got: ttl.num_seconds(),
                    max: self.limits.desktop_max_duration_secs,
                });
            }
        }
        let allow_internet = req.allow_internet_access.unwrap_or(true);
        let network = network::check_create(req.network.as_ref(), allow_internet)?;
        let asked = Size {
            memory_mb: req.memory_mb,
            cpu_count: req.cpu_count,
        };
        let size = self.sandbox_size(&template, asked)?;
        let want = Usage {
            sandboxes: 1,
            memory_mb: size.memory_mb.unwrap_or_default(),
            cpus: size.cpu_count.unwrap_or_default(),
        };
        let poolable = allow_internet && size == self.sandbox_size(&template, Size::default())?;
        let _slot = self.reserve_slot(&template.name, poolable, caller.team_id, want)?;
        let secure = req.secure.unwrap_or(false);
        let began = Instant::now();
        let (instance, started) = self.acquire(&template, allow_internet, asked).await?;
        let id = instance.id.clone();
        let config = self.sandbox_config(id.clone(), &template, allow_internet, asked)?;
        let (cpu_count, memory_mb) = (config.limits.cpu_count, config.limits.memory_mb);
        let access_token = secure.then(new_token);
        let traffic_token = network.private.then(new_token);
        let now = Utc::now();
        let mut record = SandboxRecord {
            id: id.clone(),
            template_id: template.name.clone(),
            state: RecordState::Creating,
            runtime: self.runtime.kind_of(&id).as_str().to_string(),
            started_at: now,
            end_at: now + ttl,
            cpu_count,
            memory_mb,
            disk_size_mb: self.limits.disk_size_mb,
            allow_internet_access: allow_internet,
            access_token: access_token.clone(),
            metadata: req.metadata.clone().unwrap_or_default(),
            owner_key_id: caller.key_id,
            team_id: caller.team_id,
            auto_pause: req.auto_pause.unwrap_or(false),
            network: req.network.clone(),
            traffic_token: traffic_token.clone(),
            auto_resume,
            timeout_secs: ttl.num_seconds(),
        };
        // Recorded before the guest is prepared: a server that dies from here on finds
        // the record at its next start and removes the half-made sandbox.
        if let Err(e) = self.store.upsert_sandbox(&record) {
            self.destroy(&id).await;
            return Err(e.into());
        }

        // Before the guest runs anything of the template's or the user's.
        let new_ca = match self.apply_network(&id, caller.team_id, &network).await {
            Ok(ca) => ca,
            Err(e) => {
                self.destroy(&id).await;
                return Err(e);
            }
        };

        let mut env: BTreeMap<String, String> = BTreeMap::from([
            ("E2B_SANDBOX".to_string(), "true".to_string()),
            ("E2B_SANDBOX_ID".to_string(), id.clone()),
            ("E2B_TEMPLATE_ID".to_string(), template.name.clone()),
        ]);
        env.extend(template.meta.envs.clone());
        if new_ca.is_some() {
            env.extend(network::trust_env());
        }
        env.extend(req.env_vars.clone().unwrap_or_default());
        let init = kiln_proto::InitRequest {
            env_vars: Some(env),
            access_token: Some(access_token.clone()),
            default_user: template.meta.default_user.clone(),
            default_workdir: template.meta.default_workdir.clone(),
            timestamp: Some(Utc::now().to_rfc3339()),
        };
        let mut prepared = prepare_guest(&instance.envd_socket, &init, &template, started).await;
        if let (Ok(()), Some(ca)) = (&prepared, &new_ca) {
            prepared =
                network::install_ca(&instance.envd_socket, access_token.as_deref(), ca).await;
        }
        if let Err(message) = prepared {
            self.destroy(&id).await;
            return Err(SandboxError::GuestNotReady {
                id,
                detail: message,
            });
        }

        record.state = RecordState::Running;
        if let Err(e) = self.store.set_state(&id, RecordState::Running) {
            self.destroy(&id).await;
            return Err(e.into());
        }
        let runtime = record.runtime.clone();
        let agent = record.metadata.get("agent_id").cloned();
        self.spawn_owner(record, instance.envd_socket);
        self.events.publish(
            crate::events::LifecycleEvent::new("sandbox.created", Some(caller.team_id))
                .sandbox(&id, &template.name),
        );
        self.audit().record(
            crate::audit::Event::new("sandbox.created", true)
                .sandbox(&id)
                .user(caller.team_id, caller.key_id)
                .agent_or(agent.as_ref())
                .duration(began.elapsed()),
        );
        self.metrics.sandboxes_created.inc();
        self.metrics
            .create_duration
            .get_or_create(&crate::metrics::CreateLabels {
                runtime,
                pool: if started {
                    crate::metrics::PoolUse::Hit
                } else {
                    crate::metrics::PoolUse::Miss
                },
            })
            .observe(began.elapsed().as_secs_f64());
        tracing::info!(%id, template = %template.name, "sandbox created");
        Ok(Sandbox {
            template_id: template.name,
            sandbox_id: id,
            client_id: kiln_api::CLIENT_ID.to_string(),
            envd_version: kiln_api::ENVD_VERSION.to_string(),
            alias: None,
            envd_access_token: access_token,
            traffic_access_token: traffic_token,
            domain: None,
        })
    }

    /// Tear a sandbox down for good: its record goes to `Killing`, then the runtime
    /// removes it; once that succeeds the record is deleted. A kill that fails (or
    /// does not finish within [`KILL_DEADLINE`]) is retried in the background, with
    /// backoff, until it succeeds: the sandbox keeps its place under the host's
    /// sandbox cap meanwhile, and a restart resumes the retries from the record.
    pub(crate) async fn destroy(self: &Arc<Self>, id: &str) {
        self.killing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        if let Err(e) = self.store.set_state(id, RecordState::Killing) {
            tracing::error!(%id, error = %chain(&e), "recording a kill failed");
        }
        self.forget_network(id);
        if self.kill_once(id).await {
            return;
        }
        let manager = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_secs(1);
            loop {
                tokio::time::sleep(wait).await;
                if manager.kill_once(&id).await {
                    return;
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(60));
            }
        });
    }

    /// One attempt at removing a sandbox from the host; true when it is gone (and its
    /// record deleted).
    async fn kill_once(&self, id: &str) -> bool {
        let killed = tokio::time::timeout(KILL_DEADLINE, self.runtime.kill(id)).await;
        match killed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(%id, error = %chain(&e), "killing the sandbox failed; will retry");
                return false;
            }
            Err(_) => {
                tracing::error!(%id, "the runtime did not kill the sandbox within {} s; will retry",
                    KILL_DEADLINE.as_secs());
                return false;
            }
        }
        if let Err(e) = self.store.delete_sandbox(id) {
            tracing::error!(%id, error = %chain(&e), "deleting a killed sandbox's record failed");
        }
        self.killing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        true
    }

    fn spawn_owner(self: &Arc<Self>, record: SandboxRecord, envd_socket: PathBuf) {
        let (tx, rx) = mpsc::channel(16);
        let id = record.id.clone();
        let ports = self.template_ports(&record);
        let entry = Arc::new(SandboxEntry {
            ports,
            record: RwLock::new(record),
            envd_socket,
            commands: tx,
            last_cpu: Mutex::new(None),
            history: Mutex::default(),
        });
        self.sandboxes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, entry.clone());
        tokio::spawn(owner::run(self.clone(), entry, rx));
    }

    async fn send(
        &self,
        caller: &Caller,
        id: &str,
        make: impl FnOnce(Arc<SandboxEntry>) -> Command,
    ) -> Result<(), SandboxError> {
        if let Some((team, message)) = self.lost.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            if caller.sees(*team) {
                return Err(SandboxError::Lost(message.clone()));
            }
        }
        let entry = self.require(caller, id)?;
        entry
            .commands
            .send(make(entry.clone()))
            .await
            .map_err(|_| not_found(id))
    }

    async fn set_deadline(
        &self,
        caller: &Caller,
        id: &str,
        ttl: Duration,
        extend_only: bool,
    ) -> Result<(), SandboxError> {
        let (reply, rx) = oneshot::channel();
        let rec = self.require(caller, id)?.record();
        let end_at = self.within_lifetime(&rec, Utc::now() + ttl, extend_only)?;
        self.send(caller, id, |_| Command::SetDeadline {
            end_at,
            extend_only,
            reply,
        })
        .await?;
        rx.await.map_err(|_| not_found(id))??;
        Ok(())
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox now ends `timeout` seconds from now.
    pub async fn set_timeout(
        &self,
        caller: &Caller,
        id: &str,
        timeout: i64,
    ) -> Result<(), SandboxError> {
        // As E2B: 0 ends the sandbox now (at its deadline, which is now).
        let ttl = if timeout == 0 {
            Duration::zero()
        } else {
            self.validate_timeout(timeout)?
        };
        self.set_deadline(caller, id, ttl, false).await
    }

    /// `POST /sandboxes/{id}/refreshes`: keep alive for `duration` more seconds.
    pub async fn refresh(
        &self,
        caller: &Caller,
        id: &str,
        duration: Option<i64>,
    ) -> Result<(), SandboxError> {
        let duration = duration.unwrap_or(60);
        if !(0..=3600).contains(&duration) {
            return Err(SandboxError::DurationOutOfRange(duration));
        }
        self.set_deadline(caller, id, Duration::seconds(duration), true)
            .await
    }

    /// `POST /sandboxes/{id}/connect`: the sandbox's identity, its deadline extended to
    /// at least `timeout` seconds from now.
    pub async fn connect(
        &self,
        caller: &Caller,
        id: &str,
        timeout: Option<i64>,
    ) -> Result<(Sandbox, bool), SandboxError> {
        let ttl = self.validate_timeout(timeout.unwrap_or(300))?;
        let (reply, rx) = oneshot::channel();
        let end_at = match self.get(id) {
            Some(entry) => self.within_lifetime(&entry.record(), Utc::now() + ttl, true)?,
            None => Utc::now() + ttl,
        };
        self.send(caller, id, |_| Command::Resume { end_at, reply })
            .await?;
        let resumed = rx.await.map_err(|_| not_found(id))??;
        if !resumed {
            self.set_deadline(caller, id, ttl, true).await?;
        }
        let rec = self.require(caller, id)?.record();
        let sandbox = Sandbox {
            template_id: rec.template_id,
            sandbox_id: rec.id,
            client_id: kiln_api::CLIENT_ID.to_string(),
            envd_version: kiln_api::ENVD_VERSION.to_string(),
            alias: None,
            envd_access_token: rec.access_token,
            traffic_access_token: rec.traffic_token,
            domain: None,
        };
        Ok((sandbox, resumed))
    }

    /// Traffic reached sandbox `id` while it was paused: resumed, with its create's
    /// timeout starting again, when it was created with auto-resume (`Ok(true)`);
    /// `Ok(false)` when it stays paused. The request that woke it is the caller's
    /// credential: whoever may send it traffic could have reached it running.
    pub async fn resume_for_traffic(&self, id: &str) -> Result<bool, SandboxError> {
        let Some(entry) = self.get(id) else {
            return Err(not_found(id));
        };
        let rec = entry.record();
        if rec.state != RecordState::Paused || !rec.auto_resume {
            return Ok(false);
        }
        let end_at = self.within_lifetime(
            &rec,
            Utc::now() + Duration::seconds(rec.timeout_secs.max(1)),
            true,
        )?;
        let (reply, rx) = oneshot::channel();
        entry
            .commands
            .send(Command::Resume { end_at, reply })
            .await
            .map_err(|_| not_found(id))?;
        rx.await.map_err(|_| not_found(id))??;
        // Resumed now or by a request just before this one: either way it runs.
        Ok(!self.is_paused(id))
    }

    /// `POST /sandboxes/{id}/pause`: 409 when already paused.
    pub async fn pause(&self, caller: &Caller, id: &str) -> Result<(), SandboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(caller, id, |_| Command::Pause { reply }).await?;
        rx.await.map_err(|_| not_found(id))?
    }

    pub fn is_paused(&self, id: &str) -> bool {
        self.get(id)
            .is_some_and(|e| e.record().state == RecordState::Paused)
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill(&self, caller: &Caller, id: &str) -> Result<(), SandboxError> {
        let lost = {
            let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            match lost.get(id) {
                Some((team, _)) if caller.sees(*team) => lost.remove(id),
                _ => None,
            }
        };
        if lost.is_some() {
            self.store.delete_sandbox(id)?;
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        let agent = self
            .get(id)
            .and_then(|e| e.record().metadata.get("agent_id").cloned());
        self.send(caller, id, |_| Command::Kill { reply }).await?;
        self.audit().record(
            crate::audit::Event::new("sandbox.terminated", true)
                .sandbox(id)
                .user(caller.team_id, caller.key_id)
                .agent_or(agent.as_ref()),
        );
        rx.await.map_err(|_| not_found(id))?
    }

    pub fn detail(&self, caller: &Caller, id: &str) -> Result<SandboxDetail, SandboxError> {
        Ok(detail_of(&self.require(caller, id)?.record()))
    }

    /// The sandboxes `caller` may see (its team's; every one for an admin).
    pub fn list(&self, caller: &Caller, query: &ListQuery) -> Result<Page, SandboxError> {
        let all: Vec<SandboxRecord> = self
            .sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.record())
            .filter(|r| caller.sees(r.team_id))
            .collect();
        list::page(all, query)
    }

    /// `GET /sandboxes/{id}/metrics`: one sample now.
    /// After a restart: re-adopt the sandboxes the store remembers whose PID 1 still
    /// runs and whose deadline has not passed; kill every other trace. A sandbox the
    /// runtime could not answer about (an error, not "gone") is left running and asked
    /// again in the background: a transient failure never kills a live sandbox.
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), SandboxError> {
        let mut adopted = 0;
        let mut cleaned = 0;
        let records = self.store.list_sandboxes()?;
        let known: std::collections::HashSet<String> =
            records.iter().map(|r| r.id.clone()).collect();
        for rec in records {
            let paused = match rec.state {
                // A create or a kill the last run did not finish.
                RecordState::Creating | RecordState::Killing => {
                    tracing::info!(id = %rec.id, state = rec.state.as_str(), "finishing an interrupted create or kill");
                    self.destroy(&rec.id).await;
                    cleaned += 1;
                    continue;
                }
                RecordState::Paused => true,
                RecordState::Running => false,
            };
            if !paused && rec.end_at <= Utc::now() {
                self.destroy(&rec.id).await;
                cleaned += 1;
                continue;
            }
            match self.ask_runtime(&rec.id).await {
                Ok(Some(instance)) => {
                    tracing::info!(id = %rec.id, "re-adopted sandbox after restart");
                    self.reapply_network(&rec, &instance.envd_socket).await;
                    self.spawn_owner(rec, instance.envd_socket);
                    adopted += 1;
                }
                Ok(None) => {
                    self.forget_dead(rec).await;
                    cleaned += 1;
                }
                Err(message) => {
                    tracing::warn!(id = %rec.id, error = %message,
                        "cannot tell whether the sandbox still runs; leaving it and asking again");
                    self.adopt_later(rec);
                }
            }
        }
        let on_host = within(
            "listing the runtime's sandboxes",
            ADOPT_DEADLINE,
            self.runtime.list(),
        )
        .await?
        .map_err(|e| SandboxError::runtime("listing the runtime's sandboxes failed", e))?;
        for id in on_host.into_iter().filter(|id| !known.contains(id)) {
            tracing::info!(%id, "removing a sandbox the store does not know");
            if let Err(e) = self.runtime.kill(&id).await {
                tracing::error!(%id, error = %chain(&e), "cleanup failed");
            }
            cleaned += 1;
        }
        Ok((adopted, cleaned))
    }

    /// Ask the runtime whether a sandbox still runs: `Ok(None)` is a definite "gone";
    /// `Err` is "could not tell" (an error, or no answer within [`ADOPT_DEADLINE`]).
    async fn ask_runtime(&self, id: &str) -> Result<Option<kiln_runtime::SandboxInstance>, String> {
        match tokio::time::timeout(ADOPT_DEADLINE, self.runtime.adopt(id)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => Err(chain(&e)),
            Err(_) => Err(format!("no answer within {} s", ADOPT_DEADLINE.as_secs())),
        }
    }

    /// A recorded sandbox the runtime says is gone: remove its traces. A paused one on
    /// a runtime whose pause does not survive a reboot is remembered as lost, so its
    /// owner learns why it cannot be resumed.
    async fn forget_dead(self: &Arc<Self>, rec: SandboxRecord) {
        if rec.state == RecordState::Paused && !self.runtime.pause_of_survives_reboot(&rec.id) {
            let message = format!(
                "sandbox \"{}\" was paused on the {} runtime, whose pause keeps a \
                 sandbox only while the host runs; the host restarted, so it cannot be \
                 resumed. Kill it and create a new one.",
                rec.id,
                self.runtime.kind_of(&rec.id).as_str()
            );
            tracing::warn!(id = %rec.id, "{message}");
            if let Err(e) = self.runtime.kill(&rec.id).await {
                tracing::error!(id = %rec.id, error = %chain(&e), "cleanup failed");
            }
            self.lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(rec.id.clone(), (rec.team_id, message));
            return;
        }
        self.destroy(&rec.id).await;
    }

    /// Keep asking the runtime about a sandbox it could not answer for, with backoff,
    /// until it answers: then adopt it or remove its traces.
    fn adopt_later(self: &Arc<Self>, rec: SandboxRecord) {
        let manager = self.clone();
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_millis(500);
            loop {
                tokio::time::sleep(wait).await;
                match manager.ask_runtime(&rec.id).await {
                    Ok(Some(instance)) => {
                        tracing::info!(id = %rec.id, "re-adopted sandbox after restart");
                        manager.reapply_network(&rec, &instance.envd_socket).await;
                        manager.spawn_owner(rec, instance.envd_socket);
                        return;
                    }
                    Ok(None) => {
                        manager.forget_dead(rec).await;
                        return;
                    }
                    Err(message) => {
                        tracing::warn!(id = %rec.id, error = %message, "still cannot tell whether the sandbox runs");
                    }
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(60));
            }
        });
    }

    /// Kill every sandbox (used by tests and an orderly shutdown that asks for it).
    pub async fn kill_all(&self) {
        let ids: Vec<String> = self
            .sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            let _ = self.kill(&Caller::OPERATOR, &id).await;
        }
    }
}

/// How long a template's ready command may keep failing before a create gives up.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the runtime may take to pause or resume a sandbox (a gVisor checkpoint
/// writes the sandbox's memory to disk).
pub(super) const PAUSE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);
/// How long the runtime may take to read a sandbox's usage.
const STATS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `fut` (a runtime call), or [`SandboxError::RuntimeTimedOut`] once `limit` passes.
pub(super) async fn within<T>(
    what: &'static str,
    limit: std::time::Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, SandboxError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| SandboxError::RuntimeTimedOut {
            what,
            secs: limit.as_secs(),
        })
}

/// How long the runtime may take to start a sandbox.
pub(super) const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
/// How long the runtime may take to say whether a sandbox still runs.
const ADOPT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// How long one kill may take before it counts as failed (and is retried).
const KILL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long envd may take to report that a template's start command started.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Hand envd its identity, then (unless the sandbox comes from a pool, where that
/// happened already) run the template's start command and wait for its ready command.
/// The error is the message for the client.
async fn prepare_guest(
    socket: &std::path::Path,
    init: &kiln_proto::InitRequest,
    template: &crate::templates::TemplateInfo,
    already_started: bool,
) -> Result<(), String> {
    crate::envd::init(socket, init)
        .await
        .map_err(|e| envd_failed("envd did not initialise", &e))?;
    if already_started {
        return Ok(());
    }
    // A secure sandbox's envd wants its access token on every call.
    let token = init.access_token.clone().flatten();
    start_template(socket, template, token.as_deref()).await
}

/// A pooled sandbox before any claim: envd gets the template's env and defaults (no
/// identity, no token), then the template's start command runs and its ready command
/// passes, so a claim only needs `/init`.
pub(super) async fn prepare_pooled(
    instance: &kiln_runtime::SandboxInstance,
    template: &crate::templates::TemplateInfo,
) -> Result<(), String> {
    if template.meta.start_cmd.is_none() && template.meta.ready_cmd.is_none() {
        return Ok(());
    }
    let mut env = BTreeMap::from([
        ("E2B_SANDBOX".to_string(), "true".to_string()),
        ("E2B_TEMPLATE_ID".to_string(), template.name.clone()),
    ]);
    env.extend(template.meta.envs.clone());
    let init = kiln_proto::InitRequest {
        env_vars: Some(env),
        access_token: None,
        default_user: template.meta.default_user.clone(),
        default_workdir: template.meta.default_workdir.clone(),
        timestamp: Some(Utc::now().to_rfc3339()),
    };
    crate::envd::init(&instance.envd_socket, &init)
        .await
        .map_err(|e| envd_failed("envd did not initialise", &e))?;
    start_template(&instance.envd_socket, template, None).await
}

/// Runs the template's start command in the background and waits for its ready
/// command to exit 0.
/// A message for the client about a failed exchange with envd: what failed, without
/// the error chain (host socket paths); the chain goes to the log.
fn envd_failed(what: &str, e: &crate::envd::EnvdError) -> String {
    tracing::warn!(error = %chain(e), "{what}");
    match e {
        // envd's own answer is the guest's word about the guest: safe to pass on.
        crate::envd::EnvdError::Status { status, body, .. } => {
            format!("{what}: envd answered {status}: {body}")
        }
        _ => format!("{what}: envd did not answer"),
    }
}

async fn start_template(
    socket: &std::path::Path,
    template: &crate::templates::TemplateInfo,
    token: Option<&str>,
) -> Result<(), String> {
    let user = template.meta.default_user.as_deref().unwrap_or("user");
    if let Some(cmd) = &template.meta.start_cmd {
        // The start command runs in the background: this waits only for envd to say
        // it started, and not forever.
        tokio::time::timeout(
            START_TIMEOUT,
            crate::envd::run_with_token(socket, cmd, user, false, token, None),
        )
        .await
        .map_err(|_| {
            format!(
                "the template's start command {cmd:?} did not start within {} s",
                START_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| envd_failed(&format!("the template's start command {cmd:?} failed"), &e))?;
    }
    let Some(ready) = &template.meta.ready_cmd else {
        return Ok(());
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        // Each attempt may take at most what is left: envd kills a ready command that
        // blocks when the time is up (its Connect-Timeout-Ms).
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(std::time::Duration::from_secs(1));
        let last =
            match crate::envd::run_with_token(socket, ready, user, true, token, Some(left)).await {
                Ok(Some(exit)) if exit.code == 0 => return Ok(()),
                Ok(Some(exit)) => format!("exit {}: {}", exit.code, exit.output.trim()),
                Ok(None) => "no exit status".to_string(),
                Err(e) => envd_failed("envd did not run it", &e),
            };
        if Instant::now() >= deadline {
            return Err(format!(
                "the template's ready command {ready:?} did not succeed within {} s (last: {last})",
                READY_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

fn not_found(id: &str) -> SandboxError {
    SandboxError::NotFound(id.to_string())
}

/// An error when `used` (after the create) is over a team's `max` for `quota`.
fn check_quota(quota: Quota, used: u64, max: Option<u64>) -> Result<(), SandboxError> {
    match max {
        Some(max) if used > max => Err(SandboxError::OverQuota { quota, used, max }),
        _ => Ok(()),
    }
}

pub(crate) use network::network_of;
pub use network::EgressSetup;

pub(crate) fn detail_of(rec: &SandboxRecord) -> SandboxDetail {
    SandboxDetail {
        template_id: rec.template_id.clone(),
        sandbox_id: rec.id.clone(),
        client_id: kiln_api::CLIENT_ID.to_string(),
        envd_version: kiln_api::ENVD_VERSION.to_string(),
        started_at: rec.started_at,
        end_at: rec.end_at,
        cpu_count: rec.cpu_count,
        memory_mb: rec.memory_mb,
        disk_size_mb: rec.disk_size_mb,
        state: match rec.state {
            RecordState::Paused => SandboxState::Paused,
            // Only running and paused sandboxes are listed; the others have no entry.
            RecordState::Running | RecordState::Creating | RecordState::Killing => {
                SandboxState::Running
            }
        },
        alias: None,
        envd_access_token: rec.access_token.clone(),
        allow_internet_access: Some(rec.allow_internet_access),
        domain: None,
        metadata: rec.metadata.clone(),
        runtime: Some(rec.runtime.clone()),
        network: rec.network.clone(),
        traffic_access_token: rec.traffic_token.clone(),
        lifecycle: Some(kiln_api::Lifecycle {
            on_timeout: if rec.auto_pause { "pause" } else { "kill" }.to_string(),
            auto_resume: rec.auto_resume,
        }),
    }
}

/// Create fields of E2B's that Kiln does not serve: refused with what to do instead,
/// rather than dropped (the caller would believe it got them).
fn refuse_unsupported_fields(req: &NewSandbox) -> Result<(), SandboxError> {
    let refusals = [
        (
            &req.mcp,
            "mcp",
            "there is no MCP gateway template; run MCP servers in the sandbox yourself, \
             or use `kiln mcp` (docs/mcp.md)",
        ),
        (
            &req.iam,
            "iam",
            "there are no workload identity tokens; pass credentials with `network.rules` \
             and secrets (docs/network.md)",
        ),
        (
            &req.volume_mounts,
            "volumeMounts",
            "there are no volumes yet (docs/compatibility.md); keep data in a paused \
             sandbox or outside",
        ),
    ];
    for (value, field, why) in refusals {
        if crate::egress::given(value) {
            return Err(SandboxError::Unsupported { field, why });
        }
    }
    Ok(())
}

/// Whether a create's lifecycle asks for auto-resume, refused where E2B refuses it:
/// waking needs a pause to wake from, and a filesystem-only pause has no processes to
/// wake (E2B's rule, kept although Kiln's pause keeps memory).
fn check_lifecycle(req: &NewSandbox) -> Result<bool, SandboxError> {
    let auto_resume = req.auto_resume.is_some_and(|a| a.enabled);
    if !auto_resume {
        return Ok(false);
    }
    if req.auto_pause != Some(true) {
        return Err(SandboxError::BadLifecycle(
            "autoResume needs autoPause: a sandbox resumes only from a pause at its timeout \
             (lifecycle on_timeout \"pause\")",
        ));
    }
    if req.auto_pause_memory == Some(false) {
        return Err(SandboxError::BadLifecycle(
            "autoResume cannot be combined with autoPauseMemory false: a filesystem-only \
             pause is resumed with connect",
        ));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_e2b_shape() {
        let id = new_id();
        assert_eq!(id.len(), ID_LEN);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(new_id(), id);
    }
}
