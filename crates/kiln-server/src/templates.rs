//! The templates this server can start sandboxes from, by name. Filled at start
//! (the built-in `base` is built on first start, which can take minutes) and read on
//! every create.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::RwLock;

/// Why a `templateID` names no template the caller can start now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("template \"{id}\" not found; available templates: {}", list_or_none(.available))]
    NotFound { id: String, available: Vec<String> },
    #[error(
        "template \"{0}\" is still being built (a built-in template is built on the server's \
         first start, which takes minutes); GET /healthz lists the templates still building"
    )]
    Building(String),
    /// A built-in template the server did not build: not in `--builtin-templates`, or
    /// its build failed.
    #[error(
        "template \"{0}\" is a built-in template this server has not built: start it with \
         `kiln serve --builtin-templates code-interpreter-v1,{0}` (or \
         KILN_BUILTIN_TEMPLATES=code-interpreter-v1,{0}) and wait until GET /healthz no \
         longer lists it as building, or build it with `kiln template build \
         templates/{0}`; if it was in that list, its build failed (the server log says why)"
    )]
    BuiltinNotBuilt(String),
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// What a create needs to know about a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateInfo {
    pub name: String,
    pub rootfs: PathBuf,
    pub meta: TemplateDefaults,
}

/// Per-template defaults; `None` falls back to the server's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateDefaults {
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
    pub cpu_count: Option<u32>,
    pub memory_mb: Option<u64>,
    /// Started (as the default user, in the background) in every new sandbox.
    pub start_cmd: Option<String>,
    /// Run until it exits 0 before the sandbox is handed out.
    pub ready_cmd: Option<String>,
    /// Environment variables of the template (its ENV steps), under the create's own.
    pub envs: BTreeMap<String, String>,
    /// The runtime the template's sandboxes run on; `None`: the server's default.
    pub runtime: Option<kiln_runtime::RuntimeKind>,
    /// The port of the template's browser DevTools endpoint, served by the proxy's
    /// CDP route ([`crate::cdp`]).
    pub cdp_port: Option<u16>,
}

#[derive(Default)]
pub struct Templates {
    by_name: RwLock<BTreeMap<String, TemplateInfo>>,
    /// Templates the server is expected to serve that are still being built (the
    /// built-ins on first start).
    building: RwLock<BTreeSet<String>>,
}

impl Templates {
    pub fn insert(&self, t: TemplateInfo) {
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.name.clone(), t);
    }

    /// Stops serving `name`; true when it was served.
    pub fn remove(&self, name: &str) -> bool {
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    }

    /// Marks `name` as being built (`true`) or no longer (`false`).
    pub fn set_building(&self, name: &str, building: bool) {
        let mut set = self.building.write().unwrap_or_else(|e| e.into_inner());
        if building {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
    }

    /// Templates being built, by name.
    pub fn building(&self) -> Vec<String> {
        self.building
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Resolve a `templateID` as the SDK sends it: a name, optionally with a `:tag`
    /// (only the default tag exists) or a `kiln/` namespace.
    pub fn resolve(&self, template_id: &str) -> Result<TemplateInfo, LookupError> {
        self.resolve_visible(template_id, |_| true)
    }

    /// [`Self::resolve`] among the templates `visible` admits: the others answer (and
    /// are listed) as if they did not exist.
    pub fn resolve_visible(
        &self,
        template_id: &str,
        visible: impl Fn(&str) -> bool,
    ) -> Result<TemplateInfo, LookupError> {
        let name = template_id.strip_prefix("kiln/").unwrap_or(template_id);
        // Builds keep one version per name, so any tag (`name:v1`, the build's tag)
        // names that version.
        let name = name.split_once(':').map_or(name, |(n, _)| n);
        if let Some(t) = self
            .by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .filter(|_| visible(name))
        {
            return Ok(t.clone());
        }
        if visible(name)
            && self
                .building
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(name)
        {
            return Err(LookupError::Building(name.to_string()));
        }
        if visible(name) && crate::builtin_projects::find(name).is_some() {
            return Err(LookupError::BuiltinNotBuilt(name.to_string()));
        }
        Err(LookupError::NotFound {
            id: template_id.to_string(),
            available: self.names().into_iter().filter(|n| visible(n)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TemplateInfo {
        TemplateInfo {
            name: "base".into(),
            rootfs: "/r".into(),
            meta: TemplateDefaults::default(),
        }
    }

    #[test]
    fn resolves_names_tags_and_namespaces() {
        let t = Templates::default();
        t.insert(base());
        for id in ["base", "kiln/base", "base:default", "base:v1"] {
            assert_eq!(t.resolve(id).unwrap().name, "base", "{id}");
        }
        let err = t.resolve("nope").unwrap_err();
        assert!(matches!(err, LookupError::NotFound { .. }));
        assert!(
            err.to_string().contains("available templates: base"),
            "{err}"
        );
    }

    #[test]
    fn a_builtin_not_built_says_how_to_build_it() {
        let t = Templates::default();
        t.insert(base());
        let err = t.resolve("desktop").unwrap_err();
        assert_eq!(err, LookupError::BuiltinNotBuilt("desktop".into()));
        let msg = err.to_string();
        assert!(
            msg.contains("--builtin-templates code-interpreter-v1,desktop"),
            "{msg}"
        );
        assert!(
            msg.contains("kiln template build templates/desktop"),
            "{msg}"
        );
        t.set_building("desktop", true);
        assert_eq!(
            t.resolve("desktop").unwrap_err(),
            LookupError::Building("desktop".into())
        );
    }

    #[test]
    fn templates_a_caller_may_not_see_are_neither_found_nor_listed() {
        let t = Templates::default();
        t.insert(base());
        t.insert(TemplateInfo {
            name: "theirs".into(),
            ..base()
        });
        let mine = |n: &str| n != "theirs";
        let err = t.resolve_visible("theirs", mine).unwrap_err();
        assert!(matches!(err, LookupError::NotFound { .. }));
        assert!(
            !err.to_string()
                .contains("available templates: base, theirs"),
            "{err}"
        );
        assert!(
            err.to_string().contains("available templates: base"),
            "{err}"
        );
        assert_eq!(t.resolve_visible("base", mine).unwrap().name, "base");
    }

    #[test]
    fn a_template_being_built_is_unavailable_not_missing() {
        let t = Templates::default();
        t.set_building("base", true);
        assert!(matches!(t.resolve("base"), Err(LookupError::Building(_))));
        assert_eq!(t.building(), ["base"]);
        t.set_building("base", false);
        assert!(matches!(
            t.resolve("base"),
            Err(LookupError::NotFound { .. })
        ));
    }
}
