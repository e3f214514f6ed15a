//! Per-sandbox cgroups: limits, membership, usage, removal.
//!
//! One small trait, [`Cgroups`], with a v1 backend (one directory per controller,
//! `<controller-mount>/kiln/<id>`) and a v2 backend (`<root>/kiln/<id>`). Both only
//! read and write files under a root directory, so their logic is unit-tested against
//! a fake cgroupfs in a temporary directory.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Limits;

/// Name of the parent cgroup that holds every sandbox's cgroup.
pub const PARENT: &str = "kiln";
/// CFS period used for the CPU quota (100 ms, the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy found under {root} (need v1 memory, cpu, cpuacct and pids controllers, or v2)")]
    NotFound { root: PathBuf },
    #[error("cgroup {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected content in {path}: {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("cgroup of sandbox {id} still has processes after {waited:?}")]
    Busy { id: String, waited: Duration },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Usage read from a sandbox's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_ns: u64,
    pub mem_used_bytes: u64,
    pub mem_cache_bytes: u64,
    pub mem_limit_bytes: u64,
}

/// The cgroup operations the jail needs, for one hierarchy layout.
pub trait Cgroups: Send + Sync + std::fmt::Debug {
    /// "v1" or "v2".
    fn version(&self) -> &'static str;
    /// Create the sandbox's cgroup(s) and write the limits.
    fn create(&self, id: &str, limits: &Limits) -> Result<(), CgroupError>;
    /// Move `pid` into the sandbox's cgroup(s).
    fn attach(&self, id: &str, pid: u32) -> Result<(), CgroupError>;
    /// Pids currently in the sandbox's cgroup (empty if it does not exist).
    fn procs(&self, id: &str) -> Result<Vec<u32>, CgroupError>;
    fn stats(&self, id: &str) -> Result<CgroupStats, CgroupError>;
    /// Remove the sandbox's cgroup directories (they must be empty). Missing is fine.
    fn remove(&self, id: &str) -> Result<(), CgroupError>;
    /// Every directory this backend creates for `id` (for leak checks).
    fn dirs(&self, id: &str) -> Vec<PathBuf>;
    /// Ask the kernel to freeze (or thaw) every task of the sandbox.
    fn request_frozen(&self, id: &str, frozen: bool) -> Result<(), CgroupError>;
    /// Whether the sandbox has reached the state last requested.
    fn is_frozen(&self, id: &str) -> Result<bool, CgroupError>;
}

/// Freeze (`true`) or thaw the sandbox's tasks and wait until the kernel says done.
pub fn set_frozen(
    cg: &dyn Cgroups,
    id: &str,
    frozen: bool,
    timeout: Duration,
) -> Result<(), CgroupError> {
    cg.request_frozen(id, frozen)?;
    let deadline = Instant::now() + timeout;
    loop {
        if cg.is_frozen(id)? == frozen {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Busy {
                id: id.to_string(),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Detect the layout under `root` (normally `/sys/fs/cgroup`). v1 wins when its
/// memory controller is mounted (hosts like this one also mount an empty v2 tree at
/// `unified`).
pub fn detect(root: &Path) -> Result<Box<dyn Cgroups>, CgroupError> {
    let v1 = V1::new(root);
    if V1::CONTROLLERS
        .iter()
        .all(|c| root.join(c).join("cgroup.procs").exists())
    {
        return Ok(Box::new(v1));
    }
    if root.join("cgroup.controllers").exists() {
        return Ok(Box::new(V2::new(root)));
    }
    Err(CgroupError::NotFound {
        root: root.to_path_buf(),
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io("write", path))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io("read", path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let content = read(path)?;
    let trimmed = content.trim();
    if trimmed == "max" {
        return Ok(u64::MAX);
    }
    trimmed.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        content,
    })
}

/// A `key value` line from files like `memory.stat` or `cpu.stat`.
fn read_keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let content = read(path)?;
    for line in content.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() == Some(key) {
            if let Some(Ok(v)) = parts.next().map(str::parse) {
                return Ok(v);
            }
        }
    }
    Err(CgroupError::Parse {
        path: path.to_path_buf(),
        content,
    })
}

fn read_procs(path: &Path) -> Result<Vec<u32>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        // A cgroup being removed under us (runsc deletes its own when the sandbox
        // dies) answers ENODEV: it has no processes left either way.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(Vec::new()),
        Err(e) => Err(CgroupError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io {
            op: "mkdir",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// `rmdir` with a few retries: the kernel can report EBUSY for a moment after the
/// last task exits.
fn rmdir(path: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(CgroupError::Io {
                    op: "rmdir",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
    }
}

/// cgroup v1: `<root>/<controller>/kiln/<id>` for each controller.
#[derive(Debug, Clone)]
pub struct V1 {
    root: PathBuf,
}

impl V1 {
    /// Controllers a sandbox joins. `freezer` is joined so pause can be added later.
    pub const CONTROLLERS: [&'static str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

    pub fn new(root: &Path) -> Self {
        V1 {
            root: root.to_path_buf(),
        }
    }

    fn dir(&self, controller: &str, id: &str) -> PathBuf {
        self.root.join(controller).join(PARENT).join(id)
    }
}

impl Cgroups for V1 {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, id: &str, limits: &Limits) -> Result<(), CgroupError> {
        for c in Self::CONTROLLERS {
            mkdir(&self.root.join(c).join(PARENT))?;
            mkdir(&self.dir(c, id))?;
        }
        let mem = self.dir("memory", id);
        let bytes = limits.memory_mb.saturating_mul(MIB).to_string();
        write(&mem.join("memory.limit_in_bytes"), &bytes)?;
        // memory+swap equal to memory: no swap on top. Absent when the kernel runs
        // without swap accounting, in which case there is nothing to grant anyway.
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, &bytes)?;
        }
        let cpu = self.dir("cpu", id);
        write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        let quota = u64::from(limits.cpu_count).saturating_mul(CPU_PERIOD_US);
        write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        write(
            &self.dir("pids", id).join("pids.max"),
            &limits.pids_max.to_string(),
        )?;
        Ok(())
    }

    fn attach(&self, id: &str, pid: u32) -> Result<(), CgroupError> {
        for c in Self::CONTROLLERS {
            write(&self.dir(c, id).join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn procs(&self, id: &str) -> Result<Vec<u32>, CgroupError> {
        let mut all = Vec::new();
        for c in Self::CONTROLLERS {
            for pid in read_procs(&self.dir(c, id).join("cgroup.procs"))? {
                if !all.contains(&pid) {
                    all.push(pid);
                }
            }
        }
        Ok(all)
    }

    fn stats(&self, id: &str) -> Result<CgroupStats, CgroupError> {
        let mem = self.dir("memory", id);
        Ok(CgroupStats {
            cpu_usage_ns: read_u64(&self.dir("cpuacct", id).join("cpuacct.usage"))?,
            mem_used_bytes: read_u64(&mem.join("memory.usage_in_bytes"))?,
            mem_cache_bytes: read_keyed(&mem.join("memory.stat"), "cache")?,
            mem_limit_bytes: read_u64(&mem.join("memory.limit_in_bytes"))?,
        })
    }

    fn remove(&self, id: &str) -> Result<(), CgroupError> {
        for c in Self::CONTROLLERS {
            rmdir(&self.dir(c, id))?;
        }
        Ok(())
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        Self::CONTROLLERS.iter().map(|c| self.dir(c, id)).collect()
    }

    fn request_frozen(&self, id: &str, frozen: bool) -> Result<(), CgroupError> {
        let state = if frozen { "FROZEN" } else { "THAWED" };
        write(&self.dir("freezer", id).join("freezer.state"), state)
    }

    fn is_frozen(&self, id: &str) -> Result<bool, CgroupError> {
        // FREEZING is on the way there: not frozen yet.
        let path = self.dir("freezer", id).join("freezer.state");
        let state = fs::read_to_string(&path).map_err(io("read", &path))?;
        Ok(state.trim() == "FROZEN")
    }
}

/// cgroup v2: `<root>/kiln/<id>`, with the controllers enabled on the way down.
#[derive(Debug, Clone)]
pub struct V2 {
    root: PathBuf,
}

impl V2 {
    pub const CONTROLLERS: &'static str = "+cpu +memory +pids";

    pub fn new(root: &Path) -> Self {
        V2 {
            root: root.to_path_buf(),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(PARENT).join(id)
    }
}

impl Cgroups for V2 {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, id: &str, limits: &Limits) -> Result<(), CgroupError> {
        let parent = self.root.join(PARENT);
        write(&self.root.join("cgroup.subtree_control"), Self::CONTROLLERS)?;
        mkdir(&parent)?;
        write(&parent.join("cgroup.subtree_control"), Self::CONTROLLERS)?;
        let dir = self.dir(id);
        mkdir(&dir)?;
        write(
            &dir.join("memory.max"),
            &limits.memory_mb.saturating_mul(MIB).to_string(),
        )?;
        write(&dir.join("memory.swap.max"), "0")?;
        let quota = u64::from(limits.cpu_count).saturating_mul(CPU_PERIOD_US);
        write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        Ok(())
    }

    fn attach(&self, id: &str, pid: u32) -> Result<(), CgroupError> {
        write(&self.dir(id).join("cgroup.procs"), &pid.to_string())
    }

    fn procs(&self, id: &str) -> Result<Vec<u32>, CgroupError> {
        read_procs(&self.dir(id).join("cgroup.procs"))
    }

    fn stats(&self, id: &str) -> Result<CgroupStats, CgroupError> {
        let dir = self.dir(id);
        let usage_usec = read_keyed(&dir.join("cpu.stat"), "usage_usec")?;
        Ok(CgroupStats {
            cpu_usage_ns: usage_usec.saturating_mul(1000),
            mem_used_bytes: read_u64(&dir.join("memory.current"))?,
            mem_cache_bytes: read_keyed(&dir.join("memory.stat"), "file")?,
            mem_limit_bytes: read_u64(&dir.join("memory.max"))?,
        })
    }

    fn remove(&self, id: &str) -> Result<(), CgroupError> {
        rmdir(&self.dir(id))
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        vec![self.dir(id)]
    }

    fn request_frozen(&self, id: &str, frozen: bool) -> Result<(), CgroupError> {
        write(
            &self.dir(id).join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    fn is_frozen(&self, id: &str) -> Result<bool, CgroupError> {
        // `cgroup.events` says `frozen 1` once every task is stopped.
        Ok(read_keyed(&self.dir(id).join("cgroup.events"), "frozen")? == 1)
    }
}

/// SIGKILL every process of the sandbox's cgroup until it is empty.
pub fn kill_all(cg: &dyn Cgroups, id: &str, timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = cg.procs(id)?;
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                // The pid was listed in this sandbox's cgroup, so it is one of ours
                // (or already gone, which ESRCH reports harmlessly).
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Busy {
                id: id.to_string(),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_freezes_through_freezer_state() {
        let t = fake_v1();
        let cg = V1::new(t.path());
        cg.create("abc", &LIMITS).unwrap();
        let state = t.path().join("freezer/kiln/abc/freezer.state");
        // The fake kernel reaches the state at once; the real one passes FREEZING.
        set_frozen(&cg, "abc", true, Duration::from_secs(1)).unwrap();
        assert_eq!(read_trim(state.clone()), "FROZEN");
        fs::write(&state, "FREEZING").unwrap();
        assert!(!cg.is_frozen("abc").unwrap());
        set_frozen(&cg, "abc", false, Duration::from_secs(1)).unwrap();
        assert_eq!(read_trim(state), "THAWED");
    }

    #[test]
    fn v2_freezes_through_cgroup_freeze_and_waits_for_events() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let cg = V2::new(t.path());
        cg.create("abc", &LIMITS).unwrap();
        let dir = t.path().join("kiln/abc");
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        // The kernel has not reported `frozen 1`: the wait times out with a clear error.
        let err = set_frozen(&cg, "abc", true, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, CgroupError::Busy { .. }), "{err}");
        assert_eq!(read_trim(dir.join("cgroup.freeze")), "1");
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        set_frozen(&cg, "abc", true, Duration::from_secs(1)).unwrap();
    }

    const LIMITS: Limits = Limits {
        memory_mb: 512,
        cpu_count: 2,
        pids_max: 256,
        disk_mb: 1024,
    };

    fn read_trim(p: PathBuf) -> String {
        fs::read_to_string(p).unwrap().trim().to_string()
    }

    fn fake_v1() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for c in V1::CONTROLLERS {
            fs::create_dir_all(t.path().join(c)).unwrap();
            fs::write(t.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        // Present only when swap accounting is on; the fake has it.
        t
    }

    #[test]
    fn detects_v1_when_controllers_are_mounted() {
        let t = fake_v1();
        fs::write(t.path().join("cgroup.controllers"), "").unwrap();
        assert_eq!(detect(t.path()).unwrap().version(), "v1");
    }

    #[test]
    fn detects_v2_and_reports_missing() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            detect(t.path()),
            Err(CgroupError::NotFound { .. })
        ));
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(detect(t.path()).unwrap().version(), "v2");
    }

    #[test]
    fn v1_writes_limits() {
        let t = fake_v1();
        let cg = V1::new(t.path());
        // Pretend swap accounting exists so the memsw limit is written too.
        fs::create_dir_all(t.path().join("memory/kiln/abc")).unwrap();
        fs::write(
            t.path().join("memory/kiln/abc/memory.memsw.limit_in_bytes"),
            "",
        )
        .unwrap();
        cg.create("abc", &LIMITS).unwrap();
        let mem = t.path().join("memory/kiln/abc");
        assert_eq!(read_trim(mem.join("memory.limit_in_bytes")), "536870912");
        assert_eq!(
            read_trim(mem.join("memory.memsw.limit_in_bytes")),
            "536870912"
        );
        assert_eq!(
            read_trim(t.path().join("cpu/kiln/abc/cpu.cfs_quota_us")),
            "200000"
        );
        assert_eq!(
            read_trim(t.path().join("cpu/kiln/abc/cpu.cfs_period_us")),
            "100000"
        );
        assert_eq!(read_trim(t.path().join("pids/kiln/abc/pids.max")), "256");
        assert!(t.path().join("freezer/kiln/abc").is_dir());
        cg.attach("abc", 42).unwrap();
        assert_eq!(cg.procs("abc").unwrap(), vec![42]);
        assert_eq!(cg.dirs("abc").len(), 5);
    }

    #[test]
    fn v1_stats() {
        let t = fake_v1();
        let cg = V1::new(t.path());
        cg.create("abc", &LIMITS).unwrap();
        fs::write(t.path().join("cpuacct/kiln/abc/cpuacct.usage"), "12345\n").unwrap();
        let mem = t.path().join("memory/kiln/abc");
        fs::write(mem.join("memory.usage_in_bytes"), "1000\n").unwrap();
        fs::write(
            mem.join("memory.stat"),
            "cache 300\nrss 700\ntotal_cache 300\n",
        )
        .unwrap();
        let s = cg.stats("abc").unwrap();
        assert_eq!(
            s,
            CgroupStats {
                cpu_usage_ns: 12345,
                mem_used_bytes: 1000,
                mem_cache_bytes: 300,
                mem_limit_bytes: 536870912
            }
        );
    }

    #[test]
    fn v2_writes_limits_and_enables_controllers() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let cg = V2::new(t.path());
        cg.create("abc", &LIMITS).unwrap();
        assert_eq!(
            read_trim(t.path().join("cgroup.subtree_control")),
            V2::CONTROLLERS
        );
        assert_eq!(
            read_trim(t.path().join("kiln/cgroup.subtree_control")),
            V2::CONTROLLERS
        );
        let d = t.path().join("kiln/abc");
        assert_eq!(read_trim(d.join("memory.max")), "536870912");
        assert_eq!(read_trim(d.join("memory.swap.max")), "0");
        assert_eq!(read_trim(d.join("cpu.max")), "200000 100000");
        assert_eq!(read_trim(d.join("pids.max")), "256");
        cg.attach("abc", 7).unwrap();
        assert_eq!(cg.procs("abc").unwrap(), vec![7]);
        assert_eq!(cg.dirs("abc"), vec![d]);
    }

    #[test]
    fn v2_stats() {
        let t = tempfile::tempdir().unwrap();
        let cg = V2::new(t.path());
        cg.create("abc", &LIMITS).unwrap();
        let d = t.path().join("kiln/abc");
        fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        fs::write(d.join("memory.current"), "4096\n").unwrap();
        fs::write(d.join("memory.stat"), "anon 1024\nfile 2048\n").unwrap();
        fs::write(d.join("memory.max"), "max\n").unwrap();
        let s = cg.stats("abc").unwrap();
        assert_eq!(s.cpu_usage_ns, 1_500_000);
        assert_eq!(s.mem_used_bytes, 4096);
        assert_eq!(s.mem_cache_bytes, 2048);
        assert_eq!(s.mem_limit_bytes, u64::MAX);
    }

    #[test]
    fn missing_cgroup_has_no_procs_and_bad_content_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let cg = V2::new(t.path());
        assert!(cg.procs("nope").unwrap().is_empty());
        cg.create("abc", &LIMITS).unwrap();
        fs::write(t.path().join("kiln/abc/memory.current"), "lots").unwrap();
        fs::write(t.path().join("kiln/abc/cpu.stat"), "usage_usec 1").unwrap();
        assert!(matches!(cg.stats("abc"), Err(CgroupError::Parse { .. })));
    }
}
