//! What can go wrong with a spell, before or while it runs.

use crate::manager::SandboxError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SpellError {
    #[error("spell {0:?} not found")]
    NotFound(String),
    /// The definition is not one Kiln can run (name, code, limits, parameters).
    #[error("invalid spell {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    /// The arguments do not fit the spell's parameters; no sandbox was started.
    #[error("spell {spell:?}: {reason}")]
    BadArgs { spell: String, reason: String },
    #[error("the name in the path ({path:?}) and in the body ({body:?}) differ")]
    NameMismatch { path: String, body: String },
    /// Kiln's own and the data directory's spells are the operator's.
    #[error(
        "spell {0:?} is not one of your team's own spells (it is shared: Kiln's or the \
         operator's); define one of your own with another name, or the same name to hide it"
    )]
    NotYours(String),
    #[error("starting the spell's sandbox failed")]
    Sandbox(#[from] SandboxError),
    #[error("the spell's sandbox {0} ended before the spell ran")]
    SandboxGone(String),
    #[error("the spell's sandbox failed while {what}")]
    Guest {
        what: &'static str,
        #[source]
        source: crate::envd::EnvdError,
    },
    #[error("installing the spell's packages failed (exit {code}): {output}")]
    Install { code: i32, output: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SpellError {
    pub(crate) fn invalid(name: &str, reason: impl Into<String>) -> Self {
        SpellError::Invalid {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}
