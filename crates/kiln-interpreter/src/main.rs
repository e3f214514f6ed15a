//! `kiln-interpreter`: E2B's code interpreter on real Jupyter kernels.
//!
//! Thin binary: argument parsing and logging; everything else is in the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = kiln_interpreter::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_INTERPRETER_LOG").unwrap_or_else(
                |_| // zeromq logs every refused connect while a kernel is still binding.
                tracing_subscriber::EnvFilter::new("info,zeromq=error"),
            ),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(kiln_interpreter::run(args))
}
