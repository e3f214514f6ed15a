//! Can sandboxes reach the data directory? gVisor's gofer and the jail's helper work in
//! the data directory as non-root host ids, so every directory on the way there must be
//! searchable (`x`) by "others". One without it (the data directory under `/root`,
//! mode 0700) breaks every gVisor create with nothing but `cannot read client sync
//! file … EOF`. Kiln fixes that itself where it is root's directory: it adds `o+x`,
//! never `r`, so others may pass through but still not list it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::Check;

const NAME: &str = "data dir reachable";

/// Kiln changes only directories of this owner (root).
pub(super) const FIXABLE_OWNER: u32 = 0;

/// Kernel filesystems whose modes are not ours to change.
const NEVER_TOUCH: [&str; 2] = ["/proc", "/sys"];

/// The state directories under the data directory the runtimes create (checked when they
/// exist: an operator may have tightened them).
const STATE_DIRS: [&str; 2] = ["sandboxes", "sandboxes-gvisor"];

/// `path` made absolute (against the current directory) and, of it and its ancestors,
/// the deepest that exists, with symlinks resolved: the directory the kernel walks to.
pub(super) fn deepest_existing(path: &Path) -> Option<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    absolute
        .ancestors()
        .find_map(|p| std::fs::canonicalize(p).ok())
}

/// The directories to pass on the way to the data directory, from `/` down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Walk {
    pub dirs: Vec<PathBuf>,
    /// Set when the data directory does not exist yet: the first part that is missing
    /// is created later by `kiln serve` (with the umask's mode).
    pub not_yet: bool,
}

pub(super) fn walk(data_dir: &Path) -> Option<Walk> {
    let existing = deepest_existing(data_dir)?;
    let mut dirs: Vec<PathBuf> = existing.ancestors().map(Path::to_path_buf).collect();
    dirs.reverse();
    let not_yet = !data_dir.is_dir();
    if !not_yet {
        dirs.extend(
            STATE_DIRS
                .iter()
                .map(|d| existing.join(d))
                .filter(|d| d.is_dir()),
        );
    }
    Some(Walk { dirs, not_yet })
}

/// A directory others cannot search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Blocked {
    pub path: PathBuf,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
}

fn blocked(dirs: &[PathBuf]) -> Vec<Blocked> {
    dirs.iter()
        .filter_map(|d| {
            let m = std::fs::metadata(d).ok()?;
            let mode = m.permissions().mode() & 0o7777;
            (mode & 0o001 == 0).then(|| Blocked {
                path: d.clone(),
                mode,
                uid: m.uid(),
            })
        })
        .collect()
}

/// Whether Kiln may add `o+x` to `b`: a directory of `owner` outside `/proc` and `/sys`.
pub(super) fn may_fix(b: &Blocked, owner: u32) -> bool {
    b.uid == owner && !NEVER_TOUCH.iter().any(|n| b.path.starts_with(n))
}

/// Adds `o+x` to `b` and nothing else; the new mode.
fn add_search(b: &Blocked) -> std::io::Result<u32> {
    let mode = b.mode | 0o001;
    std::fs::set_permissions(&b.path, std::fs::Permissions::from_mode(mode))?;
    Ok(mode)
}

/// The check of the real data directory; with `fix`, first adds `o+x` where Kiln may
/// (directories of `owner`). The second value lists what was changed, one line each.
pub(super) fn check(data_dir: &Path, fix: bool, owner: u32) -> (Check, Vec<String>) {
    match walk(data_dir) {
        Some(w) => check_walk(&w, data_dir, fix, owner),
        None => (
            Check::fail(
                NAME,
                format!("cannot resolve {}", data_dir.display()),
                "give --data-dir an absolute path to a directory root can create",
            ),
            Vec::new(),
        ),
    }
}

pub(super) fn check_walk(
    walk: &Walk,
    data_dir: &Path,
    fix: bool,
    owner: u32,
) -> (Check, Vec<String>) {
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    if fix {
        for b in blocked(&walk.dirs).iter().filter(|b| may_fix(b, owner)) {
            match add_search(b) {
                Ok(mode) => changes.push(format!(
                    "fixed: chmod o+x {} ({:04o} → {mode:04o}) so sandboxes' non-root ids \
                     can reach {}",
                    b.path.display(),
                    b.mode,
                    data_dir.display()
                )),
                Err(e) => errors.push(format!("chmod o+x {}: {e}", b.path.display())),
            }
        }
    }
    let left = blocked(&walk.dirs);
    if left.is_empty() {
        let mut detail = format!(
            "every directory on the way to {} is searchable by others",
            data_dir.display()
        );
        if walk.not_yet {
            detail.push_str(" (the data directory itself does not exist yet)");
        }
        return (Check::ok(NAME, detail), changes);
    }
    let listed: Vec<String> = left
        .iter()
        .map(|b| format!("{} is {:04o} (uid {})", b.path.display(), b.mode, b.uid))
        .collect();
    let mut detail = format!(
        "{}: others cannot search {}, and gVisor's gofer and the jail's helper reach {} as \
         non-root ids (runsc create fails with \"cannot read client sync file\")",
        listed.join(", "),
        if left.len() == 1 { "it" } else { "them" },
        data_dir.display()
    );
    for e in &errors {
        detail.push_str(&format!("; {e}"));
    }
    let paths: Vec<String> = left.iter().map(|b| b.path.display().to_string()).collect();
    let fix = if left.iter().all(|b| may_fix(b, owner)) && errors.is_empty() {
        format!(
            "chmod o+x {} (search only, not read; `kiln doctor --fix` and `kiln serve` do it)",
            paths.join(" ")
        )
    } else {
        format!(
            "chmod o+x {} (Kiln changes only root's directories outside /proc and /sys), \
             or use a --data-dir every user can pass through, such as /var/lib/kiln",
            paths.join(" ")
        )
    };
    (Check::fail(NAME, detail, fix), changes)
}

#[cfg(test)]
mod tests {
    use super::super::Level;
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn set(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    /// `top/parent` (0700) `/data` (0750) `/sandboxes-gvisor` (0710); only the part
    /// below the temporary directory is walked, so nothing outside it changes.
    fn tree() -> (tempfile::TempDir, Walk, PathBuf, u32) {
        let t = tempfile::tempdir().unwrap();
        let parent = t.path().join("parent");
        let data = parent.join("data");
        std::fs::create_dir_all(data.join("sandboxes-gvisor")).unwrap();
        set(t.path(), 0o755);
        set(&parent, 0o700);
        set(&data, 0o750);
        set(&data.join("sandboxes-gvisor"), 0o710);
        let owner = std::fs::metadata(t.path()).unwrap().uid();
        let walk = Walk {
            dirs: vec![
                t.path().to_path_buf(),
                parent.clone(),
                data.clone(),
                data.join("sandboxes-gvisor"),
            ],
            not_yet: false,
        };
        (t, walk, data, owner)
    }

    #[test]
    fn a_0700_parent_fails_and_the_fix_adds_only_o_x() {
        let (t, walk, data, owner) = tree();
        let parent = t.path().join("parent");
        let before: Vec<u32> = walk.dirs.iter().map(|d| mode(d)).collect();

        let (c, changes) = check_walk(&walk, &data, false, owner);
        assert_eq!(c.level, Level::Fail, "{c}");
        assert!(changes.is_empty());
        assert!(
            c.detail.contains(&format!("{} is 0700", parent.display())),
            "{c}"
        );
        assert!(c.to_string().contains("— fix: chmod o+x"), "{c}");
        // Without --fix nothing changed.
        assert_eq!(
            before,
            walk.dirs.iter().map(|d| mode(d)).collect::<Vec<_>>()
        );

        let (c, changes) = check_walk(&walk, &data, true, owner);
        assert_eq!(c.level, Level::Ok, "{c}");
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(changes[0].contains("(0700 → 0701)"), "{changes:?}");
        for (dir, old) in walk.dirs.iter().zip(before) {
            let new = mode(dir);
            // Only the search bit for others was added, and only where it was missing.
            assert_eq!(new, old | 0o001, "{}", dir.display());
        }
        // 0755 top, 0700 parent, 0750 data, 0710 state dir.
        let after: Vec<u32> = walk.dirs.iter().map(|d| mode(d)).collect();
        assert_eq!(after, [0o755, 0o701, 0o751, 0o711]);
        // A second run has nothing left to do.
        let (c, changes) = check_walk(&walk, &data, true, owner);
        assert_eq!(c.level, Level::Ok);
        assert!(changes.is_empty());
    }

    #[test]
    fn directories_of_another_owner_are_reported_not_changed() {
        let (_t, walk, data, owner) = tree();
        let before: Vec<u32> = walk.dirs.iter().map(|d| mode(d)).collect();
        let (c, changes) = check_walk(&walk, &data, true, owner.wrapping_add(1));
        assert_eq!(c.level, Level::Fail);
        assert!(changes.is_empty());
        assert!(
            c.fix
                .as_deref()
                .unwrap()
                .contains("only root's directories"),
            "{c}"
        );
        assert_eq!(
            before,
            walk.dirs.iter().map(|d| mode(d)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn proc_and_sys_are_never_fixed() {
        let b = |p: &str| Blocked {
            path: p.into(),
            mode: 0o555,
            uid: 0,
        };
        assert!(!may_fix(&b("/proc/sys"), 0));
        assert!(!may_fix(&b("/sys/fs/cgroup"), 0));
        assert!(may_fix(&b("/root"), 0));
        assert!(may_fix(&b("/system"), 0));
        assert!(!may_fix(&b("/root"), 1000));
    }

    #[test]
    fn the_walk_goes_from_the_root_to_the_deepest_existing_directory() {
        let (t, _walk, data, _) = tree();
        let w = walk(&data).unwrap();
        let real = std::fs::canonicalize(&data).unwrap();
        assert_eq!(w.dirs.first().map(PathBuf::as_path), Some(Path::new("/")));
        assert!(!w.not_yet);
        // The data directory, then its state directories that exist.
        assert_eq!(w.dirs[w.dirs.len() - 2], real);
        assert_eq!(w.dirs[w.dirs.len() - 1], real.join("sandboxes-gvisor"));
        let later = w.dirs.len();
        // A data directory not made yet: its existing ancestors.
        let w = walk(&data.join("later/kiln")).unwrap();
        assert!(w.not_yet);
        assert_eq!(w.dirs.len(), later - 1);
        assert_eq!(w.dirs.last(), Some(&real));
        drop(t);
    }
}
