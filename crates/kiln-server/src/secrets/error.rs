//! What can go wrong with a secret. No variant carries a value, so neither can a
//! message, a log line or an answer built from one.

use std::path::PathBuf;

use super::crypt::KeyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {0:?} not found")]
    NotFound(String),
    #[error("invalid secret name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// Says what is allowed; never shows the value.
    #[error("invalid secret value: {0}")]
    InvalidValue(String),
    #[error("invalid secret metadata: {0}")]
    InvalidMetadata(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("your team already has a secret named {0:?}; update it with POST /secrets/{0}")]
    Exists(String),
    #[error("secret {name:?} kept changing while it was being updated; try again")]
    Contended { name: String },
    #[error("secret {name:?} cannot be decrypted with this server's key")]
    Undecryptable { name: String },
    #[error("sealing secret {name:?} failed (the random number generator failed)")]
    Seal { name: String },
    /// A new key now would leave every stored secret unreadable for good.
    #[error(
        "the secrets key file {path} is missing, but {sealed} secrets are sealed with a \
         key: restore the file (or point KILN_SECRETS_KEY_FILE at it), or delete those \
         secrets"
    )]
    KeyMissing { path: PathBuf, sealed: u64 },
    #[error("the secrets key cannot be used")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
