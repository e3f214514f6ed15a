//! The built-in templates' projects: Dockerfile projects from the repository's
//! `templates/` folder, embedded in the binary (`builtins.rs` builds them). A leaf: the
//! template registry asks it whether a name is a built-in, without the build machinery.

use std::path::{Path, PathBuf};

/// One built-in template: its name and its project files (relative path, contents).
pub struct Builtin {
    pub name: &'static str,
    files: &'static [(&'static str, &'static str)],
}

macro_rules! project_file {
    ($template:literal, $file:literal) => {
        (
            $file,
            include_str!(concat!("../../../templates/", $template, "/", $file)),
        )
    };
}

/// The desktop template's name: its sandboxes live at most `E2B_DESKTOP_MAX_DURATION`.
pub const DESKTOP: &str = "desktop";

/// Every built-in template the server can build, in build order.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "code-interpreter-v1",
        files: &[
            project_file!("code-interpreter-v1", "Dockerfile"),
            project_file!("code-interpreter-v1", "kiln.toml"),
            project_file!("code-interpreter-v1", "requirements.txt"),
            project_file!("code-interpreter-v1", "start-interpreter.sh"),
        ],
    },
    // The e2b-desktop SDK's default template (docs/desktop.md). Not built by default:
    // it installs about 1 GB of packages (XFCE, Chromium, Firefox ESR).
    Builtin {
        name: DESKTOP,
        files: &[
            project_file!("desktop", "Dockerfile"),
            project_file!("desktop", "kiln.toml"),
            project_file!("desktop", "files/chromium-flags"),
            project_file!("desktop", "files/close-range-clamp.c"),
            project_file!("desktop", "files/firefox-policies.json"),
            project_file!("desktop", "files/google-chrome"),
            project_file!("desktop", "files/google-chrome.desktop"),
            project_file!("desktop", "files/mimeapps.list"),
            project_file!("desktop", "files/screensaver-off.desktop"),
        ],
    },
];

/// The names `kiln serve --builtin-templates` accepts.
pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|b| b.name).collect()
}

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

impl Builtin {
    /// Writes the project into `dir/<name>` (replacing what was there) and returns
    /// that directory. Files are written 0644, as git checks them out, so the COPY
    /// hashes match a `kiln template build templates/<name>` of the same files.
    pub fn write_project(&self, dir: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let root = dir.join(self.name);
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        for (rel, text) in self.files {
            let path = root.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded file list is the whole project folder: a file added to
    /// `templates/<name>/` and not listed here would be missing from the built-in.
    #[test]
    fn embedded_projects_match_the_repository() {
        let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../templates");
        for b in BUILTINS {
            let mut on_disk: Vec<String> = walk(&templates.join(b.name), Path::new(""));
            on_disk.sort();
            let mut embedded: Vec<String> = b.files.iter().map(|(p, _)| p.to_string()).collect();
            embedded.sort();
            assert_eq!(embedded, on_disk, "templates/{}", b.name);
        }
    }

    fn walk(dir: &Path, rel: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path(), &rel));
            } else {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
        out
    }

    #[test]
    fn written_projects_load() {
        let tmp = tempfile::tempdir().unwrap();
        for b in BUILTINS {
            let dir = b.write_project(tmp.path()).unwrap();
            let p = kiln_template::dockerfile::load_project(&dir, None, false).unwrap();
            assert_eq!(p.name, b.name);
            // Written twice: replaced, same result.
            let again = b.write_project(tmp.path()).unwrap();
            assert_eq!(dir, again);
        }
        assert!(find("code-interpreter-v1").is_some());
        assert!(find("desktop").is_some());
        assert!(find("nope").is_none());
    }
}
