//! Lifecycle events: a sandbox created, paused, resumed, killed or failed; a template
//! built. Each goes to the server's subscribers (`GET /events`, server-sent events,
//! a team's own) and, with `--nats-url`, to NATS through `async-nats`.
//!
//! NATS subjects are versioned like the seed's: `kiln.<kind>.v1`, e.g.
//! `kiln.sandbox.created.v1`, `kiln.template.built.v1` (subscribe to `kiln.>` for
//! all). The payload is the event as JSON (`version`, `type`, `time`, `team_id`,
//! `sandbox_id`, `template_id`, `reason`). A change that breaks a payload gets a new
//! version suffix; fields are only ever added.
//!
//! NATS is never in the way: events go to a bounded queue that a background task
//! publishes from; when NATS is down (or slow) an event is dropped and counted
//! (`kiln_events_dropped_total`), the client reconnects by itself, and the server keeps
//! serving.

use std::sync::{Arc, OnceLock};

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::metrics::Metrics;

/// The payload version (and subject suffix).
pub const VERSION: u32 = 1;
/// Events waiting for NATS before new ones are dropped.
const NATS_QUEUE: usize = 1024;
/// Events a slow `GET /events` reader may fall behind by before it misses some.
const LOCAL_QUEUE: usize = 256;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LifecycleEvent {
    pub version: u32,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    /// The owning team (`None`: the server's own, e.g. a built-in's build).
    pub team_id: Option<i64>,
    pub sandbox_id: Option<String>,
    pub template_id: Option<String>,
    /// Why, where it is not the obvious (a failure's message, "timeout").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl LifecycleEvent {
    pub fn new(kind: &'static str, team_id: Option<i64>) -> Self {
        LifecycleEvent {
            version: VERSION,
            kind,
            time: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            team_id,
            sandbox_id: None,
            template_id: None,
            reason: None,
        }
    }

    pub fn sandbox(mut self, id: &str, template: &str) -> Self {
        self.sandbox_id = Some(id.to_string());
        self.template_id = Some(template.to_string());
        self
    }

    pub fn template(mut self, name: &str) -> Self {
        self.template_id = Some(name.to_string());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// `kiln.sandbox.created.v1`.
    pub fn subject(&self) -> String {
        format!("kiln.{}.v{VERSION}", self.kind)
    }
}

/// Where events go.
pub struct EventBus {
    local: broadcast::Sender<LifecycleEvent>,
    nats: OnceLock<mpsc::Sender<LifecycleEvent>>,
    metrics: Arc<Metrics>,
}

impl EventBus {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        EventBus {
            local: broadcast::channel(LOCAL_QUEUE).0,
            nats: OnceLock::new(),
            metrics,
        }
    }

    /// From now on, events also go to the NATS server at `url` (connected, and
    /// reconnected, in the background).
    pub fn connect_nats(&self, url: &str) {
        let (tx, rx) = mpsc::channel(NATS_QUEUE);
        if self.nats.set(tx).is_err() {
            return;
        }
        tokio::spawn(publish_to_nats(url.to_string(), rx, self.metrics.clone()));
    }

    pub fn publish(&self, event: LifecycleEvent) {
        if let Some(nats) = self.nats.get() {
            if nats.try_send(event.clone()).is_err() {
                self.metrics.events_dropped.inc();
            }
        }
        // No subscriber is not an error.
        let _ = self.local.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.local.subscribe()
    }
}

async fn publish_to_nats(
    url: String,
    mut events: mpsc::Receiver<LifecycleEvent>,
    metrics: Arc<Metrics>,
) {
    let client = async_nats::ConnectOptions::new()
        .name("kiln")
        .retry_on_initial_connect()
        .connect(url.as_str())
        .await;
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%url, error = %e, "cannot use the NATS server; events are not published");
            while events.recv().await.is_some() {
                metrics.events_dropped.inc();
            }
            return;
        }
    };
    let mut down_reported = false;
    while let Some(event) = events.recv().await {
        if client.connection_state() != async_nats::connection::State::Connected {
            // The client reconnects by itself; until then events are dropped, not
            // queued without bound.
            metrics.events_dropped.inc();
            if !down_reported {
                tracing::warn!(%url, "NATS is not connected; dropping lifecycle events until it is");
                down_reported = true;
            }
            continue;
        }
        down_reported = false;
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => p,
            Err(_) => continue,
        };
        if let Err(e) = client.publish(event.subject(), payload.into()).await {
            metrics.events_dropped.inc();
            tracing::debug!(error = %e, "publishing an event to NATS failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_payloads_are_versioned() {
        let e = LifecycleEvent::new("sandbox.created", Some(3)).sandbox("abc", "base");
        assert_eq!(e.subject(), "kiln.sandbox.created.v1");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["type"], "sandbox.created");
        assert_eq!(v["team_id"], 3);
        assert_eq!(v["sandbox_id"], "abc");
        assert!(v.get("reason").is_none());
    }

    #[tokio::test]
    async fn nats_down_drops_and_counts_and_local_subscribers_still_get_them() {
        let metrics = Arc::new(Metrics::new());
        let bus = EventBus::new(metrics.clone());
        let mut sub = bus.subscribe();
        // Nothing listens on port 1.
        bus.connect_nats("nats://127.0.0.1:1");
        for _ in 0..3 {
            bus.publish(LifecycleEvent::new("sandbox.created", Some(1)));
        }
        assert_eq!(sub.recv().await.unwrap().kind, "sandbox.created");
        for _ in 0..200 {
            if metrics.events_dropped.get() >= 3 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("dropped events were not counted");
    }
}
