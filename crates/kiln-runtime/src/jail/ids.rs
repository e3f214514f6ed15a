//! Host id ranges of sandboxes (jail and gVisor): each live sandbox maps its ids
//! `0..65535` to a range of 65 536 host ids of its own, so root in one sandbox and root
//! in the next are different host uids (their files, their processes, limits kept per host uid).
//!
//! Range `n` is `RANGE_BASE + n × 65536`, `n < RANGE_SLOTS`: host ids `0x2000_0000` to
//! `0x3000_0000`, far above what `/etc/subuid` hands out by default (`100000` + 65 536
//! per user) and below the namespace owners (`spec::OWNER_BASE`, `0x7000_0000`). A
//! range that overlaps an entry of `/etc/subuid` or `/etc/subgid` is skipped.
//!
//! Template builds keep the canonical range ([`HostIds::CANONICAL`], host `100000`):
//! their upper directories become template layers, which are stored owned by it.
//!
//! Allocation mirrors the network slots (`net.rs`): one set per process (lowest free
//! index), plus a host-wide claim per range, a file `/run/kiln-id-slots/<n>` created
//! with `O_EXCL` and naming the sandbox directory that holds it, so two servers (or
//! parallel tests) never pick the same range. The range is recorded in the sandbox's
//! own directory (`<dir>/idmap`, host-owned, written by the helper before anything of
//! the sandbox exists), so it survives a server restart and a reboot: ranges recorded
//! by the directories under the runtime's state directory are taken, whatever the
//! claims say, and the runtime reserves them again at startup and at `adopt`. A claim
//! whose directory does not record its range after [`STALE_CLAIM`] was left by a
//! process that died before the helper wrote the record, and is taken over.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::idmap::{read_record, HostIds, IdsError, RANGE_SLOTS};
use crate::ID_MAP_LEN;

/// Host-wide claims (emptied by a reboot; records on disk outlive it).
pub const CLAIMS_DIR: &str = "/run/kiln-id-slots";
/// A claim whose sandbox directory does not record its range after this long belongs
/// to a start that died before the helper wrote the record (which takes milliseconds).
pub const STALE_CLAIM: Duration = Duration::from_secs(60);

/// The ranges recorded by the sandbox directories directly under `state_dir`.
pub fn recorded(state_dir: &Path) -> BTreeSet<u32> {
    std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| read_record(&e.path()).ok().flatten())
        .filter_map(HostIds::index)
        .collect()
}

/// `[start, start + count)` ranges of `/etc/subuid`-style text (`name:start:count`).
pub fn parse_subordinate(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let (_, start, count) = (f.next()?, f.next()?, f.next()?);
            let (start, count) = (
                start.trim().parse::<u64>().ok()?,
                count.trim().parse::<u64>().ok()?,
            );
            Some((start, start + count))
        })
        .collect()
}

fn overlaps(ids: HostIds, ranges: &[(u64, u64)]) -> bool {
    let (a, b) = (
        u64::from(ids.base),
        u64::from(ids.base) + u64::from(ID_MAP_LEN),
    );
    ranges.iter().any(|&(s, e)| s < b && a < e)
}

/// Where allocation looks (injectable for tests).
#[derive(Debug, Clone)]
pub struct Plan {
    pub claims_dir: PathBuf,
    /// `/etc/subuid` and `/etc/subgid`: ranges overlapping their entries are skipped.
    pub subordinate_files: Vec<PathBuf>,
}

impl Plan {
    pub fn host() -> Plan {
        Plan {
            claims_dir: PathBuf::from(CLAIMS_DIR),
            subordinate_files: vec!["/etc/subuid".into(), "/etc/subgid".into()],
        }
    }

    /// Every entry of the subordinate id files; a missing file has none.
    fn subordinate(&self) -> Result<Vec<(u64, u64)>, IdsError> {
        let mut out = Vec::new();
        for f in &self.subordinate_files {
            match std::fs::read_to_string(f) {
                Ok(text) => out.extend(parse_subordinate(&text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(IdsError::Read {
                        path: f.display().to_string(),
                        source,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Claims range `index` host-wide for the sandbox directory `owner` (`O_EXCL`). A
    /// stale claim (older than [`STALE_CLAIM`], its directory not recording the range)
    /// is taken over.
    fn claim(&self, index: u32, owner: &Path) -> bool {
        let path = self.claims_dir.join(index.to_string());
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|mut f| f.write_all(owner.as_os_str().as_encoded_bytes()))
        };
        if std::fs::create_dir_all(&self.claims_dir).is_err() {
            // No host-wide claims (as for network slots): this process's set and the
            // records on disk still keep its own sandboxes apart.
            return true;
        }
        match create() {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = super::claim_age(&path);
                let holder = std::fs::read(&path).unwrap_or_default();
                let recorded = read_record(Path::new(&*String::from_utf8_lossy(&holder)))
                    .ok()
                    .flatten()
                    .and_then(HostIds::index)
                    == Some(index);
                !recorded
                    && age > STALE_CLAIM
                    && std::fs::remove_file(&path).is_ok()
                    && create().is_ok()
            }
            Err(_) => false,
        }
    }

    /// Claims `index` for `owner` unless a claim is there (a sandbox found on disk).
    pub fn reserve_claim(&self, index: u32, owner: &Path) {
        let _ = std::fs::create_dir_all(&self.claims_dir);
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.claims_dir.join(index.to_string()))
            .and_then(|mut f| f.write_all(owner.as_os_str().as_encoded_bytes()));
    }

    /// Removes the claim on `index` if `owner` holds it.
    pub fn release_claim(&self, index: u32, owner: &Path) {
        let path = self.claims_dir.join(index.to_string());
        if std::fs::read(&path).is_ok_and(|h| h == owner.as_os_str().as_encoded_bytes()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Range allocator: lowest free index. One per process ([`ranges`]), seeded from the
/// records of the sandboxes the runtime finds at startup.
#[derive(Debug, Default)]
pub struct Allocator {
    used: BTreeSet<u32>,
}

impl Allocator {
    pub fn reserve(&mut self, index: u32) {
        self.used.insert(index);
    }

    pub fn release(&mut self, index: u32) {
        self.used.remove(&index);
    }

    /// A range for the sandbox whose directory will be `owner` (under `state_dir`):
    /// the lowest index this process does not use, that no directory under
    /// `state_dir` records, that overlaps no subordinate id entry, and that this call
    /// claims host-wide.
    pub fn allocate(
        &mut self,
        plan: &Plan,
        state_dir: &Path,
        owner: &Path,
    ) -> Result<HostIds, IdsError> {
        let subordinate = plan.subordinate()?;
        let recorded = recorded(state_dir);
        for index in 0..RANGE_SLOTS {
            let Some(ids) = HostIds::slot(index) else {
                break;
            };
            if self.used.contains(&index)
                || recorded.contains(&index)
                || overlaps(ids, &subordinate)
                || !plan.claim(index, owner)
            {
                continue;
            }
            self.used.insert(index);
            return Ok(ids);
        }
        Err(IdsError::Exhausted)
    }
}

/// Marks the range the sandbox directory `dir` records (a sandbox found on disk) as
/// used: in this process's set, and host-wide unless a claim is there already.
pub(crate) fn reserve_recorded(plan: &Plan, dir: &Path) {
    if let Some(index) = read_record(dir).ok().flatten().and_then(HostIds::index) {
        ranges().reserve(index);
        plan.reserve_claim(index, dir);
    }
}

/// Gives the range of the sandbox directory `dir` back (the directory is gone, or
/// never recorded it).
pub(crate) fn give_back(plan: &Plan, dir: &Path, ids: HostIds) {
    if let Some(index) = ids.index() {
        ranges().release(index);
        plan.release_claim(index, dir);
    }
}

/// The host ids of the sandbox directory `dir`: its record, else the canonical range
/// (a sandbox from before ranges existed, or none at all).
pub(crate) fn recorded_or_canonical(dir: &Path) -> HostIds {
    read_record(dir)
        .ok()
        .flatten()
        .unwrap_or(HostIds::CANONICAL)
}

/// The ids a new sandbox in `dir` gets: a range of its own, or the canonical one for a
/// template build step (its upper directory becomes a template layer, stored in that
/// range) and when ranges are off (`per_sandbox`).
pub(crate) fn allocate_for(
    plan: &Plan,
    state_dir: &Path,
    dir: &Path,
    per_sandbox: bool,
    config: &crate::SandboxConfig,
) -> Result<HostIds, crate::RuntimeError> {
    if !per_sandbox || config.host_ids == crate::HostIdMode::Canonical {
        return Ok(HostIds::CANONICAL);
    }
    ranges()
        .allocate(plan, state_dir, dir)
        .map_err(|e| crate::RuntimeError::Start {
            id: config.id.clone(),
            reason: super::chain(&e),
        })
}

/// The ranges of every runtime of this process (jail and gVisor sandboxes draw from
/// one set).
pub(crate) fn ranges() -> std::sync::MutexGuard<'static, Allocator> {
    static RANGES: std::sync::Mutex<Allocator> = std::sync::Mutex::new(Allocator {
        used: BTreeSet::new(),
    });
    // A panic while holding this lock cannot leave the set inconsistent.
    RANGES.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
