//! The in-sandbox side of the tests: a stand-in for envd and a syscall prober.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

/// Serve `/run/kiln/envd.sock`: each connection sends a shell command and closes its
/// write side; the reply is `<exit code>\n<stdout><stderr>`.
pub fn serve() {
    let _ = std::fs::remove_file(kiln_runtime::GUEST_ENVD_SOCKET);
    let listener = match UnixListener::bind(kiln_runtime::GUEST_ENVD_SOCKET) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("probe agent: bind: {e}");
            std::process::exit(1);
        }
    };
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        // No thread per connection: under a pids limit the agent must still work.
        let mut cmd = String::new();
        if conn.read_to_string(&mut cmd).is_err() {
            continue;
        }
        let reply = match Command::new("/bin/sh")
            .args(["-c", &cmd])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => {
                let mut r = format!("{}\n", out.status.code().unwrap_or(-1)).into_bytes();
                r.extend_from_slice(&out.stdout);
                r.extend_from_slice(&out.stderr);
                r
            }
            Err(e) => format!("-2\nspawn failed: {e}\n").into_bytes(),
        };
        let _ = conn.write_all(&reply);
    }
}

fn errno_name(ret: libc::c_long) -> String {
    if ret >= 0 {
        return "OK".into();
    }
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    match e {
        libc::EPERM => "EPERM".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::EBADF => "EBADF".into(),
        libc::ENOENT => "ENOENT".into(),
        other => format!("errno{other}"),
    }
}

/// A raw syscall with integer arguments only (pointers are passed as 0).
fn raw(nr: libc::c_long, a: [libc::c_long; 5]) -> libc::c_long {
    // SAFETY: every argument is an integer (null where the kernel expects a pointer);
    // the kernel validates them and no memory of this process is handed out.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) }
}

/// Try each syscall the policy denies (with harmless arguments) and print
/// `name RESULT` lines. A syscall that reached the kernel would fail differently
/// (EFAULT, EINVAL, ENOENT...) or succeed; the filter answers EPERM (ENOSYS for clone3).
pub fn syscalls() {
    let probes: [(&str, libc::c_long, [libc::c_long; 5]); 19] = [
        ("mount", libc::SYS_mount, [0; 5]),
        ("umount2", libc::SYS_umount2, [0; 5]),
        ("pivot_root", libc::SYS_pivot_root, [0; 5]),
        ("kexec_load", libc::SYS_kexec_load, [0; 5]),
        ("init_module", libc::SYS_init_module, [0; 5]),
        ("finit_module", libc::SYS_finit_module, [-1, 0, 0, 0, 0]),
        ("bpf", libc::SYS_bpf, [0; 5]),
        (
            "perf_event_open",
            libc::SYS_perf_event_open,
            [0, 0, -1, -1, 0],
        ),
        // KEYCTL_GET_KEYRING_ID of the session keyring: succeeds when allowed.
        ("keyctl", libc::SYS_keyctl, [0, -3, 0, 0, 0]),
        ("add_key", libc::SYS_add_key, [0; 5]),
        ("swapoff", libc::SYS_swapoff, [0; 5]),
        ("reboot", libc::SYS_reboot, [0; 5]),
        ("settimeofday", libc::SYS_settimeofday, [0; 5]),
        ("userfaultfd", libc::SYS_userfaultfd, [0; 5]),
        (
            "open_by_handle_at",
            libc::SYS_open_by_handle_at,
            [-1, 0, 0, 0, 0],
        ),
        (
            "unshare_newuser",
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as libc::c_long, 0, 0, 0, 0],
        ),
        ("x32_mount", libc::SYS_mount | 0x4000_0000, [0; 5]),
        ("clone3", libc::SYS_clone3, [0; 5]),
        // Control: not denied, so it reaches the kernel (EINVAL for this flag).
        ("unshare_bogus", libc::SYS_unshare, [0x1, 0, 0, 0, 0]),
    ];
    for (name, nr, args) in probes {
        println!("{name} {}", errno_name(raw(nr, args)));
    }
}
