//! Path resolution shared by `/files`, the filesystem RPCs and process `cwd` (spec §3.2).

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path '{0}': expanding another user's home (~user) is not supported; use an absolute path or ~/")]
    OtherUsersHome(String),
}

/// Resolves a client path for a user whose home is `home`:
/// - empty → `default_workdir` if set, else `home`;
/// - `~` / `~/rest` → under `home`; `~other` is an error;
/// - absolute → itself; relative → joined to `home` (not to the workdir).
///
/// The result is cleaned lexically (`.`/`..`/`//` removed), without touching the disk.
pub fn resolve(
    path: &str,
    home: &Path,
    default_workdir: Option<&str>,
) -> Result<PathBuf, PathError> {
    let path = if path.is_empty() {
        match default_workdir {
            Some(dir) if !dir.is_empty() => dir,
            _ => return Ok(clean(home)),
        }
    } else {
        path
    };
    let joined = if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('~') {
        return Err(PathError::OtherUsersHome(path.to_owned()));
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home.join(path)
    };
    Ok(clean(&joined))
}

/// Lexical cleaning like Go's `filepath.Clean` for absolute paths: `..` at the root
/// stays at the root.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    let mut relative = PathBuf::new();
    let absolute = path.is_absolute();
    for component in path.components() {
        let target = if absolute { &mut out } else { &mut relative };
        match component {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if absolute || target.file_name().is_some() {
                    target.pop();
                } else {
                    target.push("..");
                }
            }
            Component::Normal(part) => target.push(part),
        }
    }
    if absolute {
        out
    } else if relative.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        relative
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str, workdir: Option<&str>) -> Result<PathBuf, PathError> {
        resolve(path, Path::new("/home/user"), workdir)
    }

    #[test]
    fn empty_path_uses_workdir_then_home() {
        assert_eq!(r("", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("", Some("/srv/app")).unwrap(), PathBuf::from("/srv/app"));
        assert_eq!(r("", Some("")).unwrap(), PathBuf::from("/home/user"));
    }

    #[test]
    fn tilde_expands_to_home_only_for_self() {
        assert_eq!(r("~", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/a/b", None).unwrap(), PathBuf::from("/home/user/a/b"));
        assert_eq!(
            r("~root", None),
            Err(PathError::OtherUsersHome("~root".into()))
        );
    }

    #[test]
    fn relative_paths_join_home_not_workdir() {
        assert_eq!(
            r("a.txt", Some("/srv")).unwrap(),
            PathBuf::from("/home/user/a.txt")
        );
        assert_eq!(r("../x", None).unwrap(), PathBuf::from("/home/x"));
        assert_eq!(
            r("./a//b/.", None).unwrap(),
            PathBuf::from("/home/user/a/b")
        );
    }

    #[test]
    fn absolute_paths_are_cleaned() {
        assert_eq!(r("/tmp//x/../y/", None).unwrap(), PathBuf::from("/tmp/y"));
        assert_eq!(r("/../..", None).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn clean_relative() {
        assert_eq!(clean(Path::new("a/../../b")), PathBuf::from("../b"));
        assert_eq!(clean(Path::new("a/..")), PathBuf::from("."));
    }
}
