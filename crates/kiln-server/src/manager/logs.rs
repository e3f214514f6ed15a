//! A sandbox's logs: its console (what its init, envd and start command wrote), read
//! from the end of the guest-written file and parsed into E2B's log entries.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{SandboxError, SandboxManager};
use crate::authz::Caller;

/// The most of the console the logs read (its end).
const CONSOLE_TAIL: u64 = 256 * 1024;
/// The longest message kept per line.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "trace" | "debug" => Some(Level::Debug),
            "info" => Some(Level::Info),
            "warn" | "warning" => Some(Level::Warn),
            "error" => Some(Level::Error),
            _ => None,
        }
    }
}

/// One entry, in E2B's `SandboxLogEntry` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    /// RFC 3339 with microseconds, always (fixed width: sorts as text too).
    #[serde(serialize_with = "micros")]
    pub timestamp: DateTime<Utc>,
    pub level: Level,
    pub message: String,
    pub fields: std::collections::BTreeMap<String, String>,
}

fn micros<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// Parse console text: envd's lines (`<RFC 3339> <LEVEL> <target>: <message>`) keep
/// their time and level; any other line is `info` at the time of the line before it
/// (the sandbox's start for the first).
pub fn parse_console(text: &str, started: DateTime<Utc>) -> Vec<LogEntry> {
    // Lines before the first stamped one take its time: a pooled sandbox's console
    // starts before the sandbox's record does.
    let first_stamp = text.lines().find_map(|l| {
        let first = l.split_whitespace().next()?;
        DateTime::parse_from_rfc3339(first).ok()
    });
    let mut last = first_stamp.map_or(started, |t| t.with_timezone(&Utc).min(started));
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.trim_end();
        if line.is_empty() {
            continue;
        }
        let mut fields =
            std::collections::BTreeMap::from([("source".to_string(), "console".to_string())]);
        let (first, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let stamp = DateTime::parse_from_rfc3339(first).ok();
        let entry = match stamp {
            Some(t) => {
                let rest = rest.trim_start();
                let (word, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                let (level, message) = match Level::parse(word) {
                    Some(level) => (level, after.trim_start()),
                    None => (Level::Info, rest),
                };
                let message = match message.split_once(": ") {
                    Some((target, msg)) if !target.contains(' ') => {
                        fields.insert("logger".into(), target.to_string());
                        msg
                    }
                    _ => message,
                };
                last = t.with_timezone(&Utc);
                (level, message)
            }
            None => (Level::Info, line),
        };
        let mut message = entry.1.to_string();
        if message.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        out.push(LogEntry {
            timestamp: last,
            level: entry.0,
            message,
            fields,
        });
    }
    out
}

impl SandboxManager {
    /// The sandbox's log entries, oldest first (the last 256 KiB of its console).
    pub fn logs(&self, caller: &Caller, id: &str) -> Result<Vec<LogEntry>, SandboxError> {
        let entry = self.require(caller, id)?;
        let started = entry.record().started_at;
        let text = self
            .runtime
            .console_tail(id, CONSOLE_TAIL)
            .unwrap_or_default();
        let mut entries = parse_console(&text, started);
        // A read that started inside the file begins with a cut line: drop it.
        if text.len() as u64 >= CONSOLE_TAIL && !entries.is_empty() {
            entries.remove(0);
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_lines_keep_their_time_and_level_others_follow() {
        let started: DateTime<Utc> = "2026-12-07T13:00:00Z".parse().unwrap();
        let text = "kiln-jail: sandbox x started, pid 5\n\
            2026-12-07T12:32:39.554437Z  INFO kiln_envd::server: kiln-envd listening socket=/run/kiln/envd.sock\n\
            2026-12-07T12:32:40Z  WARN kiln_envd::process: slow\n\
            plain output\n";
        let got = parse_console(text, started);
        assert_eq!(got.len(), 4);
        // Before the first stamped line: its time (earlier than the record's start).
        assert_eq!(got[0].timestamp, got[1].timestamp);
        assert_eq!(got[0].message, "kiln-jail: sandbox x started, pid 5");
        assert_eq!(got[1].level, Level::Info);
        assert_eq!(got[1].fields["logger"], "kiln_envd::server");
        assert_eq!(
            got[1].message,
            "kiln-envd listening socket=/run/kiln/envd.sock"
        );
        assert_eq!(got[2].level, Level::Warn);
        assert_eq!(got[3].timestamp, got[2].timestamp);
        assert_eq!(got[3].level, Level::Info);
    }

    #[test]
    fn hostile_console_text_is_bounded() {
        let started = Utc::now();
        let long = "é".repeat(10_000);
        let got = parse_console(&format!("{long}\n\u{0}\u{7f}junk"), started);
        assert!(got[0].message.len() <= MAX_LINE);
        assert_eq!(got.len(), 2);
    }
}
