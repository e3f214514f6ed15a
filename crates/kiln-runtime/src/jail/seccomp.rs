//! The sandbox's seccomp policy (data) and its compilation with `seccompiler`.
//!
//! An allow-list: a syscall runs only if [`ALLOW`] names it (with its argument
//! condition, if any). The reference is Docker's default profile (moby
//! `profiles/seccomp/default.json`) for the capabilities the jail keeps
//! ([`super::KEEP_CAPS`]: `SYS_PTRACE` and `SYS_CHROOT` bring `ptrace` and `chroot`,
//! there is no `SYS_ADMIN`, `SYS_TIME`, `SYS_NICE`, ...); the departures from it are
//! commented at each entry and listed in `docs/jail.md`. Three stacked filters,
//! applied last before `exec`, while the process still holds CAP_SYS_ADMIN in the
//! sandbox's user namespace (so `no_new_privs` is not needed to install them; see
//! `docs/jail.md` for why it is not set):
//! 1. an ABI guard: non-x86_64 syscalls kill the process, x32 syscalls (nr with bit 30
//!    set, which the per-number list would not see) fail with EPERM;
//! 2. the allow-list; everything else fails with EPERM (Docker's answer, and what
//!    programs already handle for an unprivileged caller);
//! 3. ENOSYS for `clone3` (its flags sit behind a pointer the filter cannot read;
//!    ENOSYS makes glibc fall back to `clone`, whose flags filter 2 checks), for the
//!    [`ENOSYS`] list, and for every number above [`HIGHEST_KNOWN`]: a syscall newer
//!    than this table was never reviewed, and ENOSYS ("this kernel lacks it") is the
//!    answer libc and runtimes fall back from, where EPERM would be taken as final.
//!    When two filters both answer with an errno, the kernel returns the errno of the
//!    one installed last, so this filter's ENOSYS wins over filter 2's EPERM.

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

/// When an allow-list entry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Only when none of `mask`'s bits is set in argument `arg` (clone/unshare flags).
    Clear {
        arg: u8,
        mask: u64,
    },
    /// Only when the arguments match one of these alternatives; each alternative is a
    /// list of `(argument, value)` pairs that must all hold, compared as 32-bit values
    /// (the C type of every argument checked this way is `int`).
    AnyOf(&'static [&'static [(u8, u32)]]),
}

/// One entry of a table: name (for docs, tests and the probe), number, condition.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub nr: i64,
    pub when: When,
}

const fn always(name: &'static str, nr: i64) -> Entry {
    Entry {
        name,
        nr,
        when: When::Always,
    }
}

/// x86_64 numbers of syscalls newer than the `libc` crate's table
/// (`arch/x86/entry/syscalls/syscall_64.tbl`).
pub mod nr {
    pub const IO_PGETEVENTS: i64 = 333;
    pub const URETPROBE: i64 = 335;
    pub const UPROBE: i64 = 336;
    pub const CACHESTAT: i64 = 451;
    pub const FCHMODAT2: i64 = 452;
    pub const MAP_SHADOW_STACK: i64 = 453;
    pub const FUTEX_WAKE: i64 = 454;
    pub const FUTEX_WAIT: i64 = 455;
    pub const FUTEX_REQUEUE: i64 = 456;
    pub const STATMOUNT: i64 = 457;
    pub const LISTMOUNT: i64 = 458;
    pub const LSM_GET_SELF_ATTR: i64 = 459;
    pub const LSM_SET_SELF_ATTR: i64 = 460;
    pub const LSM_LIST_MODULES: i64 = 461;
    pub const MSEAL: i64 = 462;
    pub const SETXATTRAT: i64 = 463;
    pub const GETXATTRAT: i64 = 464;
    pub const LISTXATTRAT: i64 = 465;
    pub const REMOVEXATTRAT: i64 = 466;
    pub const OPEN_TREE_ATTR: i64 = 467;
}

/// The highest syscall number this table was reviewed against (Linux 6.15,
/// `open_tree_attr`). Higher numbers get ENOSYS (filter 3).
pub const HIGHEST_KNOWN: i64 = nr::OPEN_TREE_ATTR;

/// Namespace flags of `clone(2)` (Docker's mask 0x7E020000): NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET. (`clone`'s low byte is the exit signal, so
/// CLONE_NEWTIME (0x80) cannot be passed to it.)
pub const CLONE_NS_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
/// `unshare(2)`'s namespace flags: the same plus CLONE_NEWTIME.
pub const UNSHARE_NS_FLAGS: u64 = CLONE_NS_FLAGS | 0x80;

const AF_UNIX: u32 = libc::AF_UNIX as u32;
const AF_INET: u32 = libc::AF_INET as u32;
const AF_INET6: u32 = libc::AF_INET6 as u32;
const AF_NETLINK: u32 = libc::AF_NETLINK as u32;

/// `socket(2)`: the families a sandbox needs, nothing else. Docker refuses only
/// AF_VSOCK; Kiln allows four families, because every other one (AF_PACKET needs the
/// dropped NET_RAW anyway; AF_ALG, AF_TIPC, AF_RDS, AF_SMC, AF_VSOCK, AF_XDP, ...) is
/// rarely used kernel code that socket(2) loads on demand, with a record of exploits.
/// AF_NETLINK stays: glibc's `getifaddrs` (node's `os.networkInterfaces()`, python's
/// `socket.if_nameindex`), `ip`, `ss` and sudo's audit records use it; only the
/// protocols they use: ROUTE, SOCK_DIAG, AUDIT, KOBJECT_UEVENT. Without NET_ADMIN
/// netlink can only read, but NETLINK_NETFILTER (nf_tables, the most exploited
/// netlink code) is refused outright in case a capability ever leaks.
const SOCKET_ARGS: &[&[(u8, u32)]] = &[
    &[(0, AF_UNIX)],
    &[(0, AF_INET)],
    &[(0, AF_INET6)],
    &[(0, AF_NETLINK), (2, libc::NETLINK_ROUTE as u32)],
    &[(0, AF_NETLINK), (2, libc::NETLINK_SOCK_DIAG as u32)],
    &[(0, AF_NETLINK), (2, libc::NETLINK_AUDIT as u32)],
    &[(0, AF_NETLINK), (2, libc::NETLINK_KOBJECT_UEVENT as u32)],
];

/// `personality(2)`: Docker's values (PER_LINUX, PER_LINUX32, UNAME26 and their
/// combination, 0xffffffff = query) plus ADDR_NO_RANDOMIZE, which gdb sets on the
/// programs it starts (the kernel clears it across a setuid exec). The others
/// (READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, foreign ABIs) only serve old exploits.
const PERSONALITY_ARGS: &[&[(u8, u32)]] = &[
    &[(0, 0)],
    &[(0, 0x0008)],
    &[(0, 0x2_0000)],
    &[(0, 0x2_0008)],
    &[(0, 0x4_0000)],
    &[(0, 0xffff_ffff)],
];

/// Syscalls a sandbox may make: Docker's default allow-list for x86_64 and the kept
/// capabilities, without `io_uring_*` (a large, separately exploitable kernel
/// surface; programs fall back to epoll), `adjtimex`/`clock_adjtime` (the clock is
/// the host's; the read-only modes are not needed), `modify_ldt` (16-bit segments for
/// Wine and DOS emulators; a history of kernel bugs), plus the syscalls added since
/// that serve only the caller's own files and memory (`fchmodat2`, `cachestat`,
/// `map_shadow_stack`, `futex_*`, `mseal`, `*xattrat`, `uprobe`/`uretprobe`).
pub const ALLOW: &[Entry] = &[
    // Files and directories.
    always("read", libc::SYS_read),
    always("write", libc::SYS_write),
    always("open", libc::SYS_open),
    always("openat", libc::SYS_openat),
    always("openat2", libc::SYS_openat2),
    always("creat", libc::SYS_creat),
    always("close", libc::SYS_close),
    always("close_range", libc::SYS_close_range),
    always("stat", libc::SYS_stat),
    always("fstat", libc::SYS_fstat),
    always("lstat", libc::SYS_lstat),
    always("newfstatat", libc::SYS_newfstatat),
    always("statx", libc::SYS_statx),
    always("statfs", libc::SYS_statfs),
    always("fstatfs", libc::SYS_fstatfs),
    always("lseek", libc::SYS_lseek),
    always("pread64", libc::SYS_pread64),
    always("pwrite64", libc::SYS_pwrite64),
    always("readv", libc::SYS_readv),
    always("writev", libc::SYS_writev),
    always("preadv", libc::SYS_preadv),
    always("pwritev", libc::SYS_pwritev),
    always("preadv2", libc::SYS_preadv2),
    always("pwritev2", libc::SYS_pwritev2),
    always("access", libc::SYS_access),
    always("faccessat", libc::SYS_faccessat),
    always("faccessat2", libc::SYS_faccessat2),
    always("dup", libc::SYS_dup),
    always("dup2", libc::SYS_dup2),
    always("dup3", libc::SYS_dup3),
    always("fcntl", libc::SYS_fcntl),
    always("flock", libc::SYS_flock),
    always("fsync", libc::SYS_fsync),
    always("fdatasync", libc::SYS_fdatasync),
    always("sync", libc::SYS_sync),
    always("syncfs", libc::SYS_syncfs),
    always("sync_file_range", libc::SYS_sync_file_range),
    always("truncate", libc::SYS_truncate),
    always("ftruncate", libc::SYS_ftruncate),
    always("fallocate", libc::SYS_fallocate),
    always("fadvise64", libc::SYS_fadvise64),
    always("readahead", libc::SYS_readahead),
    always("getdents", libc::SYS_getdents),
    always("getdents64", libc::SYS_getdents64),
    always("getcwd", libc::SYS_getcwd),
    always("chdir", libc::SYS_chdir),
    always("fchdir", libc::SYS_fchdir),
    always("rename", libc::SYS_rename),
    always("renameat", libc::SYS_renameat),
    always("renameat2", libc::SYS_renameat2),
    always("mkdir", libc::SYS_mkdir),
    always("mkdirat", libc::SYS_mkdirat),
    always("rmdir", libc::SYS_rmdir),
    always("link", libc::SYS_link),
    always("linkat", libc::SYS_linkat),
    always("unlink", libc::SYS_unlink),
    always("unlinkat", libc::SYS_unlinkat),
    always("symlink", libc::SYS_symlink),
    always("symlinkat", libc::SYS_symlinkat),
    always("readlink", libc::SYS_readlink),
    always("readlinkat", libc::SYS_readlinkat),
    always("chmod", libc::SYS_chmod),
    always("fchmod", libc::SYS_fchmod),
    always("fchmodat", libc::SYS_fchmodat),
    always("fchmodat2", nr::FCHMODAT2),
    always("chown", libc::SYS_chown),
    always("fchown", libc::SYS_fchown),
    always("lchown", libc::SYS_lchown),
    always("fchownat", libc::SYS_fchownat),
    always("umask", libc::SYS_umask),
    always("mknod", libc::SYS_mknod),
    always("mknodat", libc::SYS_mknodat),
    always("utime", libc::SYS_utime),
    always("utimes", libc::SYS_utimes),
    always("futimesat", libc::SYS_futimesat),
    always("utimensat", libc::SYS_utimensat),
    always("setxattr", libc::SYS_setxattr),
    always("lsetxattr", libc::SYS_lsetxattr),
    always("fsetxattr", libc::SYS_fsetxattr),
    always("getxattr", libc::SYS_getxattr),
    always("lgetxattr", libc::SYS_lgetxattr),
    always("fgetxattr", libc::SYS_fgetxattr),
    always("listxattr", libc::SYS_listxattr),
    always("llistxattr", libc::SYS_llistxattr),
    always("flistxattr", libc::SYS_flistxattr),
    always("removexattr", libc::SYS_removexattr),
    always("lremovexattr", libc::SYS_lremovexattr),
    always("fremovexattr", libc::SYS_fremovexattr),
    always("setxattrat", nr::SETXATTRAT),
    always("getxattrat", nr::GETXATTRAT),
    always("listxattrat", nr::LISTXATTRAT),
    always("removexattrat", nr::REMOVEXATTRAT),
    always("name_to_handle_at", libc::SYS_name_to_handle_at),
    always("copy_file_range", libc::SYS_copy_file_range),
    always("sendfile", libc::SYS_sendfile),
    always("splice", libc::SYS_splice),
    always("tee", libc::SYS_tee),
    always("vmsplice", libc::SYS_vmsplice),
    always("cachestat", nr::CACHESTAT),
    // ioctl: terminals (PTYs), FIONREAD, ...; devices are the few bound into /dev.
    always("ioctl", libc::SYS_ioctl),
    always("chroot", libc::SYS_chroot), // CAP_SYS_CHROOT is kept
    // Change notification (inotify for watchers; fanotify_mark is useless without
    // fanotify_init, which needs CAP_SYS_ADMIN, and is in Docker's list).
    always("inotify_init", libc::SYS_inotify_init),
    always("inotify_init1", libc::SYS_inotify_init1),
    always("inotify_add_watch", libc::SYS_inotify_add_watch),
    always("inotify_rm_watch", libc::SYS_inotify_rm_watch),
    always("fanotify_mark", libc::SYS_fanotify_mark),
    // Polling, events, timers.
    always("poll", libc::SYS_poll),
    always("ppoll", libc::SYS_ppoll),
    always("select", libc::SYS_select),
    always("pselect6", libc::SYS_pselect6),
    always("epoll_create", libc::SYS_epoll_create),
    always("epoll_create1", libc::SYS_epoll_create1),
    always("epoll_ctl", libc::SYS_epoll_ctl),
    always("epoll_ctl_old", libc::SYS_epoll_ctl_old),
    always("epoll_wait", libc::SYS_epoll_wait),
    always("epoll_wait_old", libc::SYS_epoll_wait_old),
    always("epoll_pwait", libc::SYS_epoll_pwait),
    always("epoll_pwait2", libc::SYS_epoll_pwait2),
    always("eventfd", libc::SYS_eventfd),
    always("eventfd2", libc::SYS_eventfd2),
    always("signalfd", libc::SYS_signalfd),
    always("signalfd4", libc::SYS_signalfd4),
    always("timerfd_create", libc::SYS_timerfd_create),
    always("timerfd_settime", libc::SYS_timerfd_settime),
    always("timerfd_gettime", libc::SYS_timerfd_gettime),
    always("timer_create", libc::SYS_timer_create),
    always("timer_settime", libc::SYS_timer_settime),
    always("timer_gettime", libc::SYS_timer_gettime),
    always("timer_getoverrun", libc::SYS_timer_getoverrun),
    always("timer_delete", libc::SYS_timer_delete),
    always("alarm", libc::SYS_alarm),
    always("getitimer", libc::SYS_getitimer),
    always("setitimer", libc::SYS_setitimer),
    always("nanosleep", libc::SYS_nanosleep),
    always("clock_nanosleep", libc::SYS_clock_nanosleep),
    always("clock_gettime", libc::SYS_clock_gettime),
    always("clock_getres", libc::SYS_clock_getres),
    always("gettimeofday", libc::SYS_gettimeofday),
    always("time", libc::SYS_time),
    always("times", libc::SYS_times),
    always("pause", libc::SYS_pause),
    // Asynchronous I/O (the old AIO interface; io_uring stays out).
    always("io_setup", libc::SYS_io_setup),
    always("io_destroy", libc::SYS_io_destroy),
    always("io_submit", libc::SYS_io_submit),
    always("io_cancel", libc::SYS_io_cancel),
    always("io_getevents", libc::SYS_io_getevents),
    always("io_pgetevents", nr::IO_PGETEVENTS),
    always("ioprio_get", libc::SYS_ioprio_get),
    always("ioprio_set", libc::SYS_ioprio_set),
    // Memory.
    always("brk", libc::SYS_brk),
    always("mmap", libc::SYS_mmap),
    always("munmap", libc::SYS_munmap),
    always("mprotect", libc::SYS_mprotect),
    always("mremap", libc::SYS_mremap),
    always("msync", libc::SYS_msync),
    always("madvise", libc::SYS_madvise),
    always("mincore", libc::SYS_mincore),
    always("mlock", libc::SYS_mlock),
    always("mlock2", libc::SYS_mlock2),
    always("mlockall", libc::SYS_mlockall),
    always("munlock", libc::SYS_munlock),
    always("munlockall", libc::SYS_munlockall),
    always("remap_file_pages", libc::SYS_remap_file_pages),
    always("memfd_create", libc::SYS_memfd_create),
    always("memfd_secret", libc::SYS_memfd_secret),
    always("membarrier", libc::SYS_membarrier),
    always("pkey_alloc", libc::SYS_pkey_alloc),
    always("pkey_free", libc::SYS_pkey_free),
    always("pkey_mprotect", libc::SYS_pkey_mprotect),
    always("map_shadow_stack", nr::MAP_SHADOW_STACK),
    always("mseal", nr::MSEAL),
    // Processes and threads.
    Entry {
        name: "clone",
        nr: libc::SYS_clone,
        when: When::Clear {
            arg: 0,
            mask: CLONE_NS_FLAGS,
        },
    },
    Entry {
        name: "unshare",
        nr: libc::SYS_unshare,
        when: When::Clear {
            arg: 0,
            mask: UNSHARE_NS_FLAGS,
        },
    },
    always("fork", libc::SYS_fork),
    always("vfork", libc::SYS_vfork),
    always("execve", libc::SYS_execve),
    always("execveat", libc::SYS_execveat),
    always("exit", libc::SYS_exit),
    always("exit_group", libc::SYS_exit_group),
    always("wait4", libc::SYS_wait4),
    always("waitid", libc::SYS_waitid),
    always("kill", libc::SYS_kill),
    always("tkill", libc::SYS_tkill),
    always("tgkill", libc::SYS_tgkill),
    always("pidfd_open", libc::SYS_pidfd_open),
    always("pidfd_send_signal", libc::SYS_pidfd_send_signal),
    always("rt_sigaction", libc::SYS_rt_sigaction),
    always("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    always("rt_sigreturn", libc::SYS_rt_sigreturn),
    always("rt_sigpending", libc::SYS_rt_sigpending),
    always("rt_sigsuspend", libc::SYS_rt_sigsuspend),
    always("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    always("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo),
    always("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo),
    always("sigaltstack", libc::SYS_sigaltstack),
    always("restart_syscall", libc::SYS_restart_syscall),
    always("futex", libc::SYS_futex),
    always("futex_waitv", libc::SYS_futex_waitv),
    always("futex_wake", nr::FUTEX_WAKE),
    always("futex_wait", nr::FUTEX_WAIT),
    always("futex_requeue", nr::FUTEX_REQUEUE),
    always("set_robust_list", libc::SYS_set_robust_list),
    always("get_robust_list", libc::SYS_get_robust_list),
    always("set_tid_address", libc::SYS_set_tid_address),
    always("rseq", libc::SYS_rseq),
    always("arch_prctl", libc::SYS_arch_prctl),
    always("set_thread_area", libc::SYS_set_thread_area),
    always("get_thread_area", libc::SYS_get_thread_area),
    always("prctl", libc::SYS_prctl),
    // Programs that sandbox themselves (Chrome, systemd units, landlock users).
    always("seccomp", libc::SYS_seccomp),
    always("landlock_create_ruleset", libc::SYS_landlock_create_ruleset),
    always("landlock_add_rule", libc::SYS_landlock_add_rule),
    always("landlock_restrict_self", libc::SYS_landlock_restrict_self),
    Entry {
        name: "personality",
        nr: libc::SYS_personality,
        when: When::AnyOf(PERSONALITY_ARGS),
    },
    always("process_mrelease", libc::SYS_process_mrelease),
    // CAP_SYS_PTRACE is kept: debuggers, of the sandbox's own processes only (user
    // and pid namespace).
    always("ptrace", libc::SYS_ptrace),
    always("process_vm_readv", libc::SYS_process_vm_readv),
    always("process_vm_writev", libc::SYS_process_vm_writev),
    always("kcmp", libc::SYS_kcmp),
    always("pidfd_getfd", libc::SYS_pidfd_getfd),
    always("process_madvise", libc::SYS_process_madvise),
    // Kernel-made calls from the uprobe trampolines (a host tracer's probes).
    always("uretprobe", nr::URETPROBE),
    always("uprobe", nr::UPROBE),
    // Identity and limits (capabilities decide what may change).
    always("getpid", libc::SYS_getpid),
    always("getppid", libc::SYS_getppid),
    always("gettid", libc::SYS_gettid),
    always("getuid", libc::SYS_getuid),
    always("geteuid", libc::SYS_geteuid),
    always("getgid", libc::SYS_getgid),
    always("getegid", libc::SYS_getegid),
    always("getresuid", libc::SYS_getresuid),
    always("getresgid", libc::SYS_getresgid),
    always("getgroups", libc::SYS_getgroups),
    always("setuid", libc::SYS_setuid),
    always("setgid", libc::SYS_setgid),
    always("setreuid", libc::SYS_setreuid),
    always("setregid", libc::SYS_setregid),
    always("setresuid", libc::SYS_setresuid),
    always("setresgid", libc::SYS_setresgid),
    always("setfsuid", libc::SYS_setfsuid),
    always("setfsgid", libc::SYS_setfsgid),
    always("setgroups", libc::SYS_setgroups),
    always("capget", libc::SYS_capget),
    always("capset", libc::SYS_capset),
    always("getpgid", libc::SYS_getpgid),
    always("setpgid", libc::SYS_setpgid),
    always("getpgrp", libc::SYS_getpgrp),
    always("getsid", libc::SYS_getsid),
    always("setsid", libc::SYS_setsid),
    always("getrlimit", libc::SYS_getrlimit),
    always("setrlimit", libc::SYS_setrlimit),
    always("prlimit64", libc::SYS_prlimit64),
    always("getrusage", libc::SYS_getrusage),
    always("getpriority", libc::SYS_getpriority),
    always("setpriority", libc::SYS_setpriority),
    always("sched_yield", libc::SYS_sched_yield),
    always("sched_getaffinity", libc::SYS_sched_getaffinity),
    always("sched_setaffinity", libc::SYS_sched_setaffinity),
    always("sched_getattr", libc::SYS_sched_getattr),
    always("sched_setattr", libc::SYS_sched_setattr),
    always("sched_getparam", libc::SYS_sched_getparam),
    always("sched_setparam", libc::SYS_sched_setparam),
    always("sched_getscheduler", libc::SYS_sched_getscheduler),
    always("sched_setscheduler", libc::SYS_sched_setscheduler),
    always("sched_get_priority_max", libc::SYS_sched_get_priority_max),
    always("sched_get_priority_min", libc::SYS_sched_get_priority_min),
    always("sched_rr_get_interval", libc::SYS_sched_rr_get_interval),
    always("getcpu", libc::SYS_getcpu),
    always("getrandom", libc::SYS_getrandom),
    always("uname", libc::SYS_uname),
    always("sysinfo", libc::SYS_sysinfo),
    // System V and POSIX IPC (the sandbox has its own IPC namespace).
    always("shmget", libc::SYS_shmget),
    always("shmat", libc::SYS_shmat),
    always("shmctl", libc::SYS_shmctl),
    always("shmdt", libc::SYS_shmdt),
    always("semget", libc::SYS_semget),
    always("semop", libc::SYS_semop),
    always("semtimedop", libc::SYS_semtimedop),
    always("semctl", libc::SYS_semctl),
    always("msgget", libc::SYS_msgget),
    always("msgsnd", libc::SYS_msgsnd),
    always("msgrcv", libc::SYS_msgrcv),
    always("msgctl", libc::SYS_msgctl),
    always("mq_open", libc::SYS_mq_open),
    always("mq_unlink", libc::SYS_mq_unlink),
    always("mq_timedsend", libc::SYS_mq_timedsend),
    always("mq_timedreceive", libc::SYS_mq_timedreceive),
    always("mq_notify", libc::SYS_mq_notify),
    always("mq_getsetattr", libc::SYS_mq_getsetattr),
    always("pipe", libc::SYS_pipe),
    always("pipe2", libc::SYS_pipe2),
    // Sockets.
    Entry {
        name: "socket",
        nr: libc::SYS_socket,
        when: When::AnyOf(SOCKET_ARGS),
    },
    always("socketpair", libc::SYS_socketpair),
    always("bind", libc::SYS_bind),
    always("listen", libc::SYS_listen),
    always("accept", libc::SYS_accept),
    always("accept4", libc::SYS_accept4),
    always("connect", libc::SYS_connect),
    always("shutdown", libc::SYS_shutdown),
    always("getsockname", libc::SYS_getsockname),
    always("getpeername", libc::SYS_getpeername),
    always("getsockopt", libc::SYS_getsockopt),
    always("setsockopt", libc::SYS_setsockopt),
    always("sendto", libc::SYS_sendto),
    always("recvfrom", libc::SYS_recvfrom),
    always("sendmsg", libc::SYS_sendmsg),
    always("recvmsg", libc::SYS_recvmsg),
    always("sendmmsg", libc::SYS_sendmmsg),
    always("recvmmsg", libc::SYS_recvmmsg),
];

/// Syscalls that are refused (EPERM) and worth naming: what the tests and the probe
/// check, and what a reader of the allow-list may look for. Not consulted by the
/// filter: anything absent from [`ALLOW`] is refused.
pub const NAMED_DENIALS: &[Entry] = &[
    // Mount table and namespaces: the jail has finished them before exec.
    always("mount", libc::SYS_mount),
    always("umount2", libc::SYS_umount2),
    always("pivot_root", libc::SYS_pivot_root),
    always("move_mount", libc::SYS_move_mount),
    always("open_tree", libc::SYS_open_tree),
    always("open_tree_attr", nr::OPEN_TREE_ATTR),
    always("fsopen", libc::SYS_fsopen),
    always("fsconfig", libc::SYS_fsconfig),
    always("fsmount", libc::SYS_fsmount),
    always("fspick", libc::SYS_fspick),
    always("mount_setattr", libc::SYS_mount_setattr),
    always("setns", libc::SYS_setns),
    always("sethostname", libc::SYS_sethostname),
    always("setdomainname", libc::SYS_setdomainname),
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
    always("modify_ldt", libc::SYS_modify_ldt),
    always("lookup_dcookie", libc::SYS_lookup_dcookie),
    always("uselib", libc::SYS_uselib),
    always("fanotify_init", libc::SYS_fanotify_init),
    always("vhangup", libc::SYS_vhangup),
    always("io_uring_setup", libc::SYS_io_uring_setup),
    always("io_uring_enter", libc::SYS_io_uring_enter),
    always("io_uring_register", libc::SYS_io_uring_register),
    // NUMA placement (Docker: CAP_SYS_NICE only).
    always("mbind", libc::SYS_mbind),
    always("get_mempolicy", libc::SYS_get_mempolicy),
    always("set_mempolicy", libc::SYS_set_mempolicy),
    always("migrate_pages", libc::SYS_migrate_pages),
    always("move_pages", libc::SYS_move_pages),
    // The clock is the host's.
    always("settimeofday", libc::SYS_settimeofday),
    always("clock_settime", libc::SYS_clock_settime),
    always("clock_adjtime", libc::SYS_clock_adjtime),
    always("adjtimex", libc::SYS_adjtimex),
];

/// Syscalls that fail with ENOSYS, so that callers take their older path: `clone3`
/// (→ `clone`, whose flags the filter can read), and newer interfaces to what the
/// sandbox reads from `/proc` anyway (`statmount`/`listmount` → mountinfo, `lsm_*` →
/// `/proc/self/attr`), kept out as new, unreviewed kernel code.
pub const ENOSYS: &[Entry] = &[
    always("clone3", libc::SYS_clone3),
    always("statmount", nr::STATMOUNT),
    always("listmount", nr::LISTMOUNT),
    always("lsm_get_self_attr", nr::LSM_GET_SELF_ATTR),
    always("lsm_set_self_attr", nr::LSM_SET_SELF_ATTR),
    always("lsm_list_modules", nr::LSM_LIST_MODULES),
];

fn arch() -> TargetArch {
    TargetArch::x86_64
}

fn rules_of(e: &Entry) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let cond = |arg: u8, len, op, value| SeccompCondition::new(arg, len, op, value);
    match e.when {
        When::Always => Ok(Vec::new()),
        When::Clear { arg, mask } => Ok(vec![SeccompRule::new(vec![cond(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?]),
        When::AnyOf(alternatives) => alternatives
            .iter()
            .map(|all| {
                let conds = all
                    .iter()
                    .map(|&(arg, v)| {
                        cond(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(v))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                SeccompRule::new(conds)
            })
            .collect(),
    }
}

/// Filter 2: the allow-list, EPERM for everything else.
pub fn allow_list() -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Compile {
        what: "allow-list",
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for e in ALLOW {
        rules.insert(e.nr, rules_of(e).map_err(err)?);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch(),
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
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

/// Filter 3: ENOSYS for the [`ENOSYS`] list and for numbers above [`HIGHEST_KNOWN`],
/// allow the rest (filter 2 decides). Runs after the ABI guard, so the number is an
/// x86_64 one.
pub fn enosys_filter() -> BpfProgram {
    let enosys = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let n = ENOSYS.len();
    // Layout: load, x32 check, n comparisons, range check, allow, ENOSYS.
    let mut p = vec![
        ins(BPF_LD_W_ABS, 0, 0, OFF_NR),
        // x32 numbers are the ABI guard's (EPERM); an errno here would replace its.
        ins(BPF_JMP_JGE_K, (n + 1) as u8, 0, X32_SYSCALL_BIT),
    ];
    for (i, e) in ENOSYS.iter().enumerate() {
        let to_enosys = (n - i) as u8 + 1;
        p.push(ins(BPF_JMP_JEQ_K, to_enosys, 0, e.nr as u32));
    }
    p.push(ins(BPF_JMP_JGT_K, 1, 0, HIGHEST_KNOWN as u32));
    p.push(ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
    p.push(ins(BPF_RET_K, 0, 0, enosys));
    p
}

/// The compiled policy, in installation order.
pub fn compile() -> Result<Vec<BpfProgram>, SeccompError> {
    Ok(vec![abi_guard(), allow_list()?, enosys_filter()])
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
mod tests;
