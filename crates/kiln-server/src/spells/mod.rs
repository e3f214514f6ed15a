//! Spells: named, parameterized code-execution patterns with limits. A spell is a
//! script (Python, JavaScript or bash) with typed parameters that runs in a fresh
//! sandbox and comes back as a structured result ([`run`]).
//!
//! Three sources, in the order a name resolves for a team: the team's own (stored,
//! `PUT /spells/{name}`), the operator's files (`spells/*.toml` in the data directory,
//! re-read when they change), and Kiln's library (`spells/library/*.toml`, built in).

mod args;
mod error;
pub mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kiln_api::spell::{Spell, SpellLanguage, SpellParam, SpellSource};
use serde::Deserialize;

use crate::authz::Caller;
pub use crate::config::SpellLimits;
use crate::report::chain;
use crate::store::Store;

pub use args::resolve as resolve_args;
pub use error::SpellError;

/// The longest script a spell may carry.
const MAX_CODE_BYTES: usize = 256 * 1024;
const MAX_PARAMS: usize = 32;
const MAX_PACKAGES: usize = 32;

/// Kiln's own spells, compiled in.
const LIBRARY: &[(&str, &str)] = &[
    ("run-python", include_str!("library/run-python.toml")),
    ("describe-csv", include_str!("library/describe-csv.toml")),
    (
        "run-repo-tests",
        include_str!("library/run-repo-tests.toml"),
    ),
    ("fetch-text", include_str!("library/fetch-text.toml")),
];

/// A spell as a TOML file writes it (snake_case keys; see `docs/spells.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpellToml {
    name: String,
    #[serde(default)]
    description: String,
    language: SpellLanguage,
    code: String,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    internet: bool,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    parameters: Vec<SpellParam>,
}

/// Parse a spell file; `source` says where it came from.
pub fn parse_toml(text: &str, source: SpellSource) -> Result<Spell, String> {
    let t: SpellToml = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(Spell {
        name: t.name,
        description: t.description,
        language: t.language,
        code: t.code,
        template: t.template,
        parameters: t.parameters,
        timeout_secs: t.timeout_secs,
        memory_mb: t.memory_mb,
        internet: t.internet,
        packages: t.packages,
        source: Some(source),
    })
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_param_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether Kiln can run `spell` under `limits`; the reason when not.
pub fn validate(spell: &Spell, limits: SpellLimits) -> Result<(), SpellError> {
    let invalid = |reason: String| SpellError::invalid(&spell.name, reason);
    if !valid_name(&spell.name) {
        return Err(invalid(
            "a name is 1 to 64 characters: lowercase letters, digits, '-' and '_', starting \
             with a letter or digit"
                .into(),
        ));
    }
    if spell.code.trim().is_empty() || spell.code.len() > MAX_CODE_BYTES {
        return Err(invalid(format!(
            "code must be 1 to {MAX_CODE_BYTES} bytes, got {}",
            spell.code.len()
        )));
    }
    if let Some(t) = spell.timeout_secs {
        if t == 0 || t > limits.timeout_secs {
            return Err(invalid(format!(
                "timeoutSecs must be between 1 and {} (E2B_SPELLS_TIMEOUT), got {t}",
                limits.timeout_secs
            )));
        }
    }
    if let Some(m) = spell.memory_mb {
        if !(64..=limits.max_memory_mb).contains(&m) {
            return Err(invalid(format!(
                "memoryMB must be between 64 and {} (E2B_SPELLS_MAX_MEMORY), got {m}",
                limits.max_memory_mb
            )));
        }
    }
    if spell.parameters.len() > MAX_PARAMS {
        return Err(invalid(format!("at most {MAX_PARAMS} parameters")));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &spell.parameters {
        if !valid_param_name(&p.name) {
            return Err(invalid(format!(
                "parameter name {:?}: use letters, digits and '_' (not starting with a \
                 digit), at most 64",
                p.name
            )));
        }
        if !seen.insert(p.name.as_str()) {
            return Err(invalid(format!("parameter {:?} is declared twice", p.name)));
        }
        if let Some(d) = &p.default {
            if !args::fits(p.kind, d) {
                return Err(invalid(format!(
                    "the default of parameter {:?} does not have its type",
                    p.name
                )));
            }
        }
    }
    if spell.packages.len() > MAX_PACKAGES {
        return Err(invalid(format!("at most {MAX_PACKAGES} packages")));
    }
    if !spell.packages.is_empty() {
        if !spell.internet {
            return Err(invalid(
                "packages are installed from the internet: set internet = true".into(),
            ));
        }
        for p in &spell.packages {
            match spell.language {
                SpellLanguage::Python => kiln_api::spell::check_package_spec(p),
                SpellLanguage::Javascript => kiln_api::spell::check_npm_package_spec(p),
                SpellLanguage::Bash => {
                    Err("bash spells cannot list packages (install them in the template)".into())
                }
            }
            .map_err(invalid)?;
        }
    }
    if let Some(t) = &spell.template {
        if t.is_empty() || t.len() > 128 || t.contains(char::is_whitespace) {
            return Err(invalid(format!("template {t:?} is not a template name")));
        }
    }
    Ok(())
}

/// The operator's spell files, re-read when the directory's listing or any file's
/// size or modification time changes.
#[derive(Default)]
struct FileSpells {
    stamp: Vec<(PathBuf, Option<SystemTime>, u64)>,
    spells: BTreeMap<String, Spell>,
}

/// Every spell the server knows, by source.
pub struct Spells {
    store: Arc<dyn Store>,
    dir: PathBuf,
    limits: SpellLimits,
    library: BTreeMap<String, Spell>,
    files: Mutex<FileSpells>,
}

impl Spells {
    /// `dir`: the operator's spell files (`<data dir>/spells`).
    pub fn new(store: Arc<dyn Store>, dir: PathBuf, limits: SpellLimits) -> Self {
        let mut library = BTreeMap::new();
        for (name, text) in LIBRARY {
            let spell = parse_toml(text, SpellSource::Builtin)
                .unwrap_or_else(|e| panic!("library spell {name} does not parse: {e}"));
            library.insert(spell.name.clone(), spell);
        }
        Spells {
            store,
            dir,
            limits,
            library,
            files: Mutex::new(FileSpells::default()),
        }
    }

    pub fn limits(&self) -> SpellLimits {
        self.limits
    }

    /// The operator's file spells, re-read if a file changed. A file that does not
    /// parse or validate is left out and logged (once per change).
    fn file_spells(&self) -> BTreeMap<String, Spell> {
        let stamp = stamp(&self.dir);
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if files.stamp != stamp {
            files.spells = load_dir(&stamp, self.limits);
            files.stamp = stamp;
        }
        files.spells.clone()
    }

    fn team_spells(&self, team_id: i64) -> Result<BTreeMap<String, Spell>, SpellError> {
        let mut out = BTreeMap::new();
        for (name, json) in self.store.team_spells(team_id)? {
            match serde_json::from_str::<Spell>(&json) {
                Ok(mut spell) => {
                    spell.source = Some(SpellSource::Team);
                    out.insert(name, spell);
                }
                Err(e) => {
                    tracing::error!(team_id, %name, error = %e, "a stored spell does not parse")
                }
            }
        }
        Ok(out)
    }

    /// Every spell `caller` can run, a team's own hiding shared ones of its name.
    pub fn list(&self, caller: &Caller) -> Result<Vec<Spell>, SpellError> {
        let mut all = self.library.clone();
        all.extend(self.file_spells());
        all.extend(self.team_spells(caller.team_id)?);
        Ok(all.into_values().collect())
    }

    pub fn get(&self, caller: &Caller, name: &str) -> Result<Spell, SpellError> {
        if let Some(s) = self.team_spells(caller.team_id)?.remove(name) {
            return Ok(s);
        }
        self.file_spells()
            .remove(name)
            .or_else(|| self.library.get(name).cloned())
            .ok_or_else(|| SpellError::NotFound(name.to_string()))
    }

    /// Define or replace one of the caller's team's spells.
    pub fn put(&self, caller: &Caller, name: &str, mut spell: Spell) -> Result<Spell, SpellError> {
        if spell.name != name {
            return Err(SpellError::NameMismatch {
                path: name.to_string(),
                body: spell.name,
            });
        }
        spell.source = None;
        validate(&spell, self.limits)?;
        let json = serde_json::to_string(&spell).expect("a spell always serializes");
        self.store.put_spell(caller.team_id, name, &json)?;
        spell.source = Some(SpellSource::Team);
        Ok(spell)
    }

    pub fn delete(&self, caller: &Caller, name: &str) -> Result<(), SpellError> {
        if self.store.delete_spell(caller.team_id, name)? {
            return Ok(());
        }
        if self.file_spells().contains_key(name) || self.library.contains_key(name) {
            return Err(SpellError::NotYours(name.to_string()));
        }
        Err(SpellError::NotFound(name.to_string()))
    }
}

fn stamp(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            (p, modified, meta.map_or(0, |m| m.len()))
        })
        .collect();
    out.sort();
    out
}

/// The largest spell file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

fn load_dir(
    stamp: &[(PathBuf, Option<SystemTime>, u64)],
    limits: SpellLimits,
) -> BTreeMap<String, Spell> {
    let mut out = BTreeMap::new();
    for (path, _, len) in stamp {
        let loaded = if *len > MAX_FILE_BYTES {
            Err(format!("larger than {MAX_FILE_BYTES} bytes"))
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_toml(&text, SpellSource::File))
                .and_then(|spell| {
                    validate(&spell, limits)
                        .map(|()| spell)
                        .map_err(|e| chain(&e))
                })
        };
        match loaded {
            Ok(spell) => {
                out.insert(spell.name.clone(), spell);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a spell file");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn spells(dir: &Path) -> Spells {
        let store = Arc::new(SqliteStore::open(&dir.join("db")).unwrap());
        Spells::new(store, dir.join("spells"), SpellLimits::default())
    }

    const MEMBER: Caller = Caller {
        key_id: 1,
        team_id: 1,
        admin: false,
    };

    #[test]
    fn the_library_parses_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let s = spells(dir.path());
        assert_eq!(s.library.len(), LIBRARY.len());
        for spell in s.library.values() {
            validate(spell, SpellLimits::default()).unwrap();
        }
    }

    #[test]
    fn files_are_reloaded_when_they_change_and_bad_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let s = spells(dir.path());
        std::fs::create_dir(dir.path().join("spells")).unwrap();
        let file = dir.path().join("spells/hello.toml");
        std::fs::write(
            &file,
            "name = \"hello\"\nlanguage = \"bash\"\ncode = \"echo hi\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("spells/bad.toml"), "name = 1").unwrap();
        assert_eq!(s.get(&MEMBER, "hello").unwrap().code, "echo hi");
        assert!(matches!(
            s.get(&MEMBER, "bad"),
            Err(SpellError::NotFound(_))
        ));
        std::fs::write(
            &file,
            "name = \"hello\"\nlanguage = \"bash\"\ncode = \"echo there!\"\n",
        )
        .unwrap();
        assert_eq!(s.get(&MEMBER, "hello").unwrap().code, "echo there!");
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            s.get(&MEMBER, "hello"),
            Err(SpellError::NotFound(_))
        ));
    }

    #[test]
    fn a_teams_spell_hides_a_shared_one_for_that_team_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = spells(dir.path());
        let mut mine = s.get(&MEMBER, "run-python").unwrap();
        mine.code = "print('mine')".into();
        s.put(&MEMBER, "run-python", mine).unwrap();
        assert_eq!(s.get(&MEMBER, "run-python").unwrap().code, "print('mine')");
        let other = Caller {
            team_id: 2,
            ..MEMBER
        };
        assert_ne!(s.get(&other, "run-python").unwrap().code, "print('mine')");
        s.delete(&MEMBER, "run-python").unwrap();
        assert!(matches!(
            s.delete(&MEMBER, "run-python"),
            Err(SpellError::NotYours(_))
        ));
    }

    #[test]
    fn definitions_past_the_limits_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = spells(dir.path());
        let mut spell = s.get(&MEMBER, "run-python").unwrap();
        spell.timeout_secs = Some(100_000);
        let err = s.put(&MEMBER, "run-python", spell.clone()).unwrap_err();
        assert!(err.to_string().contains("E2B_SPELLS_TIMEOUT"), "{err}");
        spell.timeout_secs = None;
        spell.memory_mb = Some(1 << 20);
        let err = s.put(&MEMBER, "run-python", spell.clone()).unwrap_err();
        assert!(err.to_string().contains("E2B_SPELLS_MAX_MEMORY"), "{err}");
        spell.memory_mb = None;
        spell.internet = false;
        spell.packages = vec!["pandas".into()];
        let err = s.put(&MEMBER, "run-python", spell.clone()).unwrap_err();
        assert!(err.to_string().contains("internet = true"), "{err}");
        spell.name = "Bad Name".into();
        let err = s.put(&MEMBER, "Bad Name", spell).unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
    }
}
