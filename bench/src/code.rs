//! The code-interpreter suite (`--suite code`): `run_code("1+1")` as
//! `e2b-code-interpreter` sends it, beside the same computation through
//! `commands.run("python3 -c ...")` on the same sandbox (the peer) and
//! `commands.run("true")` there (the floor of any round trip through the proxy).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_client::{Client, CodeEvent, RunCode};

use crate::{new_sandbox, row, summarize, Args};

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

/// Round trips on one sandbox: `run_code("1+1")`, `commands.run(python3 -c ...)` and
/// `commands.run("true")`.
async fn round_trips(client: &Client, args: &Args) -> Result<[Vec<Duration>; 3]> {
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
    let mut commands = Vec::new();
    for command in [PYTHON_CMD, "true"] {
        client
            .exec_with_token(id, token, command, None, |_| {})
            .await?;
        let mut samples = Vec::with_capacity(args.round_trips);
        for _ in 0..args.round_trips {
            let t = Instant::now();
            let out = client
                .exec_with_token(id, token, command, None, |_| {})
                .await?;
            samples.push(t.elapsed());
            if out.exit_code != 0 {
                bail!("{command} exited {}", out.exit_code);
            }
        }
        commands.push(samples);
    }
    client.kill(id).await?;
    let floor = commands.pop().unwrap_or_default();
    let python = commands.pop().unwrap_or_default();
    Ok([code, python, floor])
}

pub async fn run(client: &Client, args: &Args) -> Result<()> {
    let creates = summarize(create_to_first_result(client, args).await?);
    let [code, python, floor] = round_trips(client, args).await?;
    let (code, python, floor) = (summarize(code), summarize(python), summarize(floor));
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
        &python,
    );
    row(
        "floor: `commands.run(\"true\")` on the same sandbox",
        args.round_trips,
        &floor,
    );
    Ok(())
}
