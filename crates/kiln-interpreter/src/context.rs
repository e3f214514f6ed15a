//! Contexts (spec A.5): each is one kernel with a language and a working directory.
//! The registry keeps them in creation order, plus one default context per language,
//! created on first use under a per-language lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use jupyter_zmq_client::KernelspecDir;
use serde::Serialize;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::kernel::{Kernel, KernelError, LaunchOptions};
use crate::kernelspec::{KernelspecError, SearchPath};
use crate::language::Language;
use crate::tslab;

/// Code run silently in every new Python kernel: E2B's extra display formats
/// (`e2b/data`, `e2b/chart`, JSON for dicts and lists), plain tracebacks, PIL images shown
/// as results. Harmless when the template's IPython profile already does the same.
const PYTHON_SETUP: &str = include_str!("python_setup.py");

/// How long a kernel may take to shut down before its process group is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    NoKernel(#[from] KernelspecError),
    #[error("Failed to set working directory: {0} is not a directory")]
    Cwd(String),
    #[error("cannot start the {language} kernel")]
    Launch {
        language: String,
        #[source]
        source: KernelError,
    },
}

/// The JSON form of a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

/// What every kernel launch needs.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub search: SearchPath,
    pub options: LaunchOptions,
    pub python_setup: bool,
    /// The script preloaded into JavaScript/TypeScript kernels ([`crate::tslab`]);
    /// `None` if it could not be written.
    pub tslab_preload: Option<PathBuf>,
}

impl Launcher {
    async fn launch(
        &self,
        spec: &KernelspecDir,
        language: &Language,
        cwd: &Path,
    ) -> Result<Kernel, ContextError> {
        let kernel = Kernel::launch(spec, cwd, &self.options, &self.kernel_env(spec))
            .await
            .map_err(|source| ContextError::Launch {
                language: language.to_string(),
                source,
            })?;
        if self.python_setup && spec.kernelspec.language.eq_ignore_ascii_case("python") {
            if let Err(e) = kernel
                .run_silent(PYTHON_SETUP, Duration::from_secs(30))
                .await
            {
                tracing::warn!(error = %crate::report::chain(&e), "python setup cell failed");
            }
        }
        Ok(kernel)
    }

    /// Environment variables a kernel gets on top of its kernelspec's `env`.
    fn kernel_env(&self, spec: &KernelspecDir) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(preload) = &self.tslab_preload {
            if tslab::applies_to(&spec.kernelspec.language) {
                let existing = spec
                    .kernelspec
                    .env
                    .as_ref()
                    .and_then(|e| e.get("NODE_OPTIONS").cloned())
                    .or_else(|| std::env::var("NODE_OPTIONS").ok());
                env.push((
                    "NODE_OPTIONS".to_owned(),
                    tslab::node_options(existing.as_deref(), preload),
                ));
            }
        }
        env
    }
}

pub struct Context {
    pub id: String,
    pub language: Language,
    pub cwd: String,
    spec: KernelspecDir,
    launcher: Arc<Launcher>,
    /// The current kernel; replaced on restart (and after the kernel died).
    kernel: Mutex<Arc<Kernel>>,
    /// Held for the whole of an execution: one execution at a time per context.
    pub exec_lock: Mutex<()>,
}

impl Context {
    pub fn info(&self) -> ContextInfo {
        ContextInfo {
            id: self.id.clone(),
            language: self.language.to_string(),
            cwd: self.cwd.clone(),
        }
    }

    /// The running kernel; a kernel that died is replaced first (its state is gone
    /// either way, and the next execution should not fail for it).
    pub async fn kernel(&self) -> Result<Arc<Kernel>, ContextError> {
        let mut slot = self.kernel.lock().await;
        if !slot.is_alive() {
            tracing::warn!(context = %self.id, "kernel died; starting a new one");
            *slot = Arc::new(self.launch().await?);
        }
        Ok(slot.clone())
    }

    /// The kernel as it is now, without restarting it.
    pub async fn current_kernel(&self) -> Arc<Kernel> {
        self.kernel.lock().await.clone()
    }

    async fn launch(&self) -> Result<Kernel, ContextError> {
        self.launcher
            .launch(&self.spec, &self.language, Path::new(&self.cwd))
            .await
    }

    /// A fresh kernel with the same language and cwd; a running execution ends with
    /// `ContextRestarting`.
    pub async fn restart(&self) -> Result<(), ContextError> {
        let mut slot = self.kernel.lock().await;
        slot.shutdown(SHUTDOWN_GRACE).await;
        *slot = Arc::new(self.launch().await?);
        tracing::info!(context = %self.id, "context restarted");
        Ok(())
    }

    pub async fn shutdown(&self) {
        self.kernel.lock().await.shutdown(SHUTDOWN_GRACE).await;
    }
}

pub struct Registry {
    launcher: Arc<Launcher>,
    pub default_cwd: String,
    contexts: StdMutex<Vec<Arc<Context>>>,
    /// Language → id of its default context.
    defaults: StdMutex<HashMap<Language, String>>,
    default_locks: StdMutex<HashMap<Language, Arc<Mutex<()>>>>,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only simple inserts/removes happen under these locks; a poisoned one is still sound.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub fn new(launcher: Launcher, default_cwd: String) -> Self {
        Self {
            launcher: Arc::new(launcher),
            default_cwd,
            contexts: StdMutex::default(),
            defaults: StdMutex::default(),
            default_locks: StdMutex::default(),
        }
    }

    /// Starts a new context (a new kernel).
    pub async fn create(
        &self,
        language: Language,
        cwd: Option<String>,
    ) -> Result<Arc<Context>, ContextError> {
        let cwd = cwd
            .filter(|c| !c.trim().is_empty())
            .unwrap_or_else(|| self.default_cwd.clone());
        if !Path::new(&cwd).is_dir() {
            return Err(ContextError::Cwd(cwd));
        }
        let spec = self.launcher.search.resolve(&language).await?;
        let kernel = self
            .launcher
            .launch(&spec, &language, &PathBuf::from(&cwd))
            .await?;
        let context = Arc::new(Context {
            id: uuid::Uuid::new_v4().to_string(),
            language,
            cwd,
            spec,
            launcher: self.launcher.clone(),
            kernel: Mutex::new(Arc::new(kernel)),
            exec_lock: Mutex::new(()),
        });
        tracing::info!(context = %context.id, language = %context.language, cwd = %context.cwd, "context created");
        lock(&self.contexts).push(context.clone());
        Ok(context)
    }

    /// The default context of `language`, created on first use.
    pub async fn default_for(&self, language: &Language) -> Result<Arc<Context>, ContextError> {
        if let Some(context) = self.existing_default(language) {
            return Ok(context);
        }
        let guard = self.gate(language).lock_owned().await;
        self.default_held(language, guard).await
    }

    fn gate(&self, language: &Language) -> Arc<Mutex<()>> {
        lock(&self.default_locks)
            .entry(language.clone())
            .or_default()
            .clone()
    }

    /// Marks `language`'s default context as on its way, at once: [`Self::list_settled`]
    /// waits for it from now on. Pass the guard to [`Self::default_held`].
    pub fn announce_default(&self, language: &Language) -> Option<OwnedMutexGuard<()>> {
        self.gate(language).try_lock_owned().ok()
    }

    /// [`Self::default_for`] for a caller holding the language's gate.
    pub async fn default_held(
        &self,
        language: &Language,
        _gate: OwnedMutexGuard<()>,
    ) -> Result<Arc<Context>, ContextError> {
        if let Some(context) = self.existing_default(language) {
            return Ok(context);
        }
        let context = self.create(language.clone(), None).await?;
        lock(&self.defaults).insert(language.clone(), context.id.clone());
        Ok(context)
    }

    /// [`Self::list`] once the default contexts being started have started (or failed,
    /// or 60 s passed): a list right after the server starts shows the default
    /// JavaScript context too, as E2B's does, instead of missing it while its kernel
    /// boots.
    pub async fn list_settled(&self) -> Vec<ContextInfo> {
        let gates: Vec<Arc<Mutex<()>>> = lock(&self.default_locks).values().cloned().collect();
        for gate in gates {
            let _ = tokio::time::timeout(Duration::from_secs(60), gate.lock()).await;
        }
        self.list()
    }

    fn existing_default(&self, language: &Language) -> Option<Arc<Context>> {
        let id = lock(&self.defaults).get(language).cloned()?;
        self.get(&id)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        lock(&self.contexts).iter().find(|c| c.id == id).cloned()
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        lock(&self.contexts).iter().map(|c| c.info()).collect()
    }

    /// Removes the context and shuts its kernel down. `None` if there is no such context.
    pub async fn remove(&self, id: &str) -> Option<()> {
        let context = {
            let mut contexts = lock(&self.contexts);
            let index = contexts.iter().position(|c| c.id == id)?;
            contexts.remove(index)
        };
        lock(&self.defaults).retain(|_, default_id| default_id != id);
        context.shutdown().await;
        tracing::info!(context = %id, "context removed");
        Some(())
    }

    /// Shuts every kernel down (server exit).
    pub async fn shutdown_all(&self) {
        let contexts: Vec<_> = std::mem::take(&mut *lock(&self.contexts));
        for context in contexts {
            context.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(language: &str, env: Option<&[(&str, &str)]>) -> KernelspecDir {
        let mut json = serde_json::json!({
            "argv": ["/usr/local/bin/tslab", "kernel", "--config-path", "{connection_file}"],
            "display_name": "test",
            "language": language,
        });
        if let Some(env) = env {
            json["env"] = env
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        KernelspecDir {
            kernel_name: "test".to_owned(),
            path: PathBuf::from("/nonexistent"),
            kernelspec: serde_json::from_value(json).unwrap(),
        }
    }

    fn launcher(preload: Option<&str>) -> Launcher {
        Launcher {
            search: SearchPath::default(),
            options: LaunchOptions {
                runtime_dir: PathBuf::from("/nonexistent"),
                startup_timeout: Duration::from_secs(1),
            },
            python_setup: true,
            tslab_preload: preload.map(PathBuf::from),
        }
    }

    #[test]
    fn javascript_kernels_get_the_preload() {
        let l = launcher(Some("/run/ki/tslab-preload.js"));
        let flag = r#"--require "/run/ki/tslab-preload.js""#;
        for language in ["javascript", "typescript"] {
            let env = l.kernel_env(&spec(language, None));
            assert_eq!(env.len(), 1, "{language}");
            assert_eq!(env[0].0, "NODE_OPTIONS");
            assert!(env[0].1.ends_with(flag), "{}", env[0].1);
        }
        // The kernelspec's own NODE_OPTIONS are kept.
        let env = l.kernel_env(&spec(
            "typescript",
            Some(&[("NODE_OPTIONS", "--max-old-space-size=256")]),
        ));
        assert_eq!(env[0].1, format!("--max-old-space-size=256 {flag}"));
        assert!(l.kernel_env(&spec("python", None)).is_empty());
        assert!(l.kernel_env(&spec("bash", None)).is_empty());
        assert!(launcher(None)
            .kernel_env(&spec("javascript", None))
            .is_empty());
    }
}
