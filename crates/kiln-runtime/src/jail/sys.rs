//! Thin wrappers over the few Linux calls that `nix` does not cover. Each returns an
//! `io::Error` from errno; none of them keeps pointers past the call.

use std::io;
use std::os::fd::RawFd;

/// Capabilities kept in the bounding set of every sandbox process (Docker's default
/// set without CAP_NET_RAW, plus CAP_SYS_PTRACE for debuggers; all of them act only
/// inside the sandbox's user namespace). Everything else (SYS_ADMIN, NET_ADMIN,
/// NET_RAW, SYS_MODULE, SYS_TIME, ...) is dropped. Numbers from `linux/capability.h`.
pub const KEEP_CAPS: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_MKNOD", 27),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
];

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Highest capability number the running kernel knows.
pub fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drop every capability not in [`KEEP_CAPS`] from the bounding set, and clear the
/// ambient set. Needs CAP_SETPCAP (the jail child has every capability in its user
/// namespace at that point).
pub fn bound_capabilities(last_cap: u32) -> io::Result<()> {
    for cap in 0..=last_cap {
        if KEEP_CAPS.iter().any(|(_, c)| *c == cap) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number by value and no pointers.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) })?;
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes only integer arguments.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(r)
}

/// Mark every fd from `first` upwards close-on-exec (kernel >= 5.11).
pub fn cloexec_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range takes two fd numbers and flags by value; with
    // CLOSE_RANGE_CLOEXEC it only sets flags and closes nothing, so no fd owned by
    // Rust code is invalidated.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bring `lo` up in the current network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket() takes integers; the returned fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes ifru_flags inside
    // `req`, which is a live, properly sized ifreq for the duration of the call.
    check(unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the union member ifru_flags was just initialised by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    check(unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_list_excludes_dangerous_caps() {
        for (name, num) in [
            ("CAP_SYS_ADMIN", 21),
            ("CAP_NET_ADMIN", 12),
            ("CAP_SYS_MODULE", 16),
            ("CAP_SYS_TIME", 25),
            ("CAP_SYS_RAWIO", 17),
        ] {
            assert!(!KEEP_CAPS.iter().any(|(_, c)| *c == num), "{name} kept");
        }
        assert!(cap_last_cap() >= 31);
    }
}
