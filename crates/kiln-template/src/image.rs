//! An ext4 disk image of a template's root filesystem, for runtimes that boot a disk
//! (a microVM) rather than mount a directory.
//!
//! The tree on disk is owned by the host id range a sandbox's user namespace maps
//! ([`crate::shift`]): sandbox root is host `base`, sandbox uid 1000 is host
//! `base + 1000`. A disk image must hold the ids the guest sees, so `mkfs.ext4 -d` runs
//! in a user namespace that maps host `base..base+len` back to `0..len`: there it reads
//! the tree with the guest's ids, and every file, directory, symlink, device node, hard
//! link, mode (setuid bits included) and extended attribute lands in the image as the
//! guest will see it. Nothing is copied or re-owned on the host, so the template stays
//! untouched and servable while its image is written.
//!
//! The image is sparse: its size is the disk the guest gets, not the bytes it takes on
//! the host.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_runtime::userns::{self, IdRange};
use nix::unistd::{Gid, Uid};

/// Bytes per inode that `mkfs.ext4` uses by default (its `inode_ratio`).
const BYTES_PER_INODE: u64 = 16_384;

/// MiB of a `size_mb` disk that ext4 keeps for itself: inode tables (256 bytes per
/// 16 KiB), bitmaps and group descriptors, and the journal mke2fs sizes by the disk
/// (e2fsprogs' `ext2fs_default_journal_size`).
fn metadata_mb(size_mb: u64) -> u64 {
    let journal_mb = match size_mb {
        0..128 => 4,
        128..1024 => 16,
        1024..2048 => 32,
        2048..16384 => 64,
        _ => 128,
    };
    size_mb / 50 + journal_mb + 8
}

/// What to make: the image's size and label, and the id range to map back to 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Options {
    /// Size of the disk, in MiB.
    pub size_mb: u64,
    /// Filesystem label (at most 16 bytes).
    pub label: String,
    /// Host id that is id 0 in the tree ([`kiln_runtime::ID_MAP_BASE`] for templates).
    pub id_base: u32,
    /// How many ids the range holds.
    pub id_len: u32,
    /// The `mkfs.ext4` to run (default: the one on `PATH`).
    pub mkfs: PathBuf,
}

impl Ext4Options {
    /// Options for a template's root filesystem: its ids are the sandbox id range.
    pub fn for_template(name: &str, size_mb: u64) -> Self {
        let mut label = format!("kiln-{name}");
        label.truncate(16);
        Self {
            size_mb,
            label,
            id_base: kiln_runtime::ID_MAP_BASE,
            id_len: kiln_runtime::ID_MAP_LEN,
            mkfs: PathBuf::from("mkfs.ext4"),
        }
    }
}

/// What went into an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Report {
    /// The image's size (the guest's disk), in MiB.
    pub size_mb: u64,
    /// Bytes of the files, directories and symlinks in the tree, each inode once.
    pub used_bytes: u64,
    /// Inodes in the tree.
    pub inodes: u64,
}

/// Writing an ext4 image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("reading {path}")]
    Walk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the root filesystem needs about {needed_mb} MiB ({used_mb} MiB of files and \
         {metadata_mb} MiB of ext4 metadata) but the disk is {size_mb} MiB; give a \
         larger size"
    )]
    TooSmall {
        needed_mb: u64,
        used_mb: u64,
        metadata_mb: u64,
        size_mb: u64,
    },
    #[error("invalid label {label:?}: use at most 16 bytes")]
    BadLabel { label: String },
    #[error("{path} already exists and is not a regular file")]
    OutputNotAFile { path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running {mkfs} (from e2fsprogs) in a user namespace")]
    Run {
        mkfs: PathBuf,
        #[source]
        source: userns::UsernsError,
    },
    #[error("mkfs.ext4 failed ({status}): {output}")]
    Mkfs { status: String, output: String },
}

/// Writes an ext4 image of the tree at `rootfs` to `out` (replacing a file there, and
/// only once the image is complete), with the tree's ids `id_base + n` stored as `n`.
///
/// Needs root: it maps a range of host ids into a user namespace.
pub fn write_ext4(rootfs: &Path, out: &Path, opts: &Ext4Options) -> Result<Ext4Report, ImageError> {
    if opts.label.len() > 16 {
        return Err(ImageError::BadLabel {
            label: opts.label.clone(),
        });
    }
    // A built template's `rootfs` is a symlink to its last layer: follow the top only.
    let rootfs = &match fs::canonicalize(rootfs) {
        Ok(dir) if dir.is_dir() => dir,
        _ => {
            return Err(ImageError::NotADirectory {
                path: rootfs.to_path_buf(),
            })
        }
    };
    if fs::symlink_metadata(out).is_ok_and(|m| !m.is_file()) {
        return Err(ImageError::OutputNotAFile {
            path: out.to_path_buf(),
        });
    }
    let (used_bytes, inodes) = usage(rootfs)?;
    let used_mb = used_bytes.div_ceil(1 << 20);
    // Files take a little more in the image than on the host (block rounding of the
    // directories mkfs lays out afresh); keep 5 % for that.
    let metadata_mb = metadata_mb(opts.size_mb);
    let needed_mb = used_mb + used_mb / 20 + metadata_mb;
    if needed_mb > opts.size_mb {
        return Err(ImageError::TooSmall {
            needed_mb,
            used_mb,
            metadata_mb,
            size_mb: opts.size_mb,
        });
    }

    // mkfs runs as the namespace's root (host `id_base`): it writes into a directory
    // of its own beside `out`, so the finished image is renamed into place.
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.ext4".to_string());
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { what, path, source }
    };
    let _ = fs::remove_dir_all(&work);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io("creating", &work))?;
    let result = (|| {
        std::os::unix::fs::chown(&work, Some(opts.id_base), Some(opts.id_base))
            .map_err(io("changing the owner of", &work))?;
        let image = work.join(&file_name);
        run_mkfs(rootfs, &image, opts, inodes)?;
        let (uid, gid) = (Uid::effective().as_raw(), Gid::effective().as_raw());
        std::os::unix::fs::chown(&image, Some(uid), Some(gid))
            .map_err(io("changing the owner of", &image))?;
        fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(io("setting the mode of", &image))?;
        fs::rename(&image, out).map_err(io("renaming the image to", out))
    })();
    let _ = fs::remove_dir_all(&work);
    result?;
    Ok(Ext4Report {
        size_mb: opts.size_mb,
        used_bytes,
        inodes,
    })
}

/// Bytes and inodes of the tree, each inode counted once (templates are hard-link
/// farms over their layers). Other filesystems mounted inside are not entered.
fn usage(root: &Path) -> Result<(u64, u64), ImageError> {
    let walk = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Walk { path, source }
    };
    let top = fs::symlink_metadata(root).map_err(walk(root))?;
    let dev = top.dev();
    let mut seen = HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![(root.to_path_buf(), top)];
    while let Some((path, meta)) = stack.pop() {
        if !seen.insert(meta.ino()) {
            continue;
        }
        inodes += 1;
        bytes += meta.size().div_ceil(4096) * 4096;
        if meta.is_dir() && meta.dev() == dev {
            for entry in fs::read_dir(&path).map_err(walk(&path))? {
                let entry = entry.map_err(walk(&path))?;
                let p = entry.path();
                let m = fs::symlink_metadata(&p).map_err(walk(&p))?;
                stack.push((p, m));
            }
        }
    }
    Ok((bytes, inodes))
}

/// Runs `mkfs.ext4 -d rootfs image` as root of a user namespace whose ids 0..len are
/// host ids base..base+len ([`kiln_runtime::userns`]).
fn run_mkfs(
    rootfs: &Path,
    image: &Path,
    opts: &Ext4Options,
    inodes: u64,
) -> Result<(), ImageError> {
    // mkfs reaches the tree and its output directory through descriptors opened here
    // (`/proc/self/fd/N`), so the directories above them need not be searchable by the
    // namespace's root, which host root's 0700 directories are not.
    let open_dir = |path: &Path| {
        fs::File::open(path).map_err(|source| ImageError::Io {
            what: "opening",
            path: path.to_path_buf(),
            source,
        })
    };
    let tree = open_dir(rootfs)?;
    let out_dir = open_dir(image.parent().unwrap_or(Path::new(".")))?;
    let image_name = image.file_name().unwrap_or_default();

    let mut cmd = Command::new(&opts.mkfs);
    cmd.args(["-q", "-F", "-t", "ext4", "-L", &opts.label]);
    let default_inodes = opts.size_mb * (1 << 20) / BYTES_PER_INODE;
    if inodes + inodes / 4 > default_inodes {
        cmd.arg("-N").arg((inodes + inodes / 4).to_string());
    }
    cmd.arg("-d")
        .arg(format!("/proc/self/fd/{}", tree.as_raw_fd()))
        .arg(Path::new(&format!("/proc/self/fd/{}", out_dir.as_raw_fd())).join(image_name))
        .arg(format!("{}M", opts.size_mb));
    let range = IdRange {
        base: opts.id_base,
        len: opts.id_len,
    };
    let output = userns::output_as_mapped_root(cmd, range, &[tree.as_fd(), out_dir.as_fd()])
        .map_err(|source| ImageError::Run {
            mkfs: opts.mkfs.clone(),
            source,
        })?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        return Err(ImageError::Mkfs {
            status: output.status.to_string(),
            output: tail,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::Command;

    use super::*;

    const BASE: u32 = 100_000;

    fn opts(size_mb: u64) -> Ext4Options {
        Ext4Options::for_template("unit", size_mb)
    }

    /// `debugfs -R <request> image`, its stdout.
    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (uid, gid, mode, links) of `path` in the image, from `debugfs stat`.
    fn stat(image: &Path, path: &str) -> (u32, u32, u32, u32) {
        let text = debugfs(image, &format!("stat {path}"));
        let field = |name: &str, radix: u32| {
            let rest = text
                .split(name)
                .nth(1)
                .unwrap_or_else(|| panic!("no {name} for {path} in:\n{text}"));
            let word = rest.split_whitespace().next().unwrap();
            u32::from_str_radix(word, radix).unwrap()
        };
        (
            field("User:", 10),
            field("Group:", 10),
            field("Mode:", 8),
            field("Links:", 10),
        )
    }

    /// A small guest tree, owned like a shifted template: host `BASE + n` is guest `n`.
    /// It sits in a 0700 temporary directory, as a root-only data directory would.
    fn guest_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("rootfs");
        for d in ["etc", "usr/bin", "home/user", "tmp"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::write(r.join("etc/hostname"), "kiln\n").unwrap();
        fs::write(r.join("usr/bin/sudo"), "#!/bin/sh\n").unwrap();
        fs::write(r.join("home/user/secret"), "mine").unwrap();
        fs::hard_link(r.join("etc/hostname"), r.join("etc/hostname.bak")).unwrap();
        symlink("../etc/hostname", r.join("tmp/link")).unwrap();
        nix::unistd::mkfifo(
            &r.join("tmp/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let own = |p: &str, id: u32| {
            std::os::unix::fs::lchown(r.join(p), Some(BASE + id), Some(BASE + id)).unwrap()
        };
        for p in [
            "",
            "etc",
            "etc/hostname",
            "usr",
            "usr/bin",
            "usr/bin/sudo",
            "home",
            "tmp",
        ] {
            own(p, 0);
        }
        for p in ["tmp/link", "tmp/fifo"] {
            own(p, 0);
        }
        for p in ["home/user", "home/user/secret"] {
            own(p, 1000);
        }
        let mode = |p: &str, m: u32| {
            fs::set_permissions(r.join(p), fs::Permissions::from_mode(m)).unwrap()
        };
        mode("usr/bin/sudo", 0o4755);
        mode("home/user", 0o700);
        mode("home/user/secret", 0o600);
        mode("tmp", 0o1777);
        dir
    }

    /// Privilege tier: root (maps a range of host ids), e2fsprogs.
    #[test]
    fn the_image_holds_the_guests_ids_modes_and_links() {
        if !crate::tests::has_root("the_image_holds_the_guests_ids_modes_and_links", "id maps") {
            return;
        }
        let tree = guest_tree();
        let rootfs = tree.path().join("rootfs");
        let out_dir = tempfile::tempdir().unwrap();
        let image = out_dir.path().join("unit.ext4");
        fs::write(&image, "an older image").unwrap();

        // Built templates reach their tree through a symlink to the last layer.
        let link = tree.path().join("current");
        symlink(&rootfs, &link).unwrap();
        let report = write_ext4(&link, &image, &opts(64)).unwrap();
        assert_eq!(report.size_mb, 64);
        assert_eq!(
            report.inodes, 12,
            "7 directories, 5 inodes of files (one hard-linked twice)"
        );

        let meta = fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < meta.len() / 2, "the image is sparse");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o644));
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert!(debugfs(&image, "stats").contains("Filesystem volume name:   kiln-unit"));

        // Links of /: ., .., etc, usr, home, tmp and the lost+found mkfs adds.
        assert_eq!(stat(&image, "/"), (0, 0, 0o755, 7));
        assert_eq!(stat(&image, "/usr/bin/sudo"), (0, 0, 0o4755, 1));
        assert_eq!(stat(&image, "/home/user"), (1000, 1000, 0o700, 2));
        assert_eq!(stat(&image, "/home/user/secret"), (1000, 1000, 0o600, 1));
        assert_eq!(stat(&image, "/tmp").2, 0o1777);
        assert_eq!(
            stat(&image, "/etc/hostname").3,
            2,
            "the hard link stays one inode"
        );
        assert_eq!(debugfs(&image, "cat /home/user/secret"), "mine");
        assert!(debugfs(&image, "stat /tmp/link").contains("\"../etc/hostname\""));
        assert!(debugfs(&image, "stat /tmp/fifo").contains("Type: FIFO"));
        // Nothing is left beside the image, and the tree was not touched.
        let names: Vec<_> = fs::read_dir(out_dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["unit.ext4"]);
        assert_eq!(
            fs::metadata(rootfs.join("home/user/secret")).unwrap().uid(),
            BASE + 1000
        );
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_written() {
        let tree = tempfile::tempdir().unwrap();
        fs::write(tree.path().join("big"), vec![1u8; 20 << 20]).unwrap();
        let out = tempfile::tempdir().unwrap();
        let image = out.path().join("x.ext4");

        let err = write_ext4(tree.path(), &image, &opts(16)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooSmall {
                    used_mb: 20..=21,
                    size_mb: 16,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("give a larger size"), "{err}");

        let err = write_ext4(&tree.path().join("big"), &image, &opts(64)).unwrap_err();
        assert!(matches!(err, ImageError::NotADirectory { .. }), "{err}");

        let err = write_ext4(tree.path(), out.path(), &opts(64)).unwrap_err();
        assert!(matches!(err, ImageError::OutputNotAFile { .. }), "{err}");

        let mut long = opts(64);
        long.label = "a-label-of-seventeen".into();
        let err = write_ext4(tree.path(), &image, &long).unwrap_err();
        assert!(matches!(err, ImageError::BadLabel { .. }), "{err}");
        assert!(!image.exists());
    }
}
