//! JavaScript and TypeScript kernels. Kiln's template runs tslab's `jslab` and `tslab`
//! kernels (E2B's ijavascript fork is not published); a script preloaded into every
//! JavaScript/TypeScript kernel process makes tslab report results, errors and
//! execution counts the way E2B's server expects (see `tslab_preload.js`). It is inert
//! in any other kernel.
//!
//! The script is written into the interpreter's runtime directory at start and loaded
//! with `NODE_OPTIONS=--require "<path>"`, added to whatever `NODE_OPTIONS` the kernel
//! would otherwise get; the script removes its own flag again so that programs the
//! user's code starts do not inherit it.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const PRELOAD: &str = include_str!("tslab_preload.js");
const FILE_NAME: &str = "tslab-preload.js";

#[derive(Debug, thiserror::Error)]
pub enum PreloadError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `NODE_OPTIONS` has no escaping for these; the runtime dir is ours to choose.
    #[error("{path} contains a quote, backslash or line break, which NODE_OPTIONS cannot carry")]
    Unquotable { path: PathBuf },
}

/// Whether kernels whose kernelspec declares `language` get the preload.
pub fn applies_to(language: &str) -> bool {
    language.eq_ignore_ascii_case("javascript") || language.eq_ignore_ascii_case("typescript")
}

/// Writes the preload script into `runtime_dir` (created, mode 0700, if missing; the
/// kernels' connection files go there too) and returns its path.
pub fn install(runtime_dir: &Path) -> Result<PathBuf, PreloadError> {
    let path = runtime_dir.join(FILE_NAME);
    if path
        .to_str()
        .is_none_or(|p| p.contains(['"', '\\', '\n', '\r']))
    {
        return Err(PreloadError::Unquotable { path });
    }
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(runtime_dir)?;
        // Replace, never append to, a file left by a previous run.
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        file.write_all(PRELOAD.as_bytes())
    };
    write().map_err(|source| PreloadError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// `NODE_OPTIONS` for a kernel: `existing` (the kernelspec's, else the interpreter's
/// own) followed by the flag that loads `preload`. The script strips exactly this flag.
pub fn node_options(existing: Option<&str>, preload: &Path) -> String {
    let flag = format!("--require \"{}\"", preload.display());
    match existing.map(str::trim).filter(|e| !e.is_empty()) {
        Some(existing) => format!("{existing} {flag}"),
        None => flag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages() {
        assert!(applies_to("javascript"));
        assert!(applies_to("TypeScript"));
        assert!(!applies_to("python"));
        assert!(!applies_to("bash"));
    }

    #[test]
    fn node_options_append_the_flag() {
        let preload = Path::new("/run/kiln interp/tslab-preload.js");
        assert_eq!(
            node_options(None, preload),
            r#"--require "/run/kiln interp/tslab-preload.js""#
        );
        assert_eq!(
            node_options(Some("  "), preload),
            node_options(None, preload)
        );
        assert_eq!(
            node_options(Some("--max-old-space-size=512"), preload),
            r#"--max-old-space-size=512 --require "/run/kiln interp/tslab-preload.js""#
        );
    }

    #[test]
    fn install_writes_the_script_and_refuses_unquotable_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let path = install(tmp.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), PRELOAD);
        // A second start replaces the file.
        assert_eq!(install(tmp.path()).unwrap(), path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), PRELOAD);

        // The runtime dir is created when missing.
        let nested = install(&tmp.path().join("run/kiln")).unwrap();
        assert!(nested.is_file());

        let odd = tmp.path().join("a\"b");
        std::fs::create_dir(&odd).unwrap();
        assert!(matches!(
            install(&odd),
            Err(PreloadError::Unquotable { .. })
        ));
    }

    /// Outside a tslab kernel the script only removes its own flag from NODE_OPTIONS.
    /// Runs `node` when it is installed (it is not a build dependency of Kiln).
    #[test]
    fn preload_is_inert_outside_tslab_and_drops_its_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let path = install(tmp.path()).unwrap();
        let print = "process.stdout.write(JSON.stringify(process.env.NODE_OPTIONS ?? null))";
        let run = |existing: Option<&str>| {
            std::process::Command::new("node")
                .args(["-e", print])
                .env("NODE_OPTIONS", node_options(existing, &path))
                .output()
        };
        let out = match run(Some("--max-old-space-size=100")) {
            Ok(out) => out,
            Err(e) => {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP preload_is_inert_outside_tslab_and_drops_its_flag: cannot run node ({e})"
                );
                return;
            }
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "node: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            r#""--max-old-space-size=100""#
        );
        let out = run(None).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "null");
    }
}
