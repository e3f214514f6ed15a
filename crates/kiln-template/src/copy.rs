//! COPY steps, done on the host: the uploaded context archive is unpacked, and its
//! source is merged into a new layer with Docker's semantics (a file goes to `dest`, or
//! into `dest/`; a directory's contents are merged into `dest`), owned by the step's
//! user (shifted into the sandbox id range) and with the step's mode.
//!
//! The context is an adversary's archive. It is unpacked in process by the image-layer
//! walker ([`crate::unpack`] with [`UnpackOptions::CONTEXT`]): paths resolved
//! inside the staging directory, `..` refused, device nodes refused, entry count and
//! bytes capped. The COPY source is then resolved inside the staging directory as if it
//! were `/` (Docker resolves sources inside the build context): a context symlink
//! `s -> /` makes `s/etc/shadow` the context's own `etc/shadow`, which is not there, so
//! the COPY fails; the kernel never follows a context symlink to a host path. Files are
//! read with `O_NOFOLLOW`, symlinks below the source are copied as symlinks.
//!
//! Paths inside the layer are resolved with its symlinks interpreted relative to the
//! layer's root, so an absolute link in a template never points at the host.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::fsutil::{self, read_layer_file};
use crate::layer::remove_any;
use crate::recipe::normalize;
use crate::unpack::{self, UnpackError, UnpackOptions};

/// A COPY step failed; the message (with its sources) is for the user.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot unpack the uploaded context")]
    Unpack(#[source] UnpackError),
    #[error(
        "COPY source {src:?} is not in the uploaded context (sources resolve inside the \
         context, symlinks included)"
    )]
    NotInContext { src: String },
    #[error("COPY owner: no {kind} {name:?} in the template")]
    NoOwner { kind: &'static str, name: String },
    #[error("COPY destination {dest}: {inside} exists and is not a directory")]
    NotADirectory { dest: String, inside: String },
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CopyError + 'a {
    move |source| CopyError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
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
    unpack_context(job.archive, job.staging)?;
    let prefix = static_prefix(job.src);
    let not_in_context = || CopyError::NotInContext {
        src: job.src.to_string(),
    };
    // Docker follows a symlink source; inside the context, as everything else.
    let from = match fsutil::resolve_file(job.staging, Path::new(&prefix)) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(not_in_context()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Err(not_in_context()),
        Err(e) => return Err(io_err("resolve the COPY source in", job.staging)(e)),
    };
    let meta = fs::symlink_metadata(&from).map_err(|_| not_in_context())?;
    let (uid, gid) = lookup_owner(job.layer, job.owner)?;
    let ids = (job.id_base + uid, job.id_base + gid);
    let dest = normalize(job.dest);
    let into = job.dest.ends_with('/');
    mkdir_p(job.layer, &dest, ids, meta.is_dir() || into)?;
    if meta.is_dir() {
        put_dir_contents(job.layer, &from, &dest, ids, job.mode)
    } else {
        let target_is_dir = resolve_in_root(job.layer, &dest)?.is_dir();
        // The name in the context (a followed symlink source keeps its own name).
        let name = Path::new(&prefix)
            .file_name()
            .or_else(|| from.file_name())
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

/// Unpacks the uploaded context (tar, plain or gzip) into the empty `staging`.
pub fn unpack_context(archive: &Path, staging: &Path) -> Result<(), CopyError> {
    unpack::unpack_file(staging, archive, &mut KeepModes, &UnpackOptions::CONTEXT)
        .map(|_| ())
        .map_err(CopyError::Unpack)
}

/// The context's owners do not matter (COPY sets its own); its modes do.
struct KeepModes;

impl crate::shift::Chown for KeepModes {
    fn lchown(&mut self, _: &Path, _: u32, _: u32) -> io::Result<()> {
        Ok(())
    }

    fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
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
    let passwd = read_layer_file(layer, "etc/passwd");
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == user)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| CopyError::NoOwner {
                kind: "user",
                name: user.to_string(),
            })?,
    };
    let gid = match group {
        None | Some("") => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read_layer_file(layer, "etc/group")
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| CopyError::NoOwner {
                    kind: "group",
                    name: g.to_string(),
                })?,
        },
    };
    Ok((uid, gid))
}

/// The host path of the absolute in-layer path `path`, following the layer's
/// symlinks as the sandbox would see them (never leaving `root`); the final component
/// may be missing.
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, CopyError> {
    fsutil::resolve_path(root, Path::new(path))
        .map_err(|e| io_err("resolve inside the layer", Path::new(path))(e))
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
                return Err(CopyError::NotADirectory {
                    dest: dest.to_string(),
                    inside,
                })
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
    let unlink = |p: &Path| {
        remove_any(p).map_err(|e| CopyError::Io {
            op: "replace",
            path: e.path,
            source: e.source,
        })
    };
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
        copy_file(from, &target)?;
        own(&target, ids, mode.unwrap_or(src_mode))
    } else {
        // Fifos and sockets are not copied (the unpack refused devices).
        debug_assert!(!ft.is_char_device() && !ft.is_block_device());
        Ok(())
    }
}

/// Copies the regular file `from` to the new file `to`, following neither.
fn copy_file(from: &Path, to: &Path) -> Result<(), CopyError> {
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    let mut src = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(from)
        .map_err(io_err("open", from))?;
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nofollow)
        .open(to)
        .map_err(io_err("create", to))?;
    io::copy(&mut src, &mut dst).map_err(io_err("copy to", to))?;
    Ok(())
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
        fs::create_dir_all(root.join("etc")).unwrap();
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

    /// A context archive built in the test; names and link targets are written raw, so
    /// hostile entries (`s -> /`, device nodes) can be put in.
    fn context_tar(entries: &[(tar::EntryType, &str, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            h.set_size(data.len() as u64);
            if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        layer: PathBuf,
        archive: PathBuf,
    }

    impl Fixture {
        fn new(tar: &[u8]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let layer = dir.path().join("layer");
            fs::create_dir_all(layer.join("etc")).unwrap();
            let me = nix::unistd::Uid::effective().as_raw();
            let gid = nix::unistd::Gid::effective().as_raw();
            fs::write(layer.join("etc/passwd"), format!("me:x:{me}:{gid}::/:/\n")).unwrap();
            let archive = dir.path().join("ctx.tar");
            fs::write(&archive, tar).unwrap();
            Self {
                dir,
                layer,
                archive,
            }
        }

        fn copy(&self, src: &str, dest: &str) -> Result<(), CopyError> {
            let staging = self.dir.path().join("staging");
            let _ = fs::remove_dir_all(&staging);
            fs::create_dir_all(&staging).unwrap();
            copy(&CopyJob {
                layer: &self.layer,
                archive: &self.archive,
                staging: &staging,
                src,
                dest,
                owner: "me",
                mode: None,
                id_base: 0,
            })
        }

        /// Every regular file in the layer, with its contents.
        fn layer_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
            fn walk(p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
                for e in fs::read_dir(p).unwrap() {
                    let e = e.unwrap();
                    let ft = e.file_type().unwrap();
                    if ft.is_dir() {
                        walk(&e.path(), out);
                    } else if ft.is_file() {
                        out.push((e.path(), fs::read(e.path()).unwrap()));
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.layer, &mut out);
            out
        }
    }

    use tar::EntryType as T;

    /// The attack: a context symlink `s -> /` and `COPY s/etc/passwd /x`. The old code
    /// unpacked with the host's tar and let the kernel resolve `staging/s/etc/passwd`,
    /// copying the host's file. Sources now resolve inside the context: nothing there.
    #[test]
    fn copy_source_through_context_symlink_to_root_does_not_read_host_files() {
        let host_file = "/etc/passwd"; // exists on every host; /etc/shadow on most
        let host = fs::read(host_file).unwrap();
        let f = Fixture::new(&context_tar(&[(T::Symlink, "s", "/", b"")]));
        let e = f.copy("s/etc/passwd", "/x").unwrap_err();
        assert!(matches!(e, CopyError::NotInContext { .. }), "{e}");
        let f = Fixture::new(&context_tar(&[(T::Symlink, "s", "../../../../../..", b"")]));
        assert!(f.copy("s/etc/shadow", "/x").is_err());
        // A whole-directory COPY through such links copies the links, never host data.
        let f = Fixture::new(&context_tar(&[
            (T::Symlink, "s", "/", b""),
            (T::Symlink, "p", "/etc/passwd", b""),
            (T::Regular, "ok", "", b"ok"),
        ]));
        f.copy(".", "/app/").unwrap();
        for (path, data) in f.layer_files() {
            assert_ne!(
                data,
                host,
                "{} holds the host's {host_file}",
                path.display()
            );
        }
        assert!(fs::symlink_metadata(f.layer.join("app/s"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A symlink source that names the host's file is followed inside the context.
        assert!(matches!(
            f.copy("p", "/y").unwrap_err(),
            CopyError::NotInContext { .. }
        ));
    }

    /// Symlink sources resolve inside the context as if it were `/` (Docker's rule).
    #[test]
    fn copy_source_symlinks_resolve_inside_the_context() {
        let f = Fixture::new(&context_tar(&[
            (T::Directory, "real/", "", b""),
            (T::Regular, "real/f", "", b"in context"),
            (T::Symlink, "abs", "/real", b""),
            (T::Symlink, "file", "/real/f", b""),
        ]));
        f.copy("abs/f", "/a").unwrap();
        assert_eq!(fs::read(f.layer.join("a")).unwrap(), b"in context");
        f.copy("file", "/d/").unwrap();
        assert_eq!(fs::read(f.layer.join("d/file")).unwrap(), b"in context");
    }

    /// Host `tar` as root created device nodes; the in-process unpack refuses them.
    #[test]
    fn copy_context_with_a_device_node_is_refused() {
        for kind in [T::Char, T::Block] {
            let f = Fixture::new(&context_tar(&[
                (T::Regular, "ok", "", b"ok"),
                (kind, "dev/mem", "", b""),
            ]));
            let e = f.copy("ok", "/ok").unwrap_err();
            let text = crate::ErrorChain(&e).to_string();
            assert!(
                matches!(&e, CopyError::Unpack(UnpackError::Device { path }) if path == "dev/mem"),
                "{text}"
            );
            assert!(
                text.contains("dev/mem") && text.contains("device"),
                "{text}"
            );
            assert!(!f.dir.path().join("staging/dev/mem").exists());
        }
    }

    /// `..` and absolute entry names never land outside the staging directory.
    #[test]
    fn copy_context_entries_stay_in_the_staging_directory() {
        let f = Fixture::new(&context_tar(&[(T::Regular, "../escaped", "", b"x")]));
        let e = f.copy("escaped", "/x").unwrap_err();
        assert!(
            matches!(e, CopyError::Unpack(UnpackError::Escape { .. })),
            "{e}"
        );
        assert!(!f.dir.path().join("escaped").exists());
        let f = Fixture::new(&context_tar(&[
            (T::Symlink, "l", "/", b""),
            (T::Regular, "l/tmp/planted", "", b"x"),
            (T::Link, "h", "/etc/passwd", b""),
        ]));
        // The hard link to "/etc/passwd" names the context's own (missing) file.
        assert!(f.copy("l", "/x").is_err());
        assert!(!Path::new("/tmp/planted").exists());
    }

    /// The template's `/etc/passwd` may be a symlink to a host device; it is not read
    /// (reading `/dev/zero` would never end).
    #[test]
    fn copy_owner_lookup_never_reads_through_layer_symlinks() {
        let f = Fixture::new(&context_tar(&[(T::Regular, "ok", "", b"ok")]));
        fs::remove_file(f.layer.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", f.layer.join("etc/passwd")).unwrap();
        let e = f.copy("ok", "/ok").unwrap_err();
        assert!(matches!(e, CopyError::NoOwner { .. }), "{e}");
    }
}
