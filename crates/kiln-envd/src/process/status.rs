//! `EndEvent` values, spelled as Go's `os.ProcessState.String()` (what envd reports).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use kiln_proto::process::EndEvent;

/// Go's `syscall.Signal.String()` for Linux signals.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

/// The end event for a reaped child.
pub fn end_event(status: ExitStatus) -> EndEvent {
    if let Some(code) = status.code() {
        let text = format!("exit status {code}");
        return EndEvent {
            exit_code: code,
            exited: true,
            error: (code != 0).then(|| text.clone()),
            status: text,
        };
    }
    let text = match status.signal() {
        Some(signal) => {
            let mut text = format!("signal: {}", signal_name(signal));
            if status.core_dumped() {
                text.push_str(" (core dumped)");
            }
            text
        }
        None => "unknown exit status".to_owned(),
    };
    EndEvent {
        exit_code: -1,
        exited: false,
        status: text.clone(),
        error: Some(text),
    }
}

/// The end event when waiting for the child failed.
pub fn wait_failed(error: &std::io::Error) -> EndEvent {
    EndEvent {
        exit_code: -1,
        exited: false,
        status: "unknown exit status".to_owned(),
        error: Some(format!("waiting for process: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_exits() {
        let ok = end_event(ExitStatus::from_raw(0));
        assert_eq!(
            ok,
            EndEvent {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None
            }
        );
        let fail = end_event(ExitStatus::from_raw(3 << 8));
        assert_eq!(fail.exit_code, 3);
        assert_eq!(fail.error.as_deref(), Some("exit status 3"));
    }

    #[test]
    fn signals() {
        let killed = end_event(ExitStatus::from_raw(9));
        assert_eq!(
            killed,
            EndEvent {
                exit_code: -1,
                exited: false,
                status: "signal: killed".into(),
                error: Some("signal: killed".into()),
            }
        );
        assert_eq!(
            end_event(ExitStatus::from_raw(15)).status,
            "signal: terminated"
        );
        assert_eq!(
            end_event(ExitStatus::from_raw(6 | 0x80)).status,
            "signal: aborted (core dumped)"
        );
        assert_eq!(signal_name(64), "signal 64");
    }
}
