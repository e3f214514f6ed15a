//! Prometheus metrics, served on `GET /metrics` (OpenMetrics text).
//!
//! The seed's names, exactly: `e2b_sandboxes_active`, `e2b_sandboxes_created_total`,
//! `e2b_executions_total`, `e2b_executions_failed_total`,
//! `e2b_execution_duration_seconds` and `e2b_sandbox_memory_bytes`. An execution is a
//! command (`process.Process/Start` through the proxy) or a `run_code` (`POST /execute`
//! on the code interpreter's port); the `kind` label says which. Kiln's own names
//! start with `kiln_`. Gauges of state (active sandboxes, memory, pools) are read when
//! Prometheus scrapes; counters and histograms are updated where things happen.
//!
//! A leaf module: the manager, the build service and the proxy record into it; it
//! knows none of them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What ran.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ExecKind {
    /// A command (`sandbox.commands.run`).
    Command,
    /// Code in the code interpreter (`run_code`).
    RunCode,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecLabels {
    pub kind: ExecKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    pub sandbox_id: String,
    pub template: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CreateLabels {
    pub runtime: String,
    /// `hit` when the create claimed a warm-pool sandbox.
    pub pool: PoolUse,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum PoolUse {
    Hit,
    Miss,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabels {
    pub template: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum BuildOutcome {
    Ready,
    Error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub outcome: BuildOutcome,
}

/// Where traffic to a sandbox failed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ProxyFailure {
    /// envd did not answer a request.
    Envd,
    /// A port tunnel could not be opened or its request failed.
    Tunnel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    pub failure: ProxyFailure,
}

/// Label values in Prometheus's style (`run_code`, not `RunCode`).
macro_rules! label_values {
    ($($ty:ty { $($variant:ident => $text:literal),+ $(,)? })+) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(match self {
                    $(Self::$variant => $text,)+
                })
            }
        }
    )+};
}

label_values! {
    ExecKind { Command => "command", RunCode => "run_code" }
    PoolUse { Hit => "hit", Miss => "miss" }
    BuildOutcome { Ready => "ready", Error => "error" }
    ProxyFailure { Envd => "envd", Tunnel => "tunnel" }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    // 5 ms to ~20 min.
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

fn create_buckets() -> Histogram {
    // 1 ms to ~2 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

fn build_buckets() -> Histogram {
    // 1 s to ~4.5 h.
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// Every metric the server keeps, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    pub sandboxes_active: Gauge,
    pub sandboxes_created: Counter,
    pub executions: Family<ExecLabels, Counter>,
    pub executions_failed: Family<ExecLabels, Counter>,
    pub execution_duration: HistogramFamily<ExecLabels>,
    pub sandbox_memory: Family<SandboxLabels, Gauge<f64, AtomicU64>>,
    /// Connections each running sandbox's network policy refused (firewall and egress
    /// proxy), set at scrape time.
    pub sandbox_egress_denied: Family<SandboxLabels, Gauge>,
    pub create_duration: HistogramFamily<CreateLabels>,
    pub pool_idle: Family<TemplateLabels, Gauge>,
    pub builds: Family<BuildLabels, Counter>,
    pub build_duration: Histogram,
    pub proxy_errors: Family<ProxyLabels, Counter>,
    /// Events the event bus could not take (NATS down).
    pub events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            sandboxes_active: Gauge::default(),
            sandboxes_created: Counter::default(),
            executions: Family::default(),
            executions_failed: Family::default(),
            execution_duration: Family::new_with_constructor(duration_buckets),
            sandbox_memory: Family::default(),
            sandbox_egress_denied: Family::default(),
            create_duration: Family::new_with_constructor(create_buckets),
            pool_idle: Family::default(),
            builds: Family::default(),
            build_duration: build_buckets(),
            proxy_errors: Family::default(),
            events_dropped: Counter::default(),
        };
        let mut r = m.registry;
        r.register(
            "e2b_sandboxes_active",
            "Sandboxes running now",
            m.sandboxes_active.clone(),
        );
        // The encoder adds `_total` to counters.
        r.register(
            "e2b_sandboxes_created",
            "Sandboxes created",
            m.sandboxes_created.clone(),
        );
        r.register(
            "e2b_executions",
            "Commands and run_code calls started (kind: command, run_code)",
            m.executions.clone(),
        );
        r.register(
            "e2b_executions_failed",
            "Commands that exited non-zero and run_code calls that raised",
            m.executions_failed.clone(),
        );
        r.register(
            "e2b_execution_duration_seconds",
            "How long commands and run_code calls ran, from request to the end of the answer",
            m.execution_duration.clone(),
        );
        r.register(
            "e2b_sandbox_memory_bytes",
            "Memory a running sandbox uses",
            m.sandbox_memory.clone(),
        );
        r.register(
            "kiln_sandbox_egress_denied",
            "Connections a running sandbox's network policy refused so far",
            m.sandbox_egress_denied.clone(),
        );
        r.register(
            "kiln_sandbox_create_duration_seconds",
            "Time from a create request to the sandbox being ready, by runtime and warm-pool use",
            m.create_duration.clone(),
        );
        r.register(
            "kiln_pool_idle_sandboxes",
            "Started sandboxes waiting in a template's warm pool",
            m.pool_idle.clone(),
        );
        r.register(
            "kiln_template_builds",
            "Template builds finished, by outcome",
            m.builds.clone(),
        );
        r.register(
            "kiln_template_build_duration_seconds",
            "How long template builds ran",
            m.build_duration.clone(),
        );
        r.register(
            "kiln_proxy_errors",
            "Requests to sandboxes that failed in the proxy (envd or a port tunnel)",
            m.proxy_errors.clone(),
        );
        r.register(
            "kiln_events_dropped",
            "Lifecycle events the event bus could not take",
            m.events_dropped.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Records one finished execution.
    pub fn execution(&self, kind: ExecKind, seconds: f64, failed: bool) {
        let labels = ExecLabels { kind };
        self.executions.get_or_create(&labels).inc();
        if failed {
            self.executions_failed.get_or_create(&labels).inc();
        }
        self.execution_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_names_are_exposed() {
        let m = Metrics::new();
        m.sandboxes_created.inc();
        m.sandboxes_active.set(2);
        m.execution(ExecKind::Command, 0.2, false);
        m.execution(ExecKind::RunCode, 1.5, true);
        m.sandbox_memory
            .get_or_create(&SandboxLabels {
                sandbox_id: "abc".into(),
                template: "base".into(),
            })
            .set(1024.0);
        let text = m.encode();
        for needle in [
            "e2b_sandboxes_active 2",
            "e2b_sandboxes_created_total 1",
            "e2b_executions_total{kind=\"command\"} 1",
            "e2b_executions_total{kind=\"run_code\"} 1",
            "e2b_executions_failed_total{kind=\"run_code\"} 1",
            "e2b_execution_duration_seconds_count{kind=\"command\"} 1",
            "e2b_sandbox_memory_bytes{sandbox_id=\"abc\",template=\"base\"} 1024",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(!text.contains("e2b_executions_failed_total{kind=\"command\"}"));
    }
}
