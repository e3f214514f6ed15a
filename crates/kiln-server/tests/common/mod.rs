//! Fixtures shared by the control-plane test binaries. Each binary uses a part of
//! them, so unused items are expected.
#![allow(dead_code)]

use std::path::Path;

use async_trait::async_trait;
use kiln_template::build::{RunError, RunRequest, StepRunner};
use serde_json::json;

/// A data directory's `base` template, just enough for builds with a fake runner.
pub fn fake_base(data: &Path) {
    let base = data.join("templates/base");
    std::fs::create_dir_all(base.join("rootfs/etc")).unwrap();
    // Steps run with a shell; the fake runner never execs it.
    std::fs::create_dir_all(base.join("rootfs/bin")).unwrap();
    std::fs::write(base.join("rootfs/bin/sh"), "").unwrap();
    std::fs::write(
        base.join("rootfs/etc/passwd"),
        "root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
    )
    .unwrap();
    let meta = json!({
        "format": 1, "name": "base", "created_at": "2026-11-23T10:00:00Z",
        "default_user": "user", "default_workdir": "/home/user", "cpu_count": 2,
        "memory_mb": 512, "disk_size_mb": 4096, "envd_version": "0.6.13",
        "kiln_version": "test", "build_hash": "b".repeat(64), "id_map_base": 0,
        "rootfs_bytes": 0,
    });
    std::fs::write(base.join("template.json"), meta.to_string()).unwrap();
}

/// A build step runner that runs nothing: each step's layer is its parent's files
/// plus `last-cmd`, the command.
pub struct LinkingRunner;

#[async_trait]
impl StepRunner for LinkingRunner {
    async fn run(
        &self,
        req: RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        on_line(format!("[stdout]: running {}", req.cmd));
        kiln_template::layer::link_tree(req.lower, req.out).unwrap();
        std::fs::write(req.out.join("last-cmd"), req.cmd).unwrap();
        Ok(())
    }
}
