//! Persistent state: teams, API keys, sandbox records, template owners, spells and
//! secrets (ciphertext only: the key lives outside the database, see
//! [`crate::secrets`]).
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
    #[error(
        "the database has schema version {found}, newer than this kiln knows ({known}); \
         run the kiln that wrote it, or a newer one"
    )]
    TooNew { found: u32, known: u32 },
    #[error("{0}")]
    Conflict(String),
}

/// A team: the unit that owns sandboxes, templates and builds. Every key belongs to
/// one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamRecord {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub quotas: Quotas,
}

/// A team's caps; `None` is "only the server's own limits".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quotas {
    /// Sandboxes running or paused at once.
    pub max_sandboxes: Option<u32>,
    /// Memory of all its sandboxes together, MiB.
    #[serde(rename = "maxMemoryMB")]
    pub max_memory_mb: Option<u64>,
    /// CPUs of all its sandboxes together.
    pub max_cpus: Option<u32>,
    /// Disk of all its templates together, MiB.
    #[serde(rename = "maxTemplateDiskMB")]
    pub max_template_disk_mb: Option<u64>,
}

/// An API key as stored: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub name: String,
    /// The first characters of the key (`e2b_1a2b…`), for listing.
    pub prefix: String,
    pub admin: bool,
    pub team_id: i64,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Lifecycle states a sandbox record can be in:
/// `Creating → Running ⇄ Paused → Killing → (record deleted)`. A create that fails
/// goes from `Creating` to `Killing`. A record stays in `Killing` until every host
/// resource of the sandbox is gone, across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Creating,
    Running,
    Paused,
    Killing,
}

impl RecordState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Creating => "creating",
            RecordState::Running => "running",
            RecordState::Paused => "paused",
            RecordState::Killing => "killing",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "creating" => Ok(RecordState::Creating),
            "running" => Ok(RecordState::Running),
            "paused" => Ok(RecordState::Paused),
            "killing" => Ok(RecordState::Killing),
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
    /// The team that owns it: only that team's keys (and admins) see it.
    pub team_id: i64,
    /// At the deadline, pause instead of kill (`autoPause` at create).
    pub auto_pause: bool,
    /// E2B's `network` object as accepted (egress lists, private ports, host mask).
    pub network: Option<kiln_api::SandboxNetwork>,
    /// What private ports want in `e2b-traffic-access-token`.
    pub traffic_token: Option<String>,
    /// A paused sandbox wakes when traffic reaches it (`autoResume`).
    pub auto_resume: bool,
    /// The timeout it was created with, in seconds: an auto-resume starts it afresh.
    pub timeout_secs: i64,
}

/// A team's secret as stored: the value only as AES-256-GCM ciphertext, sealed by
/// [`crate::secrets`] with a key the database never sees.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRecord {
    /// `sec_…`.
    pub id: String,
    pub team_id: i64,
    /// Canonical (lower-case) and unique within the team.
    pub name: String,
    /// Counts up from 1, one per value written.
    pub version: i64,
    pub nonce: Vec<u8>,
    /// The sealed current value with its tag.
    pub ciphertext: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for SecretRecord {
    // Not the ciphertext either: a log line has no use for it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("id", &self.id)
            .field("team_id", &self.team_id)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("ciphertext_len", &self.ciphertext.len())
            .field("metadata", &self.metadata)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

/// How a secret is named in a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretRef<'a> {
    Id(&'a str),
    Name(&'a str),
}

/// The persistence operations the control plane needs.
pub trait Store: Send + Sync {
    /// Register a key in `team_id` (idempotent: the same hash gets its id back and is
    /// un-revoked).
    fn insert_key(
        &self,
        name: &str,
        hash: &str,
        prefix: &str,
        admin: bool,
        team_id: i64,
    ) -> Result<i64, StoreError>;
    /// The live (not revoked) key with this hash.
    fn find_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Revoke by id or prefix; returns how many keys were revoked.
    fn revoke_key(&self, id_or_prefix: &str) -> Result<usize, StoreError>;

    /// A new team; [`StoreError::Conflict`] when the name is taken.
    fn create_team(&self, name: &str, quotas: Quotas) -> Result<TeamRecord, StoreError>;
    fn list_teams(&self) -> Result<Vec<TeamRecord>, StoreError>;
    fn find_team(&self, name: &str) -> Result<Option<TeamRecord>, StoreError>;
    fn team(&self, id: i64) -> Result<Option<TeamRecord>, StoreError>;
    fn set_quotas(&self, team_id: i64, quotas: Quotas) -> Result<(), StoreError>;

    /// Which team owns a template: `None` when no row names it, `Some(None)` for a
    /// template every team may use (the built-ins).
    fn template_owner(&self, name: &str) -> Result<Option<Option<i64>>, StoreError>;
    fn set_template_owner(&self, name: &str, team_id: Option<i64>) -> Result<(), StoreError>;
    /// Make `team_id` the owner of `name` unless it has one; answers the owner it has
    /// now (atomic: of two teams claiming one name, one wins).
    fn claim_template(&self, name: &str, team_id: i64) -> Result<Option<i64>, StoreError>;
    fn forget_template(&self, name: &str) -> Result<(), StoreError>;

    /// A team's own spells, as `(name, definition JSON)`, by name.
    fn team_spells(&self, team_id: i64) -> Result<Vec<(String, String)>, StoreError>;
    /// Define or replace one of a team's spells.
    fn put_spell(&self, team_id: i64, name: &str, definition: &str) -> Result<(), StoreError>;
    /// Whether there was such a spell.
    fn delete_spell(&self, team_id: i64, name: &str) -> Result<bool, StoreError>;

    /// A new secret; [`StoreError::Conflict`] when its team has one of that name.
    fn insert_secret(&self, rec: &SecretRecord) -> Result<(), StoreError>;
    /// Replace the secret `rec.id` of `rec.team_id` (version, value, metadata, update
    /// time) if its stored version is still `expected_version`; whether it was.
    fn update_secret(&self, rec: &SecretRecord, expected_version: i64) -> Result<bool, StoreError>;
    fn secret(&self, team_id: i64, by: SecretRef<'_>) -> Result<Option<SecretRecord>, StoreError>;
    /// Up to `limit` of a team's secrets by name, those after `after` only.
    fn list_secrets(
        &self,
        team_id: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError>;
    /// Whether there was such a secret.
    fn delete_secret(&self, team_id: i64, id: &str) -> Result<bool, StoreError>;
    /// How many secrets all teams have (to tell a lost key from a first start).
    fn count_secrets(&self) -> Result<u64, StoreError>;

    fn upsert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError>;
    fn set_end_at(&self, id: &str, end_at: DateTime<Utc>) -> Result<(), StoreError>;
    fn set_state(&self, id: &str, state: RecordState) -> Result<(), StoreError>;
    fn delete_sandbox(&self, id: &str) -> Result<(), StoreError>;
    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError>;
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// The team every key belonged to before teams existed, and the one keys join when
/// none is named.
pub const DEFAULT_TEAM: &str = "default";

/// The schema, one step per version. `PRAGMA user_version` records how many steps a
/// database has had; opening it runs the rest, each in its own transaction. Steps are
/// never edited once released: a change is a new step.
const MIGRATIONS: &[Migration] = &[
    // 1: API keys and sandboxes. Databases from before versioning (user_version 0
    // with the tables already there) may lack `auto_pause`; the step adds it.
    Migration::Sql(
        "CREATE TABLE IF NOT EXISTS api_keys (
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
            owner_key_id INTEGER NOT NULL
        );",
    ),
    Migration::AddColumnIfMissing {
        table: "sandboxes",
        column: "auto_pause",
        def: "INTEGER NOT NULL DEFAULT 0",
    },
    // 3: teams. Every existing key joins the default team, and every sandbox belongs
    // to its creating key's team.
    Migration::Sql(
        "CREATE TABLE teams (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            max_sandboxes INTEGER,
            max_memory_mb INTEGER,
            max_cpus INTEGER,
            max_template_disk_mb INTEGER
        );
        INSERT INTO teams (id, name, created_at) VALUES (1, 'default', strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
        ALTER TABLE api_keys ADD COLUMN team_id INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE sandboxes ADD COLUMN team_id INTEGER NOT NULL DEFAULT 1;
        CREATE TABLE templates (
            name TEXT PRIMARY KEY,
            team_id INTEGER REFERENCES teams(id)
        );",
    ),
    // 4: spells a team defined through the API.
    Migration::Sql(
        "CREATE TABLE spells (
            team_id INTEGER NOT NULL REFERENCES teams(id),
            name TEXT NOT NULL,
            definition TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (team_id, name)
        );",
    ),
    // 5: a sandbox's network policy and traffic access token.
    Migration::Sql(
        "ALTER TABLE sandboxes ADD COLUMN network TEXT;
        ALTER TABLE sandboxes ADD COLUMN traffic_token TEXT;",
    ),
    // 6: teams' secrets, sealed (the key is a file outside the database).
    Migration::Sql(
        "CREATE TABLE secrets (
            id TEXT PRIMARY KEY,
            team_id INTEGER NOT NULL REFERENCES teams(id),
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            nonce BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            metadata TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE(team_id, name)
        );",
    ),
    // 7: auto-resume, and the create's timeout that an auto-resume starts again.
    Migration::Sql(
        "ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE sandboxes ADD COLUMN timeout_secs INTEGER NOT NULL DEFAULT 300;",
    ),
];

enum Migration {
    Sql(&'static str),
    /// For databases created before versioning only.
    AddColumnIfMissing {
        table: &'static str,
        column: &'static str,
        def: &'static str,
    },
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(q("read schema version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(q("begin migration"))?;
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql).map_err(q("migrate schema"))?,
            Migration::AddColumnIfMissing { table, column, def } => {
                let exists: bool = tx
                    .query_row(
                        &format!(
                            "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"
                        ),
                        params![column],
                        |r| r.get::<_, i64>(0).map(|n| n > 0),
                    )
                    .map_err(q("inspect schema"))?;
                if !exists {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))
                        .map_err(q("migrate schema"))?;
                }
            }
        }
        tx.pragma_update(None, "user_version", i as u32 + 1)
            .map_err(q("record schema version"))?;
        tx.commit().map_err(q("commit migration"))?;
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
        let mut conn = conn;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        let mut conn = Connection::open_in_memory().map_err(q("open in-memory database"))?;
        migrate(&mut conn)?;
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
            team_id: row.get(6)?,
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

const KEY_COLUMNS: &str = "id, name, prefix, admin, created_at, revoked_at, team_id";
const TEAM_COLUMNS: &str =
    "id, name, created_at, max_sandboxes, max_memory_mb, max_cpus, max_template_disk_mb";
const SECRET_COLUMNS: &str =
    "id, team_id, name, version, nonce, ciphertext, metadata, created_at, updated_at";
const SANDBOX_COLUMNS: &str = "id, template_id, state, runtime, started_at, end_at, cpu_count, \
     memory_mb, disk_size_mb, allow_internet_access, access_token, metadata, owner_key_id, \
     auto_pause, team_id, network, traffic_token, auto_resume, timeout_secs";

fn team_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(TeamRecord, String)> {
    let opt_u64 = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
    };
    Ok((
        TeamRecord {
            id: row.get(0)?,
            name: row.get(1)?,
            created_at: Utc::now(),
            quotas: Quotas {
                max_sandboxes: opt_u64(3)?.map(|v| v.min(u32::MAX as u64) as u32),
                max_memory_mb: opt_u64(4)?,
                max_cpus: opt_u64(5)?.map(|v| v.min(u32::MAX as u64) as u32),
                max_template_disk_mb: opt_u64(6)?,
            },
        },
        row.get(2)?,
    ))
}

fn finish_team((mut rec, created): (TeamRecord, String)) -> Result<TeamRecord, StoreError> {
    rec.created_at = parse_time(&created)?;
    Ok(rec)
}

impl Store for SqliteStore {
    fn insert_key(
        &self,
        name: &str,
        hash: &str,
        prefix: &str,
        admin: bool,
        team_id: i64,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO api_keys (name, hash, prefix, admin, created_at, team_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(hash) DO UPDATE SET revoked_at = NULL",
            params![
                name,
                hash,
                prefix,
                admin as i64,
                Utc::now().to_rfc3339(),
                team_id
            ],
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

    fn create_team(&self, name: &str, quotas: Quotas) -> Result<TeamRecord, StoreError> {
        let conn = self.conn();
        let inserted = conn
            .execute(
                "INSERT INTO teams (name, created_at, max_sandboxes, max_memory_mb, max_cpus,
             max_template_disk_mb) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(name) DO NOTHING",
                params![
                    name,
                    Utc::now().to_rfc3339(),
                    quotas.max_sandboxes,
                    quotas.max_memory_mb.map(|v| v as i64),
                    quotas.max_cpus,
                    quotas.max_template_disk_mb.map(|v| v as i64),
                ],
            )
            .map_err(q("create team"))?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "a team named {name:?} exists already"
            )));
        }
        let id = conn.last_insert_rowid();
        drop(conn);
        self.team(id)?
            .ok_or_else(|| StoreError::Corrupt(format!("team {id} vanished after insert")))
    }

    fn list_teams(&self) -> Result<Vec<TeamRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {TEAM_COLUMNS} FROM teams ORDER BY id"))
            .map_err(q("list teams"))?;
        let rows = stmt.query_map([], team_from_row).map_err(q("list teams"))?;
        rows.map(|r| r.map_err(q("read team row")).and_then(finish_team))
            .collect()
    }

    fn find_team(&self, name: &str) -> Result<Option<TeamRecord>, StoreError> {
        let row = self
            .conn()
            .query_row(
                &format!("SELECT {TEAM_COLUMNS} FROM teams WHERE name = ?1"),
                params![name],
                team_from_row,
            )
            .optional()
            .map_err(q("look up team"))?;
        row.map(finish_team).transpose()
    }

    fn team(&self, id: i64) -> Result<Option<TeamRecord>, StoreError> {
        let row = self
            .conn()
            .query_row(
                &format!("SELECT {TEAM_COLUMNS} FROM teams WHERE id = ?1"),
                params![id],
                team_from_row,
            )
            .optional()
            .map_err(q("look up team"))?;
        row.map(finish_team).transpose()
    }

    fn set_quotas(&self, team_id: i64, quotas: Quotas) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE teams SET max_sandboxes = ?1, max_memory_mb = ?2, max_cpus = ?3,
                 max_template_disk_mb = ?4 WHERE id = ?5",
                params![
                    quotas.max_sandboxes,
                    quotas.max_memory_mb.map(|v| v as i64),
                    quotas.max_cpus,
                    quotas.max_template_disk_mb.map(|v| v as i64),
                    team_id
                ],
            )
            .map_err(q("set team quotas"))?;
        Ok(())
    }

    fn template_owner(&self, name: &str) -> Result<Option<Option<i64>>, StoreError> {
        self.conn()
            .query_row(
                "SELECT team_id FROM templates WHERE name = ?1",
                params![name],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map_err(q("look up template owner"))
    }

    fn set_template_owner(&self, name: &str, team_id: Option<i64>) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO templates (name, team_id) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET team_id = excluded.team_id",
                params![name, team_id],
            )
            .map_err(q("record template owner"))?;
        Ok(())
    }

    fn claim_template(&self, name: &str, team_id: i64) -> Result<Option<i64>, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO templates (name, team_id) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![name, team_id],
        )
        .map_err(q("claim template"))?;
        conn.query_row(
            "SELECT team_id FROM templates WHERE name = ?1",
            params![name],
            |r| r.get::<_, Option<i64>>(0),
        )
        .map_err(q("read template owner"))
    }

    fn forget_template(&self, name: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM templates WHERE name = ?1", params![name])
            .map_err(q("forget template"))?;
        Ok(())
    }

    fn team_spells(&self, team_id: i64) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, definition FROM spells WHERE team_id = ?1 ORDER BY name")
            .map_err(q("list spells"))?;
        let rows = stmt
            .query_map(params![team_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(q("list spells"))?;
        rows.collect::<Result<_, _>>().map_err(q("list spells"))
    }

    fn put_spell(&self, team_id: i64, name: &str, definition: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO spells (team_id, name, definition, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(team_id, name) DO UPDATE SET definition = excluded.definition,
                 updated_at = excluded.updated_at",
                params![team_id, name, definition, Utc::now().to_rfc3339()],
            )
            .map_err(q("store spell"))?;
        Ok(())
    }

    fn delete_spell(&self, team_id: i64, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM spells WHERE team_id = ?1 AND name = ?2",
                params![team_id, name],
            )
            .map_err(q("delete spell"))?;
        Ok(n > 0)
    }

    fn insert_secret(&self, rec: &SecretRecord) -> Result<(), StoreError> {
        let metadata = secret_metadata_json(rec)?;
        let inserted = self
            .conn()
            .execute(
                &format!(
                    "INSERT INTO secrets ({SECRET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT(team_id, name) DO NOTHING"
                ),
                params![
                    rec.id,
                    rec.team_id,
                    rec.name,
                    rec.version,
                    rec.nonce,
                    rec.ciphertext,
                    metadata,
                    rec.created_at.to_rfc3339(),
                    rec.updated_at.to_rfc3339(),
                ],
            )
            .map_err(q("store secret"))?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "your team already has a secret named {:?}",
                rec.name
            )));
        }
        Ok(())
    }

    fn update_secret(&self, rec: &SecretRecord, expected_version: i64) -> Result<bool, StoreError> {
        let metadata = secret_metadata_json(rec)?;
        let n = self
            .conn()
            .execute(
                "UPDATE secrets SET version = ?1, nonce = ?2, ciphertext = ?3, metadata = ?4,
                 updated_at = ?5 WHERE team_id = ?6 AND id = ?7 AND version = ?8",
                params![
                    rec.version,
                    rec.nonce,
                    rec.ciphertext,
                    metadata,
                    rec.updated_at.to_rfc3339(),
                    rec.team_id,
                    rec.id,
                    expected_version,
                ],
            )
            .map_err(q("update secret"))?;
        Ok(n > 0)
    }

    fn secret(&self, team_id: i64, by: SecretRef<'_>) -> Result<Option<SecretRecord>, StoreError> {
        let (column, value) = match by {
            SecretRef::Id(id) => ("id", id),
            SecretRef::Name(name) => ("name", name),
        };
        let row = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {SECRET_COLUMNS} FROM secrets WHERE team_id = ?1 AND {column} = ?2"
                ),
                params![team_id, value],
                RawSecret::from_row,
            )
            .optional()
            .map_err(q("look up secret"))?;
        row.map(RawSecret::into_record).transpose()
    }

    fn list_secrets(
        &self,
        team_id: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {SECRET_COLUMNS} FROM secrets WHERE team_id = ?1 AND name > ?2
                 ORDER BY name LIMIT ?3"
            ))
            .map_err(q("list secrets"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(
                params![team_id, after.unwrap_or(""), limit],
                RawSecret::from_row,
            )
            .map_err(q("list secrets"))?;
        rows.map(|r| {
            r.map_err(q("read secret row"))
                .and_then(RawSecret::into_record)
        })
        .collect()
    }

    fn delete_secret(&self, team_id: i64, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM secrets WHERE team_id = ?1 AND id = ?2",
                params![team_id, id],
            )
            .map_err(q("delete secret"))?;
        Ok(n > 0)
    }

    fn count_secrets(&self) -> Result<u64, StoreError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM secrets", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(q("count secrets"))
    }

    fn upsert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let metadata = serde_json::to_string(&rec.metadata)
            .map_err(|e| StoreError::Corrupt(format!("metadata: {e}")))?;
        let network = rec
            .network
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("network: {e}")))?;
        self.conn()
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO sandboxes ({SANDBOX_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
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
                    rec.team_id,
                    network,
                    rec.traffic_token,
                    rec.auto_resume as i64,
                    rec.timeout_secs,
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
                    team_id: r.get(14)?,
                    network: r.get(15)?,
                    traffic_token: r.get(16)?,
                    auto_resume: r.get(17)?,
                    timeout_secs: r.get(18)?,
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

fn secret_metadata_json(rec: &SecretRecord) -> Result<String, StoreError> {
    serde_json::to_string(&rec.metadata)
        .map_err(|e| StoreError::Corrupt(format!("metadata of secret {}: {e}", rec.id)))
}

/// A `secrets` row as SQLite holds it.
struct RawSecret {
    id: String,
    team_id: i64,
    name: String,
    version: i64,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    metadata: String,
    created_at: String,
    updated_at: String,
}

impl RawSecret {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawSecret {
            id: r.get(0)?,
            team_id: r.get(1)?,
            name: r.get(2)?,
            version: r.get(3)?,
            nonce: r.get(4)?,
            ciphertext: r.get(5)?,
            metadata: r.get(6)?,
            created_at: r.get(7)?,
            updated_at: r.get(8)?,
        })
    }

    fn into_record(self) -> Result<SecretRecord, StoreError> {
        Ok(SecretRecord {
            metadata: serde_json::from_str(&self.metadata)
                .map_err(|e| StoreError::Corrupt(format!("metadata of secret {}: {e}", self.id)))?,
            created_at: parse_time(&self.created_at)?,
            updated_at: parse_time(&self.updated_at)?,
            id: self.id,
            team_id: self.team_id,
            name: self.name,
            version: self.version,
            nonce: self.nonce,
            ciphertext: self.ciphertext,
        })
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
    team_id: i64,
    network: Option<String>,
    traffic_token: Option<String>,
    auto_resume: i64,
    timeout_secs: i64,
}

impl RawSandbox {
    fn into_record(self) -> Result<SandboxRecord, StoreError> {
        let network = self
            .network
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("network of {}: {e}", self.id)))?;
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
            team_id: self.team_id,
            auto_pause: self.auto_pause != 0,
            network,
            traffic_token: self.traffic_token,
            auto_resume: self.auto_resume != 0,
            timeout_secs: self.timeout_secs,
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
            team_id: 1,
            auto_pause: true,
            network: None,
            traffic_token: None,
            auto_resume: false,
            timeout_secs: 300,
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
                 access_token TEXT, metadata TEXT NOT NULL, owner_key_id INTEGER NOT NULL);
                 CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                 hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, admin INTEGER NOT NULL,
                 created_at TEXT NOT NULL, revoked_at TEXT);
                 INSERT INTO api_keys (name, hash, prefix, admin, created_at)
                 VALUES ('old', 'h0', 'e2b_0000', 1, '2026-01-01T00:00:00Z');
                 INSERT INTO sandboxes VALUES ('old1', 'base', 'running', 'jail',
                 '2026-01-01T00:00:00Z', '2026-01-01T00:05:00Z', 1, 512, 1024, 1, NULL, '{}', 1);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        // The old key and sandbox now belong to the default team.
        let key = s.find_key("h0").unwrap().unwrap();
        let team = s.team(key.team_id).unwrap().unwrap();
        assert_eq!(team.name, DEFAULT_TEAM);
        assert_eq!(s.list_sandboxes().unwrap()[0].team_id, team.id);
        s.upsert_sandbox(&record("p1")).unwrap();
        s.set_state("p1", RecordState::Paused).unwrap();
        let got = s
            .list_sandboxes()
            .unwrap()
            .into_iter()
            .find(|r| r.id == "p1")
            .unwrap();
        assert_eq!(got.state, RecordState::Paused);
        assert!(got.auto_pause);
        drop(s);
        // Opening again runs nothing twice, and the version is recorded.
        let s = SqliteStore::open(&path).unwrap();
        let version: u32 = s
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(s.list_teams().unwrap().len(), 1);
    }

    #[test]
    fn a_database_from_a_newer_kiln_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { .. })
        ));
    }

    #[test]
    fn teams_have_unique_names_quotas_and_template_owners() {
        let s = SqliteStore::in_memory().unwrap();
        let quotas = Quotas {
            max_sandboxes: Some(3),
            max_memory_mb: Some(2048),
            ..Quotas::default()
        };
        let t = s.create_team("alpha", quotas).unwrap();
        assert_eq!(s.find_team("alpha").unwrap().unwrap(), t);
        assert_eq!(t.quotas, quotas);
        assert!(matches!(
            s.create_team("alpha", Quotas::default()),
            Err(StoreError::Conflict(_))
        ));
        s.set_quotas(t.id, Quotas::default()).unwrap();
        assert_eq!(s.team(t.id).unwrap().unwrap().quotas, Quotas::default());
        assert_eq!(s.template_owner("x").unwrap(), None);
        s.set_template_owner("x", Some(t.id)).unwrap();
        assert_eq!(s.template_owner("x").unwrap(), Some(Some(t.id)));
        s.set_template_owner("base", None).unwrap();
        assert_eq!(s.template_owner("base").unwrap(), Some(None));
        s.forget_template("x").unwrap();
        assert_eq!(s.template_owner("x").unwrap(), None);
        // A claim wins only where nobody owns the name.
        let other = s.create_team("beta", Quotas::default()).unwrap();
        assert_eq!(s.claim_template("x", t.id).unwrap(), Some(t.id));
        assert_eq!(s.claim_template("x", other.id).unwrap(), Some(t.id));
        assert_eq!(s.claim_template("base", other.id).unwrap(), None);
    }

    #[test]
    fn keys_are_found_by_hash_until_revoked() {
        let s = SqliteStore::in_memory().unwrap();
        let id = s.insert_key("admin", "h1", "e2b_1234", true, 1).unwrap();
        assert_eq!(s.find_key("h1").unwrap().unwrap().id, id);
        assert!(s.find_key("h2").unwrap().is_none());
        // Registering the same key again is idempotent.
        assert_eq!(
            s.insert_key("admin", "h1", "e2b_1234", true, 1).unwrap(),
            id
        );
        assert_eq!(s.list_keys().unwrap().len(), 1);
        assert_eq!(s.revoke_key(&id.to_string()).unwrap(), 1);
        assert!(s.find_key("h1").unwrap().is_none());
        assert_eq!(s.revoke_key("e2b_1234").unwrap(), 0);
    }

    #[test]
    fn sandboxes_round_trip() {
        let s = SqliteStore::in_memory().unwrap();
        let mut rec = record("abc");
        rec.network = Some(kiln_api::SandboxNetwork {
            allow_out: Some(vec!["api.example.com".into()]),
            deny_out: Some(vec!["0.0.0.0/0".into()]),
            allow_public_traffic: Some(false),
            ..Default::default()
        });
        rec.traffic_token = Some("tt".into());
        s.upsert_sandbox(&rec).unwrap();
        s.upsert_sandbox(&record("nonet")).unwrap();
        let got = s.list_sandboxes().unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().any(|r| r.id == "nonet" && r.network.is_none()));
        let got: Vec<_> = got.into_iter().filter(|r| r.id == "abc").collect();
        assert_eq!(got[0].network, rec.network);
        assert_eq!(got[0].traffic_token.as_deref(), Some("tt"));
        assert_eq!(got[0].metadata, rec.metadata);
        assert_eq!(got[0].access_token.as_deref(), Some("t"));
        let later = Utc::now() + chrono::Duration::seconds(60);
        s.set_end_at("abc", later).unwrap();
        assert_eq!(
            s.list_sandboxes().unwrap()[0].end_at.timestamp(),
            later.timestamp()
        );
        s.delete_sandbox("abc").unwrap();
        s.delete_sandbox("nonet").unwrap();
        assert!(s.list_sandboxes().unwrap().is_empty());
    }

    fn secret(team_id: i64, id: &str, name: &str) -> SecretRecord {
        SecretRecord {
            id: id.into(),
            team_id,
            name: name.into(),
            version: 1,
            nonce: vec![7; 12],
            ciphertext: vec![1, 2, 3],
            metadata: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn secrets_are_per_team_unique_by_name_and_updated_only_at_the_version_read() {
        let s = SqliteStore::in_memory().unwrap();
        let other = s.create_team("beta", Quotas::default()).unwrap().id;
        let a = secret(1, "sec_a", "token");
        s.insert_secret(&a).unwrap();
        // Another team may use the name; the same team may not.
        s.insert_secret(&secret(other, "sec_b", "token")).unwrap();
        assert!(matches!(
            s.insert_secret(&secret(1, "sec_c", "token")),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            s.secret(1, SecretRef::Id("sec_a")).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            s.secret(1, SecretRef::Name("token")).unwrap(),
            Some(a.clone())
        );
        assert_eq!(s.secret(other, SecretRef::Id("sec_a")).unwrap(), None);
        assert_eq!(s.secret(1, SecretRef::Name("sec_a")).unwrap(), None);

        let mut next = a.clone();
        next.version = 2;
        next.ciphertext = vec![9; 20];
        next.metadata.clear();
        assert!(s.update_secret(&next, 1).unwrap());
        // A writer that read version 1 too loses.
        assert!(!s.update_secret(&next, 1).unwrap());
        let got = s.secret(1, SecretRef::Name("token")).unwrap().unwrap();
        assert_eq!((got.version, got.ciphertext.len()), (2, 20));
        assert!(got.metadata.is_empty());
        assert!(!format!("{got:?}").contains("[9, 9"), "{got:?}");

        for name in ["b", "c", "d"] {
            s.insert_secret(&secret(1, &format!("sec_{name}1"), name))
                .unwrap();
        }
        let names = |v: Vec<SecretRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(names(s.list_secrets(1, None, 2).unwrap()), ["b", "c"]);
        assert_eq!(
            names(s.list_secrets(1, Some("c"), 10).unwrap()),
            ["d", "token"]
        );
        assert_eq!(names(s.list_secrets(other, None, 10).unwrap()), ["token"]);
        assert_eq!(s.count_secrets().unwrap(), 5);

        assert!(!s.delete_secret(other, "sec_a").unwrap());
        assert!(s.delete_secret(1, "sec_a").unwrap());
        assert!(!s.delete_secret(1, "sec_a").unwrap());
        assert_eq!(s.secret(1, SecretRef::Name("token")).unwrap(), None);
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
