//! Languages as the E2B API names them (spec A.5, A.6): normalization, which kernels may
//! serve a language, and the per-language snippets that set and unset environment
//! variables inside a kernel.

use std::fmt;

/// A normalized language name: trimmed, lower-case, `js`/`ts` expanded, empty = `python`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Language(String);

impl Language {
    pub const PYTHON: &'static str = "python";

    pub fn normalize(raw: Option<&str>) -> Self {
        let lower = raw.unwrap_or_default().trim().to_lowercase();
        let name = match lower.as_str() {
            "" => Self::PYTHON.to_owned(),
            "js" => "javascript".to_owned(),
            "ts" => "typescript".to_owned(),
            _ => lower,
        };
        Self(name)
    }

    pub fn python() -> Self {
        Self(Self::PYTHON.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_python(&self) -> bool {
        self.0 == Self::PYTHON
    }

    /// Kernel names to try, best first. The kernel name is the language (E2B's
    /// convention), with these additions:
    /// - `python` → also Jupyter's own alias `python3`;
    /// - `javascript` → also `jslab`, tslab's JavaScript kernel (what Kiln's template
    ///   installs; E2B's ijavascript fork is named `javascript`);
    /// - `typescript` → `tslab`, tslab's TypeScript kernel, then `javascript` (E2B's
    ///   ijavascript transpiles TypeScript). Never `jslab`: it rejects type annotations;
    /// - `r` → also `ir`, IRkernel's name (Debian's `r-cran-irkernel`, and E2B's
    ///   template via `IRkernel::installspec`), which declares the language as `R`.
    ///
    /// Java needs no alias: PyPI's `jjava` (and E2B's IJava) install as `java`.
    ///
    /// Kernelspecs that merely declare the language are a further fallback (see
    /// [`crate::kernelspec`]).
    pub fn kernel_names(&self) -> Vec<&str> {
        match self.0.as_str() {
            "python" => vec!["python", "python3"],
            "javascript" => vec!["javascript", "jslab"],
            "typescript" => vec!["typescript", "tslab", "javascript"],
            "r" => vec!["r", "ir"],
            other => vec![other],
        }
    }

    fn family(&self) -> Family {
        match self.0.as_str() {
            "python" => Family::Python,
            "javascript" | "typescript" => Family::JavaScript,
            "r" => Family::R,
            "java" => Family::Java,
            "bash" => Family::Bash,
            _ => Family::Unknown,
        }
    }

    /// Code that sets `vars` in the kernel, one statement per line; `None` when this
    /// language has no known way to do it.
    pub fn set_env_code<'a>(
        &self,
        vars: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<String> {
        let family = self.family();
        let lines: Vec<String> = vars
            .into_iter()
            .filter_map(|(k, v)| family.set(k, v))
            .collect();
        (!lines.is_empty()).then(|| lines.join("\n"))
    }

    /// Code that gives every key in `restore` its value (`Some`) or removes it (`None`).
    pub fn restore_env_code<'a>(
        &self,
        restore: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Option<String> {
        let family = self.family();
        let lines: Vec<String> = restore
            .into_iter()
            .filter_map(|(k, v)| match v {
                Some(v) => family.set(k, v),
                None => family.unset(k),
            })
            .collect();
        (!lines.is_empty()).then(|| lines.join("\n"))
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Python,
    JavaScript,
    R,
    Java,
    Bash,
    Unknown,
}

impl Family {
    fn set(self, key: &str, value: &str) -> Option<String> {
        let k = json_str(key);
        let v = json_str(value);
        Some(match self {
            Family::Python => format!("import os; os.environ[{k}] = {v}"),
            Family::JavaScript => format!("process.env[{k}] = {v}"),
            Family::R => format!("Sys.setenv({k} = {v})"),
            Family::Java => format!("System.setProperty({k}, {});", java_str(value)),
            Family::Bash => format!("export {key}={}", shell_quote(value)),
            Family::Unknown => return None,
        })
    }

    fn unset(self, key: &str) -> Option<String> {
        let k = json_str(key);
        Some(match self {
            Family::Python => format!("import os; os.environ.pop({k}, None)"),
            Family::JavaScript => format!("delete process.env[{k}]"),
            Family::R => format!("Sys.unsetenv({k})"),
            Family::Java => format!("System.clearProperty({});", java_str(key)),
            Family::Bash => format!("unset {key}"),
            Family::Unknown => return None,
        })
    }
}

/// A double-quoted literal that Python, JavaScript and R all read back unchanged.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Java processes `\uXXXX` before lexing, so escape everything non-printable by hand.
fn java_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\{:03o}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Environment variable names we accept: a POSIX identifier, so that every language's
/// snippet (bash `export` in particular) is well-formed.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid environment variable name {name:?}: use letters, digits and '_', not starting with a digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        assert_eq!(Language::normalize(None).as_str(), "python");
        assert_eq!(Language::normalize(Some("  ")).as_str(), "python");
        assert_eq!(Language::normalize(Some(" Python ")).as_str(), "python");
        assert_eq!(Language::normalize(Some("JS")).as_str(), "javascript");
        assert_eq!(Language::normalize(Some("ts")).as_str(), "typescript");
        assert_eq!(Language::normalize(Some("Bash")).as_str(), "bash");
        assert_eq!(Language::normalize(Some("cobol")).as_str(), "cobol");
    }

    #[test]
    fn kernel_names() {
        assert_eq!(Language::python().kernel_names(), ["python", "python3"]);
        assert_eq!(
            Language::normalize(Some("js")).kernel_names(),
            ["javascript", "jslab"]
        );
        assert_eq!(
            Language::normalize(Some("ts")).kernel_names(),
            ["typescript", "tslab", "javascript"]
        );
        assert_eq!(Language::normalize(Some("bash")).kernel_names(), ["bash"]);
        assert_eq!(Language::normalize(Some("R")).kernel_names(), ["r", "ir"]);
        assert_eq!(Language::normalize(Some("java")).kernel_names(), ["java"]);
    }

    #[test]
    fn env_snippets() {
        let py = Language::python();
        assert_eq!(
            py.set_env_code([("A", "it's \"x\"\n")]).unwrap(),
            r#"import os; os.environ["A"] = "it's \"x\"\n""#
        );
        assert_eq!(
            py.restore_env_code([("A", None), ("B", Some("v"))])
                .unwrap(),
            "import os; os.environ.pop(\"A\", None)\nimport os; os.environ[\"B\"] = \"v\""
        );
        let bash = Language::normalize(Some("bash"));
        assert_eq!(
            bash.set_env_code([("FOO", "it's")]).unwrap(),
            r"export FOO='it'\''s'"
        );
        assert_eq!(bash.restore_env_code([("FOO", None)]).unwrap(), "unset FOO");
        let js = Language::normalize(Some("js"));
        assert_eq!(
            js.set_env_code([("K", "v")]).unwrap(),
            r#"process.env["K"] = "v""#
        );
        let java = Language::normalize(Some("java"));
        assert_eq!(
            java.set_env_code([("K", "a\u{1}\\")]).unwrap(),
            r#"System.setProperty("K", "a\001\\");"#
        );
        let r = Language::normalize(Some("r"));
        assert_eq!(
            r.set_env_code([("K", "v")]).unwrap(),
            r#"Sys.setenv("K" = "v")"#
        );
        assert!(Language::normalize(Some("cobol"))
            .set_env_code([("K", "v")])
            .is_none());
        assert!(py.set_env_code([]).is_none());
    }

    #[test]
    fn env_names() {
        assert!(check_env_name("FOO_1").is_ok());
        assert!(check_env_name("_x").is_ok());
        for bad in ["", "1A", "A-B", "A B", "A=B", "é"] {
            assert!(check_env_name(bad).is_err(), "{bad}");
        }
    }
}
