//! Surf's sessions, in memory: what was asked, how far the crawl is, what it found.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Making the sandbox and starting its desktop, live view and browser.
    Starting,
    Crawling,
    /// Computer-use mode: the model is driving the desktop.
    Acting,
    Completed,
    Failed,
}

impl Status {
    pub fn is_running(self) -> bool {
        matches!(self, Status::Starting | Status::Crawling | Status::Acting)
    }
}

/// One page the crawl visited.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PageResult {
    pub url: String,
    pub title: String,
    pub depth: u32,
    /// Its text (`extract_content`), cut at 20,000 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Its same-origin links.
    pub links: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub screenshot: Option<Arc<Vec<u8>>>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub url: String,
    pub depth: u32,
    pub extract_content: bool,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub sandbox_id: Option<String>,
    /// Whether Surf made the sandbox (the caller's own is only borrowed).
    pub owns_sandbox: bool,
    pub vnc_url: Option<String>,
    pub pages: Vec<PageResult>,
    pub error: Option<String>,
    /// Computer-use mode: what the model is asked to do.
    pub task: Option<String>,
    /// The actions it took, in order.
    pub steps: Vec<serde_json::Value>,
    /// Its last words.
    pub answer: Option<String>,
}

/// A session as `GET /api/sessions` lists it.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub session_id: String,
    pub url: String,
    pub depth: u32,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub sandbox_id: Option<String>,
    pub vnc_url: Option<String>,
    pub pages_crawled: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A page in `GET /api/sessions/{id}`: its screenshot by URL.
#[derive(Debug, Serialize)]
pub struct PageView<'a> {
    #[serde(flatten)]
    pub page: &'a PageResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screenshot_url: Option<String>,
}

impl Session {
    pub fn summary(&self) -> Summary {
        Summary {
            session_id: self.id.clone(),
            url: self.url.clone(),
            depth: self.depth,
            status: self.status,
            created_at: self.created_at,
            finished_at: self.finished_at,
            sandbox_id: self.sandbox_id.clone(),
            vnc_url: self.vnc_url.clone(),
            pages_crawled: self.pages.len(),
            error: self.error.clone(),
        }
    }

    /// The whole session: its summary, what was asked and every page.
    pub fn detail(&self) -> serde_json::Value {
        let pages: Vec<PageView<'_>> = self
            .pages
            .iter()
            .enumerate()
            .map(|(n, page)| PageView {
                page,
                screenshot_url: page
                    .screenshot
                    .as_ref()
                    .map(|_| format!("/api/sessions/{}/pages/{n}/screenshot", self.id)),
            })
            .collect();
        let mut v = serde_json::to_value(self.summary()).unwrap_or_default();
        v["extract_content"] = self.extract_content.into();
        if let Some(task) = &self.task {
            v["task"] = task.as_str().into();
            v["steps"] = self.steps.clone().into();
            v["answer"] = self.answer.clone().into();
        }
        v["pages"] = serde_json::to_value(pages).unwrap_or_default();
        v
    }
}

/// Finished sessions kept for `GET /api/sessions` and the page; older ones are forgotten.
pub const KEEP_FINISHED: usize = 50;

#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<BTreeMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Session>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        self.lock().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Session> {
        let mut all: Vec<Session> = self.lock().values().cloned().collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        all
    }

    /// Adds `session` unless `running` sessions already run; the number running.
    /// Adds `session` unless `running` sessions already run (then how many do), and
    /// forgets the oldest finished sessions past [`KEEP_FINISHED`] (their screenshots
    /// are held in memory).
    pub fn insert_within(&self, session: Session, running: usize) -> Result<(), usize> {
        let mut by_id = self.lock();
        let now = by_id.values().filter(|s| s.status.is_running()).count();
        if now >= running {
            return Err(now);
        }
        by_id.insert(session.id.clone(), session);
        let mut finished: Vec<(DateTime<Utc>, String)> = by_id
            .values()
            .filter(|s| !s.status.is_running())
            .map(|s| (s.finished_at.unwrap_or(s.created_at), s.id.clone()))
            .collect();
        if finished.len() > KEEP_FINISHED {
            finished.sort();
            for (_, id) in &finished[..finished.len() - KEEP_FINISHED] {
                by_id.remove(id);
            }
        }
        Ok(())
    }

    pub fn update(&self, id: &str, change: impl FnOnce(&mut Session)) {
        if let Some(s) = self.lock().get_mut(id) {
            change(s);
        }
    }

    pub fn remove(&self, id: &str) -> Option<Session> {
        self.lock().remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, status: Status, minute: u32) -> Session {
        let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 7, 12, minute, 0).unwrap();
        Session {
            id: id.into(),
            url: "http://a.test/".into(),
            depth: 0,
            extract_content: false,
            status,
            created_at: at,
            finished_at: (!status.is_running()).then_some(at),
            sandbox_id: None,
            owns_sandbox: false,
            vnc_url: None,
            pages: Vec::new(),
            error: None,
            task: None,
            steps: Vec::new(),
            answer: None,
        }
    }

    #[test]
    fn running_sessions_are_capped_and_finished_ones_do_not_count() {
        let sessions = Sessions::default();
        sessions
            .insert_within(session("a", Status::Starting, 0), 2)
            .unwrap();
        sessions
            .insert_within(session("b", Status::Crawling, 1), 2)
            .unwrap();
        assert_eq!(
            sessions.insert_within(session("c", Status::Starting, 2), 2),
            Err(2)
        );
        assert!(sessions.get("c").is_none());
        sessions.update("a", |s| s.status = Status::Failed);
        sessions
            .insert_within(session("c", Status::Acting, 3), 2)
            .unwrap();
        assert_eq!(sessions.all().len(), 3);
    }

    #[test]
    fn only_the_newest_finished_sessions_are_kept() {
        let sessions = Sessions::default();
        sessions
            .insert_within(session("running", Status::Crawling, 0), 1)
            .unwrap();
        for n in 0..KEEP_FINISHED as u32 + 5 {
            let s = session(&format!("done-{n}"), Status::Completed, n % 60);
            let s = Session {
                finished_at: s.finished_at.map(|t| t + chrono::Duration::hours(n.into())),
                ..s
            };
            sessions.insert_within(s, 2).unwrap();
        }
        assert_eq!(sessions.all().len(), KEEP_FINISHED + 1);
        assert!(sessions.get("running").is_some());
        assert!(sessions.get("done-4").is_none());
        assert!(sessions.get("done-5").is_some());
        assert!(sessions
            .get(&format!("done-{}", KEEP_FINISHED + 4))
            .is_some());
    }
}
