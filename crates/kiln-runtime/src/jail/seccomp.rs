//! The sandbox's seccomp policy (data) and its compilation with `seccompiler`.
//!
//! Default allow, with a deny-list of syscalls a sandbox has no business making: they
//! reach host-global kernel state, or are the usual first step of a kernel exploit.
//! Three stacked filters, applied last before `exec`, while the process still holds
//! CAP_SYS_ADMIN in the sandbox's user namespace (so `no_new_privs` is not needed to
//! install them; see `docs/jail.md` for why it is not set):
//! 1. an ABI guard: non-x86_64 syscalls kill the process, x32 syscalls (nr with bit 30
//!    set, which a per-number deny-list would not see) fail with EPERM;
//! 2. the EPERM deny-list below;
//! 3. `clone3` fails with ENOSYS: its flags sit behind a pointer the filter cannot read,
//!    and ENOSYS makes glibc fall back to `clone`, whose flags filter 2 checks.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp policy ({what})")]
    Compile {
        what: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter")]
    Apply(#[source] std::io::Error),
}

/// When a deny-list entry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only when argument 0 (clone/unshare flags) has all these bits set.
    Arg0Has(u64),
}

/// One entry of the deny-list: name (for docs and tests), number, condition.
#[derive(Debug, Clone, Copy)]
pub struct Deny {
    pub name: &'static str,
    pub nr: i64,
    pub when: When,
}

const fn always(name: &'static str, nr: i64) -> Deny {
    Deny {
        name,
        nr,
        when: When::Always,
    }
}

const NEWUSER: u64 = libc::CLONE_NEWUSER as u64;

/// Syscalls that fail with EPERM inside a sandbox.
pub const DENY_EPERM: &[Deny] = &[
    // Mount table: the jail has finished setting it up before exec.
    always("mount", libc::SYS_mount),
    always("umount2", libc::SYS_umount2),
    always("pivot_root", libc::SYS_pivot_root),
    always("move_mount", libc::SYS_move_mount),
    always("open_tree", libc::SYS_open_tree),
    always("fsopen", libc::SYS_fsopen),
    always("fsconfig", libc::SYS_fsconfig),
    always("fsmount", libc::SYS_fsmount),
    always("fspick", libc::SYS_fspick),
    always("mount_setattr", libc::SYS_mount_setattr),
    // Kernel code and kernel-global state.
    always("kexec_load", libc::SYS_kexec_load),
    always("kexec_file_load", libc::SYS_kexec_file_load),
    always("init_module", libc::SYS_init_module),
    always("finit_module", libc::SYS_finit_module),
    always("delete_module", libc::SYS_delete_module),
    always("bpf", libc::SYS_bpf),
    always("perf_event_open", libc::SYS_perf_event_open),
    always("keyctl", libc::SYS_keyctl),
    always("add_key", libc::SYS_add_key),
    always("request_key", libc::SYS_request_key),
    always("swapon", libc::SYS_swapon),
    always("swapoff", libc::SYS_swapoff),
    always("reboot", libc::SYS_reboot),
    always("acct", libc::SYS_acct),
    always("quotactl", libc::SYS_quotactl),
    always("quotactl_fd", libc::SYS_quotactl_fd),
    always("open_by_handle_at", libc::SYS_open_by_handle_at),
    always("userfaultfd", libc::SYS_userfaultfd),
    always("syslog", libc::SYS_syslog),
    always("iopl", libc::SYS_iopl),
    always("ioperm", libc::SYS_ioperm),
    always("lookup_dcookie", libc::SYS_lookup_dcookie),
    always("uselib", libc::SYS_uselib),
    always("io_uring_setup", libc::SYS_io_uring_setup),
    always("io_uring_enter", libc::SYS_io_uring_enter),
    always("io_uring_register", libc::SYS_io_uring_register),
    // The clock is the host's.
    always("settimeofday", libc::SYS_settimeofday),
    always("clock_settime", libc::SYS_clock_settime),
    always("clock_adjtime", libc::SYS_clock_adjtime),
    always("adjtimex", libc::SYS_adjtimex),
    // No nested user namespaces (the root of most unprivileged kernel exploits).
    Deny {
        name: "clone",
        nr: libc::SYS_clone,
        when: When::Arg0Has(NEWUSER),
    },
    Deny {
        name: "unshare",
        nr: libc::SYS_unshare,
        when: When::Arg0Has(NEWUSER),
    },
];

/// Syscalls that fail with ENOSYS (so libc falls back to an older, filterable call).
pub const DENY_ENOSYS: &[Deny] = &[always("clone3", libc::SYS_clone3)];

fn arch() -> TargetArch {
    TargetArch::x86_64
}

fn compile_list(list: &[Deny], errno: i32, what: &'static str) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Compile { what, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for d in list {
        let entry = rules.entry(d.nr).or_default();
        if let When::Arg0Has(bits) = d.when {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(bits),
                bits,
            )
            .map_err(err)?;
            entry.push(SeccompRule::new(vec![cond]).map_err(err)?);
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch(),
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Filter 1: kill on a foreign architecture, EPERM for x32 syscall numbers.
pub fn abi_guard() -> BpfProgram {
    vec![
        ins(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        ins(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        ins(BPF_LD_W_ABS, 0, 0, OFF_NR),
        ins(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// The compiled policy, in installation order.
pub fn compile() -> Result<Vec<BpfProgram>, SeccompError> {
    Ok(vec![
        abi_guard(),
        compile_list(DENY_EPERM, libc::EPERM, "EPERM deny-list")?,
        compile_list(DENY_ENOSYS, libc::ENOSYS, "ENOSYS list")?,
    ])
}

/// Install the compiled filters on the calling thread; every filter applies to the
/// process and its children from then on. The caller must hold CAP_SYS_ADMIN in its
/// user namespace: unlike `seccompiler::apply_filter`, this does not set
/// `no_new_privs`, so setuid programs (`sudo`) keep working inside the sandbox.
pub fn apply(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        let len = u16::try_from(p.len()).map_err(|_| {
            SeccompError::Apply(std::io::Error::other("seccomp program longer than 65535"))
        })?;
        let prog = libc::sock_fprog {
            len,
            filter: p.as_ptr().cast_mut().cast(),
        };
        // SAFETY: `prog` points at `p`, a live, correctly sized array of BPF
        // instructions that outlives the call; the kernel copies it before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Apply(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles() {
        let programs = compile().unwrap();
        assert_eq!(programs.len(), 3);
        assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }

    #[test]
    fn denies_the_dangerous_syscalls() {
        let names: Vec<&str> = DENY_EPERM.iter().map(|d| d.name).collect();
        for must in [
            "mount",
            "umount2",
            "pivot_root",
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
            "settimeofday",
            "clock_settime",
            "clone",
            "unshare",
        ] {
            assert!(names.contains(&must), "{must} missing from the deny-list");
        }
        for d in DENY_EPERM
            .iter()
            .filter(|d| d.name == "clone" || d.name == "unshare")
        {
            assert_eq!(d.when, When::Arg0Has(libc::CLONE_NEWUSER as u64));
        }
        assert_eq!(DENY_ENOSYS[0].nr, libc::SYS_clone3);
    }

    #[test]
    fn every_denied_number_appears_in_the_program() {
        let eperm = compile_list(DENY_EPERM, libc::EPERM, "t").unwrap();
        for d in DENY_EPERM {
            assert!(
                eperm
                    .iter()
                    .any(|i| i.code == BPF_JMP_JEQ_K && i.k == d.nr as u32),
                "{} not compared in the filter",
                d.name
            );
        }
        // The filter returns EPERM on a match and allows by default.
        assert!(eperm
            .iter()
            .any(|i| i.code == BPF_RET_K && i.k == SECCOMP_RET_ERRNO | libc::EPERM as u32));
        assert!(eperm
            .iter()
            .any(|i| i.code == BPF_RET_K && i.k == SECCOMP_RET_ALLOW));
    }

    #[test]
    fn names_match_numbers() {
        // Guards against a copy-paste error pairing a name with the wrong number.
        let unique: std::collections::BTreeSet<i64> = DENY_EPERM
            .iter()
            .filter(|d| d.when == When::Always)
            .map(|d| d.nr)
            .collect();
        assert_eq!(
            unique.len(),
            DENY_EPERM.iter().filter(|d| d.when == When::Always).count()
        );
    }

    #[test]
    fn abi_guard_shape() {
        let g = abi_guard();
        assert_eq!(g[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(g[2].k, SECCOMP_RET_KILL_PROCESS);
        assert_eq!(g[4].k, X32_SYSCALL_BIT);
        assert_eq!(g.last().unwrap().k, SECCOMP_RET_ALLOW);
    }
}
