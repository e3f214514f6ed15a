//! The audit log: one JSON object per line, in the seed's format, for Loki (label
//! `job="kiln"`) or any log shipper:
//!
//! ```json
//! {"timestamp":"2026-12-07T06:00:00.123Z","event_type":"sandbox.created",
//!  "sandbox_id":"abc…","user_id":"team:2/key:7","agent_id":"planner-1",
//!  "language":null,"duration_ms":412,"success":true,"ip_address":"127.0.0.1"}
//! ```
//!
//! `user_id` names the team and the key (`team:T/key:K`; `team:T` where no key acted,
//! as for a sandbox's commands, which envd's token authorizes); `agent_id` comes from
//! the request's `X-Agent-Id` header, else the sandbox's `agent_id` metadata. Event
//! types: `sandbox.created`, `sandbox.executed`, `sandbox.terminated`,
//! `sandbox.failed`, `template.built`, `key.created`, `key.revoked`, `auth.failed`,
//! `network.denied` (the egress proxy refused a connection), `secret.created`,
//! `secret.updated`, `secret.deleted` (`desktop.accessed` and `surf.started` arrive
//! with the desktop). Nothing secret is
//! ever written: no keys, tokens, environment variables, code or output.
//!
//! The sink is `KILN_AUDIT_LOG`: `file` (the default: `<data-dir>/audit/audit.log`,
//! rotated at `KILN_AUDIT_MAX_MB`, 64, keeping `KILN_AUDIT_KEEP`, 5, old files),
//! `stdout`, or `off`. A write that fails is reported in the server log once per
//! failure streak and never fails the request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};
use serde::Serialize;

/// The request header that names the agent acting.
pub const AGENT_HEADER: &str = "x-agent-id";
const MAX_AGENT_ID: usize = 128;

/// Where the request being served came from: set for each API and sandbox request,
/// read by whatever records an event while serving it.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub ip: Option<IpAddr>,
    pub agent: Option<String>,
}

impl Origin {
    pub fn from_request(peer: Option<IpAddr>, headers: &http::HeaderMap) -> Origin {
        let agent = headers
            .get(AGENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|a| a.chars().take(MAX_AGENT_ID).collect::<String>())
            .filter(|a| !a.trim().is_empty());
        Origin { ip: peer, agent }
    }
}

tokio::task_local! {
    static ORIGIN: Origin;
}

/// Runs `fut` with `origin` as the request's origin.
pub async fn scoped<F: std::future::Future>(origin: Origin, fut: F) -> F::Output {
    ORIGIN.scope(origin, fut).await
}

/// The origin of the request being served, if any.
pub fn current() -> Origin {
    ORIGIN.try_with(Clone::clone).unwrap_or_default()
}

/// One audit record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub timestamp: String,
    pub event_type: &'static str,
    pub sandbox_id: Option<String>,
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    pub language: Option<String>,
    pub duration_ms: Option<u64>,
    pub success: bool,
    pub ip_address: Option<String>,
    /// What the event is about besides a sandbox (`template:NAME`, `key:ID`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl Event {
    /// An event of `event_type` now, with the current request's origin.
    pub fn new(event_type: &'static str, success: bool) -> Event {
        let origin = current();
        Event {
            timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            event_type,
            sandbox_id: None,
            user_id: None,
            agent_id: origin.agent,
            language: None,
            duration_ms: None,
            success,
            ip_address: origin.ip.map(|ip| ip.to_string()),
            subject: None,
        }
    }

    pub fn subject(mut self, subject: String) -> Self {
        self.subject = Some(subject);
        self
    }

    pub fn sandbox(mut self, id: &str) -> Self {
        self.sandbox_id = Some(id.to_string());
        self
    }

    /// The acting team and key (`key_id` 0: none, e.g. the server itself).
    pub fn user(mut self, team_id: i64, key_id: i64) -> Self {
        self.user_id = Some(if key_id > 0 {
            format!("team:{team_id}/key:{key_id}")
        } else {
            format!("team:{team_id}")
        });
        self
    }

    /// The agent from the sandbox's metadata, where the request named none.
    pub fn agent_or(mut self, agent: Option<&String>) -> Self {
        if self.agent_id.is_none() {
            self.agent_id = agent.map(|a| a.chars().take(MAX_AGENT_ID).collect());
        }
        self
    }

    pub fn language(mut self, language: &str) -> Self {
        self.language = Some(language.to_string());
        self
    }

    pub fn duration(mut self, d: std::time::Duration) -> Self {
        self.duration_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: usize,
    },
    Stdout,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditConfigError {
    #[error("KILN_AUDIT_LOG={0:?}: use file, stdout or off")]
    Sink(String),
    #[error("{name}={value:?}: give a whole number from {min} to {max}")]
    Number {
        name: &'static str,
        value: String,
        min: u64,
        max: u64,
    },
}

impl AuditSink {
    /// The sink the environment asks for, under `data_dir`.
    pub fn from_env(data_dir: &Path) -> Result<AuditSink, AuditConfigError> {
        let number =
            |name: &'static str, default: u64, min: u64, max: u64| match std::env::var(name) {
                Err(_) => Ok(default),
                Ok(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or(AuditConfigError::Number {
                        name,
                        value: v,
                        min,
                        max,
                    }),
            };
        match std::env::var("KILN_AUDIT_LOG").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("file") => Ok(AuditSink::File {
                path: data_dir.join("audit").join("audit.log"),
                max_bytes: number("KILN_AUDIT_MAX_MB", 64, 1, 65536)? << 20,
                keep: number("KILN_AUDIT_KEEP", 5, 0, 1000)? as usize,
            }),
            Ok("stdout") => Ok(AuditSink::Stdout),
            Ok("off") => Ok(AuditSink::Off),
            Ok(other) => Err(AuditConfigError::Sink(other.to_string())),
        }
    }
}

struct Open {
    file: File,
    written: u64,
}

/// The audit log. Cheap to share; writes are serialized.
pub struct AuditLog {
    sink: AuditSink,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    open: Option<Open>,
    /// A write failed and has been reported; reset by the next success.
    failing: bool,
}

impl AuditLog {
    pub fn new(sink: AuditSink) -> AuditLog {
        AuditLog {
            sink,
            state: Mutex::default(),
        }
    }

    /// An audit log that writes nothing.
    pub fn off() -> AuditLog {
        AuditLog::new(AuditSink::Off)
    }

    pub fn sink(&self) -> &AuditSink {
        &self.sink
    }

    pub fn record(&self, event: Event) {
        let mut line = match serde_json::to_vec(&event) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let written = match &self.sink {
            AuditSink::Off => Ok(()),
            AuditSink::Stdout => std::io::stdout().lock().write_all(&line),
            AuditSink::File {
                path,
                max_bytes,
                keep,
            } => write_file(&mut state, path, *max_bytes, *keep, &line),
        };
        match written {
            Ok(()) => state.failing = false,
            Err(e) if !state.failing => {
                state.failing = true;
                tracing::error!(error = %e, "writing the audit log failed");
            }
            Err(_) => {}
        }
    }
}

fn write_file(
    state: &mut State,
    path: &Path,
    max_bytes: u64,
    keep: usize,
    line: &[u8],
) -> std::io::Result<()> {
    if state
        .open
        .as_ref()
        .is_some_and(|o| o.written > 0 && o.written + line.len() as u64 > max_bytes)
    {
        state.open = None;
        rotate(path, keep)?;
    }
    if state.open.is_none() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?
        };
        let written = file.metadata()?.len();
        state.open = Some(Open { file, written });
    }
    let open = state.open.as_mut().expect("opened above");
    open.file.write_all(line)?;
    open.written += line.len() as u64;
    Ok(())
}

/// `audit.log` → `audit.log.1` → … → `audit.log.<keep>` (the oldest goes).
fn rotate(path: &Path, keep: usize) -> std::io::Result<()> {
    let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_carry_the_seeds_fields_and_the_requests_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.log");
        let log = AuditLog::new(AuditSink::File {
            path: path.clone(),
            max_bytes: 1 << 20,
            keep: 2,
        });
        let origin = Origin {
            ip: Some("10.1.2.3".parse().unwrap()),
            agent: Some("planner".into()),
        };
        scoped(origin, async {
            log.record(
                Event::new("sandbox.created", true)
                    .sandbox("abc")
                    .user(2, 7)
                    .duration(std::time::Duration::from_millis(42)),
            );
        })
        .await;
        log.record(Event::new("auth.failed", false));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for key in [
            "timestamp",
            "event_type",
            "sandbox_id",
            "user_id",
            "agent_id",
            "language",
            "duration_ms",
            "success",
            "ip_address",
        ] {
            assert!(lines[0].get(key).is_some(), "{key} missing: {}", lines[0]);
        }
        assert_eq!(lines[0]["user_id"], "team:2/key:7");
        assert_eq!(lines[0]["agent_id"], "planner");
        assert_eq!(lines[0]["ip_address"], "10.1.2.3");
        assert_eq!(lines[0]["duration_ms"], 42);
        assert_eq!(lines[1]["ip_address"], serde_json::Value::Null);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn files_rotate_at_their_size_and_keep_a_few() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::new(AuditSink::File {
            path: path.clone(),
            max_bytes: 600,
            keep: 2,
        });
        for _ in 0..20 {
            log.record(Event::new("sandbox.executed", true).sandbox("x"));
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 600);
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.2").exists());
        assert!(!dir.path().join("audit.log.3").exists());
        for f in ["audit.log", "audit.log.1", "audit.log.2"] {
            for l in std::fs::read_to_string(dir.path().join(f)).unwrap().lines() {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
        }
    }

    #[test]
    fn agent_ids_are_cut_and_blank_ones_ignored() {
        let mut headers = http::HeaderMap::new();
        headers.insert(AGENT_HEADER, "a".repeat(500).parse().unwrap());
        assert_eq!(
            Origin::from_request(None, &headers).agent.unwrap().len(),
            MAX_AGENT_ID
        );
        headers.insert(AGENT_HEADER, "  ".parse().unwrap());
        assert_eq!(Origin::from_request(None, &headers).agent, None);
    }
}
