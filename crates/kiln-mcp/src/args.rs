//! The tools' arguments: typed, with JSON schemas (schemars) the model reads, and the
//! checks that go beyond the types.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ToolError;

/// The template of the sandbox a session makes for `run_code` when none is named.
pub const DEFAULT_TEMPLATE: &str = "code-interpreter-v1";
/// Longest lifetime a tool may ask for (the server has its own cap too).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Largest file `read_file` returns and `write_file` takes.
pub const MAX_FILE_BYTES: usize = 10 << 20;

/// Parses `args` (a JSON object, or nothing) as tool `tool`'s arguments.
pub fn parse<T: DeserializeOwned>(tool: &str, args: Option<Value>) -> Result<T, ToolError> {
    let args = match args {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(other) => {
            return Err(ToolError::invalid(
                tool,
                format!("arguments must be a JSON object, not {other}"),
            ))
        }
    };
    serde_json::from_value(args).map_err(|e| ToolError::invalid(tool, e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    #[default]
    Python,
    #[serde(alias = "js")]
    Javascript,
    #[serde(alias = "ts")]
    Typescript,
    #[serde(alias = "sh")]
    Bash,
}

impl Language {
    /// The name the code interpreter takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Typescript => "typescript",
            Language::Bash => "bash",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Text, written and read as UTF-8.
    #[default]
    Utf8,
    /// Bytes, as standard base64.
    Base64,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxArgs {
    /// Template to start from (default `code-interpreter-v1`, which has the code
    /// interpreter `run_code` needs; `base` is a plain Debian).
    #[serde(default)]
    pub template: Option<String>,
    /// Seconds until the sandbox is killed (default 300).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Memory in MiB instead of the template's (up to the server's cap).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPUs instead of the template's (up to the server's cap).
    #[serde(default)]
    pub cpu_count: Option<u32>,
    /// Whether the sandbox may reach the internet (default true).
    #[serde(default)]
    pub internet: Option<bool>,
    /// Labels to find it by later (`list_sandboxes`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Keep the sandbox running after this MCP session ends (default: killed then).
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSandboxesArgs {
    /// Only sandboxes with all of these metadata labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillSandboxArgs {
    /// The sandbox to kill.
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeArgs {
    /// The code. State (variables, imports) persists between calls in one sandbox.
    pub code: String,
    /// python (default), javascript, typescript or bash.
    #[serde(default)]
    pub language: Language,
    /// Run in this sandbox (it needs the code interpreter, e.g. template
    /// code-interpreter-v1). Default: the session's own sandbox, made on first use.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// Seconds before the run is interrupted (the kernel and its state stay).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Environment variables for this run only.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Keep the session's sandbox, if this call makes it, after the session ends.
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandArgs {
    /// A shell command line, run with `bash -l -c`.
    pub command: String,
    /// Default: the session's own sandbox, made on first use.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// Working directory (default: the user's home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment variables for this command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The sandbox user to run as (default: the template's, `user`; `root` works).
    #[serde(default)]
    pub user: Option<String>,
    /// Seconds before the command is killed (default 60; 0 = no limit, only with
    /// background).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Start the command and return its pid at once; it keeps running.
    #[serde(default)]
    pub background: bool,
    /// Keep the session's sandbox, if this call makes it, after the session ends.
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// Absolute, or relative to the user's home.
    pub path: String,
    /// Default: the session's own sandbox.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// utf8 (default; PNG and JPEG files come back as images) or base64.
    #[serde(default)]
    pub encoding: Encoding,
    /// The sandbox user to read as.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// Absolute, or relative to the user's home; parent directories are made.
    pub path: String,
    /// The contents, as `encoding` says.
    pub content: String,
    /// utf8 (default) or base64.
    #[serde(default)]
    pub encoding: Encoding,
    /// Default: the session's own sandbox, made on first use.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// The sandbox user who owns the file.
    #[serde(default)]
    pub user: Option<String>,
    /// Keep the session's sandbox, if this call makes it, after the session ends.
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// The directory (default: the user's home).
    #[serde(default)]
    pub path: Option<String>,
    /// Levels to descend, 1 (default) to 5.
    #[serde(default)]
    pub depth: Option<u32>,
    /// Default: the session's own sandbox.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// The sandbox user to list as.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallPackageArgs {
    /// pip requirements: `pandas`, `numpy==2.1.0`, `requests[socks]>=2`.
    pub packages: Vec<String>,
    /// Default: the session's own sandbox, made on first use.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// Keep the session's sandbox, if this call makes it, after the session ends.
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetEnvironmentArgs {
    /// Default: the session's own sandbox, made on first use.
    #[serde(default)]
    pub sandbox_id: Option<String>,
    /// Keep the session's sandbox, if this call makes it, after the session ends.
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListSpellsArgs {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSpellArgs {
    /// The spell (see `list_spells`).
    pub name: String,
    /// Its arguments, by parameter name.
    #[serde(default)]
    pub args: BTreeMap<String, Value>,
}

/// A sandbox id as the API makes them; checked before it goes into a URL path.
pub fn check_sandbox_id(tool: &str, id: &str) -> Result<(), ToolError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ToolError::invalid(
            tool,
            format!(
                "{id:?} is not a sandbox id (letters, digits, '-' and '_'; see list_sandboxes)"
            ),
        ))
    }
}

/// A timeout in seconds: positive, finite, at most [`MAX_TIMEOUT_SECS`].
pub fn check_timeout(tool: &str, secs: f64) -> Result<std::time::Duration, ToolError> {
    if secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_SECS as f64 {
        Ok(std::time::Duration::from_secs_f64(secs))
    } else {
        Err(ToolError::invalid(
            tool,
            format!("timeout must be between 0 and {MAX_TIMEOUT_SECS} seconds, got {secs}"),
        ))
    }
}

impl CreateSandboxArgs {
    pub fn check(&self, tool: &str) -> Result<(), ToolError> {
        if let Some(t) = self.timeout {
            if t == 0 || t > MAX_TIMEOUT_SECS {
                return Err(ToolError::invalid(
                    tool,
                    format!("timeout must be 1 to {MAX_TIMEOUT_SECS} seconds, got {t}"),
                ));
            }
        }
        if self.memory_mb == Some(0) {
            return Err(ToolError::invalid(tool, "memory_mb must be at least 1"));
        }
        if self.cpu_count == Some(0) {
            return Err(ToolError::invalid(tool, "cpu_count must be at least 1"));
        }
        if self.template.as_deref().is_some_and(str::is_empty) {
            return Err(ToolError::invalid(tool, "template must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_languages_and_fields_are_named() {
        let e = parse::<RunCodeArgs>("run_code", Some(json!({"code": "1", "language": "cobol"})))
            .unwrap_err()
            .message();
        assert!(e.starts_with("invalid arguments for run_code: "), "{e}");
        assert!(
            e.contains("cobol") && e.contains("python") && e.contains("bash"),
            "{e}"
        );
        let e = parse::<RunCodeArgs>("run_code", Some(json!({"code": "1", "lang": "python"})))
            .unwrap_err()
            .message();
        assert!(e.contains("unknown field `lang`"), "{e}");
        let e = parse::<RunCodeArgs>("run_code", Some(json!({})))
            .unwrap_err()
            .message();
        assert!(e.contains("missing field `code`"), "{e}");
        let e = parse::<RunCodeArgs>("run_code", Some(json!([1])))
            .unwrap_err()
            .message();
        assert!(e.contains("must be a JSON object"), "{e}");
    }

    #[test]
    fn defaults_and_aliases() {
        let a: RunCodeArgs = parse("run_code", Some(json!({"code": "x"}))).unwrap();
        assert_eq!(a.language, Language::Python);
        assert!(!a.keep && a.sandbox_id.is_none());
        let a: RunCodeArgs =
            parse("run_code", Some(json!({"code": "x", "language": "js"}))).unwrap();
        assert_eq!(a.language.as_str(), "javascript");
        let a: CreateSandboxArgs = parse("create_sandbox", None).unwrap();
        assert!(a.template.is_none() && a.metadata.is_empty());
    }

    #[test]
    fn checks() {
        assert!(check_sandbox_id("t", "abc123").is_ok());
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_sandbox_id("t", bad).is_err(), "{bad}");
        }
        assert!(check_timeout("t", 1.5).is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert!(check_timeout("t", bad).is_err(), "{bad}");
        }
        let c = CreateSandboxArgs {
            cpu_count: Some(0),
            ..Default::default()
        };
        assert!(c
            .check("create_sandbox")
            .unwrap_err()
            .message()
            .contains("cpu_count"));
        let c = CreateSandboxArgs {
            timeout: Some(0),
            ..Default::default()
        };
        assert!(c.check("create_sandbox").is_err());
    }
}

/// Which mouse button a click uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MouseButton {
    #[default]
    Left,
    Middle,
    Right,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScreenshotArgs {
    /// A sandbox of the `desktop` template (create_sandbox with template "desktop").
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClickArgs {
    /// A sandbox of the `desktop` template.
    pub sandbox_id: String,
    /// Pixels from the left edge of the screen (1024x768 by default).
    pub x: u32,
    /// Pixels from the top edge.
    pub y: u32,
    /// left (default), middle or right.
    #[serde(default)]
    pub button: MouseButton,
    /// A double click.
    #[serde(default)]
    pub double: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeArgs {
    /// A sandbox of the `desktop` template.
    pub sandbox_id: String,
    /// The text to type into the focused window.
    pub text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PressArgs {
    /// A sandbox of the `desktop` template.
    pub sandbox_id: String,
    /// X key names, `+` for chords: Return, Escape, Tab, ctrl+c, alt+F4, shift+Tab.
    pub keys: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenUrlArgs {
    /// A sandbox of the `desktop` template.
    pub sandbox_id: String,
    /// An http:// or https:// URL, opened in the desktop's default browser (Chromium).
    pub url: String,
}
