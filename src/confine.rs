//! The daemon's confinement of itself, so that a guest who finds a bug in
//! a parser gets a process that can do little more than the daemon already
//! does: no capabilities, a filesystem view of a few paths (landlock), and
//! a system-call allow-list (seccomp). Owns the allow-list and the order in
//! which these are applied; the daemon decides when (see `daemon::run`).
//!
//! Capabilities and landlock hold per thread and are inherited by threads
//! created later, so both are applied on the main thread before any other
//! thread exists. The seccomp filter is installed last, on every thread at
//! once (TSYNC), when start-up has done the things the list leaves out
//! (binding, reading certificates, installing signal handlers).
//!
//! One list serves every thread: the engine's threads open the host sockets
//! of UDP and echo sessions and the tokio threads dial, so per-role lists
//! would differ only in a few calls that are argument-checked anyway.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// What a system call outside the allow-list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// The daemon logs the call's number and exits (status 159, as if
    /// killed by SIGSYS); systemd's `Restart=` brings it back.
    Enforce,
    /// The kernel logs the call (audit, `SECCOMP_RET_LOG`) and lets it run:
    /// for finding what a different libc needs.
    Log,
    /// No filter.
    Off,
}

/// Why confinement could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter could not be built or installed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
    /// Capabilities could not be dropped.
    #[error("cannot drop capabilities")]
    Capabilities(#[source] io::Error),
    /// The landlock ruleset could not be built or applied.
    #[error("cannot apply the landlock ruleset: {0}")]
    Landlock(String),
}

/// Exit status when the filter stops the daemon: 128 + SIGSYS, what a shell
/// or systemd reports for a process killed by that signal.
pub const DENIED_EXIT: i32 = 128 + libc::SIGSYS;

/// Drops every capability: effective, permitted and inheritable, the
/// ambient set, and (when we may) the bounding set. Threads created after
/// this have none either. Root without capabilities keeps only what file
/// ownership gives it.
pub fn drop_capabilities() -> Result<(), Error> {
    // The bounding set matters only across execve, which the filter forbids;
    // dropping it needs CAP_SETPCAP, which an unprivileged start lacks.
    let last = last_capability();
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    // SAFETY: prctl with integer arguments only. EINVAL on kernels without
    // ambient capabilities (< 4.3), where there is nothing to clear.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data words, both
    // live on this stack for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(Error::Capabilities(io::Error::last_os_error()));
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// The paths the daemon still touches once started, and how.
#[derive(Debug, Default)]
pub struct Paths {
    /// Files read at run time (e.g. /etc/resolv.conf for each new guest).
    pub read: Vec<PathBuf>,
    /// Directories whose files the daemon removes (its socket's).
    pub remove_in: Vec<PathBuf>,
    /// Directories where the daemon makes and removes sockets (its
    /// per-connection handler sockets).
    pub sockets_in: Vec<PathBuf>,
    /// Directories whose empty subdirectories the daemon removes (its
    /// handler directory's parent, at exit).
    pub remove_dirs_in: Vec<PathBuf>,
    /// Directories where the daemon creates, overwrites and writes files
    /// (packet captures).
    pub write_in: Vec<PathBuf>,
}

/// How far landlock could confine the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landlocked {
    /// Every requested right is enforced.
    Fully,
    /// The kernel's landlock is older: some rights are not enforced.
    Partly,
    /// The kernel has no landlock (or it is disabled).
    Not,
}

/// Restricts the filesystem to `paths`: nothing else can be opened,
/// created, removed or executed. Reading metadata (stat) is not governed by
/// landlock. Applies to this thread and the threads it creates; call it
/// before any other thread exists.
pub fn landlock(paths: &Paths) -> Result<Landlocked, Error> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };
    let abi = ABI::V5;
    let fail = |e: landlock::RulesetError| Error::Landlock(e.to_string());
    let read = AccessFs::ReadFile;
    let remove = AccessFs::RemoveFile;
    let sockets = AccessFs::MakeSock | AccessFs::RemoveFile;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(existing(&paths.read), read))
        .map_err(fail)?
        .add_rules(path_beneath_rules(existing(&paths.remove_in), remove))
        .map_err(fail)?
        .add_rules(path_beneath_rules(existing(&paths.sockets_in), sockets))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            existing(&paths.remove_dirs_in),
            AccessFs::RemoveDir,
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            existing(&paths.write_in),
            (AccessFs::MakeReg | AccessFs::WriteFile | AccessFs::Truncate)
                & AccessFs::from_all(abi),
        ))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlocked::Fully,
        RulesetStatus::PartiallyEnforced => Landlocked::Partly,
        RulesetStatus::NotEnforced => Landlocked::Not,
    })
}

/// The paths that exist now (a rule needs an open file); the others cannot
/// be used later either, which is what a missing optional file means.
fn existing(paths: &[PathBuf]) -> Vec<&Path> {
    paths
        .iter()
        .map(PathBuf::as_path)
        .filter(|p| p.exists())
        .collect()
}

/// Installs the filter on every thread of the process. `Off` installs
/// nothing.
pub fn seccomp(mode: Seccomp) -> Result<(), Error> {
    let mismatch = match mode {
        Seccomp::Off => return Ok(()),
        Seccomp::Log => SeccompAction::Log,
        Seccomp::Enforce => {
            install_sigsys_handler()?;
            SeccompAction::Trap
        }
    };
    let fail = |e: seccompiler::Error| Error::Seccomp(e.to_string());
    // clone3 passes its flags in memory, where a filter cannot look: it is
    // answered ENOSYS, and glibc falls back to clone, whose flags are
    // checked. Installed first; the kernel takes the strictest answer of
    // the two filters, so clone3's ENOSYS wins over the list's allow.
    let no_clone3 = program(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let rules = allow_list().map_err(|e| Error::Seccomp(e.to_string()))?;
    let list = program(rules, mismatch, SeccompAction::Allow)?;
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(fail)?;
    seccompiler::apply_filter_all_threads(&list).map_err(fail)?;
    Ok(())
}

fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    let fail = |e: seccompiler::BackendError| Error::Seccomp(e.to_string());
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(fail)?
        .try_into()
        .map_err(fail)
}

/// `arg` (32 bits) equals `value`.
fn eq(arg: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// `arg` (64 bits) has none of `bits`.
fn without(arg: u8, bits: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(bits),
        0,
    )
}

/// `arg` (64 bits) has all of `bits`.
fn with(arg: u8, bits: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(bits),
        bits,
    )
}

/// One rule per value: `arg` is one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|v| SeccompRule::new(vec![eq(arg, *v)?]))
        .collect()
}

/// The system calls the daemon makes once started, with the arguments
/// that could widen what it can do checked. Everything else is refused.
///
/// Not on the list, among others: execve (the daemon runs nothing), fork
/// (clone without CLONE_THREAD), ptrace, mount, kill of other processes,
/// setuid and capability calls, bpf, io_uring, userfaultfd, keyctl, and
/// executable memory (mmap/mprotect with PROT_EXEC).
pub fn allow_list() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Unconditional: they act on the process's own memory, descriptors,
    // threads and time, or on sockets it already holds.
    let plain = [
        // memory
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // threads and signals of our own
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_set_tid_address,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_getrandom,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        // time
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        // descriptors
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        // files: landlock decides which paths
        libc::SYS_openat,
        libc::SYS_unlinkat,
        libc::SYS_mkdirat,
        libc::SYS_getdents64,
        // sockets already held, and new ones (socket() is checked below)
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        libc::SYS_clone3,
    ];
    for nr in plain {
        rules.insert(nr, vec![]);
    }
    #[cfg(target_arch = "x86_64")]
    for nr in [
        libc::SYS_poll,
        libc::SYS_epoll_wait,
        libc::SYS_accept,
        libc::SYS_dup2,
        libc::SYS_unlink,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_getrlimit,
    ] {
        rules.insert(nr, vec![]);
    }
    let exec = libc::PROT_EXEC as u64;
    // No executable memory: what a hostile guest's exploit would need.
    rules.insert(
        libc::SYS_mmap,
        vec![SeccompRule::new(vec![without(2, exec)?])?],
    );
    rules.insert(
        libc::SYS_mprotect,
        vec![SeccompRule::new(vec![without(2, exec)?])?],
    );
    // Threads only: a clone without CLONE_THREAD would be a fork.
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![with(0, libc::CLONE_THREAD as u64)?])?],
    );
    // Host sockets: IP, unix (VMM, handler pairs, sd_notify) and
    // rtnetlink (the host's addresses). No packet or raw netlink families.
    let mut socket = one_of(
        0,
        &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].map(|f| f as u64),
    )?;
    socket.push(SeccompRule::new(vec![
        eq(0, libc::AF_NETLINK as u64)?,
        eq(2, libc::NETLINK_ROUTE as u64)?,
    ])?);
    rules.insert(libc::SYS_socket, socket);
    rules.insert(libc::SYS_socketpair, one_of(0, &[libc::AF_UNIX as u64])?);
    // Non-blocking and close-on-exec switches, queue sizes, and the
    // terminal probe of the log writer; no device control.
    rules.insert(
        libc::SYS_ioctl,
        one_of(
            1,
            &[
                libc::FIONBIO,
                libc::FIOCLEX,
                libc::FIONCLEX,
                libc::FIONREAD,
                libc::TIOCOUTQ,
                libc::TCGETS,
            ],
        )?,
    );
    // Thread names only.
    rules.insert(
        libc::SYS_prctl,
        one_of(0, &[libc::PR_SET_NAME, libc::PR_GET_NAME].map(|o| o as u64))?,
    );
    // Reading limits (the stack size of a new thread), never setting them.
    rules.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![
            eq(0, 0)?,
            SeccompCondition::new(2, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?,
        ])?],
    );
    // Signals to our own process only (abort raises SIGABRT this way).
    let pid = u64::from(std::process::id());
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![eq(0, pid)?])?]);
    Ok(rules)
}

/// Reports the denied call on stderr and exits: the kernel's SIGSYS alone
/// would leave the operator only "status=31/SYS".
fn install_sigsys_handler() -> Result<(), Error> {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // linux/signal.h: for SIGSYS, the union after si_signo, si_errno,
        // si_code (and padding to 16 bytes) holds the call's address
        // followed by its number.
        const NR_OFFSET: usize = 16 + std::mem::size_of::<*const libc::c_void>();
        // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO
        // handler; a SIGSYS one carries the number at NR_OFFSET.
        let nr = unsafe {
            info.cast::<u8>()
                .add(NR_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        };
        const HEAD: &[u8] = b"vhost-gateway: system call ";
        const TAIL: &[u8] = b" denied by the seccomp filter; exiting\n";
        let mut line = [0u8; 96];
        line[..HEAD.len()].copy_from_slice(HEAD);
        let mut len = HEAD.len();
        let mut digits = [0u8; 10];
        let mut count = 0;
        let mut n = nr.unsigned_abs();
        loop {
            digits[count] = b'0' + u8::try_from(n % 10).unwrap_or(0);
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for digit in digits[..count].iter().rev() {
            line[len] = *digit;
            len += 1;
        }
        line[len..len + TAIL.len()].copy_from_slice(TAIL);
        len += TAIL.len();
        // SAFETY: write(2) and _exit(2) are async-signal-safe and on the
        // allow-list; the buffer lives on this stack.
        unsafe {
            libc::write(2, line.as_ptr().cast(), len);
            libc::_exit(DENIED_EXIT);
        }
    }
    // SAFETY: a zeroed sigaction is a valid starting value; the handler is
    // async-signal-safe (write and _exit only).
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::Seccomp(format!(
            "cannot install the SIGSYS handler: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child and returns how it ended.
    fn in_child(body: impl FnOnce() -> i32) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        // SAFETY: the child only runs `body` and _exits; the test harness's
        // other threads are not touched in it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = body();
            // SAFETY: leaving the forked child without running the
            // parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        std::process::ExitStatus::from_raw(status)
    }

    #[test]
    fn the_list_compiles_for_this_machine() {
        let rules = allow_list().unwrap();
        assert!(rules.len() > 60);
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_unshare,
        ] {
            assert!(!rules.contains_key(&forbidden), "{forbidden}");
        }
        program(rules, SeccompAction::Trap, SeccompAction::Allow).unwrap();
    }

    #[test]
    fn a_forbidden_call_ends_the_process_and_says_which() {
        let status = in_child(|| {
            if seccomp(Seccomp::Enforce).is_err() {
                return 2;
            }
            // SAFETY: ptrace(PTRACE_TRACEME) with integer arguments.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            0
        });
        assert_eq!(status.code(), Some(DENIED_EXIT), "{status:?}");
    }

    #[test]
    fn executable_memory_forks_and_foreign_sockets_are_refused() {
        // Each would pass without the filter; each must end the child.
        let attempts: [fn() -> i64; 4] = [
            || {
                // SAFETY: an anonymous mapping, never used.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    ) as i64
                }
            },
            // SAFETY: a packet socket; closed with the child.
            || unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) }.into(),
            // SAFETY: clone without CLONE_THREAD (a fork) via the raw call.
            || unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) },
            // SAFETY: setting a limit, with a valid pointer.
            || unsafe {
                let limit = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit).into()
            },
        ];
        for (i, attempt) in attempts.into_iter().enumerate() {
            let status = in_child(|| {
                if seccomp(Seccomp::Enforce).is_err() {
                    return 2;
                }
                attempt();
                0
            });
            assert_eq!(status.code(), Some(DENIED_EXIT), "attempt {i}: {status:?}");
        }
        // And what the daemon does stays allowed.
        let status = in_child(|| {
            if seccomp(Seccomp::Enforce).is_err() {
                return 2;
            }
            let ok = std::net::UdpSocket::bind("127.0.0.1:0").is_ok()
                && std::thread::spawn(|| 7).join().is_ok_and(|v| v == 7)
                && vec![0u8; 1 << 20].len() == 1 << 20;
            if ok { 0 } else { 3 }
        });
        assert_eq!(status.code(), Some(0), "{status:?}");
    }

    #[test]
    fn landlock_leaves_only_the_given_paths() {
        let dir = std::env::temp_dir().join(format!("vg-landlock-{}", std::process::id()));
        let sockets = dir.join("sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        let allowed = dir.join("allowed");
        let other = dir.join("other");
        std::fs::write(&allowed, "yes").unwrap();
        std::fs::write(&other, "no").unwrap();
        let paths = Paths {
            read: vec![allowed.clone()],
            sockets_in: vec![sockets.clone()],
            ..Paths::default()
        };
        let status = in_child(|| {
            match landlock(&paths) {
                Ok(Landlocked::Fully) => {}
                // No landlock in this kernel: nothing to prove here.
                Ok(_) => return 9,
                Err(_) => return 2,
            }
            let read_allowed = std::fs::read_to_string(&allowed).is_ok();
            let read_other = std::fs::read_to_string(&other).is_ok();
            let write_allowed = std::fs::write(&allowed, "x").is_ok();
            let passwd = std::fs::read_to_string("/etc/passwd").is_ok();
            let socket = std::os::unix::net::UnixListener::bind(sockets.join("s")).is_ok();
            let socket_elsewhere = std::os::unix::net::UnixListener::bind(dir.join("s")).is_ok();
            let removed = std::fs::remove_file(sockets.join("s")).is_ok();
            let removed_other = std::fs::remove_file(&other).is_ok();
            let expected = [true, false, false, false, true, false, true, false];
            let got = [
                read_allowed,
                read_other,
                write_allowed,
                passwd,
                socket,
                socket_elsewhere,
                removed,
                removed_other,
            ];
            if got == expected { 0 } else { 3 }
        });
        std::fs::remove_dir_all(&dir).unwrap();
        match status.code() {
            Some(9) => eprintln!("this kernel has no landlock; skipped"),
            code => assert_eq!(code, Some(0), "{status:?}"),
        }
    }
}
