//! The owner task of one sandbox: the only code that changes its deadline or tears
//! it down. It ends when the sandbox is killed, by request or at its deadline.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;

use super::SandboxError;
use super::{Command, SandboxEntry, SandboxManager};
use crate::report::chain;
use crate::store::RecordState;

/// A paused sandbox's owner only wakes for commands; this just bounds the timer.
const PAUSED_WAKEUP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub(super) async fn run(
    manager: Arc<SandboxManager>,
    entry: Arc<SandboxEntry>,
    mut commands: mpsc::Receiver<Command>,
) {
    let id = entry.record().id;
    loop {
        let rec = entry.record();
        // A paused sandbox has no deadline: it waits for a resume or a kill.
        let wait = match rec.state {
            RecordState::Running => (rec.end_at - Utc::now()).to_std().unwrap_or_default(),
            // An owner exists only for running and paused sandboxes.
            RecordState::Paused | RecordState::Creating | RecordState::Killing => PAUSED_WAKEUP,
        };
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::SetDeadline { end_at, extend_only, reply }) => {
                    let _ = reply.send(set_deadline(&manager, &entry, end_at, extend_only));
                }
                Some(Command::Kill { reply }) => {
                    let _ = reply.send(teardown(&manager, &id).await);
                    return;
                }
                Some(Command::Pause { reply }) => {
                    let _ = reply.send(pause(&manager, &entry).await);
                }
                Some(Command::Resume { end_at, reply }) => {
                    let _ = reply.send(resume(&manager, &entry, end_at).await);
                }
                None => return,
            },
            _ = tokio::time::sleep(wait) => {
                // The deadline may have moved while we slept; re-check before acting.
                let rec = entry.record();
                if rec.state == RecordState::Running && rec.end_at <= Utc::now() && rec.auto_pause {
                    tracing::info!(%id, "sandbox reached its timeout; pausing it (autoPause)");
                    if let Err(e) = pause(&manager, &entry).await {
                        tracing::error!(%id, error = %chain(&e), "auto-pause failed; killing");
                        let _ = teardown(&manager, &id).await;
                        return;
                    }
                } else if rec.state == RecordState::Running && rec.end_at <= Utc::now() {
                    tracing::info!(%id, "sandbox reached its timeout");
                    manager.audit().record(
                        crate::audit::Event::new("sandbox.terminated", true)
                            .sandbox(&id)
                            .user(rec.team_id, 0)
                            .agent_or(rec.metadata.get("agent_id"))
                            .subject("timeout".into()),
                    );
                    if let Err(e) = teardown(&manager, &id).await {
                        tracing::error!(%id, error = %chain(&e), "killing an expired sandbox failed");
                    }
                    return;
                }
            }
        }
    }
}

async fn pause(manager: &SandboxManager, entry: &SandboxEntry) -> Result<(), SandboxError> {
    let id = entry.record().id;
    if entry.record().state == RecordState::Paused {
        return Err(SandboxError::AlreadyPaused(id));
    }
    super::within(
        "pausing the sandbox",
        super::PAUSE_DEADLINE,
        manager.runtime.pause(&id),
    )
    .await?
    .map_err(|e| match e {
        kiln_runtime::RuntimeError::Unsupported(message) => SandboxError::PauseUnsupported(message),
        other => SandboxError::runtime(format!("pausing sandbox {id} failed"), other),
    })?;
    set_state(manager, entry, RecordState::Paused)?;
    publish(manager, entry, "sandbox.paused", None);
    tracing::info!(%id, "sandbox paused");
    Ok(())
}

async fn resume(
    manager: &SandboxManager,
    entry: &SandboxEntry,
    end_at: chrono::DateTime<Utc>,
) -> Result<bool, SandboxError> {
    let id = entry.record().id;
    if entry.record().state != RecordState::Paused {
        return Ok(false);
    }
    super::within(
        "resuming the sandbox",
        super::PAUSE_DEADLINE,
        manager.runtime.resume(&id),
    )
    .await?
    .map_err(|e| SandboxError::runtime(format!("resuming sandbox {id} failed"), e))?;
    // A gVisor sandbox resumed after a reboot has a new veth, without its rules.
    manager
        .reapply_network(&entry.record(), &entry.envd_socket)
        .await;
    set_deadline(manager, entry, end_at, false)?;
    set_state(manager, entry, RecordState::Running)?;
    publish(manager, entry, "sandbox.resumed", None);
    tracing::info!(%id, "sandbox resumed");
    Ok(true)
}

fn publish(
    manager: &SandboxManager,
    entry: &SandboxEntry,
    kind: &'static str,
    reason: Option<&str>,
) {
    let rec = entry.record();
    let mut event = crate::events::LifecycleEvent::new(kind, Some(rec.team_id))
        .sandbox(&rec.id, &rec.template_id);
    if let Some(reason) = reason {
        event = event.reason(reason);
    }
    manager.events().publish(event);
}

fn set_state(
    manager: &SandboxManager,
    entry: &SandboxEntry,
    state: RecordState,
) -> Result<(), SandboxError> {
    manager.store.set_state(&entry.record().id, state)?;
    entry
        .record
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .state = state;
    Ok(())
}

fn set_deadline(
    manager: &SandboxManager,
    entry: &SandboxEntry,
    end_at: chrono::DateTime<Utc>,
    extend_only: bool,
) -> Result<chrono::DateTime<Utc>, SandboxError> {
    let current = entry.record().end_at;
    let new_end = if extend_only {
        end_at.max(current)
    } else {
        end_at
    };
    if new_end != current {
        manager.store.set_end_at(&entry.record().id, new_end)?;
        entry
            .record
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .end_at = new_end;
    }
    Ok(new_end)
}

/// Unroute first (so the proxy answers 502 at once), then hand the sandbox to
/// [`SandboxManager::destroy`], which retries until the runtime has removed it. For
/// the caller the sandbox is gone either way.
async fn teardown(manager: &Arc<SandboxManager>, id: &str) -> Result<(), SandboxError> {
    let entry = manager
        .sandboxes
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(id);
    if let Some(entry) = entry {
        let rec = entry.record();
        let reason = (rec.end_at <= chrono::Utc::now()).then_some("timeout");
        publish(manager, &entry, "sandbox.killed", reason);
    }
    manager.destroy(id).await;
    tracing::info!(%id, "sandbox killed");
    Ok(())
}
