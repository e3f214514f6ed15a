//! Dockerfile projects: a Dockerfile subset and `kiln.toml` turned into the E2B build
//! recipe (as the Template SDK's `from_dockerfile` does client-side), with the COPY
//! contexts hashed and archived. Used by `kiln template build DIR` (which sends them
//! through the API) and by the server for its built-in templates.
//!
//! Dockerfile: exactly one `FROM`; `RUN`, `COPY`/`ADD` of local files (`--chown`),
//! `ENV`, `ARG`, `WORKDIR`, `USER`, `CMD`/`ENTRYPOINT` (the start command). Docker
//! instructions Kiln does not need (`EXPOSE`, `LABEL`, ...) are skipped with a note; an
//! unknown instruction is an error naming its line.
//!
//! `kiln.toml` (optional; flat `key = value`): `name`, `cpu_count`, `memory_mb`,
//! `runtime` (`jail` or `gvisor`: where the template's sandboxes run),
//! `ready_cmd`, `start_cmd`, `cdp_port` (the port of the template's browser DevTools
//! endpoint, served by Kiln's CDP route).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// What is wrong with a Dockerfile project: the file, line and cause in one message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DockerfileError(String);

impl From<std::io::Error> for DockerfileError {
    fn from(e: std::io::Error) -> Self {
        DockerfileError(e.to_string())
    }
}

pub type Result<T, E = DockerfileError> = std::result::Result<T, E>;

macro_rules! bail {
    ($($arg:tt)*) => { return Err(DockerfileError(format!($($arg)*))) };
}

/// `context`/`with_context` in the manner of anyhow: the context, then the cause.
trait Context<T> {
    fn context(self, ctx: impl Display) -> Result<T>;
    fn with_context<C: Display>(self, ctx: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, ctx: impl Display) -> Result<T> {
        self.map_err(|e| DockerfileError(format!("{ctx}: {e}")))
    }
    fn with_context<C: Display>(self, ctx: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| DockerfileError(format!("{}: {e}", ctx())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, ctx: impl Display) -> Result<T> {
        self.ok_or_else(|| DockerfileError(ctx.to_string()))
    }
    fn with_context<C: Display>(self, ctx: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| DockerfileError(ctx().to_string()))
    }
}

/// A Dockerfile turned into a recipe.
#[derive(Debug, Default, PartialEq)]
pub struct Recipe {
    pub spec: Value,
    /// `(src, dest, filesHash)` per COPY, in order.
    pub copies: Vec<(String, String, String)>,
    /// Instructions skipped, with their line.
    pub skipped: Vec<String>,
}

const SKIPPED: &[&str] = &[
    "EXPOSE",
    "LABEL",
    "VOLUME",
    "HEALTHCHECK",
    "SHELL",
    "STOPSIGNAL",
    "ONBUILD",
    "MAINTAINER",
];

/// Joins continuation lines and drops comments: `(line number, text)`.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if cur.is_empty() {
            start = i + 1;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body.trim_end());
            cur.push(' ');
        } else {
            cur.push_str(t);
            out.push((start, std::mem::take(&mut cur)));
        }
    }
    if !cur.trim().is_empty() {
        out.push((start, cur));
    }
    out
}

/// `["a", "b"]` (exec form) joined with spaces, or the text as is (shell form).
fn command_text(rest: &str) -> String {
    match serde_json::from_str::<Vec<String>>(rest) {
        Ok(v) => v.join(" "),
        Err(_) => rest.to_string(),
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

/// `K=V K2="V 2"` or `K V` → pairs.
fn env_pairs(rest: &str) -> Vec<(String, String)> {
    if !rest.split_whitespace().next().unwrap_or("").contains('=') {
        let (k, v) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        return vec![(k.to_string(), unquote(v))];
    }
    let mut pairs = Vec::new();
    let mut chars = rest.chars().peekable();
    while chars.peek().is_some() {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        let mut quote = None;
        while let Some(&c) = chars.peek() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, c) if c.is_whitespace() => break,
                _ => val.push(c),
            }
            chars.next();
        }
        pairs.push((key, val));
    }
    pairs
}

/// Parses `text` (the Dockerfile in `ctx`) into a recipe; COPY sources are hashed.
pub fn parse_dockerfile(text: &str, ctx: &Path) -> Result<Recipe> {
    let mut r = Recipe::default();
    let mut from: Option<String> = None;
    let mut steps: Vec<Value> = vec![json!({"type": "USER", "args": ["root"]})];
    steps.push(json!({"type": "WORKDIR", "args": ["/"]}));
    let (mut set_user, mut set_workdir) = (false, false);
    let mut start_cmd: Option<String> = None;
    for (line, text) in logical_lines(text) {
        let (instr, rest) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        let rest = rest.trim();
        let at = || format!("Dockerfile line {line}");
        match instr.to_ascii_uppercase().as_str() {
            "FROM" => {
                if from.is_some() {
                    bail!(
                        "{}: only one FROM is supported (no multi-stage builds)",
                        at()
                    );
                }
                let image = rest.split_whitespace().next().unwrap_or("");
                if image.is_empty() {
                    bail!("{}: FROM needs an image", at());
                }
                from = Some(image.to_string());
            }
            "RUN" => steps.push(json!({"type": "RUN", "args": [command_text(rest)]})),
            "COPY" | "ADD" => {
                let mut owner = String::new();
                let mut words = Vec::new();
                for w in rest.split_whitespace() {
                    if let Some(o) = w.strip_prefix("--chown=") {
                        owner = o.to_string();
                    } else if !w.starts_with("--") {
                        words.push(w.to_string());
                    }
                }
                if words.len() < 2 {
                    bail!("{}: {instr} needs a source and a destination", at());
                }
                let dest = words.pop().unwrap_or_default();
                for src in words {
                    if src.contains("://") {
                        bail!("{}: {instr} of a URL is not supported", at());
                    }
                    let hash = files_hash(ctx, &src, &dest).with_context(at)?;
                    steps.push(
                        json!({"type": "COPY", "args": [src, dest, owner, ""], "filesHash": hash}),
                    );
                    r.copies.push((src, dest.clone(), hash));
                }
            }
            "ENV" | "ARG" => {
                let pairs = if instr.eq_ignore_ascii_case("ARG") && !rest.contains('=') {
                    vec![(rest.to_string(), String::new())]
                } else {
                    env_pairs(rest)
                };
                let args: Vec<String> = pairs.into_iter().flat_map(|(k, v)| [k, v]).collect();
                steps.push(json!({"type": "ENV", "args": args}));
            }
            "WORKDIR" => {
                set_workdir = true;
                steps.push(json!({"type": "WORKDIR", "args": [rest]}));
            }
            "USER" => {
                set_user = true;
                steps.push(json!({"type": "USER", "args": [rest]}));
            }
            "CMD" | "ENTRYPOINT" => start_cmd = Some(command_text(rest)),
            other if SKIPPED.contains(&other) => r.skipped.push(format!(
                "line {line}: {other} (not needed by Kiln; skipped)"
            )),
            other => bail!(
                "{}: unknown instruction {other:?}; Kiln supports FROM, RUN, COPY, ADD, ENV, \
                 ARG, WORKDIR, USER, CMD and ENTRYPOINT",
                at()
            ),
        }
    }
    let from = from.context("the Dockerfile has no FROM")?;
    if !set_user {
        steps.push(json!({"type": "USER", "args": ["user"]}));
    }
    if !set_workdir {
        steps.push(json!({"type": "WORKDIR", "args": ["/home/user"]}));
    }
    let mut spec = json!({"force": false, "steps": steps});
    match from.strip_prefix("kiln/") {
        Some(t) if t != "base" => spec["fromTemplate"] = t.into(),
        _ => spec["fromImage"] = from.into(),
    }
    if let Some(c) = start_cmd {
        spec["startCmd"] = c.into();
        spec["readyCmd"] = "sleep 20".into();
    }
    r.spec = spec;
    Ok(r)
}

/// The SDK's files hash: `COPY src dest`, then per path (sorted, recursive) its
/// relative name, mode, size and contents (or link target).
pub fn files_hash(ctx: &Path, src: &str, dest: &str) -> Result<String> {
    if src.starts_with('/') || src.split('/').any(|c| c == "..") {
        bail!("COPY source {src:?} must be inside the build context");
    }
    if src.contains(['*', '?', '[']) {
        bail!("COPY source {src:?}: globs are not supported by `kiln template build`");
    }
    let root = ctx.join(src);
    if std::fs::symlink_metadata(&root).is_err() {
        bail!("COPY source {src:?} does not exist in {}", ctx.display());
    }
    let mut paths = Vec::new();
    walk(&root, &mut paths)?;
    paths.sort();
    let mut h = Sha256::new();
    h.update(format!("COPY {src} {dest}"));
    for p in paths {
        let m = std::fs::symlink_metadata(&p)?;
        h.update(
            p.strip_prefix(ctx)
                .unwrap_or(&p)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(m.mode().to_string());
        h.update(m.size().to_string());
        if m.file_type().is_symlink() {
            h.update(std::fs::read_link(&p)?.to_string_lossy().as_bytes());
        } else if m.is_file() {
            h.update(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    out.push(p.to_path_buf());
    if std::fs::symlink_metadata(p)?.is_dir() {
        for e in std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
            walk(&e?.path(), out)?;
        }
    }
    Ok(())
}

/// A tar.gz of `src` (relative to `ctx`), entries named relative to `ctx`.
pub fn archive(ctx: &Path, src: &str) -> Result<Vec<u8>> {
    let out = std::process::Command::new("tar")
        .arg("-czf")
        .arg("-")
        .arg("-C")
        .arg(ctx)
        .arg("--")
        .arg(src)
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!(
            "tar of {src}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `kiln.toml`: flat `key = value` lines (strings quoted, numbers bare).
pub fn parse_kiln_toml(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("kiln.toml line {}: expected key = value", i + 1))?;
        let k = k.trim();
        if ![
            "name",
            "cpu_count",
            "memory_mb",
            "ready_cmd",
            "start_cmd",
            "runtime",
            "cdp_port",
        ]
        .contains(&k)
        {
            bail!(
                "kiln.toml line {}: unknown key {k:?} (known: name, cpu_count, memory_mb, \
                 ready_cmd, start_cmd, runtime, cdp_port)",
                i + 1
            );
        }
        let v = v.trim();
        let v = if v.starts_with('"') {
            serde_json::from_str::<String>(v)
                .with_context(|| format!("kiln.toml line {}: bad string", i + 1))?
        } else {
            v.to_string()
        };
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

/// One COPY context to upload: the step's `filesHash` and a tar.gz of its files.
pub struct ContextArchive {
    pub files_hash: String,
    pub archive: Vec<u8>,
}

/// Everything a build of a Dockerfile project needs.
pub struct Project {
    pub name: String,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub recipe: Recipe,
    pub uploads: Vec<ContextArchive>,
}

/// Reads `dir/Dockerfile` and `dir/kiln.toml`.
pub fn load_project(dir: &Path, name: Option<String>, skip_cache: bool) -> Result<Project> {
    let df = dir.join("Dockerfile");
    let text = std::fs::read_to_string(&df).with_context(|| format!("reading {}", df.display()))?;
    let mut recipe = parse_dockerfile(&text, dir)?;
    let toml = match std::fs::read_to_string(dir.join("kiln.toml")) {
        Ok(t) => parse_kiln_toml(&t)?,
        Err(_) => BTreeMap::new(),
    };
    let name = name
        .or_else(|| toml.get("name").cloned())
        .or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().to_lowercase()))
        })
        .context("give the template a name (--name or name in kiln.toml)")?;
    if let Some(c) = toml.get("start_cmd") {
        recipe.spec["startCmd"] = c.clone().into();
    }
    if let Some(c) = toml.get("ready_cmd") {
        recipe.spec["readyCmd"] = c.clone().into();
    }
    if let Some(r) = toml.get("runtime") {
        if !crate::recipe::RUNTIMES.contains(&r.as_str()) {
            bail!("kiln.toml: runtime {r:?} is not one of jail, gvisor");
        }
        recipe.spec["runtime"] = r.clone().into();
    }
    if let Some(p) = toml.get("cdp_port") {
        let port: u16 = p.parse().ok().filter(|p| *p != 0).with_context(|| {
            format!("kiln.toml: cdp_port {p:?} must be a port number (1-65535)")
        })?;
        recipe.spec["cdpPort"] = port.into();
    }
    recipe.spec["force"] = skip_cache.into();
    let cpu_count = match toml.get("cpu_count") {
        Some(v) => v.parse().context("kiln.toml: cpu_count must be a number")?,
        None => 2,
    };
    let memory_mb = match toml.get("memory_mb") {
        Some(v) => v.parse().context("kiln.toml: memory_mb must be a number")?,
        None => 1024,
    };
    let mut uploads = Vec::new();
    for (src, _, hash) in &recipe.copies {
        uploads.push(ContextArchive {
            files_hash: hash.clone(),
            archive: archive(dir, src)?,
        });
    }
    Ok(Project {
        name,
        cpu_count,
        memory_mb,
        recipe,
        uploads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_subset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/a.txt"), "a").unwrap();
        let text = "# comment\nFROM debian:bookworm AS x\nRUN apt-get update && \\\n    echo hi\n\
                    COPY --chown=user app /opt/app\nENV A=1 B=\"two words\"\nARG V\n\
                    EXPOSE 80\nWORKDIR /opt\nCMD [\"python3\", \"-m\", \"http.server\"]\n";
        let r = parse_dockerfile(text, dir.path()).unwrap();
        let steps = r.spec["steps"].as_array().unwrap();
        assert_eq!(r.spec["fromImage"], "debian:bookworm");
        assert_eq!(steps[2]["args"][0], "apt-get update && echo hi");
        assert_eq!(steps[3]["type"], "COPY");
        assert_eq!(steps[3]["args"][2], "user");
        assert_eq!(steps[4]["args"], json!(["A", "1", "B", "two words"]));
        assert_eq!(steps[5]["args"], json!(["V", ""]));
        assert_eq!(steps.last().unwrap()["args"], json!(["user"]));
        assert_eq!(r.spec["startCmd"], "python3 -m http.server");
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.copies.len(), 1);
        // The hash covers the contents.
        let h1 = files_hash(dir.path(), "app", "/opt/app").unwrap();
        std::fs::write(dir.path().join("app/a.txt"), "b").unwrap();
        assert_ne!(h1, files_hash(dir.path(), "app", "/opt/app").unwrap());
    }

    #[test]
    fn broken_dockerfiles_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let e = parse_dockerfile("FROM a\nFROBNICATE x\n", dir.path()).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(parse_dockerfile("RUN true\n", dir.path()).is_err());
        assert!(parse_dockerfile("FROM a\nFROM b\n", dir.path()).is_err());
        let e = parse_dockerfile("FROM a\nCOPY missing /x\n", dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    }

    #[test]
    fn kiln_toml() {
        let t = parse_kiln_toml(
            "name = \"web\"\ncpu_count = 4\n# c\nready_cmd = \"curl -f localhost\"\n",
        )
        .unwrap();
        assert_eq!(t["name"], "web");
        assert_eq!(t["cpu_count"], "4");
        assert!(parse_kiln_toml("colour = 1").is_err());
    }

    #[test]
    fn kiln_toml_runtime_goes_into_the_recipe() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM e2bdev/base\nRUN true\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("kiln.toml"), "runtime = \"jail\"\n").unwrap();
        let p = load_project(dir.path(), Some("t".into()), false).unwrap();
        assert_eq!(p.recipe.spec["runtime"], "jail");
        let spec: crate::recipe::BuildSpec = serde_json::from_value(p.recipe.spec).unwrap();
        assert_eq!(spec.runtime().unwrap(), Some("jail"));

        std::fs::write(dir.path().join("kiln.toml"), "runtime = \"kvm\"\n").unwrap();
        let e = load_project(dir.path(), Some("t".into()), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not one of jail, gvisor"), "{e}");
        let spec = crate::recipe::BuildSpec {
            runtime: Some("docker".into()),
            ..Default::default()
        };
        assert!(spec.runtime().is_err());
    }

    #[test]
    fn kiln_toml_cdp_port_goes_into_the_recipe_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM e2bdev/base
",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("kiln.toml"),
            "cdp_port = 9222
",
        )
        .unwrap();
        let p = load_project(dir.path(), Some("t".into()), false).unwrap();
        let spec: crate::recipe::BuildSpec = serde_json::from_value(p.recipe.spec).unwrap();
        assert_eq!(spec.cdp_port().unwrap(), Some(9222));
        for bad in ["0", "65536", "\"x\"", "-1"] {
            std::fs::write(dir.path().join("kiln.toml"), format!("cdp_port = {bad}\n")).unwrap();
            let e = load_project(dir.path(), Some("t".into()), false)
                .err()
                .unwrap();
            assert!(e.to_string().contains("cdp_port"), "{bad}: {e}");
        }
        // envd's port is the server's, never a browser's (an API-sent recipe too).
        let spec = crate::recipe::BuildSpec {
            cdp_port: Some(49983),
            ..Default::default()
        };
        assert!(spec.cdp_port().is_err());
    }
}
