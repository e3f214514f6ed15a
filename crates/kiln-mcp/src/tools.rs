//! The tool catalog: names, descriptions an LLM can act on, input schemas (from the
//! argument types in `args`), and one tool per spell built from its typed parameters.

use std::sync::Arc;

use kiln_api::spell::{ParamType, Spell};
use rmcp::handler::server::common::schema_for_type;
use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use schemars::JsonSchema;
use serde_json::{json, Value};

use crate::args::*;

/// The prefix of the per-spell tools: `spell_<name>`.
pub const SPELL_PREFIX: &str = "spell_";

/// The tools every session has (spell tools come on top, from the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolName {
    CreateSandbox,
    ListSandboxes,
    KillSandbox,
    RunCode,
    RunCommand,
    ReadFile,
    WriteFile,
    ListFiles,
    InstallPackage,
    GetEnvironment,
    ListSpells,
    RunSpell,
    Screenshot,
    Click,
    Type,
    Press,
    OpenUrl,
}

impl ToolName {
    pub const ALL: [ToolName; 17] = [
        ToolName::CreateSandbox,
        ToolName::ListSandboxes,
        ToolName::KillSandbox,
        ToolName::RunCode,
        ToolName::RunCommand,
        ToolName::ReadFile,
        ToolName::WriteFile,
        ToolName::ListFiles,
        ToolName::InstallPackage,
        ToolName::GetEnvironment,
        ToolName::ListSpells,
        ToolName::RunSpell,
        ToolName::Screenshot,
        ToolName::Click,
        ToolName::Type,
        ToolName::Press,
        ToolName::OpenUrl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::CreateSandbox => "create_sandbox",
            ToolName::ListSandboxes => "list_sandboxes",
            ToolName::KillSandbox => "kill_sandbox",
            ToolName::RunCode => "run_code",
            ToolName::RunCommand => "run_command",
            ToolName::ReadFile => "read_file",
            ToolName::WriteFile => "write_file",
            ToolName::ListFiles => "list_files",
            ToolName::InstallPackage => "install_package",
            ToolName::GetEnvironment => "get_environment",
            ToolName::ListSpells => "list_spells",
            ToolName::RunSpell => "run_spell",
            ToolName::Screenshot => "screenshot",
            ToolName::Click => "click",
            ToolName::Type => "type",
            ToolName::Press => "press",
            ToolName::OpenUrl => "open_url",
        }
    }

    pub fn parse(name: &str) -> Option<ToolName> {
        ToolName::ALL.into_iter().find(|t| t.as_str() == name)
    }

    fn description(self) -> &'static str {
        match self {
            ToolName::CreateSandbox => {
                "Start a new isolated Linux sandbox (a microVM-like container) and return its \
                 sandbox_id. Usually not needed: run_code, run_command and the file tools make \
                 a code-interpreter-v1 sandbox for this session on first use. Sandboxes this \
                 session creates are killed when it ends unless keep is true."
            }
            ToolName::ListSandboxes => {
                "List the running sandboxes this API key's team can see: id, template, state, \
                 start and end time, CPUs, memory and metadata. Filter by metadata labels."
            }
            ToolName::KillSandbox => {
                "Kill a sandbox now: its processes, files and state are gone for good."
            }
            ToolName::RunCode => {
                "Run code in a Jupyter-style code interpreter and return stdout, stderr, the \
                 value of the last expression, rich results (PNG/JPEG charts come back as \
                 images) and the error with its traceback if it raised. Variables, imports and \
                 files persist between calls in the same sandbox, so build on earlier cells. \
                 Languages: python (default), javascript, typescript, bash. Without sandbox_id \
                 the session's own code-interpreter-v1 sandbox is used (made on first use)."
            }
            ToolName::RunCommand => {
                "Run a shell command (bash -l -c) in a sandbox and return its stdout, stderr \
                 and exit code; a non-zero exit is reported as an error. Set cwd, env, user \
                 (e.g. root for apt-get) and timeout; background starts it and returns its pid \
                 at once (for servers and long jobs)."
            }
            ToolName::ReadFile => {
                "Read a file from a sandbox: text as UTF-8 (or base64 with encoding base64); \
                 PNG and JPEG files come back as images. At most 10 MiB."
            }
            ToolName::WriteFile => {
                "Write a file in a sandbox (created or replaced; parent directories are made). \
                 content is UTF-8 text, or base64 with encoding base64. At most 10 MiB."
            }
            ToolName::ListFiles => {
                "List a directory in a sandbox: name, path, type (file, dir, symlink), size, \
                 permissions, owner and modification time; depth descends into subdirectories."
            }
            ToolName::InstallPackage => {
                "pip-install Python packages into the code interpreter's environment, so the \
                 next run_code can import them. Takes requirements like pandas, numpy==2.1.0, \
                 requests[socks]>=2 (no options, paths or URLs). Needs internet in the sandbox."
            }
            ToolName::GetEnvironment => {
                "Describe the code interpreter's Python environment: Python version, \
                 implementation, platform, working directory and the installed packages with \
                 their versions."
            }
            ToolName::ListSpells => {
                "List the spells: named, parameterized programs this Kiln server runs in a \
                 fresh sandbox each (with limits), with their parameters. Run one with \
                 run_spell or its own spell_<name> tool."
            }
            ToolName::RunSpell => {
                "Run a spell by name with its arguments, in a fresh sandbox removed afterwards; \
                 returns exit code, stdout, stderr, its result and the files it left (images \
                 come back as images)."
            }
            ToolName::Screenshot => {
                "Take a screenshot of a desktop sandbox's screen (1024x768 unless the operator set E2B_DESKTOP_RESOLUTION; with the pointer) \
                 and return it as a PNG image. Make the sandbox with create_sandbox and \
                 template \"desktop\" (a Linux desktop with Chromium); its display starts on \
                 first use."
            }
            ToolName::Click => {
                "Move the mouse to (x, y) on a desktop sandbox's screen and click (left by \
                 default; middle, right, or a double click). Take a screenshot first to find \
                 where things are."
            }
            ToolName::Type => {
                "Type text into the focused window of a desktop sandbox, as keystrokes."
            }
            ToolName::Press => {
                "Press a key or a chord in a desktop sandbox: X key names joined by '+', e.g. \
                 Return, Escape, Tab, ctrl+c, ctrl+l, alt+F4."
            }
            ToolName::OpenUrl => {
                "Open an http(s) URL in a desktop sandbox's browser (Chromium); take a \
                 screenshot to see the page."
            }
        }
    }

    fn schema(self) -> Arc<JsonObject> {
        match self {
            ToolName::CreateSandbox => schema::<CreateSandboxArgs>(),
            ToolName::ListSandboxes => schema::<ListSandboxesArgs>(),
            ToolName::KillSandbox => schema::<KillSandboxArgs>(),
            ToolName::RunCode => schema::<RunCodeArgs>(),
            ToolName::RunCommand => schema::<RunCommandArgs>(),
            ToolName::ReadFile => schema::<ReadFileArgs>(),
            ToolName::WriteFile => schema::<WriteFileArgs>(),
            ToolName::ListFiles => schema::<ListFilesArgs>(),
            ToolName::InstallPackage => schema::<InstallPackageArgs>(),
            ToolName::GetEnvironment => schema::<GetEnvironmentArgs>(),
            ToolName::ListSpells => schema::<ListSpellsArgs>(),
            ToolName::RunSpell => schema::<RunSpellArgs>(),
            ToolName::Screenshot => schema::<ScreenshotArgs>(),
            ToolName::Click => schema::<ClickArgs>(),
            ToolName::Type => schema::<TypeArgs>(),
            ToolName::Press => schema::<PressArgs>(),
            ToolName::OpenUrl => schema::<OpenUrlArgs>(),
        }
    }

    fn annotations(self) -> ToolAnnotations {
        let read_only = matches!(
            self,
            ToolName::ListSandboxes
                | ToolName::ReadFile
                | ToolName::ListFiles
                | ToolName::GetEnvironment
                | ToolName::ListSpells
                | ToolName::Screenshot
        );
        ToolAnnotations::new()
            .read_only(read_only)
            .destructive(matches!(self, ToolName::KillSandbox | ToolName::WriteFile))
            .open_world(matches!(self, ToolName::OpenUrl))
    }

    pub fn tool(self) -> Tool {
        Tool::new(self.as_str(), self.description(), self.schema()).annotate(self.annotations())
    }
}

fn schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    schema_for_type::<T>()
}

/// The built-in tools, in a stable order.
pub fn builtin() -> Vec<Tool> {
    ToolName::ALL.into_iter().map(ToolName::tool).collect()
}

/// The `spell_<name>` tool of `spell`, or `None` when its name cannot be a tool name
/// that every client accepts (`[A-Za-z0-9_-]`, at most 64 with the prefix); such a
/// spell is still reached through `run_spell`.
pub fn spell_tool(spell: &Spell) -> Option<Tool> {
    let name = format!("{SPELL_PREFIX}{}", spell.name);
    let ok = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return None;
    }
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    for p in &spell.parameters {
        let mut prop = json!({ "type": ParamType::as_str(p.kind) });
        if !p.description.is_empty() {
            prop["description"] = json!(p.description);
        }
        match &p.default {
            Some(d) => prop["default"] = d.clone(),
            None => required.push(json!(p.name)),
        }
        properties.insert(p.name.clone(), prop);
    }
    let schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    let Value::Object(schema) = schema else {
        return None;
    };
    let description = if spell.description.is_empty() {
        format!("Run the spell {} in a fresh sandbox.", spell.name)
    } else {
        format!(
            "{} (Kiln spell {}: runs in a fresh sandbox removed afterwards.)",
            spell.description, spell.name
        )
    };
    Some(
        Tool::new(name, description, Arc::new(schema)).annotate(
            ToolAnnotations::new()
                .read_only(false)
                .open_world(spell.internet),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::spell::{SpellLanguage, SpellParam};

    #[test]
    fn every_builtin_has_an_object_schema_and_a_description() {
        let tools = builtin();
        assert_eq!(tools.len(), ToolName::ALL.len());
        for t in &tools {
            assert_eq!(t.input_schema["type"], "object", "{}", t.name);
            assert!(t.description.as_ref().is_some_and(|d| d.len() > 30));
            assert_eq!(
                ToolName::parse(&t.name).map(ToolName::as_str),
                Some(&*t.name)
            );
        }
        let run_code = ToolName::RunCode.tool();
        let props = &run_code.input_schema["properties"];
        assert!(props["code"].is_object());
        assert_eq!(run_code.input_schema["required"], json!(["code"]));
        let lang = serde_json::to_string(&props["language"]).unwrap()
            + &serde_json::to_string(&run_code.input_schema).unwrap();
        for l in ["python", "javascript", "typescript", "bash"] {
            assert!(lang.contains(l), "{l} missing from the run_code schema");
        }
    }

    fn spell(name: &str) -> Spell {
        Spell {
            name: name.into(),
            description: "Greets".into(),
            language: SpellLanguage::Python,
            code: "print(1)".into(),
            template: None,
            parameters: vec![
                SpellParam {
                    name: "who".into(),
                    kind: ParamType::String,
                    description: "whom to greet".into(),
                    default: None,
                },
                SpellParam {
                    name: "times".into(),
                    kind: ParamType::Integer,
                    description: String::new(),
                    default: Some(json!(1)),
                },
            ],
            timeout_secs: None,
            memory_mb: None,
            internet: false,
            packages: vec![],
            source: None,
        }
    }

    #[test]
    fn spell_tools_take_their_schema_from_the_parameters() {
        let t = spell_tool(&spell("greet")).unwrap();
        assert_eq!(t.name, "spell_greet");
        assert_eq!(
            Value::Object((*t.input_schema).clone()),
            json!({
                "type": "object",
                "properties": {
                    "who": {"type": "string", "description": "whom to greet"},
                    "times": {"type": "integer", "default": 1},
                },
                "required": ["who"],
                "additionalProperties": false,
            })
        );
        assert!(spell_tool(&spell("has space")).is_none());
        assert!(spell_tool(&spell(&"x".repeat(60))).is_none());
    }
}
