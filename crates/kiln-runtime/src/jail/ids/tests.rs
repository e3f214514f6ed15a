use std::sync::{Arc, Barrier, Mutex};

use super::*;
use crate::idmap::{write_record, RANGE_BASE, RECORD};
use crate::ID_MAP_BASE;

struct Host {
    _t: tempfile::TempDir,
    plan: Plan,
    state_dir: PathBuf,
}

/// A fake host: a claims directory, subordinate id files and a state directory.
fn host(subuid: &str, subgid: &str) -> Host {
    let t = tempfile::tempdir().unwrap();
    let (uid, gid) = (t.path().join("subuid"), t.path().join("subgid"));
    std::fs::write(&uid, subuid).unwrap();
    std::fs::write(&gid, subgid).unwrap();
    let state_dir = t.path().join("sandboxes");
    std::fs::create_dir(&state_dir).unwrap();
    Host {
        plan: Plan {
            claims_dir: t.path().join("claims"),
            subordinate_files: vec![uid, gid],
        },
        state_dir,
        _t: t,
    }
}

impl Host {
    fn dir(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
    }
    /// What the helper does: the sandbox's directory with its record.
    fn record(&self, id: &str, ids: HostIds) {
        std::fs::create_dir_all(self.dir(id)).unwrap();
        write_record(&self.dir(id), ids).unwrap();
    }
    fn allocate(&self, a: &mut Allocator, id: &str) -> HostIds {
        a.allocate(&self.plan, &self.state_dir, &self.dir(id))
            .unwrap()
    }
}

#[test]
fn ranges_are_disjoint_and_far_from_other_ids() {
    let first = HostIds::slot(0).unwrap();
    let last = HostIds::slot(RANGE_SLOTS - 1).unwrap();
    assert_eq!(first.base, 0x2000_0000);
    assert_eq!(HostIds::slot(1).unwrap().base, 0x2000_0000 + 65536);
    assert!(HostIds::slot(RANGE_SLOTS).is_none());
    assert_eq!(last.index(), Some(RANGE_SLOTS - 1));
    assert!(
        u64::from(last.base) + u64::from(ID_MAP_LEN) <= u64::from(super::super::spec::OWNER_BASE)
    );
    assert!(!first.contains(ID_MAP_BASE + ID_MAP_LEN));
    assert_eq!(HostIds::CANONICAL.index(), None);
    assert!(HostIds::CANONICAL.is_canonical() && !first.is_canonical());
    assert!(first.contains(first.host(65535)) && !first.contains(first.host(65536)));
    assert!(!HostIds::slot(1).unwrap().contains(first.host(1000)));
}

#[test]
fn map_lines_and_records() {
    let ids = HostIds::slot(3).unwrap();
    assert_eq!(ids.map_line(), "0 537067520 65536\n");
    assert_eq!(ids.layer_map_line(), "100000 537067520 65536\n");
    assert_eq!(HostIds::CANONICAL.map_line(), "0 100000 65536\n");
    assert_eq!(HostIds::parse(&ids.map_line()), Some(ids));
    assert_eq!(HostIds::parse("0 100000 65536"), Some(HostIds::CANONICAL));
    for bad in [
        "",
        "0 100000",
        "1 100000 65536",
        "0 100001 65536",
        "0 537067521 65536",
        "0 0 65536",
        "0 100000 65536 1",
        "0 100000 4096",
        "x y z",
    ] {
        assert_eq!(HostIds::parse(bad), None, "{bad:?}");
    }
    let t = tempfile::tempdir().unwrap();
    assert!(read_record(t.path()).unwrap().is_none());
    write_record(t.path(), ids).unwrap();
    assert_eq!(read_record(t.path()).unwrap(), Some(ids));
    std::fs::write(t.path().join(RECORD), "0 4242 65536\n").unwrap();
    assert!(matches!(
        read_record(t.path()),
        Err(IdsError::BadRecord { .. })
    ));
}

#[test]
fn no_two_live_sandboxes_share_a_range_and_a_kill_frees_it() {
    let h = host("", "");
    let mut a = Allocator::default();
    let got: Vec<HostIds> = (0..5)
        .map(|i| h.allocate(&mut a, &format!("s{i}")))
        .collect();
    let idx: Vec<u32> = got.iter().map(|r| r.index().unwrap()).collect();
    assert_eq!(idx, [0, 1, 2, 3, 4]);
    // Killing s1 frees its range: this process's set and its claim.
    a.release(1);
    h.plan.release_claim(1, &h.dir("s1"));
    assert_eq!(h.allocate(&mut a, "s5").index(), Some(1));
    // A claim is only released by its holder.
    h.plan.release_claim(2, &h.dir("s1"));
    a.release(2);
    assert_eq!(
        h.allocate(&mut a, "s6").index(),
        Some(5),
        "s2 still holds range 2"
    );
}

#[test]
fn concurrent_allocations_never_collide() {
    // Eight "processes" (allocators of their own) and eight threads of one process (one
    // shared allocator), all at once against one host.
    let h = Arc::new(host("", ""));
    let shared = Arc::new(Mutex::new(Allocator::default()));
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (h, shared, barrier) = (h.clone(), shared.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut own = Allocator::default();
                barrier.wait();
                let mut got = Vec::new();
                for j in 0..4 {
                    let id = format!("t{i}x{j}");
                    let ids = if i < 8 {
                        h.allocate(&mut own, &id)
                    } else {
                        h.allocate(&mut shared.lock().unwrap(), &id)
                    };
                    h.record(&id, ids);
                    got.push(ids.index().unwrap());
                }
                got
            })
        })
        .collect();
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "a range was handed out twice: {all:?}");
    assert_eq!(n, 64);
}

#[test]
fn ranges_recorded_on_disk_are_honoured_after_a_restart() {
    let h = host("", "");
    {
        let mut before = Allocator::default();
        for id in ["a", "b", "c"] {
            let ids = h.allocate(&mut before, id);
            h.record(id, ids);
        }
    }
    // "b" was killed (directory gone, claim released).
    std::fs::remove_dir_all(h.dir("b")).unwrap();
    h.plan.release_claim(1, &h.dir("b"));
    // A reboot empties /run: only the records remain. A new process's allocator starts
    // empty.
    std::fs::remove_dir_all(&h.plan.claims_dir).unwrap();
    let mut after = Allocator::default();
    assert_eq!(h.allocate(&mut after, "d").index(), Some(1));
    assert_eq!(h.allocate(&mut after, "e").index(), Some(3));
    // Build sandboxes record the canonical range, which is no slot.
    h.record("build1", HostIds::CANONICAL);
    assert_eq!(recorded(&h.state_dir), [0, 2].into_iter().collect());
}

#[test]
fn subordinate_id_entries_are_skipped() {
    let slot1 = HostIds::slot(1).unwrap().base;
    // subuid covers range 0 and one id of range 1; subgid one id of range 3.
    let subuid = format!(
        "# comment\n\nalice:100000:65536\nbob:{}:{}\n",
        RANGE_BASE,
        65536 + 1
    );
    let subgid = format!(
        "carol:{}:1\nbroken line\n",
        HostIds::slot(3).unwrap().base + 65535
    );
    let h = host(&subuid, &subgid);
    let mut a = Allocator::default();
    let got: Vec<u32> = (0..3)
        .map(|i| h.allocate(&mut a, &format!("s{i}")).index().unwrap())
        .collect();
    assert_eq!(got, [2, 4, 5]);
    assert_eq!(parse_subordinate("u:10:5\nv:x:1\nw:20\n"), vec![(10, 15)],);
    assert!(overlaps(
        HostIds { base: slot1 },
        &[(u64::from(slot1) + 65535, u64::from(slot1) + 65536)]
    ));
    assert!(!overlaps(
        HostIds { base: slot1 },
        &[(u64::from(slot1) + 65536, u64::from(slot1) + 70000)]
    ));
    // Missing files: no entries.
    let mut plan = h.plan.clone();
    plan.subordinate_files = vec![PathBuf::from("/nonexistent/subuid")];
    assert!(plan.subordinate().unwrap().is_empty());
}

#[test]
fn stale_claims_are_taken_over_unless_their_directory_records_the_range() {
    let h = host("", "");
    let age = |index: u32| {
        std::fs::File::options()
            .write(true)
            .open(h.plan.claims_dir.join(index.to_string()))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - STALE_CLAIM * 2)
            .unwrap();
    };
    // Claimed by a start that died before its helper wrote the record.
    assert!(h.plan.claim(0, &h.dir("dead")));
    assert!(!h.plan.claim(0, &h.dir("x")), "fresh: respected");
    age(0);
    // Claimed by a live sandbox of another state directory, recorded there.
    let other = tempfile::tempdir().unwrap();
    write_record(other.path(), HostIds::slot(1).unwrap()).unwrap();
    assert!(h.plan.claim(1, other.path()));
    age(1);
    let mut a = Allocator::default();
    assert_eq!(
        h.allocate(&mut a, "y").index(),
        Some(0),
        "stale claim taken over"
    );
    assert_eq!(
        h.allocate(&mut a, "z").index(),
        Some(2),
        "recorded claim respected"
    );
    // reserve_claim does not replace a claim.
    h.plan.reserve_claim(0, &h.dir("w"));
    assert_eq!(
        std::fs::read_to_string(h.plan.claims_dir.join("0")).unwrap(),
        h.dir("y").display().to_string()
    );
}
