//! Finding Jupyter kernelspecs (`<data dir>/kernels/<name>/kernel.json`) without asking
//! the `jupyter` command: the directories Jupyter itself searches, plus the
//! `share/jupyter` of every prefix on `PATH` (so a virtualenv's kernels are found when its
//! `bin` is on `PATH`, as `jupyter --paths` would report).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use jupyter_zmq_client::KernelspecDir;

use crate::language::Language;

#[derive(Debug, thiserror::Error)]
pub enum KernelspecError {
    #[error(
        "no Jupyter kernel for language '{language}' (tried kernel names {tried:?}; installed kernels: {available:?})"
    )]
    NotFound {
        language: String,
        tried: Vec<String>,
        available: Vec<String>,
    },
}

/// Where to look, most specific first (Jupyter's order: `JUPYTER_PATH`, user, env, system).
#[derive(Debug, Clone, Default)]
pub struct SearchPath {
    dirs: Vec<PathBuf>,
}

impl SearchPath {
    /// `extra` (from `--kernelspec-dir`) come first; they may be a data dir (containing
    /// `kernels/`) or a `kernels` dir itself.
    pub fn from_env(extra: &[PathBuf]) -> Self {
        let mut dirs = Vec::new();
        for dir in extra {
            if dir.file_name().is_some_and(|n| n == "kernels") {
                dirs.push(dir.parent().map(Path::to_path_buf).unwrap_or_default());
            } else {
                dirs.push(dir.clone());
            }
        }
        if let Some(paths) = std::env::var_os("JUPYTER_PATH") {
            dirs.extend(std::env::split_paths(&paths));
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
            dirs.push(PathBuf::from(data).join("jupyter"));
        } else if let Some(home) = std::env::var_os("HOME") {
            dirs.push(PathBuf::from(home).join(".local/share/jupyter"));
        }
        if let Some(path) = std::env::var_os("PATH") {
            for bin in std::env::split_paths(&path) {
                if let Some(prefix) = bin.parent() {
                    dirs.push(prefix.join("share/jupyter"));
                }
            }
        }
        dirs.push(PathBuf::from("/usr/local/share/jupyter"));
        dirs.push(PathBuf::from("/usr/share/jupyter"));
        let mut seen = BTreeSet::new();
        dirs.retain(|d| seen.insert(d.clone()));
        Self { dirs }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Every readable kernelspec; for a name found in several dirs the first wins.
    pub async fn list(&self) -> Vec<KernelspecDir> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for dir in &self.dirs {
            for spec in jupyter_zmq_client::read_kernelspec_jsons(dir).await {
                if seen.insert(spec.kernel_name.clone()) {
                    out.push(spec);
                }
            }
        }
        out
    }

    /// The kernelspec that serves `language`: by kernel name first (see
    /// [`Language::kernel_names`]), then any kernelspec declaring that language.
    pub async fn resolve(&self, language: &Language) -> Result<KernelspecDir, KernelspecError> {
        let specs = self.list().await;
        let names = language.kernel_names();
        for name in &names {
            if let Some(spec) = specs.iter().find(|s| s.kernel_name == *name) {
                return Ok(spec.clone());
            }
        }
        if let Some(spec) = specs.iter().find(|s| {
            s.kernelspec
                .language
                .eq_ignore_ascii_case(language.as_str())
        }) {
            return Ok(spec.clone());
        }
        Err(KernelspecError::NotFound {
            language: language.to_string(),
            tried: names.iter().map(|s| s.to_string()).collect(),
            available: specs.into_iter().map(|s| s.kernel_name).collect(),
        })
    }
}

/// `spec` with Jupyter's `{resource_dir}` placeholder in `argv` replaced by the
/// kernelspec's own directory, as `jupyter_client` does; kernels that ship their program
/// beside `kernel.json` rely on it (PyPI `jjava`: `java -jar
/// {resource_dir}/jjava-launcher.jar ...`). `{connection_file}` is left for
/// `KernelspecDir::command`.
pub fn with_resource_dir(spec: &KernelspecDir) -> KernelspecDir {
    let mut spec = spec.clone();
    let dir = spec.path.to_string_lossy().into_owned();
    for arg in &mut spec.kernelspec.argv {
        if arg.contains("{resource_dir}") {
            *arg = arg.replace("{resource_dir}", &dir);
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_spec(root: &Path, name: &str, language: &str) {
        let dir = root.join("kernels").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = serde_json::json!({
            "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name,
            "language": language,
        });
        std::fs::write(dir.join("kernel.json"), spec.to_string()).unwrap();
    }

    #[tokio::test]
    async fn resolves_by_name_alias_and_language() {
        let tmp = tempfile::tempdir().unwrap();
        write_spec(tmp.path(), "python3", "python");
        write_spec(tmp.path(), "jslab", "javascript");
        write_spec(tmp.path(), "bash", "bash");
        let search = SearchPath {
            dirs: vec![PathBuf::from("/nonexistent"), tmp.path().to_path_buf()],
        };
        let py = search.resolve(&Language::python()).await.unwrap();
        assert_eq!(py.kernel_name, "python3");
        let js = search
            .resolve(&Language::normalize(Some("js")))
            .await
            .unwrap();
        assert_eq!(js.kernel_name, "jslab");
        let bash = search
            .resolve(&Language::normalize(Some("bash")))
            .await
            .unwrap();
        assert_eq!(bash.kernel_name, "bash");
        let err = search
            .resolve(&Language::normalize(Some("cobol")))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("'cobol'") && err.contains("python3"), "{err}");
    }

    #[tokio::test]
    async fn tslab_kernels_serve_javascript_and_typescript() {
        let resolve = |search: SearchPath, raw: &'static str| async move {
            search
                .resolve(&Language::normalize(Some(raw)))
                .await
                .map(|s| s.kernel_name)
        };
        // What the template installs: `tslab install` names them jslab and tslab.
        let tmp = tempfile::tempdir().unwrap();
        write_spec(tmp.path(), "jslab", "javascript");
        write_spec(tmp.path(), "tslab", "typescript");
        let search = SearchPath {
            dirs: vec![tmp.path().to_path_buf()],
        };
        assert_eq!(resolve(search.clone(), "js").await.unwrap(), "jslab");
        assert_eq!(
            resolve(search.clone(), "javascript").await.unwrap(),
            "jslab"
        );
        assert_eq!(resolve(search.clone(), "ts").await.unwrap(), "tslab");
        assert_eq!(
            resolve(search.clone(), "TypeScript").await.unwrap(),
            "tslab"
        );

        // E2B's own kernel name wins for JavaScript; TypeScript prefers tslab to it.
        write_spec(tmp.path(), "javascript", "javascript");
        assert_eq!(resolve(search.clone(), "js").await.unwrap(), "javascript");
        assert_eq!(resolve(search.clone(), "ts").await.unwrap(), "tslab");

        // With only a JavaScript kernel, TypeScript falls back to E2B's `javascript`
        // (ijavascript transpiles TypeScript) but never to jslab, which rejects types.
        let only_js = tempfile::tempdir().unwrap();
        write_spec(only_js.path(), "jslab", "javascript");
        let search = SearchPath {
            dirs: vec![only_js.path().to_path_buf()],
        };
        let err = resolve(search.clone(), "ts").await.unwrap_err().to_string();
        assert!(
            err.contains("'typescript'") && err.contains("jslab"),
            "{err}"
        );
        write_spec(only_js.path(), "javascript", "javascript");
        assert_eq!(resolve(search, "ts").await.unwrap(), "javascript");
    }

    #[tokio::test]
    async fn r_and_java_resolve_to_irkernel_and_jjava() {
        // Debian's r-cran-irkernel installs `ir` (language "R"); PyPI's jjava `java`.
        let tmp = tempfile::tempdir().unwrap();
        write_spec(tmp.path(), "ir", "R");
        write_spec(tmp.path(), "java", "java");
        let search = SearchPath {
            dirs: vec![tmp.path().to_path_buf()],
        };
        for raw in ["r", "R", " r "] {
            let spec = search
                .resolve(&Language::normalize(Some(raw)))
                .await
                .unwrap();
            assert_eq!(spec.kernel_name, "ir", "{raw}");
        }
        let java = search
            .resolve(&Language::normalize(Some("Java")))
            .await
            .unwrap();
        assert_eq!(java.kernel_name, "java");
    }

    #[test]
    fn resource_dir_placeholder_is_the_kernelspec_dir() {
        let spec = KernelspecDir {
            kernel_name: "java".to_owned(),
            path: PathBuf::from("/usr/local/share/jupyter/kernels/java"),
            kernelspec: serde_json::from_value(serde_json::json!({
                "argv": ["java", "-jar", "{resource_dir}/jjava-launcher.jar",
                         "{resource_dir}/jjava.jar", "{connection_file}"],
                "display_name": "Java",
                "language": "java",
            }))
            .unwrap(),
        };
        assert_eq!(
            with_resource_dir(&spec).kernelspec.argv,
            [
                "java",
                "-jar",
                "/usr/local/share/jupyter/kernels/java/jjava-launcher.jar",
                "/usr/local/share/jupyter/kernels/java/jjava.jar",
                "{connection_file}",
            ]
        );
    }

    #[test]
    fn extra_kernels_dir_is_turned_into_its_data_dir() {
        let search = SearchPath::from_env(&[PathBuf::from("/opt/x/kernels")]);
        assert_eq!(search.dirs()[0], PathBuf::from("/opt/x"));
    }
}
