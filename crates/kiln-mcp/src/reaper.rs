//! The sandboxes each MCP session made, killed when the session ends (stdio EOF, an
//! HTTP session's DELETE or its end at shutdown) unless a call said `keep`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_client::Client;
use tokio_util::task::TaskTracker;

/// How long a shutdown waits for the kills of ended sessions.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

struct Owned {
    id: String,
    client: Client,
}

/// Shared by every session of one server (stdio or HTTP).
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    sessions: Mutex<HashMap<u64, Vec<Owned>>>,
    next: AtomicU64,
    kills: TaskTracker,
}

impl Reaper {
    fn sessions(&self) -> MutexGuard<'_, HashMap<u64, Vec<Owned>>> {
        // A panic elsewhere while holding the lock leaves the map consistent (every
        // change is one insert or remove), so keep using it.
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new session's number.
    pub fn open(&self) -> u64 {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.sessions().insert(n, Vec::new());
        n
    }

    /// Session `session` made sandbox `id` with `client`: kill it when the session ends.
    pub fn track(&self, session: u64, id: &str, client: &Client) {
        self.sessions().entry(session).or_default().push(Owned {
            id: id.to_string(),
            client: client.clone(),
        });
    }

    /// The session no longer owns `id` (killed, or to be kept).
    pub fn release(&self, session: u64, id: &str) {
        if let Some(list) = self.sessions().get_mut(&session) {
            list.retain(|o| o.id != id);
        }
    }

    /// Whether session `session` owns sandbox `id`.
    pub fn owns(&self, session: u64, id: &str) -> bool {
        self.sessions()
            .get(&session)
            .is_some_and(|l| l.iter().any(|o| o.id == id))
    }

    /// Session `session` ended: kill what it owns, in the background (tracked, so a
    /// shutdown waits for it).
    pub fn close(&self, session: u64) {
        let owned = self.sessions().remove(&session).unwrap_or_default();
        if owned.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                count = owned.len(),
                "MCP session ended outside the runtime; its sandboxes stay until their timeout"
            );
            return;
        };
        for o in owned {
            self.inner.kills.spawn_on(kill(o), &rt);
        }
    }

    /// Kills what every session still owns and waits (bounded) for all kills.
    pub async fn shutdown(&self) {
        let sessions: Vec<u64> = self.sessions().keys().copied().collect();
        for s in sessions {
            self.close(s);
        }
        self.inner.kills.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.inner.kills.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sandboxes of ended MCP sessions were not killed in time");
        }
    }

    /// Waits until the kills started so far are done (tests, stdio's end).
    pub async fn settle(&self) {
        while !self.inner.kills.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn kill(o: Owned) {
    match o.client.kill(&o.id).await {
        Ok(()) => tracing::info!(sandbox = %o.id, "killed the sandbox of an ended MCP session"),
        Err(kiln_client::ClientError::Api { status, .. }) if status.as_u16() == 404 => {}
        Err(e) => {
            tracing::warn!(sandbox = %o.id, error = %e, "could not kill the sandbox of an ended MCP session")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_own_what_they_track_until_released() {
        let r = Reaper::default();
        let (a, b) = (r.open(), r.open());
        assert_ne!(a, b);
        // Nothing listens there: the kill fails quietly and is still waited for.
        let c = Client::new("http://127.0.0.1:9", "e2b_x");
        r.track(a, "s1", &c);
        r.track(a, "s2", &c);
        assert!(r.owns(a, "s1") && !r.owns(b, "s1"));
        r.release(a, "s1");
        assert!(!r.owns(a, "s1") && r.owns(a, "s2"));
        r.close(a);
        assert!(!r.owns(a, "s2"));
        r.shutdown().await;
        assert!(r.inner.kills.is_empty());
    }
}
