//! The running kernel's release, and what the agent needs of it.

use std::fmt;

/// A kernel release's major and minor numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest kernel the guard runs on: its program reads the coarse clock
/// (`bpf_ktime_get_coarse_ns`, 5.11), and from 5.11 BPF memory is charged to the memory cgroup
/// rather than to RLIMIT_MEMLOCK, so no limit needs raising.
pub const GUARD_FLOOR: Release = Release {
    major: 5,
    minor: 11,
};

/// From 6.5 only creating maps and loading programs needs CAP_BPF; before, with unprivileged
/// BPF disabled (every distribution's default), every bpf() command did, reading a map too.
pub const BPF_COMMANDS_UNPRIVILEGED: Release = Release { major: 6, minor: 5 };

/// Parses the start of a release string such as `6.18.44-fc-v1147` or `5.15.0-91-generic`.
pub fn parse(release: &str) -> Option<Release> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(Release { major, minor })
}

/// This machine's kernel.
pub fn running() -> Option<Release> {
    parse(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()?
            .trim(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_order() {
        assert_eq!(
            parse("6.18.44-fc-v1147"),
            Some(Release {
                major: 6,
                minor: 18
            })
        );
        assert_eq!(
            parse("5.15.0-91-generic"),
            Some(Release {
                major: 5,
                minor: 15
            })
        );
        assert_eq!(parse("6.5"), Some(Release { major: 6, minor: 5 }));
        assert_eq!(parse("garbage"), None);
        assert!(parse("5.10.209").unwrap() < GUARD_FLOOR);
        assert!(parse("5.11.0").unwrap() >= GUARD_FLOOR);
        assert!(parse("6.4.16").unwrap() < BPF_COMMANDS_UNPRIVILEGED);
        assert!(parse("6.10.1").unwrap() > BPF_COMMANDS_UNPRIVILEGED);
    }
}
