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
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        other => format!("errno{other}"),
    }
}

/// A raw syscall with integer arguments only (pointers are passed as 0).
fn raw(nr: libc::c_long, a: [libc::c_long; 5]) -> libc::c_long {
    // SAFETY: every argument is an integer (null where the kernel expects a pointer);
    // the kernel validates them and no memory of this process is handed out.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) }
}

const AT_FDCWD: libc::c_long = libc::AT_FDCWD as libc::c_long;

/// `(name, number, arguments, expected result)`.
pub type Probe = (&'static str, libc::c_long, [libc::c_long; 5], &'static str);

/// Each syscall the policy refuses, with
/// harmless arguments under which the kernel itself would answer differently (OK,
/// EFAULT, EINVAL, ...), so the expected EPERM/ENOSYS can only come from the filter;
/// and controls that must reach the kernel.
#[rustfmt::skip]
pub const PROBES: &[Probe] = &[
    ("mount", libc::SYS_mount, [0; 5], "EPERM"),
    ("umount2", libc::SYS_umount2, [0; 5], "EPERM"),
    ("pivot_root", libc::SYS_pivot_root, [0; 5], "EPERM"),
    ("kexec_load", libc::SYS_kexec_load, [0; 5], "EPERM"),
    ("init_module", libc::SYS_init_module, [0; 5], "EPERM"),
    ("finit_module", libc::SYS_finit_module, [-1, 0, 0, 0, 0], "EPERM"),
    ("bpf", libc::SYS_bpf, [0; 5], "EPERM"),
    ("perf_event_open", libc::SYS_perf_event_open, [0, 0, -1, -1, 0], "EPERM"),
    // KEYCTL_GET_KEYRING_ID of the session keyring: succeeds when allowed.
    ("keyctl", libc::SYS_keyctl, [0, -3, 0, 0, 0], "EPERM"),
    ("add_key", libc::SYS_add_key, [0; 5], "EPERM"),
    ("swapoff", libc::SYS_swapoff, [0; 5], "EPERM"),
    ("reboot", libc::SYS_reboot, [0; 5], "EPERM"),
    ("settimeofday", libc::SYS_settimeofday, [0; 5], "EPERM"),
    ("userfaultfd", libc::SYS_userfaultfd, [0; 5], "EPERM"),
    ("open_by_handle_at", libc::SYS_open_by_handle_at, [-1, 0, 0, 0, 0], "EPERM"),
    ("unshare_newuser", libc::SYS_unshare, [libc::CLONE_NEWUSER as libc::c_long, 0, 0, 0, 0], "EPERM"),
    ("x32_mount", libc::SYS_mount | 0x4000_0000, [0; 5], "EPERM"),
    ("clone3", libc::SYS_clone3, [0; 5], "ENOSYS"),
    // Allow-list: io_uring (EFAULT when allowed), adjtimex (EFAULT), a syscall in no
    // table at all (ustat: EINVAL when allowed), socket families and netlink
    // protocols, personality values.
    ("io_uring_setup", libc::SYS_io_uring_setup, [1, 0, 0, 0, 0], "EPERM"),
    ("adjtimex", libc::SYS_adjtimex, [0; 5], "EPERM"),
    ("ustat_in_no_table", libc::SYS_ustat, [0; 5], "EPERM"),
    ("socket_vsock", libc::SYS_socket, [libc::AF_VSOCK as libc::c_long, libc::SOCK_STREAM as libc::c_long, 0, 0, 0], "EPERM"),
    ("socket_netlink_netfilter", libc::SYS_socket, [libc::AF_NETLINK as libc::c_long, libc::SOCK_RAW as libc::c_long, libc::NETLINK_NETFILTER as libc::c_long, 0, 0], "EPERM"),
    ("personality_read_implies_exec", libc::SYS_personality, [0x40_0000, 0, 0, 0, 0], "EPERM"),
    // Newer than the table (statmount: listed; file_getattr, 468: past the highest
    // reviewed number): ENOSYS, so callers fall back. The kernel here has both.
    ("statmount", 457, [0; 5], "ENOSYS"),
    ("file_getattr_unknown", 468, [-1, 0, 0, 0, 0], "ENOSYS"),
    // Controls: not denied, so they reach the kernel.
    ("unshare_bogus", libc::SYS_unshare, [0x1, 0, 0, 0, 0], "EINVAL"),
    ("socket_inet", libc::SYS_socket, [libc::AF_INET as libc::c_long, libc::SOCK_STREAM as libc::c_long, 0, 0, 0], "OK"),
    ("socket_netlink_route", libc::SYS_socket, [libc::AF_NETLINK as libc::c_long, libc::SOCK_RAW as libc::c_long, libc::NETLINK_ROUTE as libc::c_long, 0, 0], "OK"),
    ("personality_query", libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0], "OK"),
    ("fchmodat2", 452, [AT_FDCWD, 0, 0, 0, 0], "EFAULT"),
    ("inotify_init1", libc::SYS_inotify_init1, [0; 5], "OK"),
];

/// Try each of [`PROBES`] and print `name RESULT` lines.
pub fn syscalls() {
    for (name, nr, args, _) in PROBES {
        println!("{name} {}", errno_name(raw(*nr, *args)));
    }
}

/// Everyday work under the filter that a busybox shell cannot show: ptrace of a child
/// (CAP_SYS_PTRACE is kept), a PTY pair, inotify, threads, fork + exec. Prints one
/// `name OK|FAILED: why` line each.
pub fn everyday() {
    type Check = fn() -> std::io::Result<()>;
    let checks: [(&str, Check); 5] = [
        ("ptrace", ptrace_child),
        ("pty", open_pty),
        ("inotify", inotify_event),
        ("threads", || {
            let t: Vec<_> = (0..4).map(|i| std::thread::spawn(move || i * 2)).collect();
            let sum: i32 = t.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            (sum == 12)
                .then_some(())
                .ok_or_else(|| std::io::Error::other("bad sum"))
        }),
        ("fork_exec", || {
            let s = Command::new("/bin/true").status()?;
            s.success()
                .then_some(())
                .ok_or_else(|| std::io::Error::other(s.to_string()))
        }),
    ];
    for (name, check) in checks {
        match check() {
            Ok(()) => println!("{name} OK"),
            Err(e) => println!("{name} FAILED: {e}"),
        }
    }
}

fn last_err<T>(what: &str) -> std::io::Result<T> {
    let e = std::io::Error::last_os_error();
    Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Fork a child that asks to be traced and stops itself; continue it and reap it.
fn ptrace_child() -> std::io::Result<()> {
    // SAFETY: fork in this single-threaded probe process; the child only makes
    // async-signal-safe calls (ptrace, raise, _exit) before exiting.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return last_err("fork");
    }
    if pid == 0 {
        // SAFETY: integer arguments only; the child exits right after.
        unsafe {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                libc::_exit(3);
            }
            libc::raise(libc::SIGSTOP);
            libc::_exit(7);
        }
    }
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer for the duration of the call.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return last_err("waitpid");
    }
    if !libc::WIFSTOPPED(status) {
        return Err(std::io::Error::other(format!(
            "child not stopped under ptrace (status {status:#x})"
        )));
    }
    // SAFETY: `pid` is our traced, stopped child; PTRACE_CONT takes integers only.
    if unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) } != 0 {
        return last_err("PTRACE_CONT");
    }
    // SAFETY: as above.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return last_err("waitpid");
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("child status {status:#x}")))
    }
}

fn open_pty() -> std::io::Result<()> {
    // SAFETY: posix_openpt takes flags only; the fd it returns is owned below.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    if master < 0 {
        return last_err("posix_openpt");
    }
    // SAFETY: `master` is the open PTY master fd returned above.
    let ok = unsafe { libc::grantpt(master) == 0 && libc::unlockpt(master) == 0 };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: `name` is a writable buffer of the length passed.
    let named = ok && unsafe { libc::ptsname_r(master, name.as_mut_ptr(), name.len()) } == 0;
    let result = if named {
        // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
        let slave = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if slave < 0 {
            last_err("open pts")
        } else {
            // SAFETY: `slave` was opened above and is not used after.
            unsafe { libc::close(slave) };
            Ok(())
        }
    } else {
        last_err("grantpt/unlockpt/ptsname")
    };
    // SAFETY: `master` was opened above and is not used after.
    unsafe { libc::close(master) };
    result
}

fn inotify_event() -> std::io::Result<()> {
    // SAFETY: flags only; the fd is closed below.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
    if fd < 0 {
        return last_err("inotify_init1");
    }
    let dir = std::ffi::CString::new("/tmp").map_err(std::io::Error::other)?;
    // SAFETY: `fd` is the inotify fd; `dir` is a NUL-terminated path that outlives the call.
    let wd = unsafe { libc::inotify_add_watch(fd, dir.as_ptr(), libc::IN_CREATE) };
    let result = if wd < 0 {
        last_err("inotify_add_watch")
    } else {
        std::fs::write("/tmp/inotify-probe", b"x")?;
        let mut buf = [0u8; 512];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            Ok(())
        } else {
            last_err("no inotify event")
        }
    };
    // SAFETY: `fd` was opened above and is not used after.
    unsafe { libc::close(fd) };
    result
}

/// `probe euid`: print the effective uid (run setuid-root by [`setuid_exec`]).
pub fn euid() {
    println!("euid={}", nix::unistd::geteuid());
}

/// `probe setuid <program>`: become uid/gid 1000 and exec `<program> euid`, as a
/// user's shell runs `sudo`: a setuid-root program must still gain euid 0 under the
/// seccomp filter (no `no_new_privs`).
pub fn setuid_exec(program: &str) {
    use nix::unistd::{Gid, Uid};
    let gid = Gid::from_raw(1000);
    let uid = Uid::from_raw(1000);
    let dropped = nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setresgid(gid, gid, gid))
        .and_then(|()| nix::unistd::setresuid(uid, uid, uid));
    if let Err(e) = dropped {
        println!("cannot drop to uid 1000: {e}");
        std::process::exit(1);
    }
    let err = std::os::unix::process::CommandExt::exec(Command::new(program).arg("euid"));
    println!("exec {program}: {err}");
    std::process::exit(1);
}
