//! Memory layouts shared by the kernel programs (`agent-ebpf`) and the agent's dataplane.
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every type is
//! `#[repr(C)]` with explicit padding, and its size and field offsets are pinned at compile
//! time: a layout change that only one side picks up would silently corrupt counters.
#![no_std]

/// Name of the per-CPU counter array in the eBPF object.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Name of the XDP program that guards an interface.
pub const GUARD_PROGRAM: &str = "tether_guard";

/// Why the guard let a packet through or dropped it: the index into the counter array.
///
/// Values are explicit because userspace and the kernel program are built by different
/// compilers and must agree on them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Passed: nothing in the policy matched.
    Pass = 0,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; 1] = [Reason::Pass];

    /// Number of slots the counter array needs.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable label for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::Pass => "pass",
        }
    }
}

/// Error for an index that names no [`Reason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownReason(pub u32);

impl TryFrom<u32> for Reason {
    type Error = UnknownReason;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Reason::ALL
            .into_iter()
            .find(|r| *r as u32 == value)
            .ok_or(UnknownReason(value))
    }
}

/// Packets and bytes seen for one reason on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = {
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::offset_of!(Counter, packets) == 0);
    assert!(core::mem::offset_of!(Counter, bytes) == 8);
    assert!(core::mem::size_of::<Reason>() == 4);
};

// SAFETY: Counter is repr(C), has no padding (checked above) and every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_round_trips_through_its_index() {
        for reason in Reason::ALL {
            assert_eq!(Reason::try_from(reason as u32), Ok(reason));
        }
        assert_eq!(
            Reason::try_from(Reason::COUNT),
            Err(UnknownReason(Reason::COUNT))
        );
    }
}
