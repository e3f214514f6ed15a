//! Built-in templates besides `base`: Dockerfile projects from the repository's
//! `templates/` folder, embedded in the binary and built by the server in the
//! background after `base` (the first start pays for their package installs; later
//! starts hit the layer cache for every step and take seconds).
//!
//! `code-interpreter-v1` is the template the `e2b-code-interpreter` SDK creates
//! sandboxes from when none is named; `desktop` is the e2b-desktop SDK's.

use std::path::PathBuf;
use std::sync::Arc;

use crate::builds::TemplateBuilds;
use crate::manager::SandboxManager;
use crate::report::chain;
use crate::templates::Templates;

pub use crate::builtin_projects::{find, names, Builtin, BUILTINS};

/// Builds `names` one after another; each is served once built. A failure is logged
/// (with the step and the output's tail) and the next one is built; a previous
/// version of a failed template stays served.
pub async fn build_all(
    names: Vec<String>,
    data_dir: PathBuf,
    builds: Arc<TemplateBuilds>,
    templates: Arc<Templates>,
    manager: Arc<SandboxManager>,
) {
    let projects = data_dir.join("builtins");
    for name in names {
        let Some(builtin) = find(&name) else {
            templates.set_building(&name, false);
            continue;
        };
        tracing::info!(template = %name, "building the built-in template");
        let started = std::time::Instant::now();
        let result = async {
            let dir = builtin
                .write_project(&projects)
                .map_err(|e| format!("writing its project to {}: {e}", projects.display()))?;
            let project = kiln_template::dockerfile::load_project(&dir, None, false)
                .map_err(|e| e.to_string())?;
            builds.build_project(project).await.map_err(|e| chain(&e))
        }
        .await;
        templates.set_building(&name, false);
        match result {
            Ok(info) => {
                tracing::info!(
                    template = %name,
                    secs = started.elapsed().as_secs_f64(),
                    "built-in template ready"
                );
                manager.fill_pool(&info);
            }
            Err(message) => {
                tracing::error!(template = %name, "building the built-in template failed: {message}")
            }
        }
    }
}
