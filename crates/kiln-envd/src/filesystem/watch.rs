//! Directory watching on inotify: the `WatchDir` stream and polled watchers
//! (`CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher`), spec §5.3.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use kiln_proto::filesystem::{EventType, FilesystemEvent};
use rand::Rng;

use super::entry::entry_info;
use super::FsError;
use crate::users::UserDb;

/// Events a polled watcher keeps before dropping new ones (a client that never polls
/// must not exhaust memory).
const MAX_BUFFERED_EVENTS: usize = 100_000;

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::ONLYDIR
}

/// Filesystems a watch is refused on unless `allow_network_mounts` (inotify misses
/// remote changes there).
pub fn is_network_fs(path: &Path) -> bool {
    const NFS: i64 = 0x6969;
    const SMB: i64 = 0x517B;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB2: i64 = 0xFE53_4D42;
    const FUSE: i64 = 0x6573_5546;
    match nix::sys::statfs::statfs(path) {
        Ok(stat) => {
            // `f_type`'s width differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            let kind = stat.filesystem_type().0 as i64;
            [NFS, SMB, CIFS, SMB2, FUSE].contains(&kind)
        }
        Err(_) => false,
    }
}

/// One live inotify watch on a directory (and its subtree when recursive).
pub struct Watch {
    stream: EventStream<Vec<u8>>,
    watches: Watches,
    root: PathBuf,
    /// Path of each watched directory relative to `root` (`""` for the root).
    dirs: HashMap<WatchDescriptor, PathBuf>,
    recursive: bool,
    include_entry: bool,
    pending: VecDeque<FilesystemEvent>,
    users: UserDb,
}

impl Watch {
    /// Starts watching `root`, an existing directory. Must run inside the runtime.
    pub fn new(
        root: PathBuf,
        recursive: bool,
        include_entry: bool,
        users: UserDb,
    ) -> Result<Self, FsError> {
        let inotify = Inotify::init().map_err(|e| FsError::Watch(format!("inotify init: {e}")))?;
        let stream = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(|e| FsError::Watch(format!("inotify stream: {e}")))?;
        let watches = stream.watches();
        let mut watch = Self {
            stream,
            watches,
            root,
            dirs: HashMap::new(),
            recursive,
            include_entry,
            pending: VecDeque::new(),
            users,
        };
        watch.add_dir(PathBuf::new(), true)?;
        Ok(watch)
    }

    /// Watches `root/rel` and, when recursive, every real subdirectory below it.
    fn add_dir(&mut self, rel: PathBuf, required: bool) -> Result<(), FsError> {
        let full = self.root.join(&rel);
        match self.watches.add(&full, mask()) {
            Ok(wd) => {
                self.dirs.insert(wd, rel.clone());
            }
            Err(e) if required => {
                return Err(FsError::Watch(format!("watching {}: {e}", full.display())))
            }
            // A subdirectory may vanish or be unreadable; skip it.
            Err(_) => return Ok(()),
        }
        if self.recursive {
            if let Ok(entries) = std::fs::read_dir(&full) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        self.add_dir(rel.join(entry.file_name()), false)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The next event. An error ends the watch.
    pub async fn next(&mut self) -> Result<FilesystemEvent, FsError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            match self.stream.next().await {
                None => return Err(FsError::Watch("inotify stream ended".to_owned())),
                Some(Err(e)) => return Err(FsError::Watch(format!("reading inotify events: {e}"))),
                Some(Ok(event)) => self.translate(event.wd, event.mask, event.name.as_deref()),
            }
        }
    }

    fn translate(&mut self, wd: WatchDescriptor, mask: EventMask, name: Option<&OsStr>) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!(root = %self.root.display(), "inotify queue overflowed; events were lost");
            return;
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&wd);
            return;
        }
        let (Some(dir), Some(name)) = (self.dirs.get(&wd), name) else {
            return; // events about a watched directory itself are reported by its parent
        };
        let rel = dir.join(name);
        if self.recursive
            && mask.contains(EventMask::ISDIR)
            && mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
        {
            if let Err(e) = self.add_dir(rel.clone(), false) {
                tracing::debug!(error = %e, "adding recursive watch");
            }
        }
        // One event per operation, in envd's order.
        let ops = [
            (EventMask::CREATE | EventMask::MOVED_TO, EventType::Create),
            (EventMask::MOVED_FROM, EventType::Rename),
            (EventMask::ATTRIB, EventType::Chmod),
            (EventMask::MODIFY, EventType::Write),
            (EventMask::DELETE, EventType::Remove),
        ];
        for (bits, event_type) in ops {
            if !mask.intersects(bits) {
                continue;
            }
            let wants_entry = matches!(
                event_type,
                EventType::Create | EventType::Write | EventType::Chmod
            );
            let entry = (self.include_entry && wants_entry)
                .then(|| entry_info(&self.root.join(&rel), &self.users).ok())
                .flatten();
            self.pending.push_back(FilesystemEvent {
                name: rel.to_string_lossy().into_owned(),
                event_type,
                entry,
            });
        }
    }
}

/// A polled watcher's buffer, filled by its task.
#[derive(Default)]
struct Buffer {
    events: Vec<FilesystemEvent>,
    error: Option<String>,
    dropped: usize,
}

struct Watcher {
    buffer: Arc<Mutex<Buffer>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watchers created by `CreateWatcher`, by id.
#[derive(Default)]
pub struct WatcherTable {
    watchers: Mutex<HashMap<String, Watcher>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `"w"` + 20 characters from `[a-z0-9]`.
pub fn new_watcher_id() -> String {
    const CHARSET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(21);
    id.push('w');
    for _ in 0..20 {
        id.push(CHARSET[rng.random_range(0..CHARSET.len())] as char);
    }
    id
}

impl WatcherTable {
    /// Starts buffering `watch`'s events; returns the new watcher id.
    pub fn create(&self, mut watch: Watch) -> String {
        let buffer = Arc::new(Mutex::new(Buffer::default()));
        let sink = buffer.clone();
        let task = tokio::spawn(async move {
            loop {
                match watch.next().await {
                    Ok(event) => {
                        let mut buf = lock(&sink);
                        if buf.events.len() < MAX_BUFFERED_EVENTS {
                            buf.events.push(event);
                        } else {
                            buf.dropped += 1;
                        }
                    }
                    Err(e) => {
                        lock(&sink).error = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        let id = new_watcher_id();
        lock(&self.watchers).insert(
            id.clone(),
            Watcher {
                buffer,
                task: task.abort_handle(),
            },
        );
        id
    }

    /// Takes the buffered events, or the watcher's terminal error.
    pub fn take_events(&self, id: &str) -> Result<Vec<FilesystemEvent>, FsError> {
        let watchers = lock(&self.watchers);
        let watcher = watchers
            .get(id)
            .ok_or_else(|| FsError::WatcherNotFound(id.to_owned()))?;
        let mut buffer = lock(&watcher.buffer);
        if buffer.events.is_empty() {
            if let Some(error) = &buffer.error {
                return Err(FsError::Watch(error.clone()));
            }
        }
        if buffer.dropped > 0 {
            tracing::warn!(
                watcher = id,
                dropped = buffer.dropped,
                "watcher buffer was full; events dropped"
            );
            buffer.dropped = 0;
        }
        Ok(std::mem::take(&mut buffer.events))
    }

    /// Stops and forgets a watcher.
    pub fn remove(&self, id: &str) -> Result<(), FsError> {
        lock(&self.watchers)
            .remove(id)
            .map(drop)
            .ok_or_else(|| FsError::WatcherNotFound(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_ids() {
        let id = new_watcher_id();
        assert_eq!(id.len(), 21);
        assert!(id.starts_with('w'));
        assert!(id[1..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(new_watcher_id(), id);
    }

    #[tokio::test]
    async fn events_are_relative_and_recursive() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("sub")).unwrap();
        let mut watch = Watch::new(root.clone(), true, true, UserDb::default()).unwrap();
        std::fs::write(root.join("sub/a.txt"), b"x").unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.name, "sub/a.txt");
        assert_eq!(first.event_type, EventType::Create);
        assert!(first.entry.is_some());
        std::fs::remove_file(root.join("sub/a.txt")).unwrap();
        let mut seen = vec![];
        while !seen.contains(&EventType::Remove) {
            let ev = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
                .await
                .unwrap()
                .unwrap();
            if ev.event_type == EventType::Remove {
                assert!(ev.entry.is_none());
            }
            seen.push(ev.event_type);
        }
    }
}
