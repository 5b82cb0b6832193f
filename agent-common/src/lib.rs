//! Memory layouts shared by the kernel programs (`agent-ebpf`) and the agent that loads them.
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every type is
//! `#[repr(C)]` with explicit padding, and its size and field offsets are pinned at compile
//! time: a layout change that only one side picks up would silently corrupt counters.
#![no_std]

/// Version of the pinned maps' layout: their names, types, key and value layouts, capacities
/// and what their values mean. Bump it with any such change, so an agent never adopts maps a
/// different release pinned and instead replaces them (see the agent's `guard_program::pins`).
pub const PIN_LAYOUT: u32 = 4;

/// Per-CPU counters of what the guard passes, one slot per (reason, action): see
/// [`counter_slot`]. What it drops, or would drop, is counted in [`INTERFACE_COUNTERS_MAP`]
/// alone; the totals are the sum of both.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Per-CPU [`DropCounters`], for what the guard drops or would drop: at index
/// `ifindex % INTERFACE_SLOTS` when [`GuardConfig::interface_slots`] gives that slot to the
/// interface, else at [`UNCLAIMED_SLOT`]. One lookup on the drop path counts the drop, its
/// interface and the events' budget: each further per-CPU lookup there cost a SYN flood
/// about 4 % of its drop rate.
pub const INTERFACE_COUNTERS_MAP: &str = "IF_COUNTERS";
pub const INTERFACE_SLOTS: u32 = 256;
/// Drops on interfaces without a slot of their own (an interface whose slot another guarded
/// interface holds, or a program run without one: BPF_PROG_TEST_RUN).
pub const UNCLAIMED_SLOT: u32 = INTERFACE_SLOTS;
/// Never written by the program: the agent adds a slot's counts here before giving the slot to
/// another interface, so that the totals never lose them.
pub const RETIRED_SLOT: u32 = INTERFACE_SLOTS + 1;
/// Entries of [`INTERFACE_COUNTERS_MAP`].
pub const DROP_COUNTER_ENTRIES: u32 = INTERFACE_SLOTS + 2;
/// One [`GuardConfig`] at index 0.
pub const CONFIG_MAP: &str = "CONFIG";
/// LPM tries of control-plane source prefixes: the policy of record. The program asks them
/// only where the control-plane table in [`GuardConfig`] defers.
pub const CONTROL_PLANE_V4_MAP: &str = "CP_V4";
pub const CONTROL_PLANE_V6_MAP: &str = "CP_V6";
/// LPM tries of sources still allowed to reach protected ports directly.
pub const ALLOW_V4_MAP: &str = "ALLOW_V4";
pub const ALLOW_V6_MAP: &str = "ALLOW_V6";
/// Destination ports (host byte order) → [`PORT_PROTECTED`] | [`PORT_TUNNEL`].
pub const PORTS_MAP: &str = "PORTS";

/// In [`PORTS_MAP`]: TCP SYNs and UDP to this port are dropped unless the source is allowed.
pub const PORT_PROTECTED: u8 = 1;
/// In [`PORTS_MAP`]: UDP to this port carries a tunnel (VXLAN, Geneve, WireGuard…) and is
/// dropped from the control plane.
pub const PORT_TUNNEL: u8 = 2;

/// Ring buffer of [`DropEvent`]s, written at most [`EVENTS_PER_SECOND`] times per CPU and
/// counter slot.
pub const EVENTS_MAP: &str = "EVENTS";

/// Maps whose contents must outlive the agent process: pinned under the bpffs root and adopted
/// by the next agent, so policy, mode and counters carry over a restart. The events ring
/// belongs to the running agent and is not pinned.
pub const PINNED_MAPS: [&str; 8] = [
    COUNTERS_MAP,
    INTERFACE_COUNTERS_MAP,
    CONFIG_MAP,
    CONTROL_PLANE_V4_MAP,
    CONTROL_PLANE_V6_MAP,
    ALLOW_V4_MAP,
    ALLOW_V6_MAP,
    PORTS_MAP,
];

/// Drop events each CPU may emit per second for each interface with a counter slot (and as
/// many for those without); beyond that they are only counted in the next event's
/// `suppressed`. Enough to see who is knocking, too few to flood the logs.
pub const EVENTS_PER_SECOND: u32 = 8;
/// Once a budget is spent, it reads the clock (to see whether a new one-second window
/// began) for each of the first this many suppressed drops, then only for every this-many-th:
/// a flood pays for the clock on one packet in this many, and its next event comes at most
/// this many packets late.
pub const EVENT_CLOCK_EVERY: u32 = 32;
/// Size of the events ring in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 64 * 1024;

/// Name of the XDP program that guards an interface whose frames carry an Ethernet header.
pub const GUARD_PROGRAM: &str = "tether_guard";
/// Name of the XDP program that guards an interface whose frames begin with the IP header
/// (tun, WireGuard, ipip, sit, PPP, raw IP).
pub const GUARD_IP_PROGRAM: &str = "tether_guard_ip";

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
    /// A new inbound connection from a control-plane source: a TCP SYN without ACK, an SCTP
    /// INIT, a DCCP Request.
    ControlPlaneSyn = 2,
    /// A TCP SYN or UDP datagram to a protected port from a source not allowed there.
    ProtectedPort = 3,
    /// An IP fragment from a control-plane source.
    Fragment = 4,
    /// Well-formed, but the guard cannot parse it far enough to decide (an IPv6 header chain
    /// longer than it walks, a first fragment cut inside the transport header); dropped unless
    /// the source is allowed on protected ports.
    Unparseable = 5,
    /// A tunnel packet (IPIP, IPv6-in-IP, GRE, ESP, or UDP to a tunnel port) from a
    /// control-plane source: its inner packet would reach the node with no guard in the way.
    Encapsulated = 6,
    /// A TCP segment that is not a SYN from a control-plane source, which would land on a
    /// listening socket (a SYN-cookie ACK, say) rather than a connection the node opened.
    ControlPlaneToListener = 7,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; 8] = [
        Reason::Pass,
        Reason::Malformed,
        Reason::ControlPlaneSyn,
        Reason::ProtectedPort,
        Reason::Fragment,
        Reason::Unparseable,
        Reason::Encapsulated,
        Reason::ControlPlaneToListener,
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
            Reason::Unparseable => "unparseable",
            Reason::Encapsulated => "encapsulated",
            Reason::ControlPlaneToListener => "control_plane_to_listener",
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
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GuardConfig {
    /// A [`Mode`] value.
    pub mode: u32,
    /// [`tunnel_bit`]s of the IP protocols dropped as [`Reason::Encapsulated`] from the
    /// control plane.
    pub tunnels: u32,
    /// The interface (ifindex) whose drops slot `ifindex % INTERFACE_SLOTS` of
    /// [`INTERFACE_COUNTERS_MAP`] counts, or 0. Here, beside the mode, the program reads it
    /// from a line it has already; the agent changes an entry with one aligned store.
    pub interface_slots: [u32; INTERFACE_SLOTS as usize],
    /// The control-plane table's first level, one `TABLE_*` entry per IPv4 /16 (indexed by
    /// the address's first two octets). The table is here rather than in maps of its own:
    /// the program looks the config up for every packet anyway, and each further lookup
    /// costs established traffic a fifth of what it costs now.
    pub v4_top: [u8; 65536],
    /// The same for IPv6, by the first 16 bits; it has no levels below it (a prefix longer
    /// than /16 makes its entry [`TABLE_TRIE`]).
    pub v6_top: [u8; 65536],
    /// The second IPv4 level: blocks of entries by the third octet, for /16s that hold part
    /// of the control plane. Indexed by the entry that names the block, so any byte is in
    /// bounds as the verifier sees it; the first [`TABLE_BLOCK`] are never named.
    pub v4_mid: [[u8; 256]; 256],
    /// The last IPv4 level: bitmaps by the fourth octet (see [`low_block_holds`]), for /24s
    /// that hold part of the control plane; indexed as `v4_mid`.
    pub v4_low: [[u64; 4]; 256],
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            mode: Mode::Off as u32,
            tunnels: 0,
            interface_slots: [0; INTERFACE_SLOTS as usize],
            v4_top: [TABLE_NONE; 65536],
            v6_top: [TABLE_NONE; 65536],
            v4_mid: [[TABLE_NONE; 256]; 256],
            v4_low: [[0; 4]; 256],
        }
    }
}

/// Entries of the control-plane table. Most sources are decided by one or three array reads
/// instead of a trie walk (which costs a control-plane SYN drop about what the rest of its
/// path does); what the table cannot hold it leaves to the tries.
///
/// No control-plane prefix reaches into this part of the address space.
pub const TABLE_NONE: u8 = 0;
/// All of this part of the address space is control plane.
pub const TABLE_ALL: u8 = 1;
/// Ask the trie: the blocks ran out, or the policy is changing.
pub const TABLE_TRIE: u8 = 2;
/// Entries from here up name the next level's block of the same index.
pub const TABLE_BLOCK: u8 = 3;
/// Blocks that can be named in each of [`GuardConfig::v4_mid`] and [`GuardConfig::v4_low`].
pub const TABLE_BLOCKS: u32 = u8::MAX as u32 + 1 - TABLE_BLOCK as u32;

/// The slot in [`GuardConfig::v4_top`] or [`GuardConfig::v6_top`] of an address whose first two
/// octets these are: one place for the kernel's reads and the agent's writes to agree on.
pub const fn top_slot(first: u8, second: u8) -> usize {
    u16::from_be_bytes([first, second]) as usize
}

/// Whether a [`GuardConfig::v4_low`] bitmap holds the address whose last octet is `octet`.
pub const fn low_block_holds(bits: &[u64; 4], octet: u8) -> bool {
    bits[(octet >> 6) as usize] & (1 << (octet & 63)) != 0
}

/// IP protocols that carry a whole packet (or frame) inside, as `GuardConfig::tunnels` bits:
/// IPv4 and IPv6 in IP, GRE, ESP, L2TPv3 and MPLS in IP, each of which Linux decapsulates.
pub const TUNNEL_PROTOCOLS: [(u8, &str); 6] = [
    (4, "ipip"),
    (41, "ipv6"),
    (47, "gre"),
    (50, "esp"),
    (115, "l2tp"),
    (137, "mpls"),
];

/// The `GuardConfig::tunnels` bit for an IP protocol (0 for one that is not a tunnel).
pub const fn tunnel_bit(protocol: u8) -> u32 {
    match protocol {
        4 => 1,
        41 => 2,
        47 => 4,
        50 => 8,
        115 => 16,
        137 => 32,
        _ => 0,
    }
}

/// What one CPU dropped (or would drop) on one interface: [`COUNTER_SLOTS`] slots, indexed as
/// [`counter_slot`], and the budget of its drop events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// The interface the agent gave this slot to, for readers of the counts; the program
    /// decides by [`GuardConfig::interface_slots`] and never writes it.
    pub ifindex: u32,
    pub _pad: u32,
    pub budget: EventBudget,
    pub slots: [Counter; COUNTER_SLOTS as usize],
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
    /// Drops this CPU left out of the events, because of the rate limit, since its previous
    /// event on the same counter slot (the same interface).
    pub suppressed: u32,
}

/// One CPU's share of the events' rate limit on one counter slot.
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
    assert!(
        core::mem::size_of::<GuardConfig>()
            == 8 + 4 * INTERFACE_SLOTS as usize + 2 * 65536 + 256 * (256 + 32)
    );
    assert!(core::mem::offset_of!(GuardConfig, v4_low) % 8 == 0);
    assert!(core::mem::offset_of!(GuardConfig, interface_slots) == 8);
    assert!(core::mem::offset_of!(GuardConfig, v4_top) == 8 + 4 * INTERFACE_SLOTS as usize);
    assert!(core::mem::offset_of!(GuardConfig, mode) == 0);
    assert!(core::mem::size_of::<Reason>() == 4);
    assert!(core::mem::size_of::<DropEvent>() == 48);
    assert!(core::mem::offset_of!(DropEvent, destination) == 16);
    assert!(core::mem::offset_of!(DropEvent, source_port) == 32);
    assert!(core::mem::offset_of!(DropEvent, reason) == 36);
    assert!(core::mem::offset_of!(DropEvent, family) == 40);
    assert!(core::mem::offset_of!(DropEvent, suppressed) == 44);
    assert!(core::mem::size_of::<EventBudget>() == 16);
    assert!(core::mem::size_of::<DropCounters>() == 24 + 16 * COUNTER_SLOTS as usize);
    assert!(core::mem::offset_of!(DropCounters, budget) == 8);
};

/// The dial hooks' maps, by the names the kernel side gives them (its `#[map(name = ...)]`).
pub const DIAL_RULES_MAP: &str = "DIAL_RULES";
pub const DIAL_CONFIG_MAP: &str = "DIAL_CONFIG";
/// Per-rule decisions, and one slot past the rules for "no rule matched".
pub const DIAL_HITS_MAP: &str = "DIAL_HITS";
pub const SERVICES_MAP: &str = "SERVICES";
pub const BACKENDS_MAP: &str = "BACKENDS";
/// Per-Service round-robin position, which is also its counter of steered dials.
pub const SERVICE_NEXT_MAP: &str = "SERVICE_NEXT";
/// Steered sockets' Service address, for `getpeername()`.
pub const STEERED_MAP: &str = "STEERED";
/// Every map of the dial hooks' object.
pub const DIAL_MAPS: [&str; 7] = [
    DIAL_RULES_MAP,
    DIAL_CONFIG_MAP,
    DIAL_HITS_MAP,
    SERVICES_MAP,
    BACKENDS_MAP,
    SERVICE_NEXT_MAP,
    STEERED_MAP,
];

/// The dial hooks' programs (the kernel side's function names), one per cgroup hook.
pub const DIAL_PROGRAMS: [&str; 6] = [
    "tether_dial_connect4",
    "tether_dial_connect6",
    "tether_dial_sendmsg4",
    "tether_dial_sendmsg6",
    "tether_dial_getpeername4",
    "tether_dial_getpeername6",
];

/// Most rules the dial hooks hold: the defaults, what the agent needs, and the operator's.
pub const MAX_DIAL_RULES: u32 = 64;

/// One dial-policy rule as the cgroup hooks read it, in the order the agent's policy tries
/// them. Addresses are in network byte order, as `bpf_sock_addr` holds them; an IPv4 rule uses
/// only the first word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DialRule {
    /// 4 or 6.
    pub family: u8,
    /// 1 allows, 0 denies.
    pub allow: u8,
    pub _pad: [u8; 2],
    /// Inclusive port range, host byte order.
    pub first_port: u16,
    pub last_port: u16,
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// How many rules are in use, and what happens to a destination none matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DialConfig {
    pub rules: u32,
    /// 1 allows what no rule matches, 0 denies it.
    pub otherwise_allow: u32,
}

/// Services the dial hooks steer (ClusterIP:port/protocol), and their backends in all.
pub const MAX_SERVICES: u32 = 4096;
pub const MAX_BACKENDS: u32 = 16384;
/// Sockets whose steered destination `getpeername()` still shows as the Service's.
pub const MAX_STEERED_SOCKETS: u32 = 65536;

/// A Service's address as a dial names it. Addresses in network byte order (as the hooks see
/// them), the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub protocol: u8,
}

/// Where a Service's backends are: `count` entries of the backend array from `first`; `id`
/// indexes its counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub first: u32,
    pub count: u32,
    pub id: u32,
    pub _pad: u32,
}

/// One ready backend (or, in the steered-sockets map, the Service a socket was dialled as).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<Endpoint>() == 20);
};

const _: () = {
    assert!(core::mem::size_of::<DialRule>() == 40);
    assert!(core::mem::offset_of!(DialRule, first_port) == 4);
    assert!(core::mem::offset_of!(DialRule, addr) == 8);
    assert!(core::mem::offset_of!(DialRule, mask) == 24);
    assert!(core::mem::size_of::<DialConfig>() == 8);
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
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DropCounters {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DialRule {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for DialConfig {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServiceKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServiceValue {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Endpoint {}

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
