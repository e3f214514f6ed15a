//! Build records: what a build is (template, resources, tags, owner) and how it stands
//! (status, failure reason). Each is written to `templates/.builds/<buildID>.json`
//! whenever its status changes, next to its log (`<buildID>.log`, see
//! [`super::logs`]), so that a build's outcome survives a restart. In memory, a
//! [`BuildHandle`] holds a build of this run: its record, its log and its cancel switch;
//! the newest [`KEPT_FINISHED`] finished ones are kept, older ones are read back from
//! their files when asked for.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::logs::{self, LogBuffer, LogEntry, Page};
use super::names::is_build_id;

/// Finished builds kept in memory, and build records kept on disk across restarts.
pub const KEPT_FINISHED: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Waiting,
    Building,
    Ready,
    Error,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Ready | Status::Error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Building => "building",
            Status::Ready => "ready",
            Status::Error => "error",
        }
    }
}

/// Why a build failed, as E2B's `reason`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub template_id: String,
    pub status: Status,
    pub reason: Option<Reason>,
    pub cpu_count: u32,
    pub memory_mb: u64,
    /// Tags the build was created with (besides `default`), given to the template
    /// when the build succeeds.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The team that created the build (not enforced yet).
    #[serde(default)]
    pub owner: Option<i64>,
    /// The log, in records written before logs had a file of their own; moved to
    /// the file when read.
    #[serde(default, skip_serializing)]
    pub logs: Vec<LogEntry>,
}

/// `templates/.builds`: the records and logs of builds.
pub struct RecordDir {
    dir: PathBuf,
}

impl RecordDir {
    pub fn new(dir: PathBuf) -> Self {
        RecordDir { dir }
    }

    pub fn log_path(&self, build_id: &str) -> PathBuf {
        self.dir.join(format!("{build_id}.log"))
    }

    fn record_path(&self, build_id: &str) -> PathBuf {
        self.dir.join(format!("{build_id}.json"))
    }

    /// The directory, created if missing; a failure is logged (builds then keep their
    /// state in memory only).
    pub fn create(&self) {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot create the build records directory");
        }
    }

    /// Writes a record; a failure is logged, the build goes on.
    pub fn save(&self, build_id: &str, record: &BuildRecord) {
        let path = self.record_path(build_id);
        let tmp = self.dir.join(format!(".{build_id}.json.tmp"));
        let written = serde_json::to_vec(record)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(build = %build_id, error = %e, "saving the build record failed");
        }
    }

    /// The record of `build_id`, if one is on disk (its old embedded log moved to
    /// the log file).
    pub fn load(&self, build_id: &str) -> Option<BuildRecord> {
        if !is_build_id(build_id) {
            return None;
        }
        let path = self.record_path(build_id);
        let bytes = std::fs::read(&path).ok()?;
        let Ok(mut record) = serde_json::from_slice::<BuildRecord>(&bytes) else {
            tracing::warn!(path = %path.display(), "unreadable build record; ignored");
            return None;
        };
        if !record.logs.is_empty() {
            let logs = std::mem::take(&mut record.logs);
            let log = self.log_path(build_id);
            if !log.exists() {
                if let Err(e) = logs::append_to_file(&log, &logs) {
                    tracing::warn!(path = %log.display(), error = %e, "moving a build log to its file failed");
                }
            }
            self.save(build_id, &record);
        }
        Some(record)
    }

    /// The records of earlier runs, oldest first: the newest [`KEPT_FINISHED`]; older
    /// ones are removed with their logs. A build that was waiting or running when the
    /// server stopped failed, and its record and log say why.
    pub fn load_all(&self) -> Vec<(String, BuildRecord)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".json")?.to_string();
                let mtime = e.metadata().and_then(|m| m.modified());
                is_build_id(&id).then(|| (mtime.unwrap_or(std::time::UNIX_EPOCH), id))
            })
            .collect();
        files.sort();
        let old = files.len().saturating_sub(KEPT_FINISHED);
        for (_, id) in files.drain(..old) {
            let _ = std::fs::remove_file(self.record_path(&id));
            let _ = std::fs::remove_file(self.log_path(&id));
        }
        let mut out = Vec::new();
        for (_, id) in files {
            let Some(mut record) = self.load(&id) else {
                continue;
            };
            if !record.status.is_final() {
                let message = "the build was interrupted: kiln serve stopped before it \
                               finished; start the build again"
                    .to_string();
                let entry = LogEntry::new("error", format!("Build failed: {message}"), None);
                if let Err(e) = logs::append_to_file(&self.log_path(&id), &[entry]) {
                    tracing::warn!(build = %id, error = %e, "writing to a build log failed");
                }
                record.status = Status::Error;
                record.reason = Some(Reason {
                    message,
                    step: None,
                });
                self.save(&id, &record);
            }
            out.push((id, record));
        }
        out
    }
}

/// A build known to this run.
pub struct BuildHandle {
    pub id: String,
    pub template_id: String,
    /// The team whose build it is (`None`: the server's own).
    pub owner: Option<i64>,
    cancel: CancellationToken,
    state: Mutex<HandleState>,
}

struct HandleState {
    record: BuildRecord,
    log: Log,
}

enum Log {
    /// A build of this run.
    Live(LogBuffer),
    /// A build of an earlier run: only its file.
    File(PathBuf),
}

/// A build's status and a page of its log, taken together: when the status is final,
/// the page ends the log.
pub struct Snapshot {
    pub status: Status,
    pub reason: Option<Reason>,
    pub page: Page,
}

impl BuildHandle {
    /// A new build with its log in `log`.
    pub fn new(id: String, record: BuildRecord, log: LogBuffer) -> Self {
        Self::with_log(id, record, Log::Live(log))
    }

    /// A build of an earlier run, its log in the file `log`.
    pub fn finished(id: String, record: BuildRecord, log: &Path) -> Self {
        Self::with_log(id, record, Log::File(log.to_path_buf()))
    }

    fn with_log(id: String, record: BuildRecord, log: Log) -> Self {
        BuildHandle {
            id,
            template_id: record.template_id.clone(),
            owner: record.owner,
            cancel: CancellationToken::new(),
            state: Mutex::new(HandleState { record, log }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HandleState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self) -> BuildRecord {
        self.state().record.clone()
    }

    pub fn status(&self) -> Status {
        self.state().record.status
    }

    /// Changes the record under the lock; returns the record as changed.
    pub fn update<T>(&self, f: impl FnOnce(&mut BuildRecord) -> T) -> (T, BuildRecord) {
        let mut state = self.state();
        let out = f(&mut state.record);
        (out, state.record.clone())
    }

    pub fn log(&self, entry: LogEntry) {
        if let Log::Live(log) = &mut self.state().log {
            log.push(entry);
        }
    }

    /// Ends the build: its closing log entry (if any), its status and reason. Returns
    /// the record to save.
    pub fn finish(
        &self,
        status: Status,
        reason: Option<Reason>,
        closing: Option<LogEntry>,
    ) -> BuildRecord {
        let mut state = self.state();
        if let Log::Live(log) = &mut state.log {
            if let Some(entry) = closing {
                log.push_closing(entry);
            }
            log.close();
        }
        state.record.status = status;
        state.record.reason = reason;
        state.record.clone()
    }

    pub fn snapshot(&self, offset: usize, limit: usize) -> Snapshot {
        let state = self.state();
        let page = match &state.log {
            Log::Live(log) => log.page(offset, limit),
            Log::File(path) => logs::file_page(path, offset, limit),
        };
        Snapshot {
            status: state.record.status,
            reason: state.record.reason.clone(),
            page,
        }
    }

    /// Entries and message bytes of the log held in memory.
    pub fn log_in_memory(&self) -> (usize, usize) {
        match &self.state().log {
            Log::Live(log) => log.in_memory(),
            Log::File(_) => (0, 0),
        }
    }

    /// Stops the build if it is waiting or running; `Err` with the status it ended
    /// with otherwise.
    pub fn cancel(&self) -> Result<(), Status> {
        let state = self.state();
        if state.record.status.is_final() {
            return Err(state.record.status);
        }
        self.cancel.cancel();
        Ok(())
    }

    /// Resolves when the build is cancelled.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

/// The builds in memory: every unfinished one and the newest finished ones.
#[derive(Default)]
pub struct Registry {
    builds: HashMap<String, Arc<BuildHandle>>,
    finished: VecDeque<String>,
}

impl Registry {
    pub fn get(&self, build_id: &str) -> Option<Arc<BuildHandle>> {
        self.builds.get(build_id).cloned()
    }

    pub fn insert(&mut self, handle: Arc<BuildHandle>) {
        let id = handle.id.clone();
        let done = handle.status().is_final();
        self.builds.insert(id.clone(), handle);
        if done {
            self.finished(id);
        }
    }

    /// Marks `build_id` finished; the oldest finished builds past [`KEPT_FINISHED`]
    /// leave memory (their records stay on disk).
    pub fn finished(&mut self, build_id: String) {
        self.finished.push_back(build_id);
        while self.finished.len() > KEPT_FINISHED {
            if let Some(old) = self.finished.pop_front() {
                self.builds.remove(&old);
            }
        }
    }
}
