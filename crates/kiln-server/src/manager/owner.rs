//! The owner task of one sandbox: the only code that changes its deadline or tears
//! it down. It ends when the sandbox is killed, by request or at its deadline.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;

use super::{Command, SandboxEntry, SandboxManager};
use crate::error::{chain, AppError};

pub(super) async fn run(
    manager: Arc<SandboxManager>,
    entry: Arc<SandboxEntry>,
    mut commands: mpsc::Receiver<Command>,
) {
    let id = entry.record().id;
    loop {
        let end_at = entry.record().end_at;
        let wait = (end_at - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::SetDeadline { end_at, extend_only, reply }) => {
                    let _ = reply.send(set_deadline(&manager, &entry, end_at, extend_only));
                }
                Some(Command::Kill { reply }) => {
                    let _ = reply.send(teardown(&manager, &id).await);
                    return;
                }
                None => return,
            },
            _ = tokio::time::sleep(wait) => {
                // The deadline may have moved while we slept; re-check before killing.
                if entry.record().end_at <= Utc::now() {
                    tracing::info!(%id, "sandbox reached its timeout");
                    if let Err(e) = teardown(&manager, &id).await {
                        tracing::error!(%id, error = %chain(&e), "killing an expired sandbox failed");
                    }
                    return;
                }
            }
        }
    }
}

fn set_deadline(
    manager: &SandboxManager,
    entry: &SandboxEntry,
    end_at: chrono::DateTime<Utc>,
    extend_only: bool,
) -> Result<chrono::DateTime<Utc>, AppError> {
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

/// Unroute first (so the proxy answers 502 at once), then kill, then forget.
async fn teardown(manager: &SandboxManager, id: &str) -> Result<(), AppError> {
    manager
        .sandboxes
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(id);
    let killed = manager.runtime.kill(id).await;
    manager.store.delete_sandbox(id)?;
    killed.map_err(|e| AppError::internal(format!("killing sandbox {id} failed"), e))?;
    tracing::info!(%id, "sandbox killed");
    Ok(())
}
