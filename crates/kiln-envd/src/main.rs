//! `kiln-envd`: the in-sandbox daemon speaking E2B's envd protocol.
//!
//! Thin binary: argument parsing and logging; everything else is in the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = kiln_envd::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_ENVD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(kiln_envd::run(args))
}
