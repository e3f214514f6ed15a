//! Kernel features sandboxes need: cgroups (the layout `jail::cgroup` detects), user
//! namespaces, overlayfs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use kiln_runtime::jail::cgroup;

use super::Check;

pub(super) fn check_cgroups(root: &Path) -> Check {
    const NAME: &str = "cgroups";
    let v1_missing: Vec<&str> = cgroup::V1::CONTROLLERS
        .into_iter()
        .filter(|c| !root.join(c).join("cgroup.procs").exists())
        .collect();
    let unified = root.join("unified");
    let v2_aside = unified.join("cgroup.controllers").exists();
    match cgroup::detect(root) {
        Ok(cg) if cg.version() == "v1" => {
            let mut detail = format!(
                "v1 with {} under {}",
                cgroup::V1::CONTROLLERS.join(", "),
                root.display()
            );
            if v2_aside {
                detail.push_str(&format!(
                    " (v2 also at {}, unused: Kiln takes v1 when both are there)",
                    unified.display()
                ));
            }
            Check::ok(NAME, detail)
        }
        Ok(_) => {
            let have = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let have: Vec<&str> = have.split_whitespace().collect();
            let missing: Vec<&str> = ["cpu", "memory", "pids"]
                .into_iter()
                .filter(|c| !have.contains(c))
                .collect();
            if missing.is_empty() {
                Check::ok(
                    NAME,
                    format!("v2 at {} with {}", root.display(), have.join(" ")),
                )
            } else {
                Check::fail(
                    NAME,
                    format!(
                        "v2 at {} lacks the {} controller(s) sandbox limits need",
                        root.display(),
                        missing.join(", ")
                    ),
                    "boot without cgroup_disable= for them on the kernel command line",
                )
            }
        }
        Err(_) => {
            let mut detail = format!(
                "no v2 at {} and v1 lacks {}",
                root.display(),
                v1_missing.join(", ")
            );
            if v2_aside {
                detail.push_str(&format!(
                    " (a v2 hierarchy at {} is not used)",
                    unified.display()
                ));
            }
            Check::fail(
                NAME,
                detail,
                format!(
                    "mount the missing v1 controllers under {}, or boot with the unified \
                     hierarchy (systemd.unified_cgroup_hierarchy=1)",
                    root.display()
                ),
            )
        }
    }
}

pub(super) fn check_userns(
    max_user_namespaces: Option<u64>,
    unprivileged_clone: Option<u64>,
) -> Check {
    const NAME: &str = "user namespaces";
    let fix = "sysctl -w user.max_user_namespaces=65536 (and keep it in /etc/sysctl.d/)";
    match max_user_namespaces {
        None => Check::warn(
            NAME,
            "cannot read /proc/sys/user/max_user_namespaces (kernel without user namespaces?)",
            fix,
        ),
        Some(0) => Check::fail(
            NAME,
            "user.max_user_namespaces is 0: every sandbox needs one",
            fix,
        ),
        Some(n) => {
            let mut detail = format!("user.max_user_namespaces={n}");
            if unprivileged_clone == Some(0) {
                detail.push_str(
                    "; kernel.unprivileged_userns_clone=0 restricts only unprivileged users \
                     (Kiln runs as root)",
                );
            }
            Check::ok(NAME, detail)
        }
    }
}

/// The overlay module file of the running kernel, if it is a module at all.
pub(super) fn overlay_module() -> Option<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let dir = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/fs/overlayfs");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("overlay.ko"))
        })
}

/// `filesystems`: the text of `/proc/filesystems`; `module`: the overlay module file.
pub(super) fn check_overlay(filesystems: Option<&str>, module: Option<PathBuf>) -> Check {
    const NAME: &str = "overlayfs";
    let registered = filesystems.is_some_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    });
    match (registered, module) {
        (true, _) => Check::ok(NAME, "overlay in /proc/filesystems"),
        (false, Some(m)) => Check::ok(
            NAME,
            format!(
                "not loaded yet; {} is loaded by the first mount",
                m.display()
            ),
        ),
        (false, None) => Check::fail(
            NAME,
            "no overlay filesystem in /proc/filesystems and no module for it: every \
             sandbox's root is an overlay",
            "modprobe overlay, or use a kernel built with CONFIG_OVERLAY_FS",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn cgroup_layouts() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // Nothing mounted.
        let c = check_cgroups(root);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.detail.contains("memory, cpu, cpuacct, pids, freezer"),
            "{c}"
        );
        // v1 with every controller, and an unused v2 beside it (this host's layout).
        for ctl in cgroup::V1::CONTROLLERS {
            std::fs::create_dir_all(root.join(ctl)).unwrap();
            std::fs::write(root.join(ctl).join("cgroup.procs"), "").unwrap();
        }
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
        let c = check_cgroups(root);
        assert_eq!(c.level, Level::Ok, "{c}");
        assert!(c.detail.starts_with("v1 with memory"), "{c}");
        assert!(c.detail.contains("unused"), "{c}");
        // v2 only, without pids.
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory\n",
        )
        .unwrap();
        let c = check_cgroups(t.path());
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("lacks the pids"), "{c}");
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(check_cgroups(t.path()).level, Level::Ok);
    }

    #[test]
    fn userns_fails_only_when_none_may_be_made() {
        assert_eq!(check_userns(Some(0), None).level, Level::Fail);
        assert_eq!(check_userns(None, None).level, Level::Warn);
        let c = check_userns(Some(15000), Some(0));
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("unprivileged_userns_clone=0"), "{c}");
    }

    #[test]
    fn overlay_registered_or_loadable() {
        let fs = "nodev\tsysfs\n\text4\nnodev\toverlay\n";
        assert_eq!(check_overlay(Some(fs), None).level, Level::Ok);
        assert_eq!(
            check_overlay(
                Some("\text4\n"),
                Some("/lib/modules/x/overlay.ko.xz".into())
            )
            .level,
            Level::Ok
        );
        assert_eq!(check_overlay(Some("\text4\n"), None).level, Level::Fail);
        assert_eq!(check_overlay(None, None).level, Level::Fail);
    }
}
