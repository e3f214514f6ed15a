//! `kiln-jail`: the runtimes' single-threaded helper. `start` builds one jail sandbox
//! and supervises its PID 1 (`kiln_runtime::jail::helper`, `docs/jail.md`);
//! `gvisor-rootfs` mounts a gVisor sandbox's overlay over its idmapped template layer
//! (`kiln_runtime::gvisor::rootfs`, `docs/gvisor.md`).

use kiln_runtime::{gvisor::rootfs, jail::helper};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((cmd, rest)) if cmd == rootfs::SUBCOMMAND => {
            helper::exit_with(rootfs::helper_main(rest))
        }
        _ => helper::main(&args),
    }
}
