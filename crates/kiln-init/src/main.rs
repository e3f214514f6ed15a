//! `kiln-init`: PID 1 of a Kiln sandbox.
//!
//! It starts envd (`/opt/kiln/bin/kiln-envd --socket /run/kiln/envd.sock`, or the
//! command given after `--`), with `--sudo-broker` then Kiln's sudo broker
//! (`/opt/kiln/bin/kiln-sudo --kiln-broker`, for kernels that ignore setuid bits),
//! reaps every process that is re-parented to it, forwards SIGTERM, SIGINT, SIGHUP
//! and SIGQUIT to envd, and exits with envd's status when envd
//! exits (which ends the sandbox: the kernel kills the rest of the pid namespace).
//!
//! Signals are handled synchronously: they are blocked before envd starts and taken
//! with `sigwait`, so there are no handlers and no async-signal-safety concerns. The
//! child gets an empty signal mask (set explicitly before exec).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_ENVD: [&str; 3] = ["/opt/kiln/bin/kiln-envd", "--socket", "/run/kiln/envd.sock"];
const SUDO_BROKER: [&str; 2] = ["/opt/kiln/bin/kiln-sudo", "--kiln-broker"];
const SUDO_FLAG: &str = "--sudo-broker";
const FORWARDED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let sudo_broker = args.first().map(String::as_str) == Some(SUDO_FLAG);
    if sudo_broker {
        args.remove(0);
    }
    let command = match envd_command(&args) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("kiln-init: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&command, sudo_broker) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("kiln-init: {message}");
            ExitCode::from(1)
        }
    }
}

/// The command to run as envd: everything after `--`, or the default.
fn envd_command(args: &[String]) -> Result<Vec<String>, String> {
    match args.iter().position(|a| a == "--") {
        None if args.is_empty() => Ok(DEFAULT_ENVD.iter().map(|s| s.to_string()).collect()),
        None => Err(format!(
            "unexpected arguments {args:?}; usage: kiln-init [{SUDO_FLAG}] [-- COMMAND...]"
        )),
        Some(0) if args.len() > 1 => Ok(args[1..].to_vec()),
        Some(_) => Err("usage: kiln-init [-- COMMAND...] (the command must not be empty)".into()),
    }
}

fn run(command: &[String], sudo_broker: bool) -> Result<u8, String> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for sig in FORWARDED {
        mask.add(sig);
    }
    mask.thread_set_mask()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let envd = start(command)?;
    if sudo_broker {
        // After envd, so envd keeps pid 2. Without the broker only `sudo` fails.
        let broker: Vec<String> = SUDO_BROKER.iter().map(|s| s.to_string()).collect();
        if let Err(message) = start(&broker) {
            eprintln!("kiln-init: {message}");
        }
    }

    loop {
        let sig = mask.wait().map_err(|e| format!("sigwait: {e}"))?;
        if sig != Signal::SIGCHLD {
            // envd may already be gone; ESRCH is fine.
            let _ = kill(envd, sig);
            continue;
        }
        if let Some(code) = reap(envd)? {
            return Ok(code);
        }
    }
}

/// Starts a child with an empty signal mask and the sandbox's PATH.
fn start(command: &[String]) -> Result<Pid, String> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).env("PATH", PATH);
    // std resets the mask on its fork/exec path, but not on every spawn path of every
    // kernel: under gVisor envd started with SIGCHLD still blocked and never saw its
    // children exit. Clear it explicitly in the child.
    // SAFETY: the closure runs between fork and exec and only calls sigprocmask with a
    // stack-local empty set, which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let empty = SigSet::empty();
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&empty),
                None,
            )
            .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", command[0]))?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// Reaps every exited child. Returns envd's exit code once envd has exited.
fn reap(envd: Pid) -> Result<Option<u8>, String> {
    let mut envd_code = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == envd => {
                envd_code = Some(u8::try_from(code).unwrap_or(1));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == envd => {
                envd_code = Some(128u8.saturating_add(sig as u8));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(envd_code),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("waitpid: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn default_command_is_envd() {
        assert_eq!(envd_command(&[]).unwrap(), s(&DEFAULT_ENVD));
    }

    #[test]
    fn override_after_double_dash() {
        assert_eq!(
            envd_command(&s(&["--", "/bin/sh", "-c", "x"])).unwrap(),
            s(&["/bin/sh", "-c", "x"])
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(envd_command(&s(&["--"])).is_err());
        assert!(envd_command(&s(&["foo"])).is_err());
        assert!(envd_command(&s(&["foo", "--", "x"])).is_err());
    }
}
