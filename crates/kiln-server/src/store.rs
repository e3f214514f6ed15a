//! Persistent state: API keys and sandbox records.
//!
//! [`Store`] is the seam where Postgres will plug in for several nodes; today the one
//! implementation is [`SqliteStore`], a single SQLite file in the data directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the database at {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// An API key as stored: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub name: String,
    /// The first characters of the key (`e2b_1a2b…`), for listing.
    pub prefix: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Lifecycle states a sandbox record can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Running,
    Paused,
}

impl RecordState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Running => "running",
            RecordState::Paused => "paused",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "running" => Ok(RecordState::Running),
            "paused" => Ok(RecordState::Paused),
            other => Err(StoreError::Corrupt(format!(
                "unknown sandbox state {other:?}"
            ))),
        }
    }
}

/// What the control plane remembers about a sandbox across restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub template_id: String,
    pub state: RecordState,
    pub runtime: String,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_size_mb: u64,
    pub allow_internet_access: bool,
    pub access_token: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// The API key that created it.
    pub owner_key_id: i64,
    /// At the deadline, pause instead of kill (`autoPause` at create).
    pub auto_pause: bool,
}

/// The persistence operations the control plane needs.
pub trait Store: Send + Sync {
    fn insert_key(
        &self,
        name: &str,
        hash: &str,
        prefix: &str,
        admin: bool,
    ) -> Result<i64, StoreError>;
    /// The live (not revoked) key with this hash.
    fn find_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Revoke by id or prefix; returns how many keys were revoked.
    fn revoke_key(&self, id_or_prefix: &str) -> Result<usize, StoreError>;

    fn upsert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError>;
    fn set_end_at(&self, id: &str, end_at: DateTime<Utc>) -> Result<(), StoreError>;
    fn set_state(&self, id: &str, state: RecordState) -> Result<(), StoreError>;
    fn delete_sandbox(&self, id: &str) -> Result<(), StoreError>;
    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError>;
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    admin INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    state TEXT NOT NULL,
    runtime TEXT NOT NULL,
    started_at TEXT NOT NULL,
    end_at TEXT NOT NULL,
    cpu_count INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_size_mb INTEGER NOT NULL,
    allow_internet_access INTEGER NOT NULL,
    access_token TEXT,
    metadata TEXT NOT NULL,
    owner_key_id INTEGER NOT NULL,
    auto_pause INTEGER NOT NULL DEFAULT 0
);
";

/// Columns added after the first release, with their definitions: added to older
/// databases at open.
const ADDED_COLUMNS: &[(&str, &str, &str)] =
    &[("sandboxes", "auto_pause", "INTEGER NOT NULL DEFAULT 0")];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, def) in ADDED_COLUMNS {
        let exists: bool = conn.query_row(
            &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            params![column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
        }
    }
    Ok(())
}

fn q(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("bad timestamp {s:?}: {e}")))
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&conn).map_err(open_err)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(q("open in-memory database"))?;
        conn.execute_batch(SCHEMA).map_err(q("create schema"))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (statements
        // are atomic), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn key_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<(ApiKeyRecord, String, Option<String>)> {
    Ok((
        ApiKeyRecord {
            id: row.get(0)?,
            name: row.get(1)?,
            prefix: row.get(2)?,
            admin: row.get::<_, i64>(3)? != 0,
            created_at: Utc::now(),
            revoked_at: None,
        },
        row.get::<_, String>(4)?,
        row.get::<_, Option<String>>(5)?,
    ))
}

fn finish_key(
    (mut rec, created, revoked): (ApiKeyRecord, String, Option<String>),
) -> Result<ApiKeyRecord, StoreError> {
    rec.created_at = parse_time(&created)?;
    rec.revoked_at = revoked.as_deref().map(parse_time).transpose()?;
    Ok(rec)
}

const KEY_COLUMNS: &str = "id, name, prefix, admin, created_at, revoked_at";
const SANDBOX_COLUMNS: &str = "id, template_id, state, runtime, started_at, end_at, cpu_count, \
     memory_mb, disk_size_mb, allow_internet_access, access_token, metadata, owner_key_id, \
     auto_pause";

impl Store for SqliteStore {
    fn insert_key(
        &self,
        name: &str,
        hash: &str,
        prefix: &str,
        admin: bool,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO api_keys (name, hash, prefix, admin, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(hash) DO UPDATE SET revoked_at = NULL",
            params![name, hash, prefix, admin as i64, Utc::now().to_rfc3339()],
        )
        .map_err(q("insert api key"))?;
        conn.query_row(
            "SELECT id FROM api_keys WHERE hash = ?1",
            params![hash],
            |r| r.get(0),
        )
        .map_err(q("read inserted api key"))
    }

    fn find_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL"
                ),
                params![hash],
                key_from_row,
            )
            .optional()
            .map_err(q("look up api key"))?;
        row.map(finish_key).transpose()
    }

    fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"))
            .map_err(q("list api keys"))?;
        let rows = stmt
            .query_map([], key_from_row)
            .map_err(q("list api keys"))?;
        rows.map(|r| r.map_err(q("read api key row")).and_then(finish_key))
            .collect()
    }

    fn revoke_key(&self, id_or_prefix: &str) -> Result<usize, StoreError> {
        let conn = self.conn();
        let now = Utc::now().to_rfc3339();
        let n = match id_or_prefix.parse::<i64>() {
            Ok(id) => conn.execute(
                "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                params![now, id],
            ),
            Err(_) => conn.execute(
                "UPDATE api_keys SET revoked_at = ?1 WHERE prefix = ?2 AND revoked_at IS NULL",
                params![now, id_or_prefix],
            ),
        }
        .map_err(q("revoke api key"))?;
        Ok(n)
    }

    fn upsert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let metadata = serde_json::to_string(&rec.metadata)
            .map_err(|e| StoreError::Corrupt(format!("metadata: {e}")))?;
        self.conn()
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO sandboxes ({SANDBOX_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
                ),
                params![
                    rec.id,
                    rec.template_id,
                    rec.state.as_str(),
                    rec.runtime,
                    rec.started_at.to_rfc3339(),
                    rec.end_at.to_rfc3339(),
                    rec.cpu_count,
                    rec.memory_mb as i64,
                    rec.disk_size_mb as i64,
                    rec.allow_internet_access as i64,
                    rec.access_token,
                    metadata,
                    rec.owner_key_id,
                    rec.auto_pause as i64,
                ],
            )
            .map_err(q("save sandbox"))?;
        Ok(())
    }

    fn set_end_at(&self, id: &str, end_at: DateTime<Utc>) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET end_at = ?1 WHERE id = ?2",
                params![end_at.to_rfc3339(), id],
            )
            .map_err(q("update sandbox deadline"))?;
        Ok(())
    }

    fn set_state(&self, id: &str, state: RecordState) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET state = ?1 WHERE id = ?2",
                params![state.as_str(), id],
            )
            .map_err(q("update sandbox state"))?;
        Ok(())
    }

    fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])
            .map_err(q("delete sandbox"))?;
        Ok(())
    }

    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY started_at"
            ))
            .map_err(q("list sandboxes"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RawSandbox {
                    id: r.get(0)?,
                    template_id: r.get(1)?,
                    state: r.get(2)?,
                    runtime: r.get(3)?,
                    started_at: r.get(4)?,
                    end_at: r.get(5)?,
                    cpu_count: r.get(6)?,
                    memory_mb: r.get(7)?,
                    disk_size_mb: r.get(8)?,
                    allow_internet_access: r.get(9)?,
                    access_token: r.get(10)?,
                    metadata: r.get(11)?,
                    owner_key_id: r.get(12)?,
                    auto_pause: r.get(13)?,
                })
            })
            .map_err(q("list sandboxes"))?;
        rows.map(|row| {
            row.map_err(q("read sandbox row"))
                .and_then(RawSandbox::into_record)
        })
        .collect()
    }
}

/// A `sandboxes` row as SQLite holds it.
struct RawSandbox {
    id: String,
    template_id: String,
    state: String,
    runtime: String,
    started_at: String,
    end_at: String,
    cpu_count: u32,
    memory_mb: i64,
    disk_size_mb: i64,
    allow_internet_access: i64,
    access_token: Option<String>,
    metadata: String,
    owner_key_id: i64,
    auto_pause: i64,
}

impl RawSandbox {
    fn into_record(self) -> Result<SandboxRecord, StoreError> {
        Ok(SandboxRecord {
            state: RecordState::parse(&self.state)?,
            started_at: parse_time(&self.started_at)?,
            end_at: parse_time(&self.end_at)?,
            metadata: serde_json::from_str(&self.metadata)
                .map_err(|e| StoreError::Corrupt(format!("metadata of {}: {e}", self.id)))?,
            id: self.id,
            template_id: self.template_id,
            runtime: self.runtime,
            cpu_count: self.cpu_count,
            memory_mb: self.memory_mb.max(0) as u64,
            disk_size_mb: self.disk_size_mb.max(0) as u64,
            allow_internet_access: self.allow_internet_access != 0,
            access_token: self.access_token,
            owner_key_id: self.owner_key_id,
            auto_pause: self.auto_pause != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            template_id: "base".into(),
            state: RecordState::Running,
            runtime: "jail".into(),
            started_at: Utc::now(),
            end_at: Utc::now(),
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            allow_internet_access: true,
            access_token: Some("t".into()),
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
            owner_key_id: 1,
            auto_pause: true,
        }
    }

    #[test]
    fn old_databases_gain_new_columns_and_states_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            // The first release's table, without auto_pause.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, template_id TEXT NOT NULL,
                 state TEXT NOT NULL, runtime TEXT NOT NULL, started_at TEXT NOT NULL,
                 end_at TEXT NOT NULL, cpu_count INTEGER NOT NULL, memory_mb INTEGER NOT NULL,
                 disk_size_mb INTEGER NOT NULL, allow_internet_access INTEGER NOT NULL,
                 access_token TEXT, metadata TEXT NOT NULL, owner_key_id INTEGER NOT NULL);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        s.upsert_sandbox(&record("p1")).unwrap();
        s.set_state("p1", RecordState::Paused).unwrap();
        let got = &s.list_sandboxes().unwrap()[0];
        assert_eq!(got.state, RecordState::Paused);
        assert!(got.auto_pause);
    }

    #[test]
    fn keys_are_found_by_hash_until_revoked() {
        let s = SqliteStore::in_memory().unwrap();
        let id = s.insert_key("admin", "h1", "e2b_1234", true).unwrap();
        assert_eq!(s.find_key("h1").unwrap().unwrap().id, id);
        assert!(s.find_key("h2").unwrap().is_none());
        // Registering the same key again is idempotent.
        assert_eq!(s.insert_key("admin", "h1", "e2b_1234", true).unwrap(), id);
        assert_eq!(s.list_keys().unwrap().len(), 1);
        assert_eq!(s.revoke_key(&id.to_string()).unwrap(), 1);
        assert!(s.find_key("h1").unwrap().is_none());
        assert_eq!(s.revoke_key("e2b_1234").unwrap(), 0);
    }

    #[test]
    fn sandboxes_round_trip() {
        let s = SqliteStore::in_memory().unwrap();
        let rec = record("abc");
        s.upsert_sandbox(&rec).unwrap();
        let got = s.list_sandboxes().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].metadata, rec.metadata);
        assert_eq!(got[0].access_token.as_deref(), Some("t"));
        let later = Utc::now() + chrono::Duration::seconds(60);
        s.set_end_at("abc", later).unwrap();
        assert_eq!(
            s.list_sandboxes().unwrap()[0].end_at.timestamp(),
            later.timestamp()
        );
        s.delete_sandbox("abc").unwrap();
        assert!(s.list_sandboxes().unwrap().is_empty());
    }

    #[test]
    fn file_store_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.upsert_sandbox(&record("x1")).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.list_sandboxes().unwrap()[0].id, "x1");
    }
}
