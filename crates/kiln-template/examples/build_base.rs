//! Builds (or reuses) the `base` template: `build_base DATA_DIR [GUEST_BIN_DIR]`.
//!
//! Privilege tier: root, network to a Debian mirror, mmdebstrap installed. Takes about
//! 90 s and 600 MB the first time; returns at once when the template is complete.

use std::path::PathBuf;

use anyhow::Context;
use kiln_template::{BuildEvent, TemplateStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let data_dir = PathBuf::from(
        args.next()
            .context("usage: build_base DATA_DIR [GUEST_BIN_DIR]")?,
    );
    let guest_bin_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/x86_64-unknown-linux-gnu/debug"));
    let store = TemplateStore::open(&data_dir)?;
    let template = store
        .ensure_base(&guest_bin_dir, |event| match event {
            BuildEvent::Started {
                reason, build_hash, ..
            } => {
                println!("building base ({reason}), recipe {build_hash}")
            }
            BuildEvent::Step { index, total, name } => println!("[{index}/{total}] {name}"),
            BuildEvent::Log { line } => println!("    {line}"),
            BuildEvent::Warning { message } => println!("warning: {message}"),
            BuildEvent::Finished { secs } => println!("built in {secs:.1} s"),
            other => println!("{other:?}"),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", kiln_template::ErrorChain(&e)))?;
    println!("{}", serde_json::to_string_pretty(&template.meta)?);
    println!("rootfs: {}", template.rootfs.display());
    Ok(())
}
