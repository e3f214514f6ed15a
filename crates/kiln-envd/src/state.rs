//! What every handler shares: the sandbox defaults `/init` sets, the user database and
//! envd's own PATH. The process and watcher tables are not here: each belongs to the
//! service that uses it ([`crate::process`], [`crate::filesystem`]), so this module sits
//! below the handlers instead of depending on them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::paths::{self, PathError};
use crate::users::{User, UserDb, UserFiles, UsersError};

/// Sandbox-wide settings, replaced by `POST /init`.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Environment every process gets (layer 3 of [`crate::env`]).
    pub env_vars: BTreeMap<String, String>,
    /// When set, requests must carry `X-Access-Token` (see [`crate::auth`]).
    pub access_token: Option<String>,
    pub user: String,
    pub workdir: Option<String>,
}

/// The sandbox as requests see it. Cheap to clone; every handler gets one.
#[derive(Clone)]
pub struct Sandbox(Arc<Inner>);

pub struct Inner {
    pub defaults: RwLock<Defaults>,
    pub users: UserFiles,
    /// envd's own PATH, captured at start (layer 1 of [`crate::env`]).
    pub envd_path: Option<String>,
}

impl std::ops::Deref for Sandbox {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// A request's identity and its path resolution context.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: User,
    pub workdir: Option<String>,
}

impl Identity {
    /// Resolves a client path per spec §3.2.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, PathError> {
        paths::resolve(path, &self.user.home, self.workdir.as_deref())
    }
}

impl Sandbox {
    pub fn new(defaults: Defaults, users: UserFiles) -> Self {
        Self(Arc::new(Inner {
            defaults: RwLock::new(defaults),
            users,
            envd_path: std::env::var("PATH").ok(),
        }))
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn update_defaults(&self, update: impl FnOnce(&mut Defaults)) {
        let mut guard = self
            .defaults
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        update(&mut guard);
    }

    /// The user a request acts as: `explicit` (Basic auth or `username` query) or the
    /// default user.
    pub fn identity(&self, explicit: Option<&str>) -> Result<Identity, UsersError> {
        let defaults = self.defaults();
        let name = match explicit {
            Some(name) if !name.is_empty() => name,
            _ => defaults.user.as_str(),
        };
        Ok(Identity {
            user: self.users.user(name)?,
            workdir: defaults.workdir,
        })
    }

    /// A snapshot of the user database for owner/group names (empty if unreadable).
    pub fn user_db(&self) -> UserDb {
        self.users.load().unwrap_or_default()
    }
}
