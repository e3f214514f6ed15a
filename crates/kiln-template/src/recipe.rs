//! A template recipe as the E2B Template SDK sends it (`TemplateBuildStartV2`): a base,
//! steps, a start and a ready command. Parsing turns the SDK's loose `{type, args}`
//! steps into typed [`Step`]s and says which step is wrong and why, and a `fromImage`
//! with its `fromImageRegistry` into the [`ImageSource`] that [`crate::oci`] pulls.

use std::collections::BTreeMap;
use std::fmt;

pub use oci_client::Reference;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The start body of a build, as the SDK serializes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image_registry: Option<serde_json::Value>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    /// Kiln's extension (the SDKs never send it; `kiln.toml`'s `runtime` does): the
    /// isolation runtime this template's sandboxes run on, one of [`RUNTIMES`];
    /// `None` is the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Kiln's extension (`kiln.toml`'s `cdp_port`): the port of the template's
    /// browser DevTools endpoint, which Kiln's proxy serves with a CDP-aware route
    /// (`docs/desktop.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdp_port: Option<u16>,
}

/// The runtimes a template may ask for.
pub const RUNTIMES: [&str; 2] = ["jail", "gvisor"];

/// One step as sent: `{"type": "RUN", "args": [...], "force": false, "filesHash"?}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<String>,
    #[serde(default)]
    pub force_upload: bool,
}

/// A parsed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `bash -l -c cmd` as `user` (or the current USER).
    Run {
        cmd: String,
        user: Option<String>,
    },
    /// Copy `src` (a path or glob inside the uploaded context `files_hash`) to `dest`.
    Copy {
        src: String,
        dest: String,
        owner: Option<String>,
        mode: Option<u32>,
        files_hash: String,
    },
    /// Set build (and sandbox) environment variables.
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
}

/// Where a build starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// An existing template of this store (`fromTemplate`).
    Template(String),
    /// A Debian image Kiln builds from Debian's packages instead of pulling it: the
    /// built-in `base` for bookworm, an internal base built on first use for trixie.
    Debian(crate::base::DebianBase),
    /// An image pulled from an OCI registry ([`crate::oci`]).
    Image(ImageSource),
}

/// Username and password for the image's registry (`fromImageRegistry` of type
/// `registry`). Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An image to pull: its reference and the credentials for its registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub reference: Reference,
    pub credentials: Option<Credentials>,
}

impl ImageSource {
    /// Parses `fromImage` and `fromImageRegistry` as the SDK sends them.
    pub fn parse(image: &str, registry: Option<&serde_json::Value>) -> Result<Self, RecipeError> {
        let reference: Reference = image.trim().parse().map_err(|e: oci_client::ParseError| {
            RecipeError::InvalidImage {
                image: image.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            reference,
            credentials: credentials(registry)?,
        })
    }

    /// The host (and port) the registry is reached at (`index.docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.reference.resolve_registry()
    }
}

fn credentials(registry: Option<&serde_json::Value>) -> Result<Option<Credentials>, RecipeError> {
    let Some(v) = registry.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("registry");
    if kind != "registry" {
        return Err(RecipeError::UnsupportedRegistry {
            kind: kind.to_string(),
        });
    }
    let (username, password) = (field("username"), field("password"));
    Ok(
        (!username.is_empty() || !password.is_empty())
            .then_some(Credentials { username, password }),
    )
}

/// The recipe is not something Kiln can build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecipeError {
    #[error("give exactly one of fromImage and fromTemplate")]
    NoBase,
    #[error(
        "fromImage {image:?} is not an image reference ({reason}); use \
         [registry/]repository[:tag][@sha256:digest], e.g. alpine:3.20 or \
         ghcr.io/org/app@sha256:..."
    )]
    InvalidImage { image: String, reason: String },
    #[error(
        "fromImageRegistry of type {kind:?} is not supported: Kiln pulls anonymously or \
         with {{\"type\": \"registry\", \"username\", \"password\"}}"
    )]
    UnsupportedRegistry { kind: String },
    #[error("cdp_port {0} is not a port a browser's DevTools can use (1-65535, not envd's 49983)")]
    CdpPort(u16),
    #[error("runtime {0:?} is not one of jail, gvisor")]
    UnknownRuntime(String),
    #[error("step {index} ({kind}): {message}")]
    Step {
        index: usize,
        kind: String,
        message: String,
    },
}
impl BuildSpec {
    /// The runtime the recipe asks for, checked.
    pub fn runtime(&self) -> Result<Option<&str>, RecipeError> {
        match self.runtime.as_deref() {
            Some(r) if !RUNTIMES.contains(&r) => Err(RecipeError::UnknownRuntime(r.to_owned())),
            other => Ok(other),
        }
    }

    /// The DevTools port the recipe declares, checked: not 0 and not envd's.
    pub fn cdp_port(&self) -> Result<Option<u16>, RecipeError> {
        match self.cdp_port {
            Some(p) if p == 0 || p == kiln_proto::envd::ENVD_PORT => Err(RecipeError::CdpPort(p)),
            other => Ok(other),
        }
    }

    /// The base the recipe starts from.
    pub fn base(&self) -> Result<Base, RecipeError> {
        match (&self.from_image, &self.from_template) {
            (Some(image), None) => base_for_image(image, self.from_image_registry.as_ref()),
            (None, Some(t)) if !t.trim().is_empty() => {
                let t = t.strip_prefix("kiln/").unwrap_or(t);
                let t = t.strip_suffix(":default").unwrap_or(t);
                Ok(Base::Template(t.to_string()))
            }
            _ => Err(RecipeError::NoBase),
        }
    }

    /// Parses every step; the first bad one is the error (numbered from 1).
    pub fn parse_steps(&self) -> Result<Vec<Step>, RecipeError> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| parse_step(i + 1, s))
            .collect()
    }
}

/// Images whose userland the built-in `base` template (Debian 12) provides. `stable`
/// stays here although Docker Hub's `debian:stable` has been trixie since August 2025:
/// moving it would silently change the OS of every template built with the SDK's
/// `from_debian_image()` default.
const BOOKWORM_IMAGES: &[&str] = &[
    "debian:bookworm",
    "debian:stable",
    "debian:12",
    "debian:bookworm-slim",
    "debian:stable-slim",
    "debian:12-slim",
    "debian",
    "e2bdev/base",
    "e2bdev/base:latest",
    "kiln/base",
];

/// Images the internal `base-trixie` (Debian 13) stands for (`from_debian_image("trixie")`
/// sends `debian:trixie`). Not `debian:testing`: that is forky now.
const TRIXIE_IMAGES: &[&str] = &[
    "debian:trixie",
    "debian:13",
    "debian:trixie-slim",
    "debian:13-slim",
];

fn base_for_image(image: &str, registry: Option<&serde_json::Value>) -> Result<Base, RecipeError> {
    let trimmed = image.trim();
    let short = trimmed.strip_prefix("docker.io/").unwrap_or(trimmed);
    let short = short.strip_prefix("library/").unwrap_or(short);
    if BOOKWORM_IMAGES.contains(&short) {
        Ok(Base::Debian(crate::base::BOOKWORM))
    } else if TRIXIE_IMAGES.contains(&short) {
        Ok(Base::Debian(crate::base::TRIXIE))
    } else {
        // Everything else, Ubuntu included (no Ubuntu archive is reachable to build it
        // from packages), is pulled from its registry.
        ImageSource::parse(image, registry).map(Base::Image)
    }
}

fn parse_step(index: usize, s: &StepSpec) -> Result<Step, RecipeError> {
    let bad = |message: String| RecipeError::Step {
        index,
        kind: s.kind.clone(),
        message,
    };
    let args = &s.args;
    let nonempty = |i: usize, what: &str| -> Result<String, RecipeError> {
        match args.get(i) {
            Some(a) if !a.is_empty() => Ok(a.clone()),
            _ => Err(bad(format!("missing {what} (args[{i}])"))),
        }
    };
    let opt = |i: usize| args.get(i).filter(|a| !a.is_empty()).cloned();
    match s.kind.to_ascii_uppercase().as_str() {
        "RUN" => Ok(Step::Run {
            cmd: nonempty(0, "command")?,
            user: opt(1),
        }),
        "COPY" => {
            let files_hash = s.files_hash.clone().unwrap_or_default();
            if !is_files_hash(&files_hash) {
                return Err(bad(format!(
                    "filesHash must be 64 lower-case hex digits, got {files_hash:?}"
                )));
            }
            let src = nonempty(0, "source")?;
            if src.starts_with('/') || src.split('/').any(|c| c == "..") {
                return Err(bad(format!(
                    "source {src:?} must be relative to the context and stay inside it"
                )));
            }
            let mode = match opt(3) {
                None => None,
                Some(m) => Some(
                    u32::from_str_radix(&m, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            bad(format!("mode {m:?} is not an octal file mode like 0755"))
                        })?,
                ),
            };
            Ok(Step::Copy {
                src,
                dest: nonempty(1, "destination")?,
                owner: opt(2),
                mode,
                files_hash,
            })
        }
        "ENV" | "ARG" => {
            if !args.len().is_multiple_of(2) {
                return Err(bad(
                    "expects key/value pairs (an even number of args)".into()
                ));
            }
            let mut pairs = Vec::new();
            for kv in args.chunks(2) {
                if kv[0].is_empty() || kv[0].contains('=') || kv[0].contains('\0') {
                    return Err(bad(format!("invalid variable name {:?}", kv[0])));
                }
                pairs.push((kv[0].clone(), kv[1].clone()));
            }
            Ok(Step::Env(pairs))
        }
        "WORKDIR" => Ok(Step::Workdir(nonempty(0, "directory")?)),
        "USER" => {
            let u = nonempty(0, "user name")?;
            if !u
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(format!("invalid user name {u:?}")));
            }
            Ok(Step::User(u))
        }
        other => Err(bad(format!(
            "unknown step type {other:?}; Kiln builds RUN, COPY, ENV, ARG, WORKDIR and USER"
        ))),
    }
}

/// `^[0-9a-f]{64}$`, the shape of a file-context hash.
pub fn is_files_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hash of a layer: the parent's hash, the step's type and args, and its files hash.
pub fn layer_hash(parent: &str, step: &StepSpec) -> String {
    let mut h = Sha256::new();
    h.update(parent.as_bytes());
    h.update(b"\n");
    h.update(step.kind.to_ascii_uppercase().as_bytes());
    // JSON keeps argument boundaries ("a b" vs "a","b").
    h.update(serde_json::to_vec(&step.args).unwrap_or_default());
    h.update(b"\n");
    h.update(step.files_hash.as_deref().unwrap_or("").as_bytes());
    hex::encode(h.finalize())
}

/// Hash of a base: the base template's name and its own build hash.
pub fn base_hash(template: &str, template_build_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-layer-v1\n");
    h.update(template.as_bytes());
    h.update(b"\n");
    h.update(template_build_hash.as_bytes());
    hex::encode(h.finalize())
}

/// What the steps so far have set: the build context of the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildState {
    pub user: String,
    /// `None`: the user's home.
    pub workdir: Option<String>,
    pub env: BTreeMap<String, String>,
}

impl BuildState {
    /// The directory a relative path or command starts in.
    pub fn cwd(&self) -> String {
        self.workdir.clone().unwrap_or_else(|| home_of(&self.user))
    }

    /// A WORKDIR argument resolved against the current workdir (or `/`).
    pub fn resolve_workdir(&self, dir: &str) -> String {
        if dir.starts_with('/') {
            normalize(dir)
        } else {
            normalize(&format!("{}/{dir}", self.workdir.as_deref().unwrap_or("/")))
        }
    }
}

/// `PATH` before any ENV step (Debian's default for login shells).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Expands `$NAME` and `${NAME}` in an ENV value against the build's variables (then
/// `PATH`, `HOME`, `USER` defaults; unknown names are empty), as infra's
/// `printf "%s" "<value>"` does. `\$` is a literal `$`; `$(...)` is left as is.
pub fn expand_env(value: &str, env: &BTreeMap<String, String>, user: &str) -> String {
    let lookup = |name: &str| -> String {
        if let Some(v) = env.get(name) {
            return v.clone();
        }
        match name {
            "PATH" => DEFAULT_PATH.to_string(),
            "HOME" => home_of(user),
            "USER" => user.to_string(),
            _ => String::new(),
        }
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                out.push_str(&lookup(&name));
            }
            '$' if chars
                .peek()
                .is_some_and(|&c| c.is_ascii_alphabetic() || c == '_') =>
            {
                let mut name = String::new();
                while let Some(&c) = chars.peek().filter(|&&c| is_name(c)) {
                    name.push(c);
                    chars.next();
                }
                out.push_str(&lookup(&name));
            }
            c => out.push(c),
        }
    }
    out
}

/// Home directory of a user by Kiln's convention (`useradd -m` defaults).
pub fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".to_string()
    } else {
        format!("/home/{user}")
    }
}

/// Collapses `.`, `..` and repeated slashes of an absolute path (never above `/`).
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> BuildSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn parses_the_sdk_body() {
        let s = spec(
            r#"{"fromImage":"debian:bookworm","force":false,"steps":[
            {"type":"USER","args":["root"],"force":false},
            {"type":"ENV","args":["A","1","B","2"],"force":false},
            {"type":"RUN","args":["echo a && echo b","user"],"force":true},
            {"type":"COPY","args":["server",".server","root","0755"],"filesHash":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","force":false},
            {"type":"WORKDIR","args":["/app"],"force":false}],
            "startCmd":"sleep infinity","readyCmd":"true"}"#,
        );
        assert_eq!(s.base().unwrap(), Base::Debian(crate::base::BOOKWORM));
        let steps = s.parse_steps().unwrap();
        assert_eq!(steps[0], Step::User("root".into()));
        assert_eq!(
            steps[1],
            Step::Env(vec![("A".into(), "1".into()), ("B".into(), "2".into())])
        );
        assert_eq!(
            steps[2],
            Step::Run {
                cmd: "echo a && echo b".into(),
                user: Some("user".into())
            }
        );
        assert!(
            matches!(&steps[3], Step::Copy { mode: Some(0o755), owner: Some(o), .. } if o == "root")
        );
        assert_eq!(steps[4], Step::Workdir("/app".into()));
    }

    #[test]
    fn bad_steps_name_the_step() {
        let s = spec(
            r#"{"fromTemplate":"base","steps":[{"type":"RUN","args":["true"]},{"type":"HEALTHCHECK","args":[]}]}"#,
        );
        let e = s.parse_steps().unwrap_err();
        assert!(matches!(e, RecipeError::Step { index: 2, .. }), "{e}");
        assert!(e.to_string().contains("unknown step type"), "{e}");
        let s = spec(
            r#"{"fromTemplate":"base","steps":[{"type":"COPY","args":["a","b"],"filesHash":"xyz"}]}"#,
        );
        assert!(s
            .parse_steps()
            .unwrap_err()
            .to_string()
            .contains("filesHash"));
        let s = spec(
            r#"{"fromTemplate":"base","steps":[{"type":"COPY","args":["../a","b"],"filesHash":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}]}"#,
        );
        assert!(s.parse_steps().unwrap_err().to_string().contains("inside"));
        let s = spec(r#"{"fromTemplate":"base","steps":[{"type":"ENV","args":["A"]}]}"#);
        assert!(s.parse_steps().is_err());
    }

    #[test]
    fn bases() {
        assert_eq!(
            spec(r#"{"fromImage":"e2bdev/base"}"#).base().unwrap(),
            Base::Debian(crate::base::BOOKWORM)
        );
        for trixie in [
            "debian:trixie",
            "debian:13",
            "docker.io/library/debian:trixie-slim",
        ] {
            assert_eq!(
                spec(&format!(r#"{{"fromImage":"{trixie}"}}"#))
                    .base()
                    .unwrap(),
                Base::Debian(crate::base::TRIXIE),
                "{trixie}"
            );
        }
        // Ubuntu is pulled (the error then names its registry), as is debian:testing.
        for pulled in ["ubuntu:22.04", "ubuntu:24.04", "debian:testing"] {
            let Base::Image(src) = spec(&format!(r#"{{"fromImage":"{pulled}"}}"#))
                .base()
                .unwrap()
            else {
                panic!("{pulled} is pulled")
            };
            assert_eq!(src.registry(), "index.docker.io", "{pulled}");
        }
        let Base::Image(src) = spec(r#"{"fromImage":"python:3.13"}"#).base().unwrap() else {
            panic!("python:3.13 is pulled")
        };
        assert_eq!(src.reference.whole(), "docker.io/library/python:3.13");
        assert_eq!(src.credentials, None);
        let Base::Image(src) = spec(
            r#"{"fromImage":"127.0.0.1:5000/team/app:1",
                "fromImageRegistry":{"type":"registry","username":"u","password":"s3cret"}}"#,
        )
        .base()
        .unwrap() else {
            panic!("pulled")
        };
        assert_eq!(src.reference.registry(), "127.0.0.1:5000");
        let creds = src.credentials.unwrap();
        assert_eq!(
            (creds.username.as_str(), creds.password.as_str()),
            ("u", "s3cret")
        );
        assert!(
            !format!("{creds:?}").contains("s3cret"),
            "the password stays out of logs"
        );
        let e = spec(r#"{"fromImage":"Not A Reference"}"#)
            .base()
            .unwrap_err();
        assert!(matches!(e, RecipeError::InvalidImage { .. }), "{e}");
        assert!(e.to_string().contains("\"Not A Reference\""), "{e}");
        let e = spec(r#"{"fromImage":"app:1","fromImageRegistry":{"type":"aws","awsRegion":"x"}}"#)
            .base()
            .unwrap_err();
        assert_eq!(e, RecipeError::UnsupportedRegistry { kind: "aws".into() });
        assert_eq!(spec("{}").base().unwrap_err(), RecipeError::NoBase);
        assert_eq!(
            spec(r#"{"fromTemplate":"mine"}"#).base().unwrap(),
            Base::Template("mine".into())
        );
    }

    #[test]
    fn hashes_chain_and_cover_args_and_files() {
        let run = |args: &[&str]| StepSpec {
            kind: "RUN".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let b = base_hash("base", "x");
        assert_ne!(b, base_hash("base", "y"));
        let h1 = layer_hash(&b, &run(&["echo a"]));
        assert_eq!(h1, layer_hash(&b, &run(&["echo a"])));
        assert_ne!(h1, layer_hash(&b, &run(&["echo", "a"])));
        assert_ne!(h1, layer_hash(&b, &run(&["echo b"])));
        assert_ne!(h1, layer_hash(&base_hash("other", "x"), &run(&["echo a"])));
        // force does not change the hash (a forced step is rebuilt, see build.rs).
        let mut forced = run(&["echo a"]);
        forced.force = true;
        assert_eq!(h1, layer_hash(&b, &forced));
        let mut copy = run(&["a", "b"]);
        copy.kind = "COPY".into();
        copy.files_hash = Some("1".repeat(64));
        let mut copy2 = copy.clone();
        copy2.files_hash = Some("2".repeat(64));
        assert_ne!(layer_hash(&b, &copy), layer_hash(&b, &copy2));
    }

    #[test]
    fn paths() {
        assert_eq!(normalize("/a//b/./c/../d"), "/a/b/d");
        assert_eq!(normalize("/../.."), "/");
        let st = BuildState {
            user: "user".into(),
            workdir: None,
            env: BTreeMap::new(),
        };
        assert_eq!(st.cwd(), "/home/user");
        assert_eq!(st.resolve_workdir("app"), "/app");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn env_values_expand() {
        let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(
            expand_env("/opt/bin:$PATH", &env, "user"),
            format!("/opt/bin:{DEFAULT_PATH}")
        );
        assert_eq!(
            expand_env("${A}-$A-$B-$HOME", &env, "user"),
            "x-x--/home/user"
        );
        assert_eq!(expand_env(r"\$A $(date) 5$", &env, "root"), "$A $(date) 5$");
    }

    fn src(image: &str) -> ImageSource {
        ImageSource::parse(image, None).unwrap()
    }

    #[test]
    fn references_default_to_docker_hub() {
        let cases = [
            (
                "alpine",
                "docker.io/library/alpine:latest",
                "index.docker.io",
            ),
            (
                "alpine:3.20",
                "docker.io/library/alpine:3.20",
                "index.docker.io",
            ),
            ("oven/bun:1", "docker.io/oven/bun:1", "index.docker.io"),
            (
                "docker.io/library/python:3.13",
                "docker.io/library/python:3.13",
                "index.docker.io",
            ),
            ("ghcr.io/org/app:v2", "ghcr.io/org/app:v2", "ghcr.io"),
            (
                "127.0.0.1:5000/kiln-test/busybox:1",
                "127.0.0.1:5000/kiln-test/busybox:1",
                "127.0.0.1:5000",
            ),
            ("localhost/x", "localhost/x:latest", "localhost"),
        ];
        for (image, whole, registry) in cases {
            let s = src(image);
            assert_eq!(s.reference.whole(), whole, "{image}");
            assert_eq!(s.registry(), registry, "{image}");
        }
        let digest = format!("sha256:{}", "a".repeat(64));
        let s = src(&format!("ghcr.io/org/app@{digest}"));
        assert_eq!(s.reference.digest(), Some(digest.as_str()));
        assert_eq!(s.reference.tag(), None);
    }

    #[test]
    fn bad_references_say_what_is_allowed() {
        for bad in ["", "Alpine:3", "a b", "alpine:", "x@sha256:short", "-x"] {
            let e = ImageSource::parse(bad, None).unwrap_err();
            assert!(
                matches!(e, RecipeError::InvalidImage { .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("[registry/]repository"), "{e}");
        }
    }

    #[test]
    fn credentials_come_from_the_registry_object() {
        let v = serde_json::json!({"type": "registry", "username": "me", "password": "pw"});
        let s = ImageSource::parse("ghcr.io/me/app:1", Some(&v)).unwrap();
        assert_eq!(
            s.credentials,
            Some(Credentials {
                username: "me".into(),
                password: "pw".into()
            })
        );
        let empty = serde_json::json!({"type": "registry"});
        assert_eq!(
            ImageSource::parse("a:1", Some(&empty)).unwrap().credentials,
            None
        );
        assert_eq!(
            ImageSource::parse("a:1", Some(&serde_json::Value::Null))
                .unwrap()
                .credentials,
            None
        );
        let gcp = serde_json::json!({"type": "gcp", "serviceAccountJson": "{}"});
        let e = ImageSource::parse("a:1", Some(&gcp)).unwrap_err();
        assert!(e.to_string().contains("\"gcp\""), "{e}");
    }
}
