//! The tar walker of image pulls ([`crate::oci`]) and COPY steps ([`crate::copy`]).
//!
//! Applying an image layer (a tar archive, plain, gzip or zstd) onto a root filesystem
//! directory, as the OCI image spec's "applying changesets" says:
//!
//! - entries are written in archive order; an entry replaces what is at its path,
//!   except that a directory over a directory merges (and takes the new metadata);
//! - `.wh.<name>` deletes `<name>` of the lower layers, `.wh..wh..opq` hides everything
//!   the lower layers have in its directory; neither is written itself, and neither
//!   touches what this same layer wrote (whatever the order of the entries);
//! - modes (setuid/setgid/sticky included), owners, symlinks, hard links, fifos and
//!   modification times of files are kept; device nodes are skipped (sandboxes mount
//!   their root `nodev` and get `/dev` from the runtime); extended attributes are not
//!   applied (the later uid shift would drop file capabilities anyway, see
//!   [`crate::shift`]).
//!
//! Nothing is written outside the root: entry paths and hard-link targets with `..`
//! are refused, and every parent directory is resolved inside the root
//! ([`fsutil::resolve_dir`]), so a symlink planted by an earlier entry or layer
//! (`etc -> /etc`, `x -> ../../..`) leads back into the tree, never out of it.
//!
//! The same walker unpacks uploaded COPY contexts ([`crate::copy`]) with
//! [`UnpackOptions::CONTEXT`]: no whiteouts (a `.wh.` name is an ordinary file there),
//! device nodes refused, tighter [`Limits`]. Every unpack is bounded by its limits (entry
//! count and bytes of file data), so a decompression bomb fails with an error naming the
//! cap instead of filling the disk.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::fsutil;
use crate::shift::Chown;

/// Prefix of a whiteout entry's name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";

/// What applying a layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries written (files, directories, links, fifos).
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Character and block devices left out.
    pub skipped_devices: u64,
}

/// What an unpack may write at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Archive entries (of any kind, whiteouts included).
    pub max_entries: u64,
    /// Bytes of regular-file data, as the entries' headers declare them.
    pub max_bytes: u64,
}

/// What to do with a character or block device entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Devices {
    /// Leave it out and count it ([`LayerStats::skipped_devices`]): image layers carry
    /// `/dev` nodes that sandboxes never need (they get `/dev` from the runtime).
    Skip,
    /// Fail the unpack, naming the entry.
    Refuse,
}

/// How an archive is unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Apply `.wh.` whiteouts and opaque markers (image layers); otherwise such names
    /// are ordinary entries.
    pub whiteouts: bool,
    pub devices: Devices,
    pub limits: Limits,
}

impl UnpackOptions {
    /// An OCI image layer: whiteouts, devices skipped, generous limits (a layer of a
    /// large CUDA image holds ~10 GiB and ~200k files).
    pub const IMAGE_LAYER: Self = Self {
        whiteouts: true,
        devices: Devices::Skip,
        limits: Limits {
            max_entries: 4_000_000,
            max_bytes: 64 << 30,
        },
    };
    /// An uploaded COPY context: no whiteouts, devices refused, tighter limits.
    pub const CONTEXT: Self = Self {
        whiteouts: false,
        devices: Devices::Refuse,
        limits: Limits {
            max_entries: 1_000_000,
            max_bytes: 8 << 30,
        },
    };
}

/// A layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the archive")]
    Read(#[source] io::Error),
    #[error(
        "archive entry {path:?} is a device node; device nodes are not allowed here \
         (only files, directories, links and fifos)"
    )]
    Device { path: String },
    #[error("the archive has more than {limit} entries (the limit); refusing it")]
    TooManyEntries { limit: u64 },
    #[error(
        "archive entry {path:?} takes the archive's file data past {limit} bytes (the \
         limit); refusing it"
    )]
    TooLarge { path: String, limit: u64 },
    #[error(
        "layer entry {path:?} would leave the root filesystem (a `..` component); refusing \
         the layer"
    )]
    Escape { path: String },
    #[error("layer entry {path:?}: cannot {op} {target}")]
    Io {
        path: String,
        op: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer entry {path:?}: {message}")]
    Invalid { path: String, message: String },
}

/// Applies the layer archive in `file` (compression detected from its first bytes) onto
/// `root`, changing owners and modes through `chown`.
pub fn apply_layer_file(
    root: &Path,
    file: &Path,
    chown: &mut dyn Chown,
) -> Result<LayerStats, UnpackError> {
    unpack_file(root, file, chown, &UnpackOptions::IMAGE_LAYER)
}

/// Unpacks the archive in `file` (compression detected from its first bytes) onto
/// `root` as `opts` say.
pub fn unpack_file(
    root: &Path,
    file: &Path,
    chown: &mut dyn Chown,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let f = fs::File::open(file).map_err(UnpackError::Read)?;
    unpack(root, decompress(BufReader::new(f))?, chown, opts)
}

/// A reader of the decompressed archive: gzip and zstd are recognized by their magic
/// numbers (what `docker load` does), anything else is read as a plain tar.
pub fn decompress<'a>(mut r: impl BufRead + 'a) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let head = r.fill_buf().map_err(UnpackError::Read)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(
            zstd::stream::read::Decoder::with_buffer(r).map_err(UnpackError::Read)?,
        ))
    } else {
        Ok(Box::new(r))
    }
}

/// Applies the (decompressed) layer archive read from `reader` onto `root`.
pub fn apply_layer(
    root: &Path,
    reader: impl Read,
    chown: &mut dyn Chown,
) -> Result<LayerStats, UnpackError> {
    unpack(root, reader, chown, &UnpackOptions::IMAGE_LAYER)
}

/// Unpacks the (decompressed) archive read from `reader` onto `root` as `opts` say.
pub fn unpack(
    root: &Path,
    reader: impl Read,
    chown: &mut dyn Chown,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    // Host paths this layer wrote, with all their ancestors: whiteouts and opaque
    // markers apply to the lower layers only.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut budget = Budget {
        entries: 0,
        bytes: 0,
        limits: opts.limits,
    };
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        budget.entries += 1;
        if budget.entries > opts.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: opts.limits.max_entries,
            });
        }
        apply_entry(
            root,
            &mut entry,
            &mut written,
            chown,
            &mut stats,
            opts,
            &mut budget,
        )?;
    }
    Ok(stats)
}

/// What an unpack has written so far, against its limits.
struct Budget {
    entries: u64,
    bytes: u64,
    limits: Limits,
}

/// The normal components of an archive path (a leading `/` or `./` is dropped);
/// `None` when it has a `..`.
fn components(path: &Path) -> Option<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn apply_entry<R: Read>(
    root: &Path,
    entry: &mut tar::Entry<'_, R>,
    written: &mut HashSet<PathBuf>,
    chown: &mut dyn Chown,
    stats: &mut LayerStats,
    opts: &UnpackOptions,
    budget: &mut Budget,
) -> Result<(), UnpackError> {
    let raw = entry.path().map_err(UnpackError::Read)?.into_owned();
    let shown = raw.display().to_string();
    let escape = || UnpackError::Escape {
        path: shown.clone(),
    };
    let io_err = |op: &'static str, target: &Path| {
        let (path, target) = (shown.clone(), target.to_path_buf());
        move |source| UnpackError::Io {
            path,
            op,
            target,
            source,
        }
    };
    let comps = components(&raw).ok_or_else(escape)?;
    // The archive's root entry (`./`) carries nothing to apply.
    let Some((name, parents)) = comps.split_last() else {
        return Ok(());
    };
    let parent_rel: PathBuf = parents.iter().collect();
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions() {
        return Ok(());
    }
    // Old (v7) archives mark a directory only by a trailing slash.
    let is_dir = kind.is_dir() || (kind.is_file() && entry.path_bytes().ends_with(b"/"));

    if kind.is_character_special() || kind.is_block_special() {
        return match opts.devices {
            Devices::Skip => {
                stats.skipped_devices += 1;
                Ok(())
            }
            Devices::Refuse => Err(UnpackError::Device {
                path: shown.clone(),
            }),
        };
    }
    let whiteout = if opts.whiteouts {
        name.as_bytes().strip_prefix(WHITEOUT_PREFIX)
    } else {
        None
    };
    if let Some(target) = whiteout {
        let parent = match fsutil::resolve_dir(root, &parent_rel, false) {
            Ok(p) => p,
            // Nothing below to delete.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("resolve", &root.join(&parent_rel))(e)),
        };
        stats.whiteouts += 1;
        if name.as_bytes() == OPAQUE {
            return hide_lower(&parent, written).map_err(io_err("clear", &parent));
        }
        if target.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are AUFS bookkeeping, not deletions.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/') {
            return Err(UnpackError::Invalid {
                path: shown.clone(),
                message: "a whiteout must name a file".into(),
            });
        }
        let victim = parent.join(OsStr::from_bytes(target));
        if !written.contains(&victim) {
            remove(&victim).map_err(io_err("delete", &victim))?;
        }
        return Ok(());
    }

    let parent = fsutil::resolve_dir(root, &parent_rel, true)
        .map_err(io_err("create parent directory", &root.join(&parent_rel)))?;
    let path = parent.join(name);
    mark_written(root, &path, written);
    let existing = fs::symlink_metadata(&path).ok();
    if is_dir {
        match existing {
            Some(m) if m.is_dir() => {}
            Some(_) => {
                remove(&path).map_err(io_err("replace", &path))?;
                fs::create_dir(&path).map_err(io_err("create directory", &path))?;
            }
            None => fs::create_dir(&path).map_err(io_err("create directory", &path))?,
        }
    } else {
        if existing.is_some() {
            remove(&path).map_err(io_err("replace", &path))?;
        }
        if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                // Never through a symlink (none is left at `path`; this makes sure).
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&path)
                .map_err(io_err("create file", &path))?;
            // Checked before writing, from the header (for a sparse file, its real
            // size); the copy is bounded by what is left, whatever the header said.
            let size = entry.size();
            let left = budget.limits.max_bytes - budget.bytes;
            if size > left {
                return Err(UnpackError::TooLarge {
                    path: shown.clone(),
                    limit: budget.limits.max_bytes,
                });
            }
            let n =
                io::copy(&mut entry.by_ref().take(left), &mut f).map_err(io_err("write", &path))?;
            budget.bytes += n;
        } else if kind.is_symlink() {
            let target = link_name(entry, &shown)?;
            std::os::unix::fs::symlink(&target, &path).map_err(io_err("create symlink", &path))?;
        } else if kind.is_hard_link() {
            let target = link_name(entry, &shown)?;
            let source = hard_link_source(root, &target, &shown)?;
            fs::hard_link(&source, &path).map_err(io_err("hard-link", &path))?;
            // The link shares the inode (and so the metadata) of its source.
            stats.entries += 1;
            return Ok(());
        } else if kind.is_fifo() {
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| io_err("create fifo", &path)(io::Error::from(e)))?;
        } else {
            return Err(UnpackError::Invalid {
                path: shown.clone(),
                message: format!("unsupported entry type {kind:?}"),
            });
        }
    }
    stats.entries += 1;

    let header = entry.header();
    let id = |v: io::Result<u64>| -> Result<u32, UnpackError> {
        let v = v.map_err(UnpackError::Read)?;
        u32::try_from(v).map_err(|_| UnpackError::Invalid {
            path: shown.clone(),
            message: format!("owner id {v} does not fit 32 bits"),
        })
    };
    let (uid, gid) = (id(header.uid())?, id(header.gid())?);
    let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
    chown
        .lchown(&path, uid, gid)
        .map_err(io_err("change the owner of", &path))?;
    if !kind.is_symlink() {
        // After the chown, which clears setuid/setgid bits.
        chown
            .set_mode(&path, mode)
            .map_err(io_err("change the mode of", &path))?;
    }
    if !is_dir {
        // Directory times change as later entries land in them; only file times are
        // kept (Python compares them with its bytecode caches).
        let secs = i64::try_from(header.mtime().map_err(UnpackError::Read)?).unwrap_or(0);
        let t = rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &path,
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("set the time of", &path)(io::Error::from(e)))?;
    }
    Ok(())
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, shown: &str) -> Result<PathBuf, UnpackError> {
    entry
        .link_name()
        .map_err(UnpackError::Read)?
        .map(|c| c.into_owned())
        .ok_or_else(|| UnpackError::Invalid {
            path: shown.to_string(),
            message: "a link without a target".into(),
        })
}

/// The existing file a hard-link entry names (relative to the archive's root), resolved
/// inside `root`; its last component is not followed (a link to a symlink links the
/// symlink).
fn hard_link_source(root: &Path, target: &Path, shown: &str) -> Result<PathBuf, UnpackError> {
    let comps = components(target).ok_or_else(|| UnpackError::Escape {
        path: shown.to_string(),
    })?;
    let invalid = |message: String| UnpackError::Invalid {
        path: shown.to_string(),
        message,
    };
    let Some((name, parents)) = comps.split_last() else {
        return Err(invalid("a hard link to the root directory".into()));
    };
    let parent_rel: PathBuf = parents.iter().collect();
    let source = fsutil::resolve_dir(root, &parent_rel, false)
        .map(|p| p.join(name))
        .map_err(|e| invalid(format!("hard-link target {}: {e}", target.display())))?;
    match fs::symlink_metadata(&source) {
        Ok(m) if !m.is_dir() => Ok(source),
        Ok(_) => Err(invalid(format!(
            "hard-link target {} is a directory",
            target.display()
        ))),
        Err(e) => Err(invalid(format!(
            "hard-link target {}: {e}",
            target.display()
        ))),
    }
}

/// Records `path` and its ancestors below `root` as written by this layer.
fn mark_written(root: &Path, path: &Path, written: &mut HashSet<PathBuf>) {
    let mut p = path;
    while p != root && p.starts_with(root) {
        if !written.insert(p.to_path_buf()) {
            // Its ancestors are in already.
            break;
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
}

/// The opaque marker: removes from `dir` everything this layer did not write, down
/// through the directories it did write.
fn hide_lower(dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if written.contains(&path) {
            if fs::symlink_metadata(&path)?.is_dir() {
                hide_lower(&path, written)?;
            }
        } else {
            remove(&path)?;
        }
    }
    Ok(())
}

/// Removes `path` whatever it is, never following a symlink.
fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
