//! tether's kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build-ebpf` and
//! embedded in `tether-agent`; the layouts they share with userspace live in `agent-common`.
//!
//! `tether_guard` (XDP) makes the tunnel the only way in: new connections from the control
//! plane, direct hits on protected node ports and control-plane fragments are dropped before
//! the kernel allocates anything for them. Every read is bounds-checked; a packet that cannot
//! be parsed is counted as malformed and dropped only when it came from the control plane.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, xdp_action};
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf};
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use tether_agent_common::{
    COUNTER_SLOTS, Counter, DropEvent, EVENT_CLOCK_EVERY, EVENTS_PER_SECOND, EVENTS_RING_BYTES,
    EventBudget, GuardConfig, MAX_PORTS, MAX_PREFIXES, Mode, Reason, counter_slot,
};

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "CONFIG")]
static CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);
#[map(name = "CP_V4")]
static CP_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "CP_V6")]
static CP_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map(name = "EVENT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers followed before giving up (and calling the packet malformed).
const MAX_EXTENSION_HEADERS: usize = 6;
/// Largest L3 + extension-header offset parsed; keeps offsets bounded for the verifier.
const MAX_L4_OFFSET: usize = 512;

#[xdp]
pub fn tether_guard(ctx: XdpContext) -> u32 {
    let mode = CONFIG.get(0).map_or(Mode::Off as u32, |c| c.mode);
    if mode == Mode::Off as u32 {
        return xdp_action::XDP_PASS;
    }
    let mut transport = Transport::default();
    let verdict = classify(&ctx, &mut transport);
    let drop = verdict.drop && mode == Mode::Enforce as u32;
    count(&ctx, verdict.reason, drop);
    if verdict.drop {
        report(&ctx, verdict.reason, &transport, drop);
    }
    if drop {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

struct Verdict {
    reason: Reason,
    drop: bool,
}

const PASS: Verdict = Verdict::new(Reason::Pass, false);

impl Verdict {
    const fn new(reason: Reason, drop: bool) -> Self {
        Verdict { reason, drop }
    }
}

/// For drop events: where the transport header of a dropped packet is. Written only on the
/// paths that drop after parsing it, so the verdict the fast path returns stays small.
#[derive(Default)]
struct Transport {
    protocol: u8,
    l4: u16,
}

const fn malformed(from_control_plane: bool) -> Verdict {
    Verdict::new(Reason::Malformed, from_control_plane)
}

/// Where the source address sits in the packet. It is read only when a verdict needs it:
/// established traffic, the bulk of what passes, never does.
#[derive(Clone, Copy)]
enum Source {
    V4(usize),
    V6(usize),
}

impl Source {
    /// Whether the control plane sent the packet; an unreadable address is not the control
    /// plane's.
    #[inline(always)]
    fn in_control_plane(self, ctx: &XdpContext) -> bool {
        match self {
            Source::V4(at) => {
                array::<4>(ctx, at).is_some_and(|a| CP_V4.get(&Key::new(32, a)).is_some())
            }
            Source::V6(at) => {
                array::<16>(ctx, at).is_some_and(|a| CP_V6.get(&Key::new(128, a)).is_some())
            }
        }
    }

    /// Unparsable past the IP version: dropped only when the control plane sent it.
    #[inline(always)]
    fn malformed(self, ctx: &XdpContext) -> Verdict {
        malformed(self.in_control_plane(ctx))
    }

    #[inline(always)]
    fn allowed_on_protected_ports(self, ctx: &XdpContext) -> bool {
        match self {
            Source::V4(at) => {
                array::<4>(ctx, at).is_some_and(|a| ALLOW_V4.get(&Key::new(32, a)).is_some())
            }
            Source::V6(at) => {
                array::<16>(ctx, at).is_some_and(|a| ALLOW_V6.get(&Key::new(128, a)).is_some())
            }
        }
    }
}

#[inline(always)]
fn be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    array::<2>(ctx, offset).map(u16::from_be_bytes)
}

/// Reads N bytes at `offset`, or `None` past the end. Every read is at least two bytes wide:
/// LLVM turns a one-byte bound check `p + 1 > end` into `p >= end`, for which the verifier
/// grants no range at a variable offset.
#[inline(always)]
fn array<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    // SAFETY: all N bytes lie inside the packet (checked above); read_unaligned because
    // packet data has no alignment guarantee.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

/// The N bytes at `offset`, in place, or `None` past the end: one bounds check for a whole
/// header (N is at least two, for the reason `array` gives).
#[inline(always)]
fn window<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    // SAFETY: all N bytes lie inside the packet (checked above), which outlives the program
    // run; [u8; N] has no alignment requirement.
    Some(unsafe { &*((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn classify(ctx: &XdpContext, found: &mut Transport) -> Verdict {
    let Some(mut ethertype) = be16(ctx, 12) else {
        return malformed(false);
    };
    // Untagged IPv4 first: it is most of what a node receives.
    if ethertype == ETH_P_IP {
        return ipv4(ctx, ETH_HLEN, found);
    }
    let mut offset = ETH_HLEN;
    // Up to two VLAN tags (802.1Q, or 802.1ad outer + 802.1Q inner).
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(ctx, offset + 2) else {
            return malformed(false);
        };
        ethertype = inner;
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, offset, found),
        ETH_P_IPV6 => ipv6(ctx, offset, found),
        // A third tag is nothing the node's stack would deliver as IP.
        ETH_P_8021Q | ETH_P_8021AD => malformed(false),
        // ARP and everything else is not ours to judge.
        _ => PASS,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize, found: &mut Transport) -> Verdict {
    let source = Source::V4(l3 + 12);
    let Some(header) = window::<20>(ctx, l3) else {
        return source.malformed(ctx);
    };
    let version_ihl = header[0];
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return source.malformed(ctx);
    }
    // More-fragments set or a non-zero offset: any piece of a fragmented datagram.
    if header[6] & 0x3f != 0 || header[7] != 0 {
        return fragment_verdict(ctx, source);
    }
    let protocol = header[9];
    let l4 = l3 + header_len;
    // Options must be present in full; a TCP or UDP header read past them proves it anyway.
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP && array::<2>(ctx, l4 - 2).is_none() {
        return source.malformed(ctx);
    }
    transport(ctx, protocol, l4, source, found)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize, found: &mut Transport) -> Verdict {
    let source = Source::V6(l3 + 8);
    let Some(header) = window::<40>(ctx, l3) else {
        return source.malformed(ctx);
    };
    if header[0] >> 4 != 6 {
        return source.malformed(ctx);
    }
    let mut next = header[6];
    let mut offset = l3 + 40;
    let mut fragmented = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let step = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units after the first.
            0 | 43 | 60 => {
                let Some([following, len]) = array::<2>(ctx, offset) else {
                    return source.malformed(ctx);
                };
                next = following;
                (usize::from(len) + 1) * 8
            }
            // Fragment header: fixed 8 octets.
            44 => {
                let Some([following, _]) = array::<2>(ctx, offset) else {
                    return source.malformed(ctx);
                };
                fragmented = true;
                next = following;
                8
            }
            _ => break,
        };
        offset += step;
        if offset > MAX_L4_OFFSET {
            return source.malformed(ctx);
        }
    }
    if matches!(next, 0 | 43 | 44 | 60) {
        // The chain is longer than we follow.
        return source.malformed(ctx);
    }
    if fragmented {
        return fragment_verdict(ctx, source);
    }
    transport(ctx, next, offset, source, found)
}

#[inline(always)]
fn fragment_verdict(ctx: &XdpContext, source: Source) -> Verdict {
    if source.in_control_plane(ctx) {
        Verdict::new(Reason::Fragment, true)
    } else {
        PASS
    }
}

#[inline(always)]
fn transport(
    ctx: &XdpContext,
    protocol: u8,
    l4: usize,
    source: Source,
    found: &mut Transport,
) -> Verdict {
    if l4 > MAX_L4_OFFSET {
        return source.malformed(ctx);
    }
    match protocol {
        IPPROTO_TCP => {
            let Some(header) = window::<20>(ctx, l4) else {
                return source.malformed(ctx);
            };
            if header[12] >> 4 < 5 {
                return source.malformed(ctx);
            }
            let flags = header[13];
            if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
                // Established traffic, including replies to the node's own connections.
                return PASS;
            }
            if source.in_control_plane(ctx) {
                *found = Transport {
                    protocol,
                    l4: l4 as u16,
                };
                return Verdict::new(Reason::ControlPlaneSyn, true);
            }
            let port = u16::from_be_bytes([header[2], header[3]]);
            protected_port(ctx, port, source, protocol, l4, found)
        }
        IPPROTO_UDP => {
            let Some(header) = window::<8>(ctx, l4) else {
                return source.malformed(ctx);
            };
            let port = u16::from_be_bytes([header[2], header[3]]);
            protected_port(ctx, port, source, protocol, l4, found)
        }
        // ICMP (path-MTU errors included) and everything else passes.
        _ => PASS,
    }
}

#[inline(always)]
fn protected_port(
    ctx: &XdpContext,
    port: u16,
    source: Source,
    protocol: u8,
    l4: usize,
    found: &mut Transport,
) -> Verdict {
    // SAFETY: a hash-map lookup; the value is only tested for presence.
    let protected = unsafe { PORTS.get(&port) }.is_some();
    if protected && !source.allowed_on_protected_ports(ctx) {
        *found = Transport {
            protocol,
            l4: l4 as u16,
        };
        Verdict::new(Reason::ProtectedPort, true)
    } else {
        PASS
    }
}

#[inline(always)]
fn count(ctx: &XdpContext, reason: Reason, dropped: bool) {
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_slot(reason, dropped)) {
        // SAFETY: the pointer comes from a successful per-CPU map lookup, so it is valid for
        // this CPU's slot, and XDP programs do not migrate between CPUs while running.
        let counter = unsafe { &mut *slot };
        if counter.packets == 0 {
            info!(
                ctx,
                "tether_guard: first {} packet on this CPU ({} bytes)",
                reason.label(),
                len
            );
        }
        counter.packets += 1;
        counter.bytes += len;
    }
}

/// Sends a [`DropEvent`] for a packet the policy drops, within this CPU's per-second budget.
///
/// Runs only on the drop path, so it re-reads the addresses instead of carrying them through
/// the fast path's parse.
#[inline(always)]
fn report(ctx: &XdpContext, reason: Reason, transport: &Transport, dropped: bool) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a successful per-CPU lookup; XDP programs do not migrate between CPUs.
    let budget = unsafe { &mut *budget };
    const SECOND_NS: u64 = 1_000_000_000;
    if budget.sent >= EVENTS_PER_SECOND {
        budget.suppressed += 1;
        // Reading the clock costs about as much as the rest of the drop path, so in a flood
        // only every EVENT_CLOCK_EVERY-th suppressed packet looks whether a new window began.
        if budget.suppressed > EVENT_CLOCK_EVERY && budget.suppressed % EVENT_CLOCK_EVERY != 0 {
            return;
        }
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if now.wrapping_sub(budget.window_start_ns) < SECOND_NS {
            return;
        }
        // This packet gets the event.
        budget.suppressed -= 1;
    }
    // The coarse clock (tick resolution) is plenty for a one-second window.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(budget.window_start_ns) >= SECOND_NS {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        budget.suppressed += 1;
        return;
    };
    budget.sent += 1;
    let mut event = DropEvent {
        reason: reason as u32,
        protocol: transport.protocol,
        dropped: dropped as u8,
        suppressed: budget.suppressed,
        ..DropEvent::default()
    };
    budget.suppressed = 0;
    addresses(ctx, &mut event);
    let l4 = usize::from(transport.l4);
    if transport.protocol != 0 && l4 <= MAX_L4_OFFSET {
        if let Some(port) = be16(ctx, l4) {
            event.source_port = port;
        }
        if let Some(port) = be16(ctx, l4 + 2) {
            event.destination_port = port;
        }
    }
    entry.write(event);
    entry.submit(0);
}

/// Fills in the family and addresses, skipping VLAN tags as `classify` does.
#[inline(always)]
fn addresses(ctx: &XdpContext, event: &mut DropEvent) {
    let Some(mut ethertype) = be16(ctx, 12) else {
        return;
    };
    let mut l3 = ETH_HLEN;
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(ctx, l3 + 2) else {
            return;
        };
        ethertype = inner;
        l3 += 4;
    }
    if ethertype == ETH_P_IP {
        if let Some(both) = array::<8>(ctx, l3 + 12) {
            event.family = 4;
            event.source[..4].copy_from_slice(&both[..4]);
            event.destination[..4].copy_from_slice(&both[4..]);
        }
    } else if ethertype == ETH_P_IPV6 {
        if let Some(both) = array::<32>(ctx, l3 + 8) {
            event.family = 6;
            event.source.copy_from_slice(&both[..16]);
            event.destination.copy_from_slice(&both[16..]);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF has no unwinding; the verifier rejects any path that could reach here.
    loop {}
}

// The ring-buffer helpers behind aya-log are GPL-only, so the programs are GPL-licensed.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
