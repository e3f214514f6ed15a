//! Spells: named, parameterized code-execution patterns with limits (Kiln's own API,
//! not E2B's). `GET /spells`, `GET|PUT|DELETE /spells/{name}`, `POST /spells`,
//! `POST /spells/{name}/runs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The language a spell's code is written in; it runs as a script in a fresh sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpellLanguage {
    Python,
    Javascript,
    Bash,
}

/// The type of a spell parameter; arguments are checked against it before any
/// sandbox starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl ParamType {
    /// The JSON Schema type name (as the API spells it).
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Array => "array",
            ParamType::Object => "object",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpellParam {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(default)]
    pub description: String,
    /// A parameter without a default must be given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

/// Where a spell comes from: shipped with Kiln, a file in the data directory's
/// `spells/`, or a team's own (`POST /spells`). A team's spell hides a shared one of
/// the same name for that team.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpellSource {
    Builtin,
    File,
    Team,
}

/// A spell's definition: the body of `POST /spells` and `PUT /spells/{name}`, and (with
/// `source`) each item of `GET /spells`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spell {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub language: SpellLanguage,
    /// The script. It reads its arguments as JSON from the file named by
    /// `KILN_SPELL_ARGS` (Python and JavaScript also get them as `args`, bash as
    /// `ARG_<NAME>` variables) and may leave files in `$KILN_SPELL_OUTPUT`, which the
    /// run returns (a `result.json` there becomes the run's `result`).
    pub code: String,
    /// Template the sandbox starts from (default `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub parameters: Vec<SpellParam>,
    /// Seconds the whole run may take (default and cap: the server's
    /// `E2B_SPELLS_TIMEOUT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Memory of the sandbox (default and cap: `E2B_SPELLS_MAX_MEMORY`).
    #[serde(default, rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Whether the sandbox may reach the internet (default false).
    #[serde(default)]
    pub internet: bool,
    /// Packages installed before the code runs (pip for Python, npm for JavaScript);
    /// needs `internet`.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Set by the server in answers; ignored in requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SpellSource>,
}

/// `POST /spells/{name}/runs` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpellRunRequest {
    #[serde(default)]
    pub args: BTreeMap<String, serde_json::Value>,
}

/// A file the spell left in its output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpellFile {
    /// Relative to the output directory.
    pub path: String,
    pub size: u64,
    /// Guessed from the extension (`image/png`, `text/csv`, ...).
    pub mime: String,
    /// The contents, base64, when the file is at most 1 MiB (`None` above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
}

/// `POST /spells/{name}/runs` answer: how the run ended. A script that fails is still
/// a run (200, `exitCode` ≠ 0); a run that could not happen is an HTTP error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpellRun {
    pub spell: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// `None` when the run was stopped at its timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The contents of `result.json` in the output directory, if the spell wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default)]
    pub files: Vec<SpellFile>,
    pub duration_ms: u64,
    /// True when the run hit its timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// True when stdout or stderr were cut (each keeps its last 1 MiB).
    #[serde(default)]
    pub truncated: bool,
}

/// Checks a pip requirement as an agent would pass it (`pandas`, `numpy==2.1`,
/// `requests[socks]>=2`): no options, no paths or URLs, no whitespace.
pub fn check_package_spec(spec: &str) -> Result<(), String> {
    let ok_start = spec
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = spec
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-[],<>=!~*".contains(c));
    if spec.len() <= 200 && ok_start && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "{spec:?} is not a package requirement: use a name with an optional version \
             (e.g. pandas, numpy==2.1.0, requests[socks]>=2); options, paths and URLs are \
             not accepted"
        ))
    }
}

/// Checks an npm package as a spell names it (`lodash`, `lodash@4.17.21`,
/// `@types/node@20`): no options, paths or URLs.
pub fn check_npm_package_spec(spec: &str) -> Result<(), String> {
    let ok_start = spec
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '@');
    let ok_chars = spec
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "@/._-~^<>=*".contains(c));
    if spec.len() <= 200 && ok_start && ok_chars && !spec.contains("..") && !spec.contains("//") {
        Ok(())
    } else {
        Err(format!(
            "{spec:?} is not an npm package: use a name with an optional version (e.g. \
             lodash, lodash@4.17.21, @types/node@20); options, paths and URLs are not accepted"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_package_specs() {
        for ok in [
            "pandas",
            "numpy==2.1.0",
            "requests[socks]>=2,<3",
            "a.b-c_d~=1.0",
        ] {
            assert!(check_package_spec(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-r req.txt",
            "--index-url=http://x",
            "pkg; rm -rf /",
            "./local",
            "git+https://x/y",
            "a b",
        ] {
            assert!(check_package_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn npm_package_specs() {
        for ok in ["lodash", "lodash@4.17.21", "@types/node@20"] {
            assert!(check_npm_package_spec(ok).is_ok(), "{ok}");
        }
        for bad in ["--save", "../x", "https://x", "file:x", "a b", ""] {
            assert!(check_npm_package_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spell_reads_from_json_with_camel_case_limits() {
        let s: Spell = serde_json::from_str(
            r#"{"name":"x","language":"python","code":"print(1)","timeoutSecs":5,
                "memoryMB":256,"parameters":[{"name":"n","type":"integer","default":3}]}"#,
        )
        .unwrap();
        assert_eq!(s.timeout_secs, Some(5));
        assert_eq!(s.memory_mb, Some(256));
        assert_eq!(s.parameters[0].kind, ParamType::Integer);
        assert!(
            serde_json::from_str::<Spell>(r#"{"name":"x","language":"cobol","code":""}"#).is_err()
        );
    }
}
