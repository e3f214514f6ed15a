//! Subordinate ids: does `/etc/subuid` or `/etc/subgid` give the host ids Kiln maps
//! sandboxes to (`kiln_runtime::idmap`, `jail::ids`) to another user?

use super::Check;

/// Host ids Kiln maps sandboxes to, `[start, end)`, with what uses them.
const KILN_ID_RANGES: [(u64, u64, &str); 2] = [
    (100_000, 165_536, "template and build ids 100000-165535"),
    (
        0x2000_0000,
        0x3000_0000,
        "per-sandbox ids 536870912-805306367",
    ),
];
/// The owner name README suggests for Kiln's own `/etc/subuid` entries.
const KILN_SUBID_OWNER: &str = "kiln";

/// One `owner:start:count` line of `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SubidEntry {
    owner: String,
    start: u64,
    count: u64,
}

fn parse_subids(text: &str) -> Vec<SubidEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let owner = f.next()?.trim().to_string();
            let start = f.next()?.trim().parse().ok()?;
            let count = f.next()?.trim().parse().ok()?;
            Some(SubidEntry {
                owner,
                start,
                count,
            })
        })
        .collect()
}

/// Entries of `file` that give ids Kiln uses to someone other than `kiln`.
fn subid_overlaps(file: &str, entries: &[SubidEntry]) -> Vec<String> {
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| e.owner != KILN_SUBID_OWNER) {
        let end = e.start.saturating_add(e.count);
        for (start, stop, what) in KILN_ID_RANGES {
            if e.start < stop && start < end {
                out.push(format!(
                    "{file} gives {}-{} to {} (Kiln's {what})",
                    e.start,
                    end.saturating_sub(1),
                    e.owner
                ));
            }
        }
    }
    out
}

/// `files`: each file's name and contents (`None`: missing).
pub(super) fn check_subids(files: &[(&str, Option<String>)]) -> Check {
    const NAME: &str = "subordinate ids";
    let mut overlaps = Vec::new();
    let mut reserved = true;
    for (file, text) in files {
        let entries = parse_subids(text.as_deref().unwrap_or(""));
        overlaps.extend(subid_overlaps(file, &entries));
        reserved &= KILN_ID_RANGES.iter().all(|&(start, stop, _)| {
            entries.iter().any(|e| {
                e.owner == KILN_SUBID_OWNER && e.start <= start && stop <= e.start + e.count
            })
        });
    }
    let reserve = "kiln:100000:65536 and kiln:536870912:268435456 in /etc/subuid and /etc/subgid";
    if !overlaps.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "{}: that user's containers would share host ids with Kiln's sandboxes \
                 (per-sandbox ranges overlapping it are skipped)",
                overlaps.join("; ")
            ),
            format!("move those ranges elsewhere and reserve Kiln's: {reserve}"),
        );
    }
    if reserved {
        Check::ok(NAME, "Kiln's ranges are reserved for kiln, no overlap")
    } else {
        Check::ok(
            NAME,
            format!("no entry overlaps Kiln's ids (to keep other tools off them: {reserve})"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn subid_entries_of_other_users_over_kilns_ranges_warn() {
        let text = "# comment\nalice:100000:65536\nbob:165536:65536\n\
                    kiln:536870912:268435456\nbroken line\ncarol:536936448:10\n";
        let entries = parse_subids(text);
        assert_eq!(entries.len(), 4);
        assert_eq!(
            entries[0],
            SubidEntry {
                owner: "alice".into(),
                start: 100_000,
                count: 65_536
            }
        );
        let overlaps = subid_overlaps("/etc/subuid", &entries);
        // alice has the template ids; bob starts right after them; kiln's own entry is
        // fine; carol sits inside the per-sandbox ranges.
        assert_eq!(
            overlaps,
            [
                "/etc/subuid gives 100000-165535 to alice (Kiln's template and build ids \
                 100000-165535)",
                "/etc/subuid gives 536936448-536936457 to carol (Kiln's per-sandbox ids \
                 536870912-805306367)",
            ]
        );
        let c = check_subids(&[("/etc/subuid", Some(text.into())), ("/etc/subgid", None)]);
        assert_eq!(c.level, Level::Warn);
        assert!(c.to_string().contains("— fix: move those ranges"), "{c}");
        // The range just below the per-sandbox plan does not overlap.
        assert!(subid_overlaps("f", &parse_subids("d:536805376:65536")).is_empty());
    }

    #[test]
    fn subids_without_overlap_are_ok_and_say_whether_reserved() {
        let kiln = "kiln:100000:65536\nkiln:536870912:268435456\nalice:200000:65536\n";
        let c = check_subids(&[
            ("/etc/subuid", Some(kiln.into())),
            ("/etc/subgid", Some(kiln.into())),
        ]);
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("reserved for kiln"), "{c}");
        let c = check_subids(&[("/etc/subuid", None), ("/etc/subgid", Some(String::new()))]);
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("kiln:100000:65536"), "{c}");
    }
}
