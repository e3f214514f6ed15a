//! A build's log: every entry goes to `templates/.builds/<buildID>.log` (NDJSON, one
//! entry a line, about [`LogLimits::file_bytes`] at most), and only the newest entries stay in
//! memory ([`LogLimits::tail_entries`], [`LogLimits::tail_bytes`] of messages). A RUN
//! step that prints a gigabyte without a newline (cut into 16 KiB lines by the step
//! runner) costs disk up to the cap, and a bounded amount of memory.
//!
//! Entries are addressed by offset (0, 1, ...) as E2B's `logsOffset`: the offsets in the
//! tail are answered from memory, older ones from the file, found through a byte offset
//! kept for every [`INDEX_EVERY`]-th entry. The log of a build of an earlier run (or one
//! evicted from memory) has no index: its file is read from the start.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One build log entry, as E2B's `logEntries` and as a line of the log file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub timestamp: DateTime<Utc>,
    pub level: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

impl LogEntry {
    pub fn new(level: &str, message: String, step: Option<String>) -> Self {
        LogEntry {
            timestamp: Utc::now(),
            level: level.to_string(),
            message,
            step,
        }
    }
}

/// How much of a log is kept where.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Entries kept in memory at most.
    pub tail_entries: usize,
    /// Message bytes kept in memory at most (the newest entry is kept whatever its size).
    pub tail_bytes: usize,
    /// Bytes written to the file at most; then one entry says so and the rest of the
    /// output that reached it is dropped ([`LogBuffer::push`]).
    pub file_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            tail_entries: 1000,
            tail_bytes: 1 << 20,
            file_bytes: 64 << 20,
        }
    }
}

/// What may still be written past the file's cap (entries other than the output that
/// reached it).
pub const AFTER_CAP_BYTES: u64 = 1 << 20;

/// A byte offset is kept for every this many entries.
pub const INDEX_EVERY: usize = 256;

/// Where a page of entries is to be read.
#[derive(Debug)]
pub enum Page {
    /// From memory, here they are.
    Memory(Vec<LogEntry>),
    /// From the file: skip `skip` lines from byte `start`, then read at most `max`.
    File(FileRead),
}

#[derive(Debug, Clone)]
pub struct FileRead {
    pub path: PathBuf,
    pub start: u64,
    pub skip: usize,
    pub max: usize,
}

impl FileRead {
    /// Reads the entries (blocking: run it off the async threads). A line that does not
    /// parse (the file was edited) is skipped.
    pub fn read(&self) -> std::io::Result<Vec<LogEntry>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            // No file: the build logged nothing, or its file could not be created.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut r = BufReader::new(file);
        r.seek(SeekFrom::Start(self.start))?;
        for _ in 0..self.skip {
            if r.skip_until(b'\n')? == 0 {
                return Ok(Vec::new());
            }
        }
        let mut out = Vec::new();
        let mut line = Vec::new();
        while out.len() < self.max {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if let Ok(entry) = serde_json::from_slice(&line) {
                out.push(entry);
            }
        }
        Ok(out)
    }
}

/// The log of one build of this run.
#[derive(Debug)]
pub struct LogBuffer {
    path: PathBuf,
    /// Open while the build may write; `None` once closed or when it could not be
    /// created (then the log is only the tail).
    file: Option<File>,
    tail: VecDeque<LogEntry>,
    tail_bytes: usize,
    /// Entries so far: offsets `0..len`.
    len: usize,
    /// Bytes in the file.
    written: u64,
    /// `index[i]`: byte offset of entry `i * INDEX_EVERY`.
    index: Vec<u64>,
    /// Once the file reached its cap: the step whose output reached it.
    truncated: Option<Option<String>>,
    limits: LogLimits,
}

impl LogBuffer {
    /// A new log written to `path` (replaced if it exists). A file that cannot be
    /// created is logged; the build goes on with its tail only.
    pub fn create(path: PathBuf, limits: LogLimits) -> Self {
        let file = match File::create(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot create the build log file; only its tail is kept");
                None
            }
        };
        LogBuffer {
            path,
            file,
            tail: VecDeque::new(),
            tail_bytes: 0,
            len: 0,
            written: 0,
            index: Vec::new(),
            truncated: None,
            limits,
        }
    }

    /// Adds an entry, unless the file reached its cap: then the output of the step
    /// that reached it is dropped, and what the build says after it (later steps'
    /// titles, finalize, the outcome) still lands, up to [`AFTER_CAP_BYTES`] more.
    pub fn push(&mut self, entry: LogEntry) {
        if let Some(step) = &self.truncated {
            if entry.step == *step || self.written > self.limits.file_bytes + AFTER_CAP_BYTES {
                return;
            }
            self.append(entry);
            return;
        }
        let line = to_line(&entry);
        if self.written + line.len() as u64 > self.limits.file_bytes {
            self.truncated = Some(entry.step.clone());
            let note = LogEntry::new(
                "warn",
                format!(
                    "log truncated: over {} MiB; the rest of this step's output is dropped",
                    self.limits.file_bytes >> 20
                ),
                entry.step.clone(),
            );
            self.append(note);
            return;
        }
        self.append_line(entry, &line);
    }

    /// Adds the build's closing entry (its outcome), past the cap if need be.
    pub fn push_closing(&mut self, entry: LogEntry) {
        self.append(entry);
    }

    /// Closes the file: the build writes no more.
    pub fn close(&mut self) {
        self.file = None;
    }

    fn append(&mut self, entry: LogEntry) {
        let line = to_line(&entry);
        self.append_line(entry, &line);
    }

    fn append_line(&mut self, entry: LogEntry, line: &[u8]) {
        if self.len.is_multiple_of(INDEX_EVERY) {
            self.index.push(self.written);
        }
        if let Some(f) = &mut self.file {
            // One write a line, unbuffered: a reader sees every counted entry.
            match f.write_all(line) {
                Ok(()) => self.written += line.len() as u64,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "writing the build log failed; only its tail is kept from now on");
                    self.file = None;
                }
            }
        }
        self.len += 1;
        self.tail_bytes += entry.message.len();
        self.tail.push_back(entry);
        while self.tail.len() > 1
            && (self.tail.len() > self.limits.tail_entries
                || self.tail_bytes > self.limits.tail_bytes)
        {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.message.len();
            }
        }
    }

    /// Entries from `offset` on, at most `limit`: from memory or where to read them.
    pub fn page(&self, offset: usize, limit: usize) -> Page {
        let offset = offset.min(self.len);
        let first = self.len - self.tail.len();
        if offset >= first {
            return Page::Memory(
                self.tail
                    .range(offset - first..)
                    .take(limit)
                    .cloned()
                    .collect(),
            );
        }
        let block = offset / INDEX_EVERY;
        Page::File(FileRead {
            path: self.path.clone(),
            start: self.index.get(block).copied().unwrap_or(0),
            skip: offset - block * INDEX_EVERY,
            max: limit.min(self.len - offset),
        })
    }

    /// Entries and message bytes held in memory.
    pub fn in_memory(&self) -> (usize, usize) {
        (self.tail.len(), self.tail_bytes)
    }

    /// Entries so far.
    pub fn count(&self) -> usize {
        self.len
    }
}

/// Where to read a page of a log that only exists as its file.
pub fn file_page(path: &Path, offset: usize, limit: usize) -> Page {
    Page::File(FileRead {
        path: path.to_path_buf(),
        start: 0,
        skip: offset,
        max: limit,
    })
}

/// Appends `entries` to the log file at `path` (a build record of an earlier run).
pub fn append_to_file(path: &Path, entries: &[LogEntry]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for e in entries {
        f.write_all(&to_line(e))?;
    }
    Ok(())
}

fn to_line(entry: &LogEntry) -> Vec<u8> {
    // A LogEntry is strings and a timestamp: it always serializes.
    let mut line = serde_json::to_vec(entry).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize, size: usize) -> LogEntry {
        let mut message = format!("line {i} ");
        message.extend(std::iter::repeat_n('x', size));
        LogEntry::new("info", message, Some("1".into()))
    }

    fn read(page: Page) -> Vec<LogEntry> {
        match page {
            Page::Memory(v) => v,
            Page::File(f) => f.read().unwrap(),
        }
    }

    fn numbers(entries: &[LogEntry]) -> Vec<usize> {
        entries
            .iter()
            .map(|e| {
                let n = e.message.split(' ').nth(1).unwrap();
                n.parse().unwrap()
            })
            .collect()
    }

    /// Privilege tier: none.
    #[test]
    fn the_tail_is_bounded_and_older_entries_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            tail_entries: 50,
            tail_bytes: 4096,
            file_bytes: 1 << 30,
        };
        let mut log = LogBuffer::create(dir.path().join("b.log"), limits);
        for i in 0..2000 {
            log.push(entry(i, i % 300));
        }
        let (entries, bytes) = log.in_memory();
        assert!(
            entries <= 50 && bytes <= 4096,
            "{entries} entries, {bytes} bytes"
        );
        assert_eq!(log.count(), 2000);
        // Every offset, from memory or the file, answers the right entries.
        for offset in [0, 1, 255, 256, 257, 1000, 1999 - entries, 1990, 1999] {
            let got = read(log.page(offset, 7));
            let want: Vec<usize> = (offset..(offset + 7).min(2000)).collect();
            assert_eq!(numbers(&got), want, "offset {offset}");
        }
        assert!(matches!(log.page(0, 10), Page::File(_)));
        assert!(matches!(log.page(1995, 10), Page::Memory(_)));
        // Past the end: nothing.
        assert!(read(log.page(5000, 10)).is_empty());
        // The file alone (an earlier run's log) reads the same.
        let got = read(file_page(&dir.path().join("b.log"), 700, 3));
        assert_eq!(numbers(&got), [700, 701, 702]);
    }

    /// Privilege tier: none.
    #[test]
    fn one_huge_entry_is_kept_alone() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            tail_entries: 10,
            tail_bytes: 100,
            file_bytes: 1 << 20,
        };
        let mut log = LogBuffer::create(dir.path().join("b.log"), limits);
        log.push(entry(0, 10));
        log.push(entry(1, 1000));
        assert_eq!(log.in_memory().0, 1);
        assert_eq!(numbers(&read(log.page(0, 5))), [0, 1]);
    }

    /// Privilege tier: none.
    #[test]
    fn the_file_is_capped_with_a_note_and_the_closing_entry_still_lands() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            tail_entries: 1000,
            tail_bytes: 1 << 20,
            file_bytes: 2 << 20,
        };
        let path = dir.path().join("b.log");
        let mut log = LogBuffer::create(path.clone(), limits);
        for i in 0..1000 {
            log.push(entry(i, 16 * 1024));
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= (2 << 20) + 1024, "{size}");
        log.push_closing(LogEntry::new("error", "Build failed: x".into(), None));
        log.close();
        let all = read(file_page(&path, 0, usize::MAX));
        assert_eq!(all.len(), log.count());
        let note = &all[all.len() - 2];
        assert_eq!(
            note.message,
            "log truncated: over 2 MiB; the rest of this step's output is dropped"
        );
        assert_eq!(all.last().unwrap().message, "Build failed: x");
        // The output of the step that reached the cap is dropped from then on; what
        // the build says besides still lands.
        let before = log.count();
        log.push(entry(5000, 1));
        assert_eq!(log.count(), before);
        log.push(LogEntry::new(
            "info",
            "installing".into(),
            Some("finalize".into()),
        ));
        assert_eq!(log.count(), before + 1);
    }
}
