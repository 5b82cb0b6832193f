//! The Linux capabilities the guard needs, checked before anything is loaded so that a missing
//! one is named instead of surfacing as a bare EPERM from deep inside the BPF syscall; and
//! giving them up once the guard is attached, since the agent then spends its life parsing
//! what the network sends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A capability the guard needs, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needed {
    pub name: &'static str,
    bit: u32,
    pub why: &'static str,
    /// Whether CAP_SYS_ADMIN grants it too.
    sys_admin_covers: bool,
}

/// What the guard needs (linux/capability.h numbers). CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON on kernels that predate them, and for both on any kernel.
pub const GUARD: [Needed; 3] = [
    Needed {
        name: "CAP_BPF",
        bit: 39,
        why: "to create the guard's maps and load its program",
        sys_admin_covers: true,
    },
    Needed {
        name: "CAP_PERFMON",
        bit: 38,
        why: "for the verifier to accept the guard's pointer arithmetic on packets and maps",
        sys_admin_covers: true,
    },
    Needed {
        name: "CAP_NET_ADMIN",
        bit: 12,
        why: "to attach XDP programs to interfaces",
        sys_admin_covers: false,
    },
];

const CAP_SYS_ADMIN: u32 = 21;

/// What following interfaces still needs once the guard is loaded: CAP_NET_ADMIN to attach the
/// loaded program to an interface that appears later; before Linux 6.5 also CAP_BPF, without
/// which no bpf() command (linking, pinning, reading the counters) is allowed.
pub fn after_attach(kernel: Option<crate::kernel::Release>) -> Vec<Needed> {
    let mut keep = vec![GUARD[2]];
    if kernel.is_none_or(|k| k < crate::kernel::BPF_COMMANDS_UNPRIVILEGED) {
        keep.insert(0, GUARD[0]);
    }
    keep
}

#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("cannot install the signal handler that drops capabilities on every thread")]
    Handler(#[source] std::io::Error),
    #[error(
        "thread {tid} still holds capabilities {held:#x} (wanted {wanted:#x}) after {waited:?}"
    )]
    Stuck {
        tid: String,
        held: u64,
        wanted: u64,
        waited: Duration,
    },
    #[error("capset refused to drop capabilities")]
    Refused,
}

/// The capability set every thread keeps; read by the signal handler.
static KEEP: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicBool = AtomicBool::new(false);

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Reduces the calling thread's effective and permitted sets to `keep` (nothing inheritable)
/// and sets no_new_privs, so no exec can bring anything back. Raw system calls only: it runs in
/// a signal handler.
fn drop_this_thread(keep: u64) -> bool {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads one header and two data structs, laid out as linux/capability.h
    // declares them, from memory that lives across the call; prctl takes plain integers.
    unsafe {
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()) == 0
            && libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    }
}

extern "C" fn drop_on_signal(_: libc::c_int) {
    // SAFETY: errno is this thread's; the handler puts back what the interrupted code had.
    let errno = unsafe { *libc::__errno_location() };
    if !drop_this_thread(KEEP.load(Ordering::Acquire)) {
        REFUSED.store(true, Ordering::Release);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Capabilities are per thread: every thread of the process (the runtime's workers, the
/// blocking pool) gives them up, each in a handler of this signal, until none holds more.
fn drop_signal() -> libc::c_int {
    libc::SIGRTMAX() - 3
}

/// Leaves the whole process with only `keep` (permitted and effective) and no_new_privs.
pub fn keep_only(keep: &[Needed]) -> Result<(), DropError> {
    let wanted = keep.iter().fold(0u64, |mask, n| mask | 1 << n.bit);
    KEEP.store(wanted, Ordering::Release);
    // SAFETY: the handler makes raw system calls and touches atomics and errno only; the
    // struct is zeroed (an empty mask, no flags) before the two fields that matter are set.
    // Real-time signals have no nix `Signal`, hence libc.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = drop_on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // Interrupted reads and writes on other threads resume rather than fail with EINTR.
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(drop_signal(), &action, std::ptr::null_mut())
    };
    if installed != 0 {
        return Err(DropError::Handler(std::io::Error::last_os_error()));
    }
    if !drop_this_thread(wanted) {
        return Err(DropError::Refused);
    }
    let started = Instant::now();
    // A thread being created while this runs inherits from its creator: the loop goes on until
    // one pass finds every thread done.
    loop {
        let holding = threads_holding_more(wanted);
        if REFUSED.load(Ordering::Acquire) {
            return Err(DropError::Refused);
        }
        let Some((tid, held)) = holding.first().cloned() else {
            return Ok(());
        };
        if started.elapsed() > Duration::from_secs(2) {
            return Err(DropError::Stuck {
                tid,
                held,
                wanted,
                waited: started.elapsed(),
            });
        }
        for (tid, _) in &holding {
            if let Ok(tid) = tid.parse::<libc::pid_t>() {
                // SAFETY: tgkill takes plain integers; a thread that exited meanwhile is ESRCH.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, drop_signal());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Threads whose permitted set is more than `wanted`, or that lack no_new_privs.
fn threads_holding_more(wanted: u64) -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            let permitted = u64::from_str_radix(field("CapPrm:")?, 16).ok()?;
            let no_new_privs = field("NoNewPrivs:") == Some("1");
            (permitted != wanted || !no_new_privs)
                .then(|| (task.file_name().to_string_lossy().into_owned(), permitted))
        })
        .collect()
}

/// The capabilities in `needed` this process lacks in its effective set.
pub fn missing(needed: &[Needed]) -> Vec<Needed> {
    let effective = effective().unwrap_or(0);
    missing_from(effective, needed)
}

fn missing_from(effective: u64, needed: &[Needed]) -> Vec<Needed> {
    let has = |bit: u32| effective & (1 << bit) != 0;
    needed
        .iter()
        .filter(|n| !(has(n.bit) || n.sys_admin_covers && has(CAP_SYS_ADMIN)))
        .copied()
        .collect()
}

/// The effective set, from `CapEff:` in /proc/self/status.
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_missing_capability_is_named_and_sys_admin_stands_in() {
        let all = (1 << 39) | (1 << 38) | (1 << 12);
        assert!(missing_from(all, &GUARD).is_empty());
        let names = |caps: Vec<Needed>| caps.iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(missing_from(all & !(1 << 38), &GUARD)),
            ["CAP_PERFMON"]
        );
        assert_eq!(
            names(missing_from(0, &GUARD)),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        assert_eq!(
            names(missing_from(1 << CAP_SYS_ADMIN, &GUARD)),
            ["CAP_NET_ADMIN"],
            "CAP_SYS_ADMIN covers BPF and PERFMON, not NET_ADMIN"
        );
    }

    #[test]
    fn cap_bpf_is_kept_only_where_every_bpf_command_needs_it() {
        let names = |caps: Vec<Needed>| caps.iter().map(|c| c.name).collect::<Vec<_>>();
        let release = |r| crate::kernel::parse(r);
        assert_eq!(names(after_attach(release("6.18.44"))), ["CAP_NET_ADMIN"]);
        assert_eq!(names(after_attach(release("6.5.0"))), ["CAP_NET_ADMIN"]);
        assert_eq!(
            names(after_attach(release("6.1.0-18-amd64"))),
            ["CAP_BPF", "CAP_NET_ADMIN"]
        );
        assert_eq!(
            names(after_attach(None)),
            ["CAP_BPF", "CAP_NET_ADMIN"],
            "an unknown kernel keeps what every kernel needs"
        );
    }
}
