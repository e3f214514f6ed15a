//! The code-interpreter suite (`--suite code`): `run_code("1+1")` as
//! `e2b-code-interpreter` sends it, beside the same computation through
//! `commands.run("python3 -c ...")` on the same sandbox and a host `python3 -c` floor.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_client::{Client, CodeEvent, RunCode};

use crate::{new_sandbox, row, summarize, time_command, Args};

const CODE: &str = "1+1";
const PYTHON_CMD: &str = "python3 -c 'print(1+1)'";

fn one_plus_one() -> RunCode {
    RunCode {
        code: CODE.to_string(),
        ..RunCode::default()
    }
}

/// `POST /sandboxes` until the first result of `run_code("1+1")` arrives.
async fn create_to_first_result(client: &Client, args: &Args) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(args.creates);
    for _ in 0..args.creates {
        let t = Instant::now();
        let sbx = client.create(&new_sandbox(&args.template)).await?;
        let mut first: Option<Duration> = None;
        let exec = client
            .run_code(
                &sbx.sandbox_id,
                sbx.envd_access_token.as_deref(),
                &one_plus_one(),
                Some(Duration::from_secs(60)),
                |e| {
                    if matches!(e, CodeEvent::Result(_)) && first.is_none() {
                        first = Some(t.elapsed());
                    }
                },
            )
            .await?;
        if exec.text() != Some("2") {
            bail!("run_code(\"1+1\") gave {:?}", exec.text());
        }
        samples.push(first.context("no result from run_code")?);
        client.kill(&sbx.sandbox_id).await?;
        tokio::time::sleep(Duration::from_millis(args.create_interval_ms)).await;
    }
    Ok(samples)
}

/// Round trips on one sandbox: `run_code("1+1")`, then `commands.run(python3 -c ...)`.
async fn round_trips(client: &Client, args: &Args) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let sbx = client.create(&new_sandbox(&args.template)).await?;
    let token = sbx.envd_access_token.as_deref();
    let id = &sbx.sandbox_id;
    let req = one_plus_one();
    let run = || client.run_code(id, token, &req, None, |_| {});
    // Warm up: the default context, the connection pool.
    run().await?;
    let mut code = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let exec = run().await?;
        code.push(t.elapsed());
        if exec.text() != Some("2") {
            bail!("run_code(\"1+1\") gave {:?}", exec.text());
        }
    }
    client
        .exec_with_token(id, token, PYTHON_CMD, None, |_| {})
        .await?;
    let mut cmd = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        let out = client
            .exec_with_token(id, token, PYTHON_CMD, None, |_| {})
            .await?;
        cmd.push(t.elapsed());
        if out.exit_code != 0 {
            bail!("{PYTHON_CMD} exited {}", out.exit_code);
        }
    }
    client.kill(id).await?;
    Ok((code, cmd))
}

pub async fn run(client: &Client, args: &Args) -> Result<()> {
    let creates = summarize(create_to_first_result(client, args).await?);
    let (code, cmd) = round_trips(client, args).await?;
    let (code, cmd) = (summarize(code), summarize(cmd));
    let host = summarize(time_command(
        args.round_trips,
        "python3",
        &["-c", "print(1+1)"],
    )?);
    println!("| measurement | samples | p50 ms | p99 ms | mean ms |");
    println!("|---|---|---|---|---|");
    row(
        &format!(
            "create ({}) → first result of `run_code(\"1+1\")`",
            args.template
        ),
        args.creates,
        &creates,
    );
    row("`run_code(\"1+1\")` round trip", args.round_trips, &code);
    row(
        "peer: `commands.run(\"python3 -c 'print(1+1)'\")` on the same sandbox",
        args.round_trips,
        &cmd,
    );
    row(
        "floor: host fork+exec of `python3 -c 'print(1+1)'`",
        args.round_trips,
        &host,
    );
    Ok(())
}
