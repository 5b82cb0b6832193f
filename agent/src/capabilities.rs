//! The Linux capabilities the guard needs, checked before anything is loaded so that a missing
//! one is named instead of surfacing as a bare EPERM from deep inside the BPF syscall.

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
}
