//! The process table and each process's subscribers.
//!
//! Output goes to whoever is subscribed when it is read (the `Start` stream and any
//! `Connect` streams); with nobody subscribed it is dropped, as envd does. A slow
//! subscriber applies backpressure instead of losing data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_proto::process::{
    EndEvent, ProcessConfig, ProcessEvent, ProcessInfo, ProcessSelector, StartEvent, StartResponse,
};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pty::PtyMaster;
use super::spawn::Input;
use crate::rpc::StreamItem;

/// How long an exited process stays visible to `Connect`.
pub const EXITED_RETENTION: Duration = Duration::from_secs(30);
/// Events buffered per subscriber before the reader waits for it.
const SUBSCRIBER_BUFFER: usize = 64;

pub type Subscriber = mpsc::Sender<StreamItem<StartResponse>>;
pub type Subscription = mpsc::Receiver<StreamItem<StartResponse>>;

/// One started process.
pub struct Process {
    pub pid: u32,
    pub tag: Option<String>,
    /// The request's config, as `List` reports it.
    pub config: ProcessConfig,
    /// The PTY master of a PTY process.
    pub pty: Option<Arc<PtyMaster>>,
    /// The stdin pipe; `None` for `/dev/null`, PTYs, or after `CloseStdin`.
    pub stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    /// Cancelled to stop the output readers (signals, deadline).
    pub stop_output: CancellationToken,
    fanout: Mutex<Fanout>,
}

#[derive(Default)]
struct Fanout {
    subscribers: Vec<Subscriber>,
    end: Option<EndEvent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn response(event: ProcessEvent) -> StreamItem<StartResponse> {
    Ok(StartResponse { event })
}

impl Process {
    pub fn new(pid: u32, tag: Option<String>, config: ProcessConfig, input: Input) -> Self {
        let (pty, stdin) = match input {
            Input::Pty(master) => (Some(master), None),
            Input::Pipe(pipe) => (None, Some(pipe)),
            Input::Null => (None, None),
        };
        Self {
            pid,
            tag,
            config,
            pty,
            stdin: tokio::sync::Mutex::new(stdin),
            stop_output: CancellationToken::new(),
            fanout: Mutex::new(Fanout::default()),
        }
    }

    pub fn is_pty(&self) -> bool {
        self.pty.is_some()
    }

    /// A new subscription: `start{pid}` first, then live events; `start` + `end` at once
    /// if the process has already ended.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let start = response(ProcessEvent::Start(StartEvent { pid: self.pid }));
        // A fresh channel has room for these two.
        let _ = tx.try_send(start);
        let mut fanout = lock(&self.fanout);
        match &fanout.end {
            Some(end) => {
                let _ = tx.try_send(response(ProcessEvent::End(end.clone())));
            }
            None => fanout.subscribers.push(tx),
        }
        rx
    }

    /// Sends `event` to every current subscriber, waiting for slow ones and forgetting
    /// the ones that went away.
    pub async fn publish(&self, event: ProcessEvent) {
        let subscribers = lock(&self.fanout).subscribers.clone();
        let mut gone = Vec::new();
        for tx in &subscribers {
            if tx.send(response(event.clone())).await.is_err() {
                gone.push(tx.clone());
            }
        }
        if !gone.is_empty() {
            lock(&self.fanout)
                .subscribers
                .retain(|tx| !gone.iter().any(|g| g.same_channel(tx)));
        }
    }

    /// Records the end and hands it to every subscriber, which closes their streams.
    pub fn finish(&self, end: EndEvent) {
        let subscribers = {
            let mut fanout = lock(&self.fanout);
            fanout.end = Some(end.clone());
            std::mem::take(&mut fanout.subscribers)
        };
        for tx in subscribers {
            let event = response(ProcessEvent::End(end.clone()));
            // A subscriber that is not reading must not block the others.
            tokio::spawn(async move {
                let _ = tx.send(event).await;
            });
        }
    }

    pub fn end(&self) -> Option<EndEvent> {
        lock(&self.fanout).end.clone()
    }

    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: self.config.clone(),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }

    fn matches(&self, selector: &ProcessSelector) -> bool {
        match selector {
            ProcessSelector::Pid(pid) => self.pid == *pid,
            ProcessSelector::Tag(tag) => self.tag.as_deref() == Some(tag.as_str()),
        }
    }
}

/// Live processes plus recently exited ones.
#[derive(Default)]
pub struct ProcessTable {
    inner: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    live: HashMap<u32, Arc<Process>>,
    exited: HashMap<u32, Arc<Process>>,
}

impl ProcessTable {
    pub fn insert(&self, process: Arc<Process>) {
        let mut tables = lock(&self.inner);
        tables.exited.remove(&process.pid);
        tables.live.insert(process.pid, process);
    }

    /// A running process (or one whose output is still draining).
    pub fn live(&self, selector: &ProcessSelector) -> Option<Arc<Process>> {
        let tables = lock(&self.inner);
        match selector {
            ProcessSelector::Pid(pid) => tables.live.get(pid).cloned(),
            ProcessSelector::Tag(_) => tables.live.values().find(|p| p.matches(selector)).cloned(),
        }
    }

    /// A live process, or one that exited less than [`EXITED_RETENTION`] ago.
    pub fn any(&self, selector: &ProcessSelector) -> Option<Arc<Process>> {
        if let Some(p) = self.live(selector) {
            return Some(p);
        }
        let tables = lock(&self.inner);
        match selector {
            ProcessSelector::Pid(pid) => tables.exited.get(pid).cloned(),
            ProcessSelector::Tag(_) => tables
                .exited
                .values()
                .find(|p| p.matches(selector))
                .cloned(),
        }
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let tables = lock(&self.inner);
        let mut infos: Vec<ProcessInfo> = tables.live.values().map(|p| p.info()).collect();
        infos.sort_by_key(|i| i.pid);
        infos
    }

    /// Moves `process` to the exited set for [`EXITED_RETENTION`].
    pub fn retire(self: &Arc<Self>, process: &Arc<Process>) {
        {
            let mut tables = lock(&self.inner);
            if tables
                .live
                .get(&process.pid)
                .is_some_and(|p| Arc::ptr_eq(p, process))
            {
                tables.live.remove(&process.pid);
            }
            tables.exited.insert(process.pid, process.clone());
        }
        let table = Arc::downgrade(self);
        let process = Arc::downgrade(process);
        tokio::spawn(async move {
            tokio::time::sleep(EXITED_RETENTION).await;
            let (Some(table), Some(process)) = (table.upgrade(), process.upgrade()) else {
                return;
            };
            let mut tables = lock(&table.inner);
            if tables
                .exited
                .get(&process.pid)
                .is_some_and(|p| Arc::ptr_eq(p, &process))
            {
                tables.exited.remove(&process.pid);
            }
        });
    }
}
