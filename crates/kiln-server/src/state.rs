//! What every request handler shares: the manager, the store, the template registry,
//! the build service, spells and secrets.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::builds::TemplateBuilds;
use crate::manager::SandboxManager;
use crate::store::Store;
use crate::templates::Templates;

pub struct AppState {
    pub manager: Arc<SandboxManager>,
    pub store: Arc<dyn Store>,
    pub templates: Arc<Templates>,
    pub ready: AtomicBool,
    pub domain: Option<String>,
    /// Template builds ([`crate::builds`]); `None` where the server cannot build.
    pub builds: Option<Arc<TemplateBuilds>>,
    /// `KILN_METRICS_TOKEN`: with it, `GET /metrics` wants it as a Bearer token;
    /// without, it answers loopback clients only.
    pub metrics_token: Option<String>,
    /// Spells: Kiln's library, the operator's files, each team's own.
    pub spells: Arc<crate::spells::Spells>,
    /// Each team's secrets, sealed with the server's key.
    pub secrets: Arc<crate::secrets::Secrets>,
}
