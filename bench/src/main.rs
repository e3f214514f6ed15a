//! `kiln-bench`: latency of a running Kiln server, each figure beside the floor it
//! cannot beat, measured in the same run on the same machine.
//!
//! - create: `POST /sandboxes` answered (what `Sandbox.create()` waits for), and
//!   create → first output: then `echo ready` until its first stdout chunk arrives,
//!   N times; each sandbox is killed after its sample (kill time not counted).
//!   Floor: `unshare` of the same namespaces running `/bin/true`.
//! - `commands.run("true")` round trip through the proxy and envd, M times on one
//!   sandbox. Floor: fork+exec of `/bin/true`.
//!
//! `--suite code` measures the code interpreter instead (see [`code`]); `syscalls`,
//! `memory` and `pause` measure the runtime (see [`runtime`]).
//!
//! Prints a Markdown table for `docs/BENCHMARKS.md`.

#![forbid(unsafe_code)]

mod code;
mod runtime;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kiln_client::{Client, ExecEvent};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Sandbox create and `commands.run("true")`.
    Sandbox,
    /// The code interpreter: `run_code("1+1")` (use a code-interpreter template).
    Code,
    /// A stat-heavy command (`find /usr | wc -l`) in a sandbox and on the host.
    Syscalls,
    /// Host memory per idle sandbox (`--creates` sandboxes; run the server without pools).
    Memory,
    /// Pause and resume times for sandboxes holding 0, 64 and 256 MiB.
    Pause,
}

#[derive(Parser)]
pub(crate) struct Args {
    #[arg(long, value_enum, default_value = "sandbox")]
    suite: Suite,
    #[arg(long, env = "E2B_API_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Creates to sample.
    #[arg(long, default_value_t = 100)]
    creates: usize,
    /// Round trips to sample.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    #[arg(long, default_value = "base")]
    template: String,
    /// Host directory the `syscalls` floor walks (the template's `rootfs/usr`).
    #[arg(long, default_value = "/usr")]
    floor_dir: std::path::PathBuf,
    /// Another floor for the create, run through `sh -c` as often as creates are
    /// sampled (e.g. `runsc --network=none do /bin/true` for the gVisor runtime).
    #[arg(long)]
    create_floor: Option<String>,
    /// Pause between create samples (not timed), e.g. to let a warm pool refill.
    #[arg(long, default_value_t = 0)]
    create_interval_ms: u64,
}

pub(crate) struct Summary {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

pub(crate) fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Summary {
        p50: pick(0.5),
        p99: pick(0.99),
        mean: total / samples.len() as u32,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub(crate) fn time_command(n: usize, program: &str, args: &[&str]) -> Result<Vec<Duration>> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let status = Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running {program}"))?;
            if !status.success() {
                bail!("{program} {args:?} failed: {status}");
            }
            Ok(t.elapsed())
        })
        .collect()
}

pub(crate) fn new_sandbox(template: &str) -> kiln_api::NewSandbox {
    kiln_api::NewSandbox {
        template_id: template.to_string(),
        timeout: Some(120),
        secure: Some(true),
        allow_internet_access: Some(true),
        metadata: Some(BTreeMap::from([(
            "purpose".to_string(),
            "bench".to_string(),
        )])),
        env_vars: None,
        auto_pause: None,
        ..Default::default()
    }
}

/// Per sample: `POST /sandboxes` answered (what `Sandbox.create()` waits for), and the
/// first output of `echo ready` after it began.
async fn create_to_first_output(
    client: &Client,
    args: &Args,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut samples = Vec::with_capacity(args.creates);
    let mut creates = Vec::with_capacity(args.creates);
    for _ in 0..args.creates {
        let t = Instant::now();
        let sbx = client.create(&new_sandbox(&args.template)).await?;
        creates.push(t.elapsed());
        let mut first: Option<Duration> = None;
        client
            .exec_with_token(
                &sbx.sandbox_id,
                sbx.envd_access_token.as_deref(),
                "echo ready",
                None,
                |e| {
                    if matches!(e, ExecEvent::Stdout(_)) && first.is_none() {
                        first = Some(t.elapsed());
                    }
                },
            )
            .await?;
        samples.push(first.context("no output from `echo ready`")?);
        client.kill(&sbx.sandbox_id).await?;
        tokio::time::sleep(Duration::from_millis(args.create_interval_ms)).await;
    }
    Ok((creates, samples))
}

async fn round_trips(client: &Client, args: &Args) -> Result<Vec<Duration>> {
    let sbx = client.create(&new_sandbox(&args.template)).await?;
    // Warm up the connection pool and envd.
    client.exec(&sbx.sandbox_id, "true", None, |_| {}).await?;
    let mut samples = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let out = client
            .exec_with_token(
                &sbx.sandbox_id,
                sbx.envd_access_token.as_deref(),
                "true",
                None,
                |_| {},
            )
            .await?;
        if out.exit_code != 0 {
            bail!("`true` exited {}", out.exit_code);
        }
        samples.push(t.elapsed());
    }
    client.kill(&sbx.sandbox_id).await?;
    Ok(samples)
}

/// One Markdown table row.
pub(crate) fn row(name: &str, n: usize, s: &Summary) {
    println!(
        "| {name} | {n} | {} | {} | {} |",
        ms(s.p50),
        ms(s.p99),
        ms(s.mean)
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = Client::new(&args.url, &args.api_key);
    match args.suite {
        Suite::Sandbox => {}
        Suite::Code => return code::run(&client, &args).await,
        Suite::Syscalls => return runtime::syscalls(&client, &args).await,
        Suite::Memory => return runtime::memory(&client, &args).await,
        Suite::Pause => return runtime::pause(&client, &args).await,
    }

    let (create_only, creates) = create_to_first_output(&client, &args).await?;
    let (create_only, creates) = (summarize(create_only), summarize(creates));
    let unshare = summarize(time_command(
        args.creates,
        "unshare",
        &[
            "--user",
            "--map-root-user",
            "--mount",
            "--pid",
            "--fork",
            "--uts",
            "--ipc",
            "--net",
            "--cgroup",
            "/bin/true",
        ],
    )?);
    let extra = match &args.create_floor {
        Some(cmd) => Some(summarize(time_command(
            args.creates,
            "/bin/sh",
            &["-c", cmd],
        )?)),
        None => None,
    };
    let rtt = summarize(round_trips(&client, &args).await?);
    let fork_exec = summarize(time_command(args.round_trips, "/bin/true", &[])?);
    // The SDK always runs `bash -l -c <cmd>`; bash's own start-up (without the host's
    // login files, which are the host's business) is part of every round trip.
    let bash = summarize(time_command(
        args.round_trips,
        "/bin/bash",
        &["-c", "true"],
    )?);

    println!("| measurement | samples | p50 ms | p99 ms | mean ms |");
    println!("|---|---|---|---|---|");
    row(
        "create (`POST /sandboxes` answered)",
        args.creates,
        &create_only,
    );
    row(
        "create → first output of `echo ready`",
        args.creates,
        &creates,
    );
    row(
        "floor: `unshare` (user, mount, pid, uts, ipc, net, cgroup) of /bin/true",
        args.creates,
        &unshare,
    );
    if let (Some(cmd), Some(extra)) = (&args.create_floor, &extra) {
        row(&format!("floor: `{cmd}`"), args.creates, extra);
    }
    row(
        "`commands.run(\"true\")` round trip",
        args.round_trips,
        &rtt,
    );
    row(
        "floor: fork+exec of /bin/true",
        args.round_trips,
        &fork_exec,
    );
    row(
        "reference: fork+exec of `/bin/bash -c true` (bash start-up)",
        args.round_trips,
        &bash,
    );
    println!(
        "\nround trip above the floor: p50 {} ms",
        ms(rtt.p50.saturating_sub(fork_exec.p50))
    );
    let inside = inside_process_costs(&client, &args).await?;
    println!("inside the sandbox (its own kernel's cost, mean of 50 each): {inside}");
    Ok(())
}

/// fork+exec of `/bin/true` and of `bash -l -c true` timed by the sandbox itself: what
/// every command costs there before envd and the proxy add anything.
async fn inside_process_costs(client: &Client, args: &Args) -> Result<String> {
    let sbx = client.create(&new_sandbox(&args.template)).await?;
    let script = "t() { s=$(date +%s%N); for i in $(seq 50); do \"$@\"; done; \
                  e=$(date +%s%N); echo $(( (e - s) / 50000 )); }; \
                  echo \"$(t /bin/true) $(t bash -l -c true)\"";
    let mut out = Vec::new();
    client
        .exec_with_token(
            &sbx.sandbox_id,
            sbx.envd_access_token.as_deref(),
            script,
            None,
            |e| {
                if let ExecEvent::Stdout(b) = e {
                    out.extend(b)
                }
            },
        )
        .await?;
    client.kill(&sbx.sandbox_id).await?;
    let text = String::from_utf8_lossy(&out);
    let us: Vec<f64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [true_us, bash_us] = us[..] else {
        bail!("unexpected timing output {text:?}");
    };
    Ok(format!(
        "fork+exec of /bin/true {:.2} ms, `bash -l -c true` {:.2} ms",
        true_us / 1000.0,
        bash_us / 1000.0
    ))
}
