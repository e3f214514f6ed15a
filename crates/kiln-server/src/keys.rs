//! API keys: `e2b_` followed by 40 lowercase hex digits (the format the E2B SDK
//! validates client-side), stored only as their SHA-256.

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

pub const KEY_PREFIX: &str = "e2b_";
const KEY_HEX_LEN: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid API key format: expected 'e2b_' followed by 40 lowercase hex digits")]
    Format,
    #[error("no team named {0:?} (`kiln teams list` shows them; `kiln teams create` makes one)")]
    NoTeam(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A fresh random key.
pub fn generate() -> String {
    let mut bytes = [0u8; KEY_HEX_LEN / 2];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

pub fn is_well_formed(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX).is_some_and(|hex| {
        hex.len() == KEY_HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The caller a plain API key stands for: `None` when it is no live key.
pub fn caller(store: &dyn Store, key: &str) -> Result<Option<crate::authz::Caller>, StoreError> {
    Ok(store.find_key(&hash(key))?.map(|k| crate::authz::Caller {
        key_id: k.id,
        team_id: k.team_id,
        admin: k.admin,
    }))
}

/// What `kiln keys list` shows of a key: enough to tell keys apart, nothing to use.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + 8).collect()
}

/// Register `key` (idempotently) in `team_id` and return its id.
pub fn register(
    store: &dyn Store,
    name: &str,
    key: &str,
    admin: bool,
    team_id: i64,
) -> Result<i64, KeyError> {
    if !is_well_formed(key) {
        return Err(KeyError::Format);
    }
    Ok(store.insert_key(name, &hash(key), &display_prefix(key), admin, team_id)?)
}

/// The id of the team named `name`, for commands that take a team by name.
pub fn team_id(store: &dyn Store, name: &str) -> Result<i64, KeyError> {
    store
        .find_team(name)?
        .map(|t| t.id)
        .ok_or_else(|| KeyError::NoTeam(name.to_string()))
}

/// The default team's id (every data directory has it from its first open).
pub fn default_team(store: &dyn Store) -> Result<i64, KeyError> {
    team_id(store, crate::store::DEFAULT_TEAM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert!(is_well_formed(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn format_is_checked() {
        assert!(!is_well_formed("e2b_123"));
        assert!(!is_well_formed(&format!("e2b_{}", "A".repeat(40))));
        assert!(!is_well_formed(&format!("xyz_{}", "a".repeat(40))));
        assert!(is_well_formed(&format!("e2b_{}", "0a".repeat(20))));
    }

    #[test]
    fn register_is_idempotent_and_stores_only_the_hash() {
        let store = SqliteStore::in_memory().unwrap();
        let key = generate();
        let id = register(&store, "k", &key, true, 1).unwrap();
        assert_eq!(register(&store, "k", &key, true, 1).unwrap(), id);
        let rec = store.find_key(&hash(&key)).unwrap().unwrap();
        assert!(rec.admin);
        assert!(!rec.prefix.contains(&key[12..]));
        assert!(matches!(
            register(&store, "bad", "e2b_nope", false, 1),
            Err(KeyError::Format)
        ));
    }
}
