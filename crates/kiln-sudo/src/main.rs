//! `kiln-sudo`: sudo for sandboxes whose kernel ignores set-user-ID bits.
//!
//! gVisor runs every task as if `no_new_privs` were set, so the setuid `sudo` of a
//! template cannot become root. In gVisor sandboxes Kiln bind-mounts this binary over
//! `/usr/bin/sudo` (the client) and kiln-init starts `kiln-sudo --kiln-broker` as root
//! (the broker). The client hands its request and its stdin/stdout/stderr to the
//! broker over the abstract socket `@kiln-sudo`; the broker checks the caller's uid
//! (`SO_PEERCRED`) against the sudoers `NOPASSWD: ALL` rules and runs the command.
//! What that grants is what the template's sudoers grants: on E2B's templates, `user`
//! may run anything as root without a password.
//!
//! Code map: [`options`] (sudo's command line), [`policy`] (sudoers), [`proto`]
//! (framing, fd passing), [`broker`] (checks, environment, start, signals),
//! [`client`].

use std::process::ExitCode;

mod broker;
mod client;
mod options;
mod policy;
mod proto;

/// The broker's flag (not a sudo option, so no sudo command line is taken for it).
const BROKER_FLAG: &str = "--kiln-broker";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.first().map(String::as_str) == Some(BROKER_FLAG) {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("kiln-sudo: the broker must run as root");
            return ExitCode::from(1);
        }
        return broker::run();
    }
    client::run(&args)
}
