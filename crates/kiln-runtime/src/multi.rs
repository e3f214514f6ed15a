//! One server, two backends: templates may ask for the runtime their sandboxes run on
//! (`kiln.toml`'s `runtime`), so the server holds its default backend and any other it
//! could set up, and sends each call to the backend that owns the sandbox.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{Runtime, RuntimeError, RuntimeKind, SandboxConfig, SandboxInstance, SandboxStats};

/// The default backend plus others, each owning the sandboxes it started (its own
/// state directory).
pub struct MultiRuntime {
    default: Arc<dyn Runtime>,
    others: Vec<Arc<dyn Runtime>>,
}

impl MultiRuntime {
    /// `others` of the same kind as `default` (or as each other) are dropped.
    pub fn new(default: Arc<dyn Runtime>, others: Vec<Arc<dyn Runtime>>) -> Self {
        let mut kept: Vec<Arc<dyn Runtime>> = Vec::new();
        for rt in others {
            if rt.kind() != default.kind() && kept.iter().all(|k| k.kind() != rt.kind()) {
                kept.push(rt);
            }
        }
        MultiRuntime {
            default,
            others: kept,
        }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        std::iter::once(&self.default).chain(self.others.iter())
    }

    /// The backend whose state holds `id`; the default when none does.
    fn owner(&self, id: &str) -> &Arc<dyn Runtime> {
        self.all().find(|r| r.owns(id)).unwrap_or(&self.default)
    }

    /// The kinds this server can start sandboxes on, the default first.
    pub fn kinds(&self) -> Vec<RuntimeKind> {
        self.all().map(|r| r.kind()).collect()
    }
}

#[async_trait]
impl Runtime for MultiRuntime {
    fn kind(&self) -> RuntimeKind {
        self.default.kind()
    }

    fn describe(&self) -> String {
        let others: Vec<&str> = self.others.iter().map(|r| r.kind().as_str()).collect();
        if others.is_empty() {
            self.default.describe()
        } else {
            format!(
                "{}; templates may ask for {}",
                self.default.describe(),
                others.join(", ")
            )
        }
    }

    async fn start(&self, config: &SandboxConfig) -> Result<SandboxInstance, RuntimeError> {
        self.default.start(config).await
    }

    async fn start_on(
        &self,
        kind: Option<RuntimeKind>,
        config: &SandboxConfig,
    ) -> Result<SandboxInstance, RuntimeError> {
        let Some(kind) = kind else {
            return self.default.start(config).await;
        };
        match self.all().find(|r| r.kind() == kind) {
            Some(rt) => rt.start(config).await,
            None => Err(unavailable(kind, &self.kinds())),
        }
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id).stop(id).await
    }

    async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id).kill(id).await
    }

    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        self.owner(id).stats(id).await
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let mut ids = Vec::new();
        for rt in self.all() {
            for id in rt.list().await? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    async fn adopt(&self, id: &str) -> Result<Option<SandboxInstance>, RuntimeError> {
        self.owner(id).adopt(id).await
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id).pause(id).await
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id).resume(id).await
    }

    fn upper_dir(&self, id: &str) -> Option<PathBuf> {
        self.owner(id).upper_dir(id)
    }

    fn console_tail(&self, id: &str, max: u64) -> Option<String> {
        self.owner(id).console_tail(id, max)
    }

    fn network_slot(&self, id: &str) -> Option<crate::jail::net::Slot> {
        self.owner(id).network_slot(id)
    }

    fn pause_survives_reboot(&self) -> bool {
        self.default.pause_survives_reboot()
    }

    fn pause_of_survives_reboot(&self, id: &str) -> bool {
        self.owner(id).pause_survives_reboot()
    }

    fn owns(&self, id: &str) -> bool {
        self.all().any(|r| r.owns(id))
    }

    fn kind_of(&self, id: &str) -> RuntimeKind {
        self.owner(id).kind()
    }
}

/// The refusal for a template that asks for a runtime this server does not have.
pub(crate) fn unavailable(kind: RuntimeKind, have: &[RuntimeKind]) -> RuntimeError {
    let have: Vec<&str> = have.iter().map(|k| k.as_str()).collect();
    RuntimeError::Unsupported(format!(
        "the template asks for the {} runtime, which this server cannot run (it runs: {}); \
         see the start log for why, or remove `runtime` from the template's kiln.toml",
        kind.as_str(),
        have.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    /// A backend that records which ids it started and killed.
    struct Fake {
        kind: RuntimeKind,
        started: Mutex<BTreeSet<String>>,
        killed: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new(kind: RuntimeKind) -> Arc<Self> {
            Arc::new(Fake {
                kind,
                started: Mutex::default(),
                killed: Mutex::default(),
            })
        }
    }

    #[async_trait]
    impl Runtime for Fake {
        fn kind(&self) -> RuntimeKind {
            self.kind
        }
        async fn start(&self, c: &SandboxConfig) -> Result<SandboxInstance, RuntimeError> {
            self.started.lock().unwrap().insert(c.id.clone());
            Ok(SandboxInstance {
                id: c.id.clone(),
                pid: 1,
                envd_socket: PathBuf::from("/nonexistent"),
            })
        }
        async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
            self.killed.lock().unwrap().push(id.to_owned());
            self.started.lock().unwrap().remove(id);
            Ok(())
        }
        async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
            Err(RuntimeError::NotFound { id: id.into() })
        }
        async fn list(&self) -> Result<Vec<String>, RuntimeError> {
            Ok(self.started.lock().unwrap().iter().cloned().collect())
        }
        async fn adopt(&self, _: &str) -> Result<Option<SandboxInstance>, RuntimeError> {
            Ok(None)
        }
        fn owns(&self, id: &str) -> bool {
            self.started.lock().unwrap().contains(id)
        }
    }

    fn config(id: &str) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            rootfs: "/t".into(),
            limits: crate::Limits {
                memory_mb: 64,
                cpu_count: 1,
                pids_max: 10,
                disk_mb: 64,
            },
            network: crate::NetworkMode::Loopback,
            host_ids: crate::HostIdMode::PerSandbox,
        }
    }

    #[tokio::test]
    async fn templates_choose_the_backend_and_calls_follow_the_owner() {
        let gvisor = Fake::new(RuntimeKind::Gvisor);
        let jail = Fake::new(RuntimeKind::Jail);
        let multi = MultiRuntime::new(
            gvisor.clone(),
            vec![jail.clone(), Fake::new(RuntimeKind::Gvisor)],
        );
        assert_eq!(multi.kinds(), [RuntimeKind::Gvisor, RuntimeKind::Jail]);
        assert!(multi.describe().ends_with("templates may ask for jail"));

        multi.start_on(None, &config("a")).await.unwrap();
        multi
            .start_on(Some(RuntimeKind::Jail), &config("b"))
            .await
            .unwrap();
        multi
            .start_on(Some(RuntimeKind::Gvisor), &config("c"))
            .await
            .unwrap();
        assert_eq!(multi.kind_of("a"), RuntimeKind::Gvisor);
        assert_eq!(multi.kind_of("b"), RuntimeKind::Jail);
        assert_eq!(multi.list().await.unwrap(), ["a", "c", "b"]);

        multi.kill("b").await.unwrap();
        assert_eq!(*jail.killed.lock().unwrap(), ["b"]);
        assert!(gvisor.killed.lock().unwrap().is_empty());
        // Unknown ids go to the default (kill is idempotent there).
        multi.kill("zz").await.unwrap();
        assert_eq!(*gvisor.killed.lock().unwrap(), ["zz"]);
    }

    #[tokio::test]
    async fn a_missing_backend_is_a_clear_error() {
        let multi = MultiRuntime::new(Fake::new(RuntimeKind::Jail), vec![]);
        let err = multi
            .start_on(Some(RuntimeKind::Gvisor), &config("a"))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("asks for the gvisor runtime") && msg.contains("it runs: jail"),
            "{msg}"
        );
        // A single backend refuses another kind the same way.
        let jail = Fake::new(RuntimeKind::Jail);
        let err = jail
            .start_on(Some(RuntimeKind::Gvisor), &config("a"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("asks for the gvisor runtime"),
            "{err}"
        );
        assert!(jail
            .start_on(Some(RuntimeKind::Jail), &config("a"))
            .await
            .is_ok());
    }
}
