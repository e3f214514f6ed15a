//! Warm pools: per template, a few sandboxes started ahead of time with internet access
//! (what the SDK asks for by default) and no identity yet. A create claims one and
//! gives it its env vars and access token through envd `/init`, so it costs
//! milliseconds instead of a namespace, overlay and veth setup.
//!
//! A template's start command runs (and its ready command passes) while the sandbox
//! waits in the pool, as E2B runs it at build time and snapshots it running: the
//! started processes see the template's env, not the claimant's, which reaches them
//! through envd (`/envs`, read per run by the code interpreter). A claim then costs
//! one `/init`.
//!
//! A pooled sandbox is used once: a claim takes it out of the pool for good and a
//! fresh one is started to replace it, so nothing of one claimant reaches another.
//! Pooled sandboxes count against `E2B_MAX_SANDBOXES` (it caps what runs on the host),
//! and yield to creates: a create at the cap kills an idle pooled sandbox to make room.
//! After a restart they are unknown to the store and `recover` removes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_runtime::{SandboxConfig, SandboxInstance};

use super::SandboxManager;
use crate::report::chain;
use crate::templates::TemplateInfo;

/// An idle sandbox and the template version (its root filesystem) it was started from.
struct Pooled {
    rootfs: PathBuf,
    instance: SandboxInstance,
}

#[derive(Default)]
pub(super) struct Pools {
    /// Idle sandboxes by template name.
    idle: Mutex<HashMap<String, Vec<Pooled>>>,
    /// Starts under way by template name, so refills do not overshoot.
    starting: Mutex<HashMap<String, usize>>,
    /// Set by [`Pools::drain`] at shutdown: a start that finishes after it is not
    /// pooled but handed back to be killed, so no sandbox outlives the server unowned.
    closed: std::sync::atomic::AtomicBool,
}

impl Pools {
    /// An idle sandbox of `template` started from `rootfs` (the current version), and
    /// the idle ones started from an older version, which the caller must kill.
    pub(super) fn claim(
        &self,
        template: &str,
        rootfs: &Path,
    ) -> (Option<SandboxInstance>, Vec<SandboxInstance>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = idle.get_mut(template) else {
            return (None, Vec::new());
        };
        let (current, stale): (Vec<Pooled>, Vec<Pooled>) =
            list.drain(..).partition(|p| p.rootfs == rootfs);
        *list = current;
        let claimed = list.pop().map(|p| p.instance);
        (claimed, stale.into_iter().map(|p| p.instance).collect())
    }

    pub(super) fn idle_count(&self, template: &str) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(template)
            .map_or(0, Vec::len)
    }

    /// Idle sandboxes by template.
    pub(super) fn idle_counts(&self) -> Vec<(String, usize)> {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(t, v)| (t.clone(), v.len()))
            .collect()
    }

    pub(super) fn drain(&self) -> Vec<SandboxInstance> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.drain()
            .flat_map(|(_, v)| v)
            .map(|p| p.instance)
            .collect()
    }

    /// Reserve up to `target` idle-or-starting sandboxes for `template`, at most `room`
    /// new ones; returns how many to start now.
    fn reserve(&self, template: &str, target: usize, room: usize) -> usize {
        let idle = self.idle_count(template);
        let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        let n = starting.entry(template.to_string()).or_default();
        let want = target.saturating_sub(idle + *n).min(room);
        *n += want;
        want
    }

    /// Sandboxes the pools hold on the host: idle ones and starts under way.
    pub(super) fn held(&self) -> usize {
        let idle: usize = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum();
        let starting: usize = self
            .starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum();
        idle + starting
    }

    /// Take one idle sandbox out of the largest pool, for the caller to kill.
    pub(super) fn evict_one(&self) -> Option<SandboxInstance> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.values_mut().max_by_key(|l| l.len())?;
        list.pop().map(|p| p.instance)
    }

    /// A start is over: its sandbox joins the pool, or, once the pools are drained,
    /// comes back to be killed (it still counts as starting until [`Self::gone`]).
    fn finish(&self, template: &str, instance: Option<Pooled>) -> Option<SandboxInstance> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        match instance {
            Some(i) if self.closed.load(std::sync::atomic::Ordering::Acquire) => Some(i.instance),
            instance => {
                if let Some(i) = instance {
                    idle.entry(template.to_string()).or_default().push(i);
                }
                drop(idle);
                self.gone(template);
                None
            }
        }
    }

    /// One start of `template` no longer under way.
    fn gone(&self, template: &str) {
        let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = starting.get_mut(template) {
            *n = n.saturating_sub(1);
        }
    }

    /// Starts under way.
    fn starting_count(&self) -> usize {
        self.starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

impl SandboxManager {
    /// Top up the pool of `template` to the configured size, in the background.
    pub fn fill_pool(self: &Arc<Self>, template: &TemplateInfo) {
        let config = match self.sandbox_config(
            super::new_id(),
            template,
            true,
            super::Size::default(),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(template = %template.name, error = %e, "not pooling this template");
                return;
            }
        };
        // Pooled sandboxes count against E2B_MAX_SANDBOXES: fill only the room left.
        let room = {
            let creating = self
                .creating
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .creates
                .len();
            self.limits
                .max_sandboxes
                .saturating_sub(self.sandboxes_on_host(creating))
        };
        let n = self
            .pools
            .reserve(&template.name, self.limits.pool_size, room);
        for _ in 0..n {
            let manager = self.clone();
            let template = template.clone();
            let mut config = config.clone();
            config.id = super::new_id();
            tokio::spawn(async move {
                let started = manager
                    .runtime
                    .start_on(template.meta.runtime, &config)
                    .await;
                let instance = match started {
                    Ok(instance) => match super::prepare_pooled(&instance, &template).await {
                        Ok(()) => Some(Pooled {
                            rootfs: template.rootfs.clone(),
                            instance,
                        }),
                        Err(message) => {
                            tracing::warn!(template = %template.name, id = %instance.id,
                                "preparing a pooled sandbox failed: {message}");
                            if let Err(e) = manager.runtime.kill(&instance.id).await {
                                tracing::warn!(id = %instance.id, error = %chain(&e),
                                    "killing a pooled sandbox failed");
                            }
                            None
                        }
                    },
                    Err(e) => {
                        tracing::warn!(template = %template.name, error = %chain(&e),
                            "starting a pooled sandbox failed");
                        None
                    }
                };
                if let Some(late) = manager.pools.finish(&template.name, instance) {
                    if let Err(e) = manager.runtime.kill(&late.id).await {
                        tracing::warn!(id = %late.id, error = %chain(&e),
                            "killing a pooled sandbox started during shutdown failed");
                    }
                    manager.pools.gone(&template.name);
                }
            });
        }
    }

    /// Kill every pooled sandbox (shutdown, tests): the idle ones now, and those still
    /// starting as their starts end (waited for, up to the runtime's start deadline).
    pub async fn drain_pools(&self) {
        for i in self.pools.drain() {
            if let Err(e) = self.runtime.kill(&i.id).await {
                tracing::warn!(id = %i.id, error = %chain(&e), "killing a pooled sandbox failed");
            }
        }
        let deadline = std::time::Instant::now() + super::START_DEADLINE;
        while self.pools.starting_count() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Kill the idle pooled sandboxes of `template`: a new version of it was installed
    /// (or it was deleted). A start already under way may still add one of the old
    /// version; `claim` never hands that one out (it compares versions).
    pub async fn discard_pool(&self, template: &str) {
        let idle = self
            .pools
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(template)
            .unwrap_or_default();
        for i in idle.into_iter().map(|p| p.instance) {
            if let Err(e) = self.runtime.kill(&i.id).await {
                tracing::warn!(id = %i.id, error = %chain(&e), "killing a pooled sandbox failed");
            }
        }
    }

    pub fn pooled(&self, template: &str) -> usize {
        self.pools.idle_count(template)
    }

    /// A started sandbox for a create: from the pool when one fits (its start command
    /// already running: the flag is true), else a cold start.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        template: &TemplateInfo,
        internet: bool,
        asked: super::Size,
    ) -> Result<(SandboxInstance, bool), super::SandboxError> {
        // Within the caps before anything starts (a pooled one was checked when it
        // was started, against the same template version).
        let config: SandboxConfig =
            self.sandbox_config(super::new_id(), template, internet, asked)?;
        // Pooled sandboxes have their template's size: a create that asks for another
        // starts one of its own.
        let pooled_size = self.sandbox_size(template, super::Size::default())?;
        let size = self.sandbox_size(template, asked)?;
        if internet && size == pooled_size {
            let (claimed, stale) = self.pools.claim(&template.name, &template.rootfs);
            if !stale.is_empty() {
                let manager = self.clone();
                tokio::spawn(async move {
                    for i in stale {
                        if let Err(e) = manager.runtime.kill(&i.id).await {
                            tracing::warn!(id = %i.id, error = %chain(&e),
                                "killing a pooled sandbox of an old template version failed");
                        }
                    }
                });
            }
            if let Some(instance) = claimed {
                self.fill_pool(template);
                return Ok((instance, true));
            }
        }
        let instance = match tokio::time::timeout(
            super::START_DEADLINE,
            self.runtime.start_on(template.meta.runtime, &config),
        )
        .await
        {
            Ok(started) => started,
            Err(_) => {
                // The runtime may have made part of it: remove whatever is there.
                self.destroy(&config.id).await;
                return Err(super::SandboxError::StartTimedOut(
                    super::START_DEADLINE.as_secs(),
                ));
            }
        };
        if internet && self.limits.pool_size > 0 {
            self.fill_pool(template);
        }
        // The runtime's error names host paths and carries the sandbox's console log:
        // the log gets it, the client a safe summary and the request id.
        let instance =
            instance.map_err(|e| super::SandboxError::runtime("failed to start the sandbox", e))?;
        Ok((instance, false))
    }
}
