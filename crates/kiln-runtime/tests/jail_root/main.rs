//! Root-tier integration tests of the jail runtime (tier: root; no KVM).
//!
//! Run: `cargo build -p kiln-init -p kiln-envd && cargo test -p kiln-runtime --test jail_root`
//! (add `-- NAME` to run the tests whose name contains NAME).
//!
//! Needs: root, `busybox-static` (`apt-get install busybox-static`), iptables,
//! iproute2, and the `kiln-init` binary built in the same target directory (or
//! `KILN_INIT_BIN`). Without root or busybox the tests are skipped with a printed
//! reason, unless `CI` is set, in which case they fail. The Debian check (`curl` and
//! `pip download` from an Internet sandbox) runs when `KILN_TEST_DEBIAN_ROOTFS` points
//! at a Debian root filesystem with curl and pip, owned by the mapped id range.
//!
//! This file is its own test harness (`harness = false`) because the same binary is
//! also the in-sandbox probe: started as `probe agent` it stands in for envd (listens
//! on `/run/kiln/envd.sock` and runs shell commands sent by the tests, so every check
//! runs *inside* the sandbox, under its namespaces, cgroup, capabilities and seccomp
//! filter); started as `probe syscalls` it tries the denied syscalls and prints errnos,
//! as `probe everyday` it does what ordinary programs do (ptrace, PTYs, inotify, ...).

mod agent;
mod fixture;
mod id_ranges;
mod tests;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("agent") => agent::serve(),
        Some("syscalls") => agent::syscalls(),
        Some("everyday") => agent::everyday(),
        Some("euid") => agent::euid(),
        Some("setuid") => agent::setuid_exec(args.get(2).map_or("", String::as_str)),
        _ => tests::run(&args[1..]),
    }
}
