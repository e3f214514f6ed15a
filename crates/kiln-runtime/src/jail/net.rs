//! Sandbox networking: address plan, veth setup, host firewall chains, DNS config.
//!
//! Every Internet sandbox gets slot `n` of 10.77.0.0/16: the /30 `10.77.0.4n/30`, the
//! host end `kv<n>` = `.4n+1`, the sandbox's `eth0` = `.4n+2`, default route via the
//! host end. The host NATs 10.77.0.0/16 out of non-`kv` interfaces and, in dedicated
//! chains, drops kv→host, kv→kv, new connections into sandboxes and egress to
//! non-public address space ([`BLOCKED_EGRESS`], the host's own networks) except the
//! sandbox's DNS resolvers and the operator's allow-list ([`parse_egress_allow`]).
//! The operator's own rules go in `KILN-USER`, which Kiln creates but never flushes
//! and which sandbox traffic meets first. Loopback sandboxes only get `lo`.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

mod cidr;
pub mod egress;
mod firewall;

pub use self::cidr::{parse_egress_allow, CidrError, Ipv4Cidr};
pub use self::firewall::{
    dns_chain_rules, host_networks, install_host_rules, ip6tables_rules, iptables_rules,
    parse_host_networks, FirewallPlan, BLOCKED_EGRESS, DNS_CHAIN, HOOKS, USER_CHAIN,
};

/// Pool the sandbox subnets come from.
pub const POOL: &str = "10.77.0.0/16";
const POOL_BASE: u32 = u32::from_be_bytes([10, 77, 0, 0]);
/// Number of /30 slots in the pool.
pub const SLOTS: u32 = 1 << 14;
/// Prefix of host-side interface names (`kv0`, `kv1`, ...).
pub const IF_PREFIX: &str = "kv";
/// Name of the interface inside the sandbox.
pub const GUEST_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("all {SLOTS} sandbox network slots are in use")]
    Exhausted,
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("no IPv4 nameserver usable from a sandbox in {files} (loopback resolvers cannot be reached from another network namespace)")]
    NoNameserver { files: String },
    #[error("writing {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("recording the DNS rules in {path}")]
    DnsRecord {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The addresses of one sandbox slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    pub index: u32,
}

impl Slot {
    pub fn new(index: u32) -> Option<Slot> {
        (index < SLOTS).then_some(Slot { index })
    }
    fn base(self) -> u32 {
        POOL_BASE + self.index * 4
    }
    pub fn host_if(self) -> String {
        format!("{IF_PREFIX}{}", self.index)
    }
    pub fn host_ip(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }
    pub fn guest_ip(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }

    /// `ip -batch` commands run in the host namespace: create the pair with its
    /// sandbox end already inside the sandbox's network namespace (by pid).
    pub fn host_batch(self, pid: u32) -> String {
        self.host_batch_in(&pid.to_string())
    }

    /// Like [`Slot::host_batch`], with the namespace given by name (`ip netns`) or pid.
    pub fn host_batch_in(self, netns: &str) -> String {
        let (hif, hip) = (self.host_if(), self.host_ip());
        format!(
            "link add {hif} type veth peer name {GUEST_IF} netns {netns}\n\
             addr add {hip}/30 dev {hif}\n\
             link set {hif} up\n"
        )
    }

    /// `ip -batch` commands run inside the sandbox's network namespace.
    pub fn guest_batch(self) -> String {
        format!(
            "addr add {}/30 dev {GUEST_IF}\nlink set {GUEST_IF} up\nroute add default via {}\n",
            self.guest_ip(),
            self.host_ip()
        )
    }

    /// Per-interface sysctls of the host end: no IPv6 (a link-local address would
    /// reach host services around the IPv4 rules) and strict reverse-path filtering
    /// (a sandbox cannot send with another sandbox's source address).
    pub fn host_sysctls(self) -> Vec<(String, &'static str)> {
        let hif = self.host_if();
        vec![
            (format!("/proc/sys/net/ipv6/conf/{hif}/disable_ipv6"), "1"),
            (format!("/proc/sys/net/ipv4/conf/{hif}/rp_filter"), "1"),
        ]
    }
}

/// Slot allocator: lowest free index. One per process ([`slots`]), seeded from the
/// state files of sandboxes the runtimes find at startup.
#[derive(Debug, Default)]
pub struct Allocator {
    used: BTreeSet<u32>,
}

impl Allocator {
    pub fn reserve(&mut self, index: u32) {
        self.used.insert(index);
    }
    /// The lowest free slot for which `taken` (e.g. "a kv<n> device exists") is false.
    pub fn allocate(&mut self, taken: impl Fn(Slot) -> bool) -> Result<Slot, NetError> {
        for index in 0..SLOTS {
            if self.used.contains(&index) {
                continue;
            }
            let slot = Slot { index };
            if taken(slot) {
                continue;
            }
            self.used.insert(index);
            return Ok(slot);
        }
        Err(NetError::Exhausted)
    }
    pub fn release(&mut self, index: u32) {
        self.used.remove(&index);
    }
}

/// Run `program args`, feeding `stdin`; error with its stderr on failure.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetError> {
    let spawn_err = |source| NetError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetError::Command {
        program: format!("{program} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|source| NetError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// Host half of a sandbox's network: the veth pair (sandbox end moved into the
/// namespace of `pid`), the host end's address and sysctls.
pub fn setup_host_side(slot: Slot, pid: u32) -> Result<(), NetError> {
    setup_host_side_in(slot, &pid.to_string())
}

/// Like [`setup_host_side`], with the namespace given by name (`ip netns`) or pid.
pub fn setup_host_side_in(slot: Slot, netns: &str) -> Result<(), NetError> {
    run("ip", &["-batch", "-"], Some(&slot.host_batch_in(netns)))?;
    for (path, value) in slot.host_sysctls() {
        write_sysctl(&path, value)?;
    }
    Ok(())
}

/// Delete the sandbox's own egress rules and the host end (which deletes the pair). A missing device is fine: the pair
/// disappears on its own when the sandbox's network namespace dies.
pub fn remove_host_side(slot: Slot) -> Result<(), NetError> {
    egress::clear(slot)?;
    if !Path::new("/sys/class/net").join(slot.host_if()).exists() {
        return Ok(());
    }
    match run("ip", &["link", "del", &slot.host_if()], None) {
        // The namespace can die between the check and the delete: same outcome.
        Err(NetError::Command { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("No such device") =>
        {
            Ok(())
        }
        other => other,
    }
}

/// IPv4 nameservers from a resolv.conf, without loopback ones.
pub fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some("nameserver"))
                .then(|| parts.next())
                .flatten()
        })
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect()
}

/// The host's IPv4 resolvers a sandbox can use: from `/etc/resolv.conf`, or
/// systemd-resolved's upstreams when the host points at a local stub.
pub fn host_nameservers() -> Result<Vec<Ipv4Addr>, NetError> {
    const FILES: [&str; 2] = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];
    for file in FILES {
        let servers = std::fs::read_to_string(file)
            .map(|s| nameservers(&s))
            .unwrap_or_default();
        if !servers.is_empty() {
            return Ok(servers);
        }
    }
    Err(NetError::NoNameserver {
        files: FILES.join(", "),
    })
}

/// The resolv.conf for Internet sandboxes: the host's nameservers (see
/// [`host_nameservers`]). Resolvers are often private addresses (a LAN router, a VPC
/// resolver) that the egress rules refuse, so this also makes sure KILN-DNS accepts
/// port 53 of exactly these addresses.
pub fn sandbox_resolv_conf() -> Result<String, NetError> {
    let servers = host_nameservers()?;
    firewall::ensure_dns_rules(&servers)?;
    Ok(servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect())
}

/// The slots of every runtime of this process: the jail and gVisor backends of one
/// server share the 10.77.0.0/16 plan, so they allocate from one set (other processes'
/// slots are seen through their `kv<n>` devices).
pub(crate) fn slots() -> std::sync::MutexGuard<'static, Allocator> {
    static SLOTS: std::sync::Mutex<Allocator> = std::sync::Mutex::new(Allocator {
        used: BTreeSet::new(),
    });
    // A panic while holding this lock cannot leave the set inconsistent.
    SLOTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Host-wide claims on slots, one file per slot, so that processes (two servers, or
/// tests running in parallel) never pick the same slot between the allocation and the
/// creation of its `kv<n>` device. `/run` is emptied by a reboot.
const CLAIMS_DIR: &str = "/run/kiln-net-slots";
/// A claim whose device still does not exist after this long was left by a process
/// that died between the two (creating the device takes well under a second).
const STALE_CLAIM: std::time::Duration = std::time::Duration::from_secs(60);

/// Claims `slot` in `dir` (`O_EXCL`); a stale claim without its device is taken over.
fn claim(dir: &Path, slot: Slot, device_exists: bool) -> bool {
    let path = dir.join(slot.index.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{}", std::process::id()))
    };
    if std::fs::create_dir_all(dir).is_err() {
        return !device_exists;
    }
    match create() {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let age = super::claim_age(&path);
            !device_exists
                && age > STALE_CLAIM
                && std::fs::remove_file(&path).is_ok()
                && create().is_ok()
        }
        Err(_) => false,
    }
}

/// Marks `index` as used by a sandbox found at startup: in this process's set, and on
/// the host unless a claim is there already (after a reboot a checkpointed gVisor
/// sandbox gets its slot's devices back at resume).
pub(crate) fn reserve(index: u32) {
    slots().reserve(index);
    let dir = Path::new(CLAIMS_DIR);
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(index.to_string()));
}

/// Gives `index` back: to this process's set and on the host.
pub(crate) fn release(index: u32) {
    slots().release(index);
    let _ = std::fs::remove_file(Path::new(CLAIMS_DIR).join(index.to_string()));
}

/// A network slot for a sandbox that asks for internet access (none for loopback only).
/// Slots whose host interface exists or that another process claimed are skipped.
pub(crate) fn allocate_for(
    slots: &mut Allocator,
    id: &str,
    network: crate::NetworkMode,
) -> Result<Option<Slot>, crate::RuntimeError> {
    match network {
        crate::NetworkMode::Loopback => Ok(None),
        crate::NetworkMode::Internet => {
            let taken = |s: Slot| {
                let exists = Path::new("/sys/class/net").join(s.host_if()).exists();
                exists || !claim(Path::new(CLAIMS_DIR), s, exists)
            };
            slots
                .allocate(taken)
                .map(Some)
                .map_err(|e| crate::RuntimeError::Start {
                    id: id.to_string(),
                    reason: crate::jail::chain(&e),
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_addresses() {
        let s = Slot::new(0).unwrap();
        assert_eq!(
            (s.host_ip(), s.guest_ip()),
            ("10.77.0.1".parse().unwrap(), "10.77.0.2".parse().unwrap())
        );
        let s = Slot::new(70).unwrap();
        assert_eq!(s.host_if(), "kv70");
        assert_eq!(s.host_ip(), "10.77.1.25".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.guest_ip(), "10.77.1.26".parse::<Ipv4Addr>().unwrap());
        let last = Slot::new(SLOTS - 1).unwrap();
        assert_eq!(
            last.guest_ip(),
            "10.77.255.254".parse::<Ipv4Addr>().unwrap()
        );
        assert!(Slot::new(SLOTS).is_none());
        // Interface names must fit IFNAMSIZ (15 bytes).
        assert!(last.host_if().len() <= 15);
    }

    #[test]
    fn claims_are_exclusive_and_stale_ones_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = Slot::new(5).unwrap();
        assert!(claim(dir.path(), s, false));
        // Held by someone (here: us) and fresh: not again, device or not.
        assert!(!claim(dir.path(), s, false));
        assert!(!claim(dir.path(), s, true));
        // Old and without its device: the claimant died before creating it.
        let file = std::fs::File::options()
            .write(true)
            .open(dir.path().join("5"))
            .unwrap();
        file.set_modified(std::time::SystemTime::now() - STALE_CLAIM * 2)
            .unwrap();
        assert!(!claim(dir.path(), s, true), "its device exists: in use");
        assert!(claim(dir.path(), s, false));
        assert!(!claim(dir.path(), s, false), "the new claim is fresh");
    }

    #[test]
    fn the_process_has_one_set_of_slots() {
        // What the jail and gVisor backends of one server both call.
        let a = slots().allocate(|_| false).unwrap();
        let b = slots().allocate(|_| false).unwrap();
        assert_ne!(a.index, b.index);
        slots().release(a.index);
        slots().release(b.index);
    }

    #[test]
    fn allocator_reuses_lowest_free_and_skips_taken() {
        let mut a = Allocator::default();
        a.reserve(0);
        let s = a.allocate(|s| s.index == 1).unwrap();
        assert_eq!(s.index, 2);
        assert_eq!(a.allocate(|_| false).unwrap().index, 1);
        a.release(0);
        assert_eq!(a.allocate(|_| false).unwrap().index, 0);
        assert!(matches!(a.allocate(|_| true), Err(NetError::Exhausted)));
    }

    #[test]
    fn batches() {
        let s = Slot::new(3).unwrap();
        assert_eq!(
            s.host_batch(4242),
            "link add kv3 type veth peer name eth0 netns 4242\naddr add 10.77.0.13/30 dev kv3\nlink set kv3 up\n"
        );
        assert_eq!(
            s.guest_batch(),
            "addr add 10.77.0.14/30 dev eth0\nlink set eth0 up\nroute add default via 10.77.0.13\n"
        );
        assert!(s.host_sysctls()[0].0.ends_with("/kv3/disable_ipv6"));
    }

    #[test]
    fn parses_nameservers() {
        let conf = "# x\nnameserver 10.255.255.53\nnameserver 127.0.0.53\nnameserver ::1\nsearch lan\nnameserver 1.1.1.1\n";
        let want: Vec<Ipv4Addr> =
            vec!["10.255.255.53".parse().unwrap(), "1.1.1.1".parse().unwrap()];
        assert_eq!(nameservers(conf), want);
        assert!(nameservers("nameserver 127.0.0.53\n").is_empty());
    }
}
