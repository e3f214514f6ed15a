//! The runtime suites: what a runtime costs beyond starting a sandbox.
//!
//! - `--suite syscalls`: `find /usr | wc -l` (stat-heavy) through `commands.run` in a
//!   sandbox, beside `find <--floor-dir> | wc -l` on the host (the floor; point it at the
//!   template's own `rootfs/usr` so both walk the same tree).
//! - `--suite memory`: host memory per idle sandbox: `MemAvailable` before and after
//!   starting N sandboxes (pools off on the server for an honest figure), divided by N.
//! - `--suite pause`: pause and resume (`POST /pause`, `POST /connect`) of a sandbox
//!   holding M MiB in a background process, for several M; then checks the process
//!   kept its memory.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_client::Client;

use crate::{new_sandbox, row, summarize, time_command, Args};

const FIND: &str = "find /usr | wc -l";

pub async fn syscalls(client: &Client, args: &Args) -> Result<()> {
    let sbx = client.create(&new_sandbox(&args.template)).await?;
    let token = sbx.envd_access_token.as_deref();
    client
        .exec_with_token(&sbx.sandbox_id, token, FIND, None, |_| {})
        .await?;
    let mut samples = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let out = client
            .exec_with_token(&sbx.sandbox_id, token, FIND, None, |_| {})
            .await?;
        samples.push(t.elapsed());
        if out.exit_code != 0 {
            bail!("{FIND} exited {}", out.exit_code);
        }
    }
    client.kill(&sbx.sandbox_id).await?;
    let floor_cmd = format!("find '{}' | wc -l", args.floor_dir.display());
    let host = summarize(time_command(
        args.round_trips,
        "/bin/sh",
        &["-c", &floor_cmd],
    )?);
    println!("| measurement | samples | p50 ms | p99 ms | mean ms |");
    println!("|---|---|---|---|---|");
    row(
        &format!("`commands.run(\"{FIND}\")` ({})", args.template),
        args.round_trips,
        &summarize(samples),
    );
    row(
        &format!("floor: host `{floor_cmd}` (same tree)"),
        args.round_trips,
        &host,
    );
    Ok(())
}

fn mem_available_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

pub async fn memory(client: &Client, args: &Args) -> Result<()> {
    let n = args.creates;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = mem_available_kib()?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let sbx = client.create(&new_sandbox(&args.template)).await?;
        ids.push(sbx.sandbox_id);
    }
    // Let start-up settle (page cache, envd's first allocations).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = mem_available_kib()?;
    for id in &ids {
        client.kill(id).await?;
    }
    // Signed: other activity on the host can free memory meanwhile (then the figure is
    // noise, and says so by its sign).
    let drop_mib = (before as f64 - after as f64) / 1024.0;
    println!("| measurement | sandboxes | MemAvailable drop MiB | per sandbox MiB |");
    println!("|---|---|---|---|");
    println!(
        "| idle sandboxes of `{}` | {n} | {drop_mib:.1} | {:.1} |",
        args.template,
        drop_mib / n as f64
    );
    Ok(())
}

pub async fn pause(client: &Client, args: &Args) -> Result<()> {
    println!("| memory held MiB | pause ms | resume ms | memory kept |");
    println!("|---|---|---|---|");
    for mib in [0u64, 64, 256] {
        let sbx = client.create(&new_sandbox(&args.template)).await?;
        let id = sbx.sandbox_id.clone();
        let hold = format!(
            "nohup python3 -c 'import time; b = bytearray({mib} << 20); \
             b[::4096] = b\"x\" * len(b[::4096]); open(\"/tmp/held\", \"w\").write(str(len(b))); \
             time.sleep(86400)' >/dev/null 2>&1 &"
        );
        client
            .exec_with_token(&id, sbx.envd_access_token.as_deref(), &hold, None, |_| {})
            .await?;
        let probe =
            "for i in $(seq 50); do [ -s /tmp/held ] && break; sleep 0.1; done; cat /tmp/held";
        client
            .exec_with_token(&id, sbx.envd_access_token.as_deref(), probe, None, |_| {})
            .await?;
        let t = Instant::now();
        client.pause(&id).await?;
        let paused = t.elapsed();
        let t = Instant::now();
        let resumed = client.connect(&id, 120).await?;
        let resume = t.elapsed();
        let mut out = Vec::new();
        client
            .exec_with_token(
                &id,
                resumed.envd_access_token.as_deref(),
                "pgrep -f 'bytearray' >/dev/null && cat /tmp/held",
                None,
                |e| {
                    if let kiln_client::ExecEvent::Stdout(b) = e {
                        out.extend(b)
                    }
                },
            )
            .await?;
        let kept = String::from_utf8_lossy(&out).trim() == (mib << 20).to_string();
        println!(
            "| {mib} | {:.1} | {:.1} | {} |",
            paused.as_secs_f64() * 1000.0,
            resume.as_secs_f64() * 1000.0,
            if kept { "yes" } else { "NO" }
        );
        client.kill(&id).await?;
    }
    Ok(())
}
