//! `EntryInfo` from `lstat`, with envd's symlink rules (spec §5.3), and directory walks.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_proto::filesystem::{EntryInfo, FileType};
use kiln_proto::pbjson::Timestamp;

use super::xattr;
use crate::users::UserDb;

/// Builds the entry for `path`. `path` is reported as given (symlinked parents stay
/// unresolved); a symlink reports its target's type and permission bits.
pub fn entry_info(path: &Path, users: &UserDb) -> io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path)?;
    let mut info = EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_owned()),
        file_type: file_type(&meta),
        path: path.to_string_lossy().into_owned(),
        size: i64::try_from(meta.size()).unwrap_or(i64::MAX),
        mode: meta.mode() & 0o777,
        permissions: mode_string(&meta),
        owner: users.user_name(meta.uid()),
        group: users.group_name(meta.gid()),
        modified_time: Some(Timestamp::new(
            meta.mtime(),
            u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        )),
        symlink_target: None,
        metadata: Default::default(),
    };
    if meta.file_type().is_symlink() {
        match std::fs::canonicalize(path).and_then(|t| std::fs::metadata(&t).map(|m| (t, m))) {
            Ok((target, target_meta)) => {
                info.file_type = file_type(&target_meta);
                info.mode = target_meta.mode() & 0o777;
                info.symlink_target = Some(target.to_string_lossy().into_owned());
            }
            Err(_) => {
                // Broken link: no type (the SDK drops it from listings); target = itself.
                info.file_type = FileType::Unspecified;
                info.symlink_target = Some(info.path.clone());
            }
        }
    }
    info.metadata = xattr::read(path);
    Ok(info)
}

fn file_type(meta: &Metadata) -> FileType {
    let ft = meta.file_type();
    if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Directory
    } else {
        // Sockets, devices, FIFOs (and symlinks, which callers resolve).
        FileType::Unspecified
    }
}

/// Go's `fs.FileMode.String()` for a Unix mode: type letters, then `rwxrwxrwx`.
pub fn mode_string(meta: &Metadata) -> String {
    format_mode(meta.mode(), meta.file_type())
}

fn format_mode(mode: u32, ft: std::fs::FileType) -> String {
    let mut out = String::with_capacity(12);
    // Go's letter order: "dalTLDpSugct?".
    if ft.is_dir() {
        out.push('d');
    }
    if ft.is_symlink() {
        out.push('L');
    }
    if ft.is_block_device() || ft.is_char_device() {
        out.push('D');
    }
    if ft.is_fifo() {
        out.push('p');
    }
    if ft.is_socket() {
        out.push('S');
    }
    if mode & libc::S_ISUID != 0 {
        out.push('u');
    }
    if mode & libc::S_ISGID != 0 {
        out.push('g');
    }
    if ft.is_char_device() {
        out.push('c');
    }
    if mode & libc::S_ISVTX != 0 {
        out.push('t');
    }
    if out.is_empty() {
        out.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, letter) in RWX.iter().enumerate() {
        if mode & (1 << (8 - i)) != 0 {
            out.push(*letter as char);
        } else {
            out.push('-');
        }
    }
    out
}

/// Entries under `dir` (already resolved to a real directory) down to `depth` levels,
/// in lexical pre-order, reported under `shown` (the path as the client gave it).
/// Symlinked subdirectories are listed but not descended into; entries that vanish
/// mid-walk are skipped.
pub fn walk(dir: &Path, shown: &Path, depth: u32, users: &UserDb) -> io::Result<Vec<EntryInfo>> {
    let mut out = Vec::new();
    walk_into(dir, shown, depth.max(1), users, &mut out, true)?;
    Ok(out)
}

fn walk_into(
    dir: &Path,
    shown: &Path,
    levels_left: u32,
    users: &UserDb,
    out: &mut Vec<EntryInfo>,
    is_root: bool,
) -> io::Result<()> {
    let reader = match std::fs::read_dir(dir) {
        Ok(r) => r,
        // A subdirectory that vanished or is unreadable is skipped; the root is not.
        Err(e) if !is_root => {
            tracing::debug!(dir = %dir.display(), error = %e, "skipping directory during walk");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut names: Vec<_> = reader
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let real: PathBuf = dir.join(&name);
        let reported: PathBuf = shown.join(&name);
        let info = match entry_info(&real, users) {
            Ok(mut info) => {
                info.path = reported.to_string_lossy().into_owned();
                if info.symlink_target.as_deref() == Some(real.to_string_lossy().as_ref()) {
                    info.symlink_target = Some(info.path.clone());
                }
                info
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.push(info);
        let is_real_dir = std::fs::symlink_metadata(&real).is_ok_and(|m| m.is_dir());
        if is_real_dir && levels_left > 1 {
            walk_into(&real, &reported, levels_left - 1, users, out, false)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn db() -> UserDb {
        UserDb::parse("root:x:0:0::/root:/bin/sh\n", "root:x:0:\n")
    }

    #[test]
    fn permission_strings_match_go() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            mode_string(&std::fs::metadata(&file).unwrap()),
            "-rw-r--r--"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(
            mode_string(&std::fs::metadata(dir.path()).unwrap()),
            "dtrwxrwxrwx"
        );
        let link = dir.path().join("l");
        symlink(&file, &link).unwrap();
        assert_eq!(
            mode_string(&std::fs::symlink_metadata(&link).unwrap()),
            "Lrwxrwxrwx"
        );
        assert_eq!(
            mode_string(&std::fs::metadata("/dev/null").unwrap()),
            "Dcrw-rw-rw-"
        );
    }

    #[test]
    fn entries_follow_envd_symlink_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let file = root.join("f.txt");
        std::fs::write(&file, b"abc").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let info = entry_info(&file, &db()).unwrap();
        assert_eq!(info.name, "f.txt");
        assert_eq!(info.file_type, FileType::File);
        assert_eq!(info.size, 3);
        assert_eq!(info.mode, 0o600);
        assert!(info.modified_time.is_some());

        let link = root.join("link");
        symlink(&file, &link).unwrap();
        let info = entry_info(&link, &db()).unwrap();
        assert_eq!(info.file_type, FileType::File);
        assert_eq!(info.mode, 0o600);
        assert_eq!(info.permissions, "Lrwxrwxrwx");
        assert_eq!(info.symlink_target.as_deref(), Some(file.to_str().unwrap()));

        let broken = root.join("broken");
        symlink(root.join("missing"), &broken).unwrap();
        let info = entry_info(&broken, &db()).unwrap();
        assert_eq!(info.file_type, FileType::Unspecified);
        assert_eq!(
            info.symlink_target.as_deref(),
            Some(broken.to_str().unwrap())
        );
    }

    #[test]
    fn walk_depth_order_and_symlinked_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/inner/deep")).unwrap();
        std::fs::write(root.join("a.txt"), b"").unwrap();
        std::fs::write(root.join("b/inner/x"), b"").unwrap();
        symlink(root.join("b"), root.join("c")).unwrap();
        let names = |depth| -> Vec<String> {
            walk(root, Path::new("/shown"), depth, &db())
                .unwrap()
                .into_iter()
                .map(|e| e.path)
                .collect()
        };
        assert_eq!(names(0), ["/shown/a.txt", "/shown/b", "/shown/c"]);
        assert_eq!(names(1), names(0));
        assert_eq!(
            names(3),
            [
                "/shown/a.txt",
                "/shown/b",
                "/shown/b/inner",
                "/shown/b/inner/deep",
                "/shown/b/inner/x",
                "/shown/c"
            ]
        );
    }
}
