//! COPY steps, done on the host: the uploaded context archive is unpacked, and its
//! source is merged into a new layer with Docker's semantics (a file goes to `dest`, or
//! into `dest/`; a directory's contents are merged into `dest`), owned by the step's
//! user (shifted into the sandbox id range) and with the step's mode.
//!
//! Paths inside the layer are resolved with its symlinks interpreted relative to the
//! layer's root, so an absolute link in a template never points at the host.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::layer::remove_any;
use crate::recipe::normalize;

/// A COPY step failed; the message is for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CopyError(pub String);

fn io_err<'a>(what: &str, path: &'a Path) -> impl FnOnce(io::Error) -> CopyError + 'a {
    let what = what.to_string();
    move |e| CopyError(format!("{what} {}: {e}", path.display()))
}

/// One COPY, resolved against the build state.
pub struct CopyJob<'a> {
    /// The new layer (a hard-link farm of the parent).
    pub layer: &'a Path,
    /// The uploaded context archive (tar, optionally gzip).
    pub archive: &'a Path,
    /// An empty scratch directory to unpack into.
    pub staging: &'a Path,
    pub src: &'a str,
    /// Absolute destination inside the layer; a trailing `/` means "into".
    pub dest: &'a str,
    /// `user[:group]` owning the copied files.
    pub owner: &'a str,
    pub mode: Option<u32>,
    /// Host id of sandbox id 0.
    pub id_base: u32,
}

/// Runs a COPY.
pub fn copy(job: &CopyJob<'_>) -> Result<(), CopyError> {
    unpack(job.archive, job.staging)?;
    let prefix = static_prefix(job.src);
    let from = job.staging.join(&prefix);
    let meta = fs::symlink_metadata(&from).map_err(|_| {
        CopyError(format!(
            "COPY source {:?} is not in the uploaded context",
            job.src
        ))
    })?;
    let (uid, gid) = lookup_owner(job.layer, job.owner)?;
    let ids = (job.id_base + uid, job.id_base + gid);
    let dest = normalize(job.dest);
    let into = job.dest.ends_with('/');
    mkdir_p(job.layer, &dest, ids, meta.is_dir() || into)?;
    if meta.is_dir() {
        put_dir_contents(job.layer, &from, &dest, ids, job.mode)
    } else {
        let target_is_dir = resolve_in_root(job.layer, &dest)?.is_dir();
        let name = from
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = if into || target_is_dir {
            format!("{}/{name}", dest.trim_end_matches('/'))
        } else {
            dest
        };
        put(job.layer, &from, &target, ids, job.mode)
    }
}

fn unpack(archive: &Path, staging: &Path) -> Result<(), CopyError> {
    let out = std::process::Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(staging)
        .arg("--no-same-owner")
        .output()
        .map_err(io_err("cannot run tar for", archive))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CopyError(format!(
            "the uploaded context is not a readable tar archive: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The part of a source glob before its first glob character, cut at a `/`
/// (`folder/*` → `folder`, `a/b.txt` → `a/b.txt`, `*.py` → ``).
pub fn static_prefix(src: &str) -> String {
    let src = src.trim_start_matches("./");
    match src.find(['*', '?', '[']) {
        None => src.trim_end_matches('/').to_string(),
        Some(i) => match src[..i].rfind('/') {
            Some(j) => src[..j].to_string(),
            None => String::new(),
        },
    }
}

/// `user[:group]` (names or numbers) → sandbox uid and gid, read from the layer's
/// `/etc/passwd` and `/etc/group`.
pub fn lookup_owner(layer: &Path, owner: &str) -> Result<(u32, u32), CopyError> {
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    let passwd = fs::read_to_string(layer.join("etc/passwd")).unwrap_or_default();
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == user)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| CopyError(format!("COPY owner: no user {user:?} in the template")))?,
    };
    let gid = match group {
        None | Some("") => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => fs::read_to_string(layer.join("etc/group"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| CopyError(format!("COPY owner: no group {g:?} in the template")))?,
        },
    };
    Ok((uid, gid))
}

/// The host path of the absolute in-layer path `path`, following the layer's
/// symlinks as the sandbox would see them (never leaving `root`).
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, CopyError> {
    let mut cur: Vec<String> = Vec::new();
    let mut queue: std::collections::VecDeque<String> =
        path.split('/').map(str::to_string).collect();
    let mut follows = 0;
    while let Some(c) = queue.pop_front() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                cur.pop();
            }
            name => {
                let host = root.join(cur.join("/")).join(name);
                match fs::symlink_metadata(&host) {
                    Ok(m) if m.file_type().is_symlink() => {
                        follows += 1;
                        if follows > 40 {
                            return Err(CopyError(format!("too many symlinks resolving {path}")));
                        }
                        let target = fs::read_link(&host).map_err(io_err("read link", &host))?;
                        let target = target.to_string_lossy().into_owned();
                        if target.starts_with('/') {
                            cur.clear();
                        }
                        for (i, t) in target.split('/').enumerate() {
                            queue.insert(i, t.to_string());
                        }
                    }
                    _ => cur.push(name.to_string()),
                }
            }
        }
    }
    Ok(root.join(cur.join("/")))
}

/// Creates the missing directories of `dest` (all of it when `whole`, else its parent).
fn mkdir_p(root: &Path, dest: &str, ids: (u32, u32), whole: bool) -> Result<(), CopyError> {
    let parts: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
    let n = if whole {
        parts.len()
    } else {
        parts.len().saturating_sub(1)
    };
    let mut inside = String::new();
    for part in &parts[..n] {
        inside.push('/');
        inside.push_str(part);
        let host = resolve_in_root(root, &inside)?;
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(CopyError(format!(
                    "COPY destination {dest}: {inside} exists and is not a directory"
                )))
            }
            Err(_) => {
                fs::create_dir(&host).map_err(io_err("create directory", &host))?;
                own(&host, ids, 0o755)?;
            }
        }
    }
    Ok(())
}

fn own(path: &Path, (uid, gid): (u32, u32), mode: u32) -> Result<(), CopyError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn put_dir_contents(
    root: &Path,
    from: &Path,
    inside: &str,
    ids: (u32, u32),
    mode: Option<u32>,
) -> Result<(), CopyError> {
    for entry in fs::read_dir(from).map_err(io_err("read directory", from))? {
        let entry = entry.map_err(io_err("read directory", from))?;
        let child = format!(
            "{}/{}",
            inside.trim_end_matches('/'),
            entry.file_name().to_string_lossy()
        );
        put(root, &entry.path(), &child, ids, mode)?;
    }
    Ok(())
}

/// Puts `from` at the in-layer path `inside`, replacing what is there (a replaced
/// file is unlinked first, so hard-linked parent inodes stay untouched).
fn put(
    root: &Path,
    from: &Path,
    inside: &str,
    ids: (u32, u32),
    mode: Option<u32>,
) -> Result<(), CopyError> {
    let (parent, name) = inside.rsplit_once('/').unwrap_or(("", inside));
    let target = resolve_in_root(root, if parent.is_empty() { "/" } else { parent })?.join(name);
    let meta = fs::symlink_metadata(from).map_err(io_err("stat", from))?;
    let src_mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    let unlink = |p: &Path| remove_any(p).map_err(|e| CopyError(format!("{e}")));
    if ft.is_dir() {
        let existing = resolve_in_root(root, inside)?;
        let dir = if existing.is_dir() {
            existing
        } else {
            unlink(&target)?;
            fs::create_dir(&target).map_err(io_err("create directory", &target))?;
            target
        };
        own(&dir, ids, mode.unwrap_or(src_mode))?;
        put_dir_contents(root, from, inside, ids, mode)
    } else if ft.is_symlink() {
        unlink(&target)?;
        let link = fs::read_link(from).map_err(io_err("read link", from))?;
        std::os::unix::fs::symlink(&link, &target).map_err(io_err("create symlink", &target))?;
        std::os::unix::fs::lchown(&target, Some(ids.0), Some(ids.1))
            .map_err(io_err("chown", &target))
    } else if ft.is_file() {
        unlink(&target)?;
        fs::copy(from, &target).map_err(io_err("copy to", &target))?;
        own(&target, ids, mode.unwrap_or(src_mode))
    } else {
        Ok(()) // devices, fifos and sockets are not copied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(static_prefix("folder/*"), "folder");
        assert_eq!(static_prefix("server"), "server");
        assert_eq!(static_prefix("server/"), "server");
        assert_eq!(static_prefix("a/b.txt"), "a/b.txt");
        assert_eq!(static_prefix("*.py"), "");
        assert_eq!(static_prefix("a/b/c*.py"), "a/b");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../etc", root.join("usr/lib/up")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/lib/x").unwrap(),
            root.join("usr/lib/x")
        );
        // `..` never climbs above the root.
        assert_eq!(
            resolve_in_root(root, "/lib/up/../../../../passwd").unwrap(),
            root.join("passwd")
        );
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(root, "/loop").is_err());
    }

    #[test]
    fn owners_from_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .unwrap();
        fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(lookup_owner(dir.path(), "user").unwrap(), (1000, 1000));
        assert_eq!(lookup_owner(dir.path(), "user:staff").unwrap(), (1000, 50));
        assert_eq!(lookup_owner(dir.path(), "7:8").unwrap(), (7, 8));
        assert!(lookup_owner(dir.path(), "nobody").is_err());
    }

    #[test]
    fn copies_a_directory_and_a_file_with_docker_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        fs::create_dir_all(ctx.join("app/sub")).unwrap();
        fs::write(ctx.join("app/a.txt"), "a").unwrap();
        fs::write(ctx.join("app/sub/b.txt"), "b").unwrap();
        let archive = dir.path().join("ctx.tar.gz");
        let st = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(&ctx)
            .arg("app")
            .status()
            .unwrap();
        assert!(st.success());
        let layer = dir.path().join("layer");
        fs::create_dir_all(layer.join("etc")).unwrap();
        let me = nix::unistd::Uid::effective().as_raw();
        let my_gid = nix::unistd::Gid::effective().as_raw();
        fs::write(
            layer.join("etc/passwd"),
            format!("me:x:{me}:{my_gid}::/:/\n"),
        )
        .unwrap();
        for (i, (src, dest)) in [("app", "/opt/app"), ("app/a.txt", "/opt/single/")]
            .into_iter()
            .enumerate()
        {
            let staging = dir.path().join(format!("staging{i}"));
            fs::create_dir_all(&staging).unwrap();
            copy(&CopyJob {
                layer: &layer,
                archive: &archive,
                staging: &staging,
                src,
                dest,
                owner: "me",
                mode: Some(0o750),
                id_base: 0,
            })
            .unwrap();
        }
        assert_eq!(
            fs::read_to_string(layer.join("opt/app/a.txt")).unwrap(),
            "a"
        );
        assert_eq!(
            fs::read_to_string(layer.join("opt/app/sub/b.txt")).unwrap(),
            "b"
        );
        assert_eq!(
            fs::read_to_string(layer.join("opt/single/a.txt")).unwrap(),
            "a"
        );
        let mode = fs::metadata(layer.join("opt/app/sub/b.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750);
        let staging = dir.path().join("staging-missing");
        fs::create_dir_all(&staging).unwrap();
        let e = copy(&CopyJob {
            layer: &layer,
            archive: &archive,
            staging: &staging,
            src: "nope",
            dest: "/x",
            owner: "me",
            mode: None,
            id_base: 0,
        })
        .unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
    }
}
