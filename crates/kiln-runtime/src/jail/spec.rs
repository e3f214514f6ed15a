//! What the runtime hands the `kiln-jail` helper, what the helper answers, what it
//! persists (`state.json`), and where a sandbox's files live on the host.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::net::Slot;
use crate::idmap::HostIds;
use crate::Limits;

/// The helper's input, one JSON document on its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperSpec {
    pub id: String,
    pub rootfs: PathBuf,
    /// `<data>/sandboxes`: the sandbox's files go to `state_dir/<id>/`.
    pub state_dir: PathBuf,
    /// Host directory bind-mounted read-only at `/opt/kiln/bin`.
    pub guest_bin_dir: PathBuf,
    pub limits: Limits,
    /// `None`: loopback only.
    pub slot: Option<Slot>,
    /// Replaces kiln-init's default envd command (`kiln-init -- <command>`).
    pub envd_command: Option<Vec<String>>,
    /// The sandbox's host ids (allocated by the runtime; the helper records them in
    /// `<dir>/idmap` before anything else of the sandbox exists).
    pub ids: HostIds,
}

/// The helper's success answer, one JSON line on its stdout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelperReply {
    /// Host pid of the sandbox's PID 1 (kiln-init).
    pub pid: u32,
}

/// `state_dir/<id>/state.json`, written by the helper before it answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxState {
    pub id: String,
    pub pid: u32,
    /// Start time of `pid` (field 22 of `/proc/<pid>/stat`), so a recycled pid is never
    /// taken for the sandbox.
    pub pid_start_time: u64,
    pub helper_pid: u32,
    pub limits: Limits,
    pub slot: Option<Slot>,
    pub cgroup_version: String,
    /// Host uid (and gid) that owns the sandbox's user namespace ([`namespace_owner`]);
    /// absent in state written before owners existed (those were owned by root).
    #[serde(default)]
    pub owner_id: Option<u32>,
}

/// First host id of the range that owns sandboxes' user namespaces: sandbox `n`'s
/// namespace belongs to `OWNER_BASE + <host pid of its kiln-jail helper>`. Far from
/// the ids `/etc/subuid` hands out and from any real user; no host process may run as
/// one of them (an owner holds every capability in the namespaces it owns).
pub const OWNER_BASE: u32 = 0x7000_0000;

/// The host id that owns the user namespace of the sandbox whose helper has host pid
/// `helper_pid`. Unique among live sandboxes, since the helper lives as long as its
/// sandbox. Why an owner per sandbox: the kernel charges per-user limits of a user
/// namespace's processes (inotify instances and watches, user namespaces, processes,
/// message queues) to the namespace's owner in the host's namespace too; with host
/// root as every sandbox's owner, one sandbox could use up root's budget and starve
/// its neighbours (and the host's own root). With its own owner, each sandbox gets the
/// host's per-user limits to itself.
pub fn namespace_owner(helper_pid: u32) -> u32 {
    OWNER_BASE.saturating_add(helper_pid)
}

/// The host paths of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        SandboxPaths {
            dir: state_dir.join(id),
        }
    }
    /// The sandbox's disk image (a sparse ext4 file of the disk cap's size).
    pub fn disk_image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    /// Where the disk image is mounted (host mount namespace); holds `upper/` and
    /// `work/`.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
    /// The directory holding `upper/` and `work/`: the disk, or the sandbox directory
    /// itself for a sandbox started before disks existed (its `upper/` is there).
    fn layers(&self) -> PathBuf {
        if self.dir.join("upper").is_dir() {
            self.dir.clone()
        } else {
            self.disk()
        }
    }
    /// Overlay upper layer: everything the sandbox writes.
    pub fn upper(&self) -> PathBuf {
        self.layers().join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.layers().join("work")
    }
    /// Mount point of the merged root filesystem (inside the helper's mount namespace).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// Bind-mounted at `/run/kiln` in the sandbox; holds envd's socket.
    pub fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn envd_socket(&self) -> PathBuf {
        self.run().join("envd.sock")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The OCI bundle's runtime spec (gvisor runtime only).
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// Console of the sandbox (kiln-init's and envd's stdout/stderr) and helper log.
    /// Root in the sandbox can write to its console (`/proc/1/fd/1`), so the file lives
    /// on the sandbox's own disk, where those writes count against its cap instead of
    /// filling the data directory. (`<dir>/log` for a sandbox started before disks.)
    pub fn log(&self) -> PathBuf {
        let old = self.dir.join("log");
        if old.exists() {
            old
        } else {
            self.disk().join("console.log")
        }
    }
    /// The sandbox's host id range (`ids::RECORD`), host-owned.
    pub fn idmap(&self) -> PathBuf {
        self.dir.join(crate::idmap::RECORD)
    }
    /// Written by the helper when PID 1 exits: its wait status.
    pub fn exit(&self) -> PathBuf {
        self.dir.join("exit")
    }
}

/// Sandbox ids are `[a-z0-9]+`, at most 63 bytes (a DNS label and a hostname).
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!(
            "sandbox id must be 1 to 63 characters, got {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!("sandbox id {id:?} may contain only a-z and 0-9"));
    }
    Ok(())
}

/// Start time of a process (clock ticks since boot), or `None` if it is gone.
pub fn pid_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of `/proc/<pid>/stat`; the command name (field 2) may contain spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl SandboxState {
    /// Whether the recorded PID 1 is still the same running process.
    pub fn is_alive(&self) -> bool {
        pid_start_time(self.pid) == Some(self.pid_start_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("abc123").is_ok());
        for bad in ["", "ABC", "a-b", "../x", "a b", &"a".repeat(64)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn start_time_parsing() {
        let stat =
            "123 (a (b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("garbage"), None);
        let me = std::process::id();
        assert!(pid_start_time(me).is_some());
    }

    #[test]
    fn namespace_owners_are_distinct_and_far_from_subordinate_ids() {
        assert_ne!(namespace_owner(100), namespace_owner(101));
        // Linux pids stay below 2^22; the range never reaches (uid_t)-1.
        assert!(namespace_owner(1 << 22) < u32::MAX - 1);
        assert!(namespace_owner(1) > crate::ID_MAP_BASE + crate::ID_MAP_LEN);
    }

    #[test]
    fn state_roundtrip() {
        let s = SandboxState {
            id: "a1".into(),
            pid: 10,
            pid_start_time: 20,
            helper_pid: 9,
            limits: Limits {
                memory_mb: 1,
                cpu_count: 1,
                pids_max: 1,
                disk_mb: 64,
            },
            slot: Slot::new(4),
            cgroup_version: "v1".into(),
            owner_id: Some(namespace_owner(9)),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SandboxState>(&json).unwrap(), s);
        // state.json written before disk caps existed still parses, with the default.
        let old = json.replace(r#","disk_mb":64"#, "");
        assert_ne!(old, json);
        let parsed: SandboxState = serde_json::from_str(&old).unwrap();
        assert_eq!(parsed.limits.disk_mb, crate::DEFAULT_DISK_MB);
    }

    #[test]
    fn layers_live_on_the_disk() {
        let t = tempfile::tempdir().unwrap();
        let p = SandboxPaths::new(t.path(), "abc");
        assert_eq!(p.upper(), t.path().join("abc/disk/upper"));
        assert_eq!(p.work(), t.path().join("abc/disk/work"));
        assert_eq!(p.disk_image(), t.path().join("abc/disk.img"));
        // A sandbox from before disks keeps its layers where they were.
        std::fs::create_dir_all(t.path().join("abc/upper")).unwrap();
        assert_eq!(p.upper(), t.path().join("abc/upper"));
        assert_eq!(p.work(), t.path().join("abc/work"));
    }
}
