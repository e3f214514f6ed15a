//! The policy run in a classic-BPF interpreter: each case is the kernel's verdict for a
//! syscall number and its arguments.

use super::*;
use std::collections::BTreeSet;

/// What the kernel would answer, from running the filters in a classic-BPF
/// interpreter (the instructions seccompiler and the hand-written filters use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Errno(i32),
    Kill,
}

fn run_one(p: &BpfProgram, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    // struct seccomp_data: nr, arch, instruction_pointer (u64), args[6] (u64).
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let i = &p[pc];
        pc += 1;
        match i.code {
            0x20 => {
                let k = i.k as usize;
                acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
            }
            0x54 => acc &= i.k,         // ALU AND K
            0x05 => pc += i.k as usize, // JA
            0x06 => return i.k,         // RET K
            0x15 | 0x25 | 0x35 | 0x45 => {
                let taken = match i.code {
                    0x15 => acc == i.k,
                    0x25 => acc > i.k,
                    0x35 => acc >= i.k,
                    _ => acc & i.k != 0,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            other => panic!("opcode {other:#x} not interpreted"),
        }
    }
}

/// The stacked filters' combined answer: the most restrictive action wins; among
/// errnos, the one of the filter installed last.
fn verdict_arch(arch: u32, nr: i64, args: [u64; 6]) -> Verdict {
    let mut result = Verdict::Allow;
    for p in compile().unwrap() {
        let r = run_one(&p, arch, nr as u32, args);
        let v = match r & 0xffff_0000 {
            SECCOMP_RET_ALLOW => Verdict::Allow,
            SECCOMP_RET_ERRNO => Verdict::Errno((r & 0xffff) as i32),
            SECCOMP_RET_KILL_PROCESS => Verdict::Kill,
            other => panic!("unexpected action {other:#x}"),
        };
        result = match (result, v) {
            (Verdict::Kill, _) | (_, Verdict::Kill) => Verdict::Kill,
            (_, Verdict::Errno(e)) => Verdict::Errno(e),
            (r, Verdict::Allow) => r,
        };
    }
    result
}

fn verdict(nr: i64, args: [u64; 6]) -> Verdict {
    verdict_arch(AUDIT_ARCH_X86_64, nr, args)
}

fn arg0(v: u64) -> [u64; 6] {
    [v, 0, 0, 0, 0, 0]
}

const EPERM: Verdict = Verdict::Errno(libc::EPERM);
const NOSYS: Verdict = Verdict::Errno(libc::ENOSYS);

#[test]
fn policy_compiles_within_the_kernel_limit() {
    let programs = compile().unwrap();
    assert_eq!(programs.len(), 3);
    // BPF_MAXINSNS.
    assert!(programs.iter().all(|p| !p.is_empty() && p.len() <= 4096));
}

#[test]
fn dangerous_syscalls_are_not_in_the_allow_list() {
    let allowed: BTreeSet<&str> = ALLOW.iter().map(|e| e.name).collect();
    for must_not in [
        "mount",
        "umount2",
        "pivot_root",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsmount",
        "mount_setattr",
        "setns",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "request_key",
        "swapon",
        "swapoff",
        "reboot",
        "acct",
        "quotactl",
        "open_by_handle_at",
        "userfaultfd",
        "syslog",
        "iopl",
        "ioperm",
        "modify_ldt",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "adjtimex",
        "sethostname",
        "clone3",
    ] {
        assert!(!allowed.contains(must_not), "{must_not} is allowed");
    }
    for e in NAMED_DENIALS.iter().chain(ENOSYS) {
        assert!(!ALLOW.iter().any(|a| a.nr == e.nr), "{} is allowed", e.name);
        assert_ne!(verdict(e.nr, [0; 6]), Verdict::Allow, "{}", e.name);
    }
}

#[test]
fn named_denials_answer_eperm_and_the_enosys_list_enosys() {
    for e in NAMED_DENIALS {
        assert_eq!(verdict(e.nr, [0; 6]), EPERM, "{}", e.name);
    }
    for e in ENOSYS {
        assert_eq!(verdict(e.nr, [0; 6]), NOSYS, "{}", e.name);
    }
}

#[test]
fn a_syscall_absent_from_the_table_is_denied() {
    // Real x86_64 syscalls the table names nowhere: refused with EPERM by the
    // allow-list's default, which the old deny-list let through.
    for nr in [
        libc::SYS_ustat,
        libc::SYS_sysfs,
        libc::SYS_nfsservctl,
        libc::SYS_set_mempolicy_home_node,
    ] {
        let named = ALLOW
            .iter()
            .chain(NAMED_DENIALS)
            .chain(ENOSYS)
            .any(|e| e.nr == nr);
        assert!(!named, "{nr} is in a table");
        assert_eq!(verdict(nr, [0; 6]), EPERM, "syscall {nr}");
    }
}

#[test]
fn syscalls_newer_than_the_table_get_enosys() {
    // file_getattr (468) and file_setattr (469) exist since Linux 6.17.
    for nr in [HIGHEST_KNOWN + 1, 468, 469, 600, 1023] {
        assert_eq!(verdict(nr, [0; 6]), NOSYS, "syscall {nr}");
    }
    assert_ne!(verdict(HIGHEST_KNOWN, [0; 6]), NOSYS);
    let highest = ALLOW
        .iter()
        .chain(NAMED_DENIALS)
        .chain(ENOSYS)
        .map(|e| e.nr)
        .max();
    assert_eq!(highest, Some(HIGHEST_KNOWN));
}

#[test]
fn everyday_syscalls_are_allowed() {
    for e in ALLOW.iter().filter(|e| e.when == When::Always) {
        assert_eq!(verdict(e.nr, [0; 6]), Verdict::Allow, "{}", e.name);
    }
    for name in [
        "read",
        "execve",
        "ptrace",
        "inotify_init1",
        "epoll_wait",
        "ioctl",
        "setresuid",
        "chroot",
        "memfd_create",
        "fchmodat2",
    ] {
        assert!(ALLOW.iter().any(|e| e.name == name), "{name} not allowed");
    }
}

#[test]
fn clone_and_unshare_without_namespace_flags_only() {
    let fork_flags =
        (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64 | libc::SIGCHLD as u64;
    let thread_flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u64;
    assert_eq!(verdict(libc::SYS_clone, arg0(fork_flags)), Verdict::Allow);
    assert_eq!(verdict(libc::SYS_clone, arg0(thread_flags)), Verdict::Allow);
    for ns in [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWCGROUP,
    ] {
        let ns = ns as u64;
        assert_eq!(verdict(libc::SYS_clone, arg0(fork_flags | ns)), EPERM);
        assert_eq!(verdict(libc::SYS_unshare, arg0(ns)), EPERM);
    }
    assert_eq!(verdict(libc::SYS_unshare, arg0(0x80)), EPERM, "NEWTIME");
    // Namespace bits above 32 bits are compared too (Qword).
    assert_eq!(
        verdict(libc::SYS_unshare, arg0((1 << 40) | NEWUSER_FLAG)),
        EPERM
    );
    assert_eq!(
        verdict(
            libc::SYS_unshare,
            arg0((libc::CLONE_FILES | libc::CLONE_FS) as u64)
        ),
        Verdict::Allow
    );
    assert_eq!(verdict(libc::SYS_clone3, [0; 6]), NOSYS);
}

const NEWUSER_FLAG: u64 = libc::CLONE_NEWUSER as u64;

#[test]
fn socket_families() {
    let sock = |family: i32, ty: i32, proto: i32| {
        verdict(
            libc::SYS_socket,
            [family as u64, ty as u64, proto as u64, 0, 0, 0],
        )
    };
    assert_eq!(sock(libc::AF_UNIX, libc::SOCK_STREAM, 0), Verdict::Allow);
    assert_eq!(sock(libc::AF_INET, libc::SOCK_DGRAM, 0), Verdict::Allow);
    assert_eq!(
        sock(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        Verdict::Allow
    );
    assert_eq!(sock(libc::AF_INET6, libc::SOCK_STREAM, 0), Verdict::Allow);
    assert_eq!(
        sock(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
        Verdict::Allow
    );
    assert_eq!(
        sock(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT),
        Verdict::Allow
    );
    assert_eq!(
        sock(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_NETFILTER),
        EPERM
    );
    for family in [
        libc::AF_VSOCK,
        libc::AF_PACKET,
        libc::AF_ALG,
        libc::AF_TIPC,
        libc::AF_RDS,
        libc::AF_XDP,
        libc::AF_BLUETOOTH,
    ] {
        assert_eq!(sock(family, libc::SOCK_STREAM, 0), EPERM, "family {family}");
    }
    // The family is an int: garbage in the upper half does not sneak past.
    assert_eq!(
        verdict(libc::SYS_socket, arg0((1 << 32) | libc::AF_INET as u64)),
        Verdict::Allow
    );
}

#[test]
fn personality_values() {
    for v in [0u64, 8, 0x2_0000, 0x2_0008, 0x4_0000, 0xffff_ffff] {
        assert_eq!(verdict(libc::SYS_personality, arg0(v)), Verdict::Allow);
    }
    // READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, PER_SVR4.
    for v in [0x40_0000u64, 0x10_0000, 0x0068_0001] {
        assert_eq!(verdict(libc::SYS_personality, arg0(v)), EPERM, "{v:#x}");
    }
}

#[test]
fn abi_guard_kills_foreign_arches_and_refuses_x32() {
    const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
    assert_eq!(
        verdict_arch(AUDIT_ARCH_I386, libc::SYS_read, [0; 6]),
        Verdict::Kill
    );
    assert_eq!(verdict(libc::SYS_read | 0x4000_0000, [0; 6]), EPERM);
    let g = abi_guard();
    assert_eq!(g[1].k, AUDIT_ARCH_X86_64);
    assert_eq!(g[2].k, SECCOMP_RET_KILL_PROCESS);
    assert_eq!(g[4].k, X32_SYSCALL_BIT);
}

#[test]
fn names_are_unique_and_numbers_do_not_collide() {
    let mut names = BTreeSet::new();
    let mut nrs = BTreeSet::new();
    for e in ALLOW.iter().chain(NAMED_DENIALS).chain(ENOSYS) {
        assert!(names.insert(e.name), "{} twice", e.name);
        assert!(nrs.insert(e.nr), "{} ({}) shares its number", e.name, e.nr);
    }
}
