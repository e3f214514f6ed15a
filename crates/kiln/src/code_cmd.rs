//! `kiln run-code`, `kiln install-package`, `kiln env-info`: a sandbox's code
//! interpreter from the shell, for people and for agent tools (the MCP server reuses
//! the same client calls).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_client::{Client, CodeEvent, Execution, RunCode};

use crate::{parse_kv, Remote};

/// Which sandbox to use: an existing one, or a new one from a template, killed
/// afterwards unless kept.
#[derive(clap::Args)]
pub struct Target {
    #[command(flatten)]
    remote: Remote,
    /// Run in this sandbox (default: a new one, killed afterwards).
    #[arg(long)]
    sandbox: Option<String>,
    /// Template of the new sandbox.
    #[arg(
        long,
        default_value = "code-interpreter-v1",
        conflicts_with = "sandbox"
    )]
    template: String,
    /// Keep the new sandbox running and print its id on stderr.
    #[arg(long, conflicts_with = "sandbox")]
    keep: bool,
}

#[derive(clap::Args)]
pub struct RunCodeArgs {
    #[command(flatten)]
    target: Target,
    /// python (default), javascript/js, typescript/ts, bash, ...
    #[arg(long, conflicts_with = "context")]
    language: Option<String>,
    /// A context id (from the SDK's create_code_context) instead of a language.
    #[arg(long)]
    context: Option<String>,
    /// Environment variable for this run (KEY=VALUE; repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Stop the run after this many seconds (the kernel is interrupted and kept).
    #[arg(long)]
    timeout: Option<f64>,
    /// Print the whole execution (outputs, results, error) as one JSON object.
    #[arg(long)]
    json: bool,
    /// The code; `-` or nothing reads it from stdin.
    code: Option<String>,
}

#[derive(clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    remote: Remote,
    /// The sandbox whose Python kernel gets the packages.
    #[arg(long)]
    sandbox: String,
    /// Requirements as pip takes them: `pandas`, `numpy==2.1.0`, `requests[socks]>=2`.
    #[arg(required = true)]
    packages: Vec<String>,
}

#[derive(clap::Args)]
pub struct EnvInfoArgs {
    #[command(flatten)]
    target: Target,
}

/// A sandbox in use; [`Session::finish`] kills it when this command created it.
struct Session {
    client: Client,
    id: String,
    token: Option<String>,
    owned: bool,
}

impl Session {
    async fn open(t: &Target) -> Result<Session> {
        let client = Client::new(&t.remote.url, &t.remote.api_key);
        let (id, token, owned) = match &t.sandbox {
            Some(id) => {
                let sbx = client.connect(id, 300).await?;
                (sbx.sandbox_id, sbx.envd_access_token, false)
            }
            None => {
                let req = kiln_api::NewSandbox {
                    template_id: t.template.clone(),
                    timeout: Some(300),
                    secure: Some(true),
                    allow_internet_access: Some(true),
                    metadata: None,
                    env_vars: None,
                    auto_pause: None,
                    ..Default::default()
                };
                let sbx = client
                    .create(&req)
                    .await
                    .with_context(|| format!("creating a sandbox from {}", t.template))?;
                if t.keep {
                    eprintln!("sandbox {} (kept running)", sbx.sandbox_id);
                }
                (sbx.sandbox_id, sbx.envd_access_token, !t.keep)
            }
        };
        Ok(Session {
            client,
            id,
            token,
            owned,
        })
    }

    async fn finish(self) {
        if self.owned {
            if let Err(e) = self.client.kill(&self.id).await {
                eprintln!("warning: killing sandbox {} failed: {e}", self.id);
            }
        }
    }
}

/// Prints outputs as they arrive: stdout and results to stdout, the rest to stderr.
fn print_event(event: &CodeEvent) {
    match event {
        CodeEvent::Stdout(s) => {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        }
        CodeEvent::Stderr(s) => {
            let _ = std::io::stderr().write_all(s.as_bytes());
        }
        CodeEvent::Result(r) => {
            let main = r["is_main_result"].as_bool() == Some(true);
            match r["text"].as_str() {
                Some(text) if main => println!("{text}"),
                _ => {
                    let formats: Vec<&str> = r
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .filter(|(k, v)| {
                                    !["is_main_result", "extra", "text"].contains(&k.as_str())
                                        && !v.is_null()
                                })
                                .map(|(k, _)| k.as_str())
                                .collect()
                        })
                        .unwrap_or_default();
                    eprintln!("[display: {}]", formats.join(", "));
                }
            }
        }
        CodeEvent::Error(e) => {
            eprintln!("{}", e.traceback);
            if !e.traceback.contains(&e.name) {
                eprintln!("{}: {}", e.name, e.value);
            }
        }
    }
}

fn execution_json(exec: &Execution) -> serde_json::Value {
    serde_json::json!({
        "stdout": exec.stdout,
        "stderr": exec.stderr,
        "results": exec.results,
        "error": exec.error.as_ref().map(|e| serde_json::json!({
            "name": e.name, "value": e.value, "traceback": e.traceback,
        })),
        "execution_count": exec.execution_count,
        "text": exec.text(),
    })
}

pub async fn run_code(args: RunCodeArgs) -> Result<()> {
    let code = match args.code.as_deref() {
        Some("-") | None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the code from stdin")?;
            s
        }
        Some(c) => c.to_string(),
    };
    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            bail!("--timeout must be a positive number of seconds")
        }
        t => t.map(Duration::from_secs_f64),
    };
    let req = RunCode {
        code,
        language: args.language,
        context_id: args.context,
        env_vars: args.env.into_iter().collect::<BTreeMap<_, _>>(),
    };
    let session = Session::open(&args.target).await?;
    let json = args.json;
    let result = session
        .client
        .run_code(&session.id, session.token.as_deref(), &req, timeout, |e| {
            if !json {
                print_event(e)
            }
        })
        .await;
    session.finish().await;
    let exec = result?;
    if json {
        println!("{}", execution_json(&exec));
    }
    if exec.error.is_some() {
        std::process::exit(1);
    }
    Ok(())
}

pub async fn install(args: InstallArgs) -> Result<()> {
    for p in &args.packages {
        kiln_client::check_package_spec(p).map_err(anyhow::Error::msg)?;
    }
    let client = Client::new(&args.remote.url, &args.remote.api_key);
    let sbx = client.connect(&args.sandbox, 300).await?;
    let exec = client
        .install_packages(
            &sbx.sandbox_id,
            sbx.envd_access_token.as_deref(),
            &args.packages,
            // pip's output; its failure is reported once, below.
            |e| {
                if matches!(e, CodeEvent::Stdout(_) | CodeEvent::Stderr(_)) {
                    print_event(e)
                }
            },
        )
        .await?;
    if let Some(e) = exec.error {
        bail!("{}", e.value);
    }
    Ok(())
}

pub async fn env_info(args: EnvInfoArgs) -> Result<()> {
    let session = Session::open(&args.target).await?;
    let info = session
        .client
        .environment_info(&session.id, session.token.as_deref())
        .await;
    session.finish().await;
    println!("{}", serde_json::to_string_pretty(&info?)?);
    Ok(())
}
