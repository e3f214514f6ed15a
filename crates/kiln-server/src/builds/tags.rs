//! Template tags, kept in `templates/.tags.json`. Kiln keeps one version per template,
//! so every tag names that version (the SDK's `name:tag` resolves to it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::BuildServiceError;

/// When a tag was given to a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagInfo {
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
}

impl TagInfo {
    pub fn now() -> Self {
        TagInfo {
            created_at: Utc::now(),
        }
    }
}

/// Tags by template name.
type TagMap = BTreeMap<String, BTreeMap<String, TagInfo>>;

pub struct Tags {
    path: PathBuf,
    map: Mutex<TagMap>,
}

impl Tags {
    /// The tags saved in `path` (none when it is missing or unreadable).
    pub fn load(path: PathBuf) -> Self {
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Tags {
            path,
            map: Mutex::new(map),
        }
    }

    /// Changes the tags of `name` under the lock and writes them out.
    pub fn update<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut BTreeMap<String, TagInfo>) -> T,
    ) -> Result<T, BuildServiceError> {
        let mut all = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(all.entry(name.to_string()).or_default());
        all.retain(|_, t| !t.is_empty());
        let json = serde_json::to_vec(&*all).map_err(|e| BuildServiceError::Tags(e.into()))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(BuildServiceError::Tags)?;
        Ok(out)
    }

    /// The tags of `name`, `default` first.
    pub fn of(&self, name: &str) -> Vec<(String, TagInfo)> {
        let all = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, TagInfo)> = all
            .get(name)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        out.sort_by_key(|(t, _)| (t != "default", t.clone()));
        out
    }
}
