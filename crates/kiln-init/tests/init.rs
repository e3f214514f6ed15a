//! kiln-init as a process (tier: unprivileged). Outside a pid namespace it is not
//! PID 1, so it makes itself a child subreaper to adopt orphans the same way.

use std::process::Command;
use std::time::{Duration, Instant};

const INIT: &str = env!("CARGO_BIN_EXE_kiln-init");

#[test]
fn exits_with_envds_status() {
    let status = Command::new(INIT)
        .args(["--", "/bin/sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
}

#[test]
fn reports_a_missing_command() {
    let out = Command::new(INIT)
        .args(["--", "/nonexistent/envd"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/envd"));
}

#[test]
fn forwards_sigterm_and_reaps_orphans() {
    // The shell leaves an orphan (the subshell's sleep), then waits for SIGTERM.
    let script = "(sleep 0.1 &) ; trap 'exit 9' TERM; while :; do sleep 0.05; done";
    let mut child = Command::new(INIT)
        .args(["--", "/bin/sh", "-c", script])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // The orphaned sleep has exited by now and must have been reaped (no zombie child).
    let zombies =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
            .unwrap();
    for pid in zombies.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains(") Z "), "unreaped zombie: {stat}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(9));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kiln-init did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
