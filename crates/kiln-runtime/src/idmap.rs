//! Which host ids a sandbox's ids are: the canonical range templates are stored in
//! (host `100000`), or a range of the sandbox's own (`docs/jail.md`, "Ids and
//! ownership"), recorded in the sandbox's host-owned directory. `jail::ids` allocates
//! ranges for both runtimes; the host's checks of what a guest made (`guest`) read
//! them here.

use std::path::Path;

use crate::{ID_MAP_BASE, ID_MAP_LEN};

/// First host id of the per-sandbox ranges.
pub const RANGE_BASE: u32 = 0x2000_0000;
/// Number of per-sandbox ranges (`0x2000_0000 + 4096 × 65536 = 0x3000_0000`).
pub const RANGE_SLOTS: u32 = 4096;
/// Name of the record in the sandbox's directory.
pub const RECORD: &str = "idmap";

#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error(
        "all {RANGE_SLOTS} sandbox id ranges are in use (or overlap /etc/subuid or /etc/subgid)"
    )]
    Exhausted,
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {line:?} is not `0 <host id> {ID_MAP_LEN}` with a host id Kiln hands out")]
    BadRecord { path: String, line: String },
}

/// Which host ids a sandbox's ids `0..65535` are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostIds {
    /// Host id of sandbox root.
    pub base: u32,
}

impl HostIds {
    /// The range templates are stored in (and build sandboxes use).
    pub const CANONICAL: HostIds = HostIds { base: ID_MAP_BASE };

    /// Range `index` of the per-sandbox plan.
    pub fn slot(index: u32) -> Option<HostIds> {
        (index < RANGE_SLOTS).then(|| HostIds {
            base: RANGE_BASE + index * ID_MAP_LEN,
        })
    }

    /// The per-sandbox range's index; `None` for the canonical range.
    pub fn index(self) -> Option<u32> {
        let off = self.base.checked_sub(RANGE_BASE)?;
        (off % ID_MAP_LEN == 0 && off / ID_MAP_LEN < RANGE_SLOTS).then_some(off / ID_MAP_LEN)
    }

    /// Whether the template's layers must be mounted idmapped (they are stored in the
    /// canonical range).
    pub fn is_canonical(self) -> bool {
        self == Self::CANONICAL
    }

    /// Host uid (and gid) of sandbox root.
    pub fn root(self) -> u32 {
        self.base
    }

    /// Host id of sandbox id `id` (`id` < 65536).
    pub fn host(self, id: u32) -> u32 {
        self.base + id
    }

    /// Whether `host_id` is one of the sandbox's ids.
    pub fn contains(self, host_id: u32) -> bool {
        (self.base..self.base.saturating_add(ID_MAP_LEN)).contains(&host_id)
    }

    /// The sandbox's `/proc/<pid>/uid_map` and `gid_map` (and the record's text).
    pub fn map_line(self) -> String {
        format!("0 {} {ID_MAP_LEN}\n", self.base)
    }

    /// uid_map/gid_map of the user namespace an idmapped mount of a template layer
    /// uses: on-disk ids (the canonical range) appear as this sandbox's ids.
    pub fn layer_map_line(self) -> String {
        format!("{ID_MAP_BASE} {} {ID_MAP_LEN}\n", self.base)
    }

    /// Parses a record (`0 <base> 65536`): the canonical range or one of the plan's.
    pub fn parse(text: &str) -> Option<HostIds> {
        let mut f = text.split_whitespace().map(str::parse::<u32>);
        let (Some(Ok(0)), Some(Ok(base)), Some(Ok(ID_MAP_LEN)), None) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return None;
        };
        let ids = HostIds { base };
        (ids.is_canonical() || ids.index().is_some()).then_some(ids)
    }
}

/// The host ids a sandbox directory records (`None`: no record, a sandbox started
/// before ranges existed: canonical).
pub fn read_record(sandbox_dir: &Path) -> Result<Option<HostIds>, IdsError> {
    let path = sandbox_dir.join(RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => HostIds::parse(&text)
            .map(Some)
            .ok_or_else(|| IdsError::BadRecord {
                path: path.display().to_string(),
                line: text.trim().chars().take(80).collect(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdsError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Writes the record into a sandbox's (fresh, host-owned) directory.
pub fn write_record(sandbox_dir: &Path, ids: HostIds) -> std::io::Result<()> {
    std::fs::write(sandbox_dir.join(RECORD), ids.map_line())
}
