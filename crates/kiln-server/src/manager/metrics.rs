//! Per-sandbox resource samples: taken every [`SAMPLE_EVERY`] by a background task,
//! kept in a bounded ring per sandbox, so `GET /sandboxes/{id}/metrics?start&end` and
//! the batch `GET /sandboxes/metrics` answer from history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kiln_api::SandboxMetric;

use super::{not_found, within, SandboxEntry, SandboxError, SandboxManager, STATS_DEADLINE};
use crate::authz::Caller;
use crate::store::RecordState;

/// How often every running sandbox is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept per sandbox: an hour at one per five seconds.
const HISTORY: usize = 720;
/// Sandboxes one batch request may name.
pub const MAX_BATCH: usize = 100;

impl SandboxManager {
    /// One sample of a sandbox's usage now; the CPU share is over the time since the
    /// previous sample (or since the start).
    async fn sample(&self, entry: &SandboxEntry) -> Result<SandboxMetric, SandboxError> {
        let rec = entry.record();
        let id = rec.id.as_str();
        let stats = within(
            "reading the metrics",
            STATS_DEADLINE,
            self.runtime.stats(id),
        )
        .await?
        .map_err(|e| match e {
            kiln_runtime::RuntimeError::NotFound { .. } => not_found(id),
            other => SandboxError::runtime("reading sandbox metrics failed", other),
        })?;
        let now_i = Instant::now();
        let cpu_pct = {
            let mut last = entry.last_cpu.lock().unwrap_or_else(|e| e.into_inner());
            let (since, base_ns) = last.unwrap_or_else(|| {
                let age = (Utc::now() - rec.started_at).to_std().unwrap_or_default();
                (now_i.checked_sub(age).unwrap_or(now_i), 0)
            });
            *last = Some((now_i, stats.cpu_usage_ns));
            let wall_ns = now_i.duration_since(since).as_nanos().max(1) as f64;
            let used = stats.cpu_usage_ns.saturating_sub(base_ns) as f64;
            (100.0 * used / wall_ns / f64::from(stats.cpu_count.max(1))).clamp(0.0, 100.0)
        };
        let now = Utc::now();
        let metric = SandboxMetric {
            timestamp: now,
            timestamp_unix: now.timestamp(),
            cpu_count: stats.cpu_count,
            cpu_used_pct: (cpu_pct * 100.0).round() / 100.0,
            mem_used: stats.mem_used_bytes,
            mem_total: stats.mem_total_bytes,
            mem_cache: stats.mem_cache_bytes,
            disk_used: stats.disk_used_bytes,
            disk_total: stats.disk_total_bytes,
        };
        let mut history = entry.history.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(metric.clone());
        Ok(metric)
    }

    /// Sample every running sandbox once (the background sampler's tick).
    pub async fn sample_all(&self) {
        let running: Vec<Arc<SandboxEntry>> = self
            .sandboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.record().state == RecordState::Running)
            .cloned()
            .collect();
        futures::future::join_all(running.iter().map(|e| async move {
            if let Err(err) = self.sample(e).await {
                tracing::debug!(id = %e.record().id, error = %err, "sampling a sandbox failed");
            }
        }))
        .await;
    }

    /// Sample every running sandbox every [`SAMPLE_EVERY`], for as long as the manager
    /// lives.
    pub fn spawn_sampler(self: &Arc<Self>) {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(m) = manager.upgrade() else { return };
                m.sample_all().await;
            }
        });
    }

    /// `GET /sandboxes/{id}/metrics`: the samples between `start` and `end` (Unix
    /// seconds, both inclusive, each optional), oldest first. A running sandbox with
    /// none yet is sampled now; a paused one answers what it has.
    pub async fn metrics(
        &self,
        caller: &Caller,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<SandboxMetric>, SandboxError> {
        let entry = self.require(caller, id)?;
        if let (Some(s), Some(e)) = (start, end) {
            if s > e {
                return Err(SandboxError::BadQuery(format!(
                    "start ({s}) is after end ({e})"
                )));
            }
        }
        let empty = entry
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if empty && entry.record().state == RecordState::Running {
            self.sample(&entry).await?;
        }
        let history = entry.history.lock().unwrap_or_else(|e| e.into_inner());
        Ok(history
            .iter()
            .filter(|m| start.is_none_or(|s| m.timestamp_unix >= s))
            .filter(|m| end.is_none_or(|e| m.timestamp_unix <= e))
            .cloned()
            .collect())
    }

    /// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each named
    /// sandbox the caller sees (others are left out, as missing ones are).
    pub async fn latest_metrics(
        &self,
        caller: &Caller,
        ids: &[String],
    ) -> Result<std::collections::BTreeMap<String, SandboxMetric>, SandboxError> {
        if ids.len() > MAX_BATCH {
            return Err(SandboxError::BadQuery(format!(
                "sandbox_ids names {} sandboxes; at most {MAX_BATCH} at once",
                ids.len()
            )));
        }
        let mut out = std::collections::BTreeMap::new();
        for id in ids {
            let Ok(entry) = self.require(caller, id) else {
                continue;
            };
            let last = entry
                .history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .back()
                .cloned();
            let latest = match last {
                Some(m) => Some(m),
                None if entry.record().state == RecordState::Running => {
                    self.sample(&entry).await.ok()
                }
                None => None,
            };
            if let Some(m) = latest {
                out.insert(id.clone(), m);
            }
        }
        Ok(out)
    }
}
