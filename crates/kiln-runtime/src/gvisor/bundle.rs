//! The OCI bundle of one sandbox: host paths under `state_dir/<id>/` and the
//! `config.json` that `runsc` runs (built with the `oci-spec` crate, pure: unit-tested
//! without root).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::idmap::HostIds;
use crate::jail::cgroup::{CPU_PERIOD_US, PARENT};
use crate::jail::mounts::tmpfs_sizes;
use crate::jail::KEEP_CAPS;
use crate::{Limits, GUEST_BIN_DIR, GUEST_ENVD_SOCKET, ID_MAP_LEN};

const MIB: i64 = 1024 * 1024;
const INIT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Host tasks the gVisor Sentry and gofer need on top of the workload's own (Go
/// runtime threads, the ptrace platform's stub processes). The cgroup's `pids.max`
/// counts host tasks, so `Limits::pids_max` alone would starve the Sentry.
pub const SENTRY_TASK_OVERHEAD: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("building the OCI runtime spec")]
    Spec(#[source] oci_spec::OciSpecError),
    #[error("unknown capability {0}")]
    Capability(String),
}

/// The host paths of one gVisor sandbox: the jail's layout (state dir, overlay layers,
/// `run/`, log), plus the bundle's `config.json`.
pub type BundlePaths = crate::jail::spec::SandboxPaths;

/// What varies between sandboxes' `config.json`.
#[derive(Debug, Clone)]
pub struct BundleSpec<'a> {
    pub id: &'a str,
    pub rootfs: &'a Path,
    pub run_dir: &'a Path,
    pub guest_bin_dir: &'a Path,
    pub limits: Limits,
    /// Network namespace the sandbox joins (`--network=sandbox`); `None`: loopback only.
    pub netns: Option<&'a Path>,
    /// Replaces kiln-init's envd command (`kiln-init -- <command>`).
    pub envd_command: Option<&'a [String]>,
    /// Where the template keeps `sudo` (`/usr/bin/sudo`): Kiln's `kiln-sudo` is
    /// bind-mounted there and kiln-init starts its broker, because gVisor ignores
    /// set-user-ID bits. `None`: no sudo in the template (or no kiln-sudo binary).
    pub sudo: Option<&'a str>,
    /// The host ids the sandbox's ids `0..65535` are (`uidMappings`/`gidMappings`):
    /// the Sentry and gofer run as `ids.root()` on the host.
    pub ids: HostIds,
}

/// Where templates keep sudo.
pub const SUDO_PATH: &str = "/usr/bin/sudo";

/// Cgroup path of a sandbox, relative to each controller's root (`kiln/<id>`, the
/// same layout as the jail's, so [`crate::jail::cgroup`] reads its usage).
pub fn cgroups_path(id: &str) -> PathBuf {
    Path::new("/").join(PARENT).join(id)
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Result<Mount, BundleError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(BundleError::Spec)
}

fn capabilities() -> Result<std::collections::HashSet<Capability>, BundleError> {
    KEEP_CAPS
        .iter()
        .map(|(name, _)| {
            serde_json::from_value::<Capability>(serde_json::Value::String(name.to_string()))
                .map_err(|_| BundleError::Capability(name.to_string()))
        })
        .collect()
}

/// The sandbox's `config.json`.
pub fn build(b: &BundleSpec<'_>) -> Result<Spec, BundleError> {
    let e = BundleError::Spec;
    let mut args = vec![format!("{GUEST_BIN_DIR}/kiln-init")];
    if b.sudo.is_some() {
        args.push("--sudo-broker".into());
    }
    if let Some(cmd) = b.envd_command {
        args.push("--".into());
        args.extend(cmd.iter().cloned());
    }
    let caps = capabilities()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(e)?,
        )
        .args(args)
        .env(vec![format!("PATH={INIT_PATH}"), "HOME=/root".into()])
        .cwd("/")
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(e)?,
        )
        // As in the jail (docs/jail.md): `sudo` for `user` is part of the template's
        // promise, and a setuid binary can only reach the sandbox's own root, inside
        // gVisor's kernel, which every SDK caller already gets with `user="root"`.
        // runsc (through 2024-07-29) ignores this and never honours set-user-ID bits,
        // hence kiln-sudo in place of the template's sudo (docs/gvisor.md).
        .no_new_privileges(false)
        .build()
        .map_err(e)?;

    let (tmp_mb, shm_mb) = tmpfs_sizes(b.limits.memory_mb);
    let none = Path::new("none");
    let run_parent = Path::new(GUEST_ENVD_SOCKET)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/run/kiln".into());
    let mut mounts = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            Path::new("shm"),
            &[
                "nosuid",
                "noexec",
                "nodev",
                "mode=1777",
                &format!("size={shm_mb}m"),
            ],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "nodev", "mode=1777", &format!("size={tmp_mb}m")],
        )?,
        mount("/sys", "sysfs", none, &["nosuid", "noexec", "nodev", "ro"])?,
        mount(
            GUEST_BIN_DIR,
            "bind",
            b.guest_bin_dir,
            &["rbind", "ro", "nosuid", "nodev"],
        )?,
        mount(
            &run_parent,
            "bind",
            b.run_dir,
            &["rbind", "rw", "nosuid", "nodev", "noexec"],
        )?,
    ];
    if let Some(sudo) = b.sudo {
        mounts.push(mount(
            sudo,
            "bind",
            &b.guest_bin_dir.join("kiln-sudo"),
            &["bind", "ro", "nodev"],
        )?);
    }

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::User,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(e)?,
        );
    }
    let mut net = LinuxNamespaceBuilder::default();
    net = net.typ(LinuxNamespaceType::Network);
    if let Some(path) = b.netns {
        net = net.path(path);
    }
    namespaces.push(net.build().map_err(e)?);

    let id_map = vec![LinuxIdMappingBuilder::default()
        .container_id(0u32)
        .host_id(b.ids.root())
        .size(ID_MAP_LEN)
        .build()
        .map_err(e)?];
    let mem = i64::try_from(b.limits.memory_mb)
        .unwrap_or(i64::MAX / MIB)
        .saturating_mul(MIB);
    let quota = i64::from(b.limits.cpu_count).saturating_mul(CPU_PERIOD_US as i64);
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(mem)
                .swap(mem)
                .build()
                .map_err(e)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()
                .map_err(e)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(
                    b.limits.pids_max.saturating_add(SENTRY_TASK_OVERHEAD),
                ))
                .build()
                .map_err(e)?,
        )
        .build()
        .map_err(e)?;
    let linux = LinuxBuilder::default()
        .uid_mappings(id_map.clone())
        .gid_mappings(id_map)
        .namespaces(namespaces)
        .resources(resources)
        .cgroups_path(cgroups_path(b.id))
        .build()
        .map_err(e)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(b.rootfs)
                .readonly(false)
                .build()
                .map_err(e)?,
        )
        .hostname(b.id)
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn spec_json(netns: Option<&Path>, cmd: Option<&[String]>) -> Value {
        spec_json_sudo(netns, cmd, None)
    }

    fn spec_json_sudo(netns: Option<&Path>, cmd: Option<&[String]>, sudo: Option<&str>) -> Value {
        spec_json_ids(netns, cmd, sudo, HostIds::CANONICAL)
    }

    fn spec_json_ids(
        netns: Option<&Path>,
        cmd: Option<&[String]>,
        sudo: Option<&str>,
        ids: HostIds,
    ) -> Value {
        let s = build(&BundleSpec {
            id: "sb1",
            rootfs: Path::new("/data/sb1/rootfs"),
            run_dir: Path::new("/data/sb1/run"),
            guest_bin_dir: Path::new("/usr/lib/kiln/guest"),
            limits: Limits {
                memory_mb: 256,
                cpu_count: 2,
                pids_max: 100,
                disk_mb: 1024,
            },
            netns,
            envd_command: cmd,
            sudo,
            ids,
        })
        .unwrap();
        serde_json::to_value(&s).unwrap()
    }

    #[test]
    fn process_root_hostname() {
        let v = spec_json(None, None);
        assert_eq!(v["hostname"], "sb1");
        assert_eq!(v["root"]["path"], "/data/sb1/rootfs");
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(
            v["process"]["args"],
            serde_json::json!(["/opt/kiln/bin/kiln-init"])
        );
        assert_eq!(v["process"]["user"]["uid"], 0);
        assert_eq!(v["process"]["noNewPrivileges"], false);
        assert!(v["process"]["env"][0]
            .as_str()
            .unwrap()
            .starts_with("PATH=/usr/local/sbin"));
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&Value::from("CAP_CHOWN")));
        assert!(!caps.contains(&Value::from("CAP_SYS_ADMIN")));
        assert_eq!(caps.len(), KEEP_CAPS.len());
        let cmd = vec!["/bin/sh".to_string(), "-c".into(), "x".into()];
        let v = spec_json(None, Some(&cmd));
        assert_eq!(
            v["process"]["args"],
            serde_json::json!(["/opt/kiln/bin/kiln-init", "--", "/bin/sh", "-c", "x"])
        );
    }

    #[test]
    fn limits_and_id_maps() {
        let v = spec_json(None, None);
        let l = &v["linux"];
        assert_eq!(l["cgroupsPath"], "/kiln/sb1");
        assert_eq!(l["resources"]["memory"]["limit"], 256 * 1024 * 1024);
        assert_eq!(l["resources"]["memory"]["swap"], 256 * 1024 * 1024);
        assert_eq!(l["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(l["resources"]["cpu"]["period"], 100_000);
        assert_eq!(
            l["resources"]["pids"]["limit"],
            100 + SENTRY_TASK_OVERHEAD as u64
        );
        let want = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        assert_eq!(l["uidMappings"], want);
        assert_eq!(l["gidMappings"], want);
        // A sandbox with a range of its own maps its ids there.
        let own = HostIds::slot(3).unwrap();
        let v = spec_json_ids(None, None, None, own);
        let want = serde_json::json!([{"containerID": 0, "hostID": own.root(), "size": 65536}]);
        assert_eq!(v["linux"]["uidMappings"], want);
        assert_eq!(v["linux"]["gidMappings"], want);
    }

    #[test]
    fn namespaces_follow_the_network_mode() {
        let v = spec_json(None, None);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 6);
        let net = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert!(net.get("path").is_none());
        let v = spec_json(Some(Path::new("/run/netns/kiln-sb1")), None);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let net = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(net["path"], "/run/netns/kiln-sb1");
        assert!(ns.iter().any(|n| n["type"] == "user"));
    }

    #[test]
    fn mounts() {
        let v = spec_json(None, None);
        let mounts = v["mounts"].as_array().unwrap();
        let find = |d: &str| mounts.iter().find(|m| m["destination"] == d).unwrap();
        let bin = find("/opt/kiln/bin");
        assert_eq!(bin["source"], "/usr/lib/kiln/guest");
        assert!(bin["options"]
            .as_array()
            .unwrap()
            .contains(&Value::from("ro")));
        assert_eq!(find("/run/kiln")["source"], "/data/sb1/run");
        assert!(find("/tmp")["options"]
            .as_array()
            .unwrap()
            .contains(&Value::from("size=128m")));
        assert_eq!(find("/dev/shm")["type"], "tmpfs");
        assert_eq!(find("/proc")["type"], "proc");
        assert_eq!(find("/dev/pts")["type"], "devpts");
    }

    #[test]
    fn sudo_is_kiln_sudo_and_init_starts_its_broker() {
        let v = spec_json(None, None);
        assert!(v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["destination"] != SUDO_PATH));
        let v = spec_json_sudo(None, None, Some(SUDO_PATH));
        let mounts = v["mounts"].as_array().unwrap();
        let sudo = mounts
            .iter()
            .find(|m| m["destination"] == SUDO_PATH)
            .unwrap();
        assert_eq!(sudo["source"], "/usr/lib/kiln/guest/kiln-sudo");
        assert_eq!(sudo["options"], serde_json::json!(["bind", "ro", "nodev"]));
        assert_eq!(
            v["process"]["args"],
            serde_json::json!(["/opt/kiln/bin/kiln-init", "--sudo-broker"])
        );
    }

    #[test]
    fn paths() {
        let p = BundlePaths::new(Path::new("/d"), "x1");
        assert_eq!(p.envd_socket(), Path::new("/d/x1/run/envd.sock"));
        assert_eq!(p.config(), Path::new("/d/x1/config.json"));
        assert_eq!(p.rootfs(), Path::new("/d/x1/rootfs"));
    }
}
