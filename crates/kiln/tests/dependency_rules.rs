//! The trust boundary in the dependency graph (Firecracker-style dependency check):
//! guest binaries run inside sandboxes and must never link host crates. Tier:
//! unprivileged (reads `cargo metadata`).

use std::process::Command;

const GUEST_CRATES: &[&str] = &["kiln-envd", "kiln-init", "kiln-interpreter", "kiln-sudo"];
const HOST_CRATES: &[&str] = &[
    "kiln",
    "kiln-api",
    "kiln-client",
    "kiln-mcp",
    "kiln-runtime",
    "kiln-server",
    "kiln-template",
];

#[test]
fn guest_crates_do_not_depend_on_host_crates() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let mut seen = Vec::new();
    for pkg in packages {
        let name = pkg["name"].as_str().unwrap_or_default();
        if !GUEST_CRATES.contains(&name) {
            continue;
        }
        seen.push(name.to_string());
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            assert!(
                !HOST_CRATES.contains(&dep_name),
                "guest crate {name} depends on host crate {dep_name}"
            );
        }
    }
    seen.sort();
    let mut expected: Vec<String> = GUEST_CRATES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(seen, expected, "every guest crate must be in the workspace");
}
