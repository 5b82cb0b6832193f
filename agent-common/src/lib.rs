//! Memory layouts shared by the kernel programs (`agent-ebpf`) and the agent's dataplane.
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every type is
//! `#[repr(C)]` with explicit padding, and its size and field offsets are pinned at compile
//! time: a layout change that only one side picks up would silently corrupt counters.
#![no_std]

/// Per-CPU counters, one slot per (reason, action): see [`counter_slot`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// One [`GuardConfig`] at index 0.
pub const CONFIG_MAP: &str = "CONFIG";
/// LPM tries of control-plane source prefixes.
pub const CONTROL_PLANE_V4_MAP: &str = "CP_V4";
pub const CONTROL_PLANE_V6_MAP: &str = "CP_V6";
/// LPM tries of sources still allowed to reach protected ports directly.
pub const ALLOW_V4_MAP: &str = "ALLOW_V4";
pub const ALLOW_V6_MAP: &str = "ALLOW_V6";
/// Protected destination ports (host byte order) → 1.
pub const PORTS_MAP: &str = "PORTS";

/// Ring buffer of [`DropEvent`]s, written at most [`EVENTS_PER_SECOND`] times per CPU.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU [`EventBudget`] behind the events' rate limit.
pub const EVENT_BUDGET_MAP: &str = "EVENT_BUDGET";

/// Maps whose contents must outlive the agent process: pinned under the bpffs root and adopted
/// by the next agent, so policy, mode and counters carry over a restart. The events ring and
/// its budget belong to the running agent and are not pinned.
pub const PINNED_MAPS: [&str; 7] = [
    COUNTERS_MAP,
    CONFIG_MAP,
    CONTROL_PLANE_V4_MAP,
    CONTROL_PLANE_V6_MAP,
    ALLOW_V4_MAP,
    ALLOW_V6_MAP,
    PORTS_MAP,
];

/// Drop events each CPU may emit per second; beyond that they are only counted in the next
/// event's `suppressed`. Enough to see who is knocking, too few to flood the logs.
pub const EVENTS_PER_SECOND: u32 = 8;
/// Once a CPU's budget is spent, it reads the clock (to see whether a new one-second window
/// began) for each of the first this many suppressed drops, then only for every this-many-th:
/// a flood pays for the clock on one packet in this many, and its next event comes at most
/// this many packets late.
pub const EVENT_CLOCK_EVERY: u32 = 32;
/// Size of the events ring in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 64 * 1024;

/// Name of the XDP program that guards an interface.
pub const GUARD_PROGRAM: &str = "tether_guard";

/// Capacity of each prefix trie and of the port set.
pub const MAX_PREFIXES: u32 = 1024;
pub const MAX_PORTS: u32 = 64;

/// Why the guard decided what it did about a packet.
///
/// Values are explicit because userspace and the kernel program are built by different
/// compilers and must agree on them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Nothing in the policy matched.
    Pass = 0,
    /// Could not be parsed (truncated at some header, bad version or length); dropped only
    /// when it came from a control-plane source.
    Malformed = 1,
    /// A new inbound TCP connection (SYN without ACK) from a control-plane source.
    ControlPlaneSyn = 2,
    /// A TCP SYN or UDP datagram to a protected port from a source not allowed there.
    ProtectedPort = 3,
    /// An IP fragment from a control-plane source.
    Fragment = 4,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; 5] = [
        Reason::Pass,
        Reason::Malformed,
        Reason::ControlPlaneSyn,
        Reason::ProtectedPort,
        Reason::Fragment,
    ];

    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable label for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::Pass => "pass",
            Reason::Malformed => "malformed",
            Reason::ControlPlaneSyn => "control_plane_syn",
            Reason::ProtectedPort => "protected_port",
            Reason::Fragment => "fragment",
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

/// Number of counter slots: each reason counted separately for passed and dropped packets
/// (in monitor mode, "would drop" is counted as passed).
pub const COUNTER_SLOTS: u32 = Reason::COUNT * 2;

/// The counter slot for `reason` and whether the packet was actually dropped.
pub const fn counter_slot(reason: Reason, dropped: bool) -> u32 {
    reason as u32 * 2 + dropped as u32
}

/// What the guard does with what it matches.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pass everything, count nothing (the map's zero value: an unconfigured program is inert).
    Off = 0,
    /// Pass everything, count what would have been dropped.
    Monitor = 1,
    /// Drop what the policy says.
    Enforce = 2,
}

impl Mode {
    pub const fn label(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        }
    }
}

/// Runtime settings the program reads on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// A [`Mode`] value.
    pub mode: u32,
    pub _pad: u32,
}

/// A packet the guard dropped, or would have dropped in monitor mode.
///
/// Addresses are in network byte order; IPv4 addresses fill the first four bytes. Ports are in
/// host byte order and zero when the packet carried none the guard parsed (fragments,
/// malformed packets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub source_port: u16,
    pub destination_port: u16,
    /// A [`Reason`] value.
    pub reason: u32,
    /// 4, 6, or 0 when the IP header could not be read.
    pub family: u8,
    /// IP protocol number when the transport header was parsed, else 0.
    pub protocol: u8,
    /// 1 when dropped, 0 when monitor mode let it pass.
    pub dropped: u8,
    pub _pad: u8,
    /// Events this CPU left out, because of the rate limit, since its previous event.
    pub suppressed: u32,
}

/// One CPU's share of the events' rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Start of the current one-second window (`bpf_ktime_get_coarse_ns`).
    pub window_start_ns: u64,
    pub sent: u32,
    pub suppressed: u32,
}

/// Packets and bytes seen for one slot on one CPU.
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
    assert!(core::mem::size_of::<GuardConfig>() == 8);
    assert!(core::mem::offset_of!(GuardConfig, mode) == 0);
    assert!(core::mem::size_of::<Reason>() == 4);
    assert!(core::mem::size_of::<DropEvent>() == 48);
    assert!(core::mem::offset_of!(DropEvent, destination) == 16);
    assert!(core::mem::offset_of!(DropEvent, source_port) == 32);
    assert!(core::mem::offset_of!(DropEvent, reason) == 36);
    assert!(core::mem::offset_of!(DropEvent, family) == 40);
    assert!(core::mem::offset_of!(DropEvent, suppressed) == 44);
    assert!(core::mem::size_of::<EventBudget>() == 16);
};

// SAFETY: both are repr(C), have no implicit padding (checked above) and every bit pattern is
// a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for GuardConfig {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DropEvent {}

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

    #[test]
    fn counter_slots_are_distinct_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for reason in Reason::ALL {
            for dropped in [false, true] {
                let slot = counter_slot(reason, dropped) as usize;
                assert!(!seen[slot]);
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
