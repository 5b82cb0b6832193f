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
    COUNTER_SLOTS, Counter, DropEvent, EVENTS_PER_SECOND, EVENTS_RING_BYTES, EventBudget,
    GuardConfig, MAX_PORTS, MAX_PREFIXES, Mode, Reason, counter_slot,
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
    let verdict = classify(&ctx);
    let drop = verdict.drop && mode == Mode::Enforce as u32;
    count(&ctx, verdict.reason, drop);
    if verdict.drop {
        report(&ctx, &verdict, drop);
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
    /// For drop events: the transport protocol and header offset, when they were parsed.
    protocol: u8,
    l4: u16,
}

const PASS: Verdict = Verdict::new(Reason::Pass, false);

impl Verdict {
    const fn new(reason: Reason, drop: bool) -> Self {
        Verdict {
            reason,
            drop,
            protocol: 0,
            l4: 0,
        }
    }
}

const fn malformed(from_control_plane: bool) -> Verdict {
    Verdict::new(Reason::Malformed, from_control_plane)
}

/// The source address, once known.
#[derive(Clone, Copy)]
enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Source {
    fn in_control_plane(self) -> bool {
        match self {
            Source::V4(a) => CP_V4.get(&Key::new(32, a)).is_some(),
            Source::V6(a) => CP_V6.get(&Key::new(128, a)).is_some(),
        }
    }

    /// Unparsable past the source address: dropped only when the control plane sent it. The
    /// lookup happens here, off the fast path, rather than for every packet.
    fn malformed(self) -> Verdict {
        malformed(self.in_control_plane())
    }

    fn allowed_on_protected_ports(self) -> bool {
        match self {
            Source::V4(a) => ALLOW_V4.get(&Key::new(32, a)).is_some(),
            Source::V6(a) => ALLOW_V6.get(&Key::new(128, a)).is_some(),
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

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Some(mut ethertype) = be16(ctx, 12) else {
        return malformed(false);
    };
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
        ETH_P_IP => ipv4(ctx, offset),
        ETH_P_IPV6 => ipv6(ctx, offset),
        // A third tag is nothing the node's stack would deliver as IP.
        ETH_P_8021Q | ETH_P_8021AD => malformed(false),
        // ARP and everything else is not ours to judge.
        _ => PASS,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Verdict {
    // One binding per read: LLVM may spill the undefined half of a tuple of Options from a
    // register holding a packet pointer, which the verifier rejects.
    let Some([version_ihl, _]) = array::<2>(ctx, l3) else {
        return malformed(false);
    };
    let Some(source) = array::<4>(ctx, l3 + 12) else {
        return malformed(false);
    };
    let source = Source::V4(source);
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return source.malformed();
    }
    let Some([frag_hi, frag_lo, _ttl, protocol]) = array::<4>(ctx, l3 + 6) else {
        return source.malformed();
    };
    // More-fragments set or a non-zero offset: any piece of a fragmented datagram.
    if u16::from_be_bytes([frag_hi, frag_lo]) & 0x3fff != 0 {
        return fragment_verdict(source);
    }
    let l4 = l3 + header_len;
    // Options must be present in full.
    if array::<2>(ctx, l4 - 2).is_none() {
        return source.malformed();
    }
    transport(ctx, protocol, l4, source)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some([version, _, _, _, _, _, first_next, _]) = array::<8>(ctx, l3) else {
        return malformed(false);
    };
    let Some(source) = array::<16>(ctx, l3 + 8) else {
        return malformed(false);
    };
    let source = Source::V6(source);
    if version >> 4 != 6 || array::<2>(ctx, l3 + 38).is_none() {
        return source.malformed();
    }
    let mut next = first_next;
    let mut offset = l3 + 40;
    let mut fragmented = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let step = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units after the first.
            0 | 43 | 60 => {
                let Some([following, len]) = array::<2>(ctx, offset) else {
                    return source.malformed();
                };
                next = following;
                (usize::from(len) + 1) * 8
            }
            // Fragment header: fixed 8 octets.
            44 => {
                let Some([following, _]) = array::<2>(ctx, offset) else {
                    return source.malformed();
                };
                fragmented = true;
                next = following;
                8
            }
            _ => break,
        };
        offset += step;
        if offset > MAX_L4_OFFSET {
            return source.malformed();
        }
    }
    if matches!(next, 0 | 43 | 44 | 60) {
        // The chain is longer than we follow.
        return source.malformed();
    }
    if fragmented {
        return fragment_verdict(source);
    }
    transport(ctx, next, offset, source)
}

#[inline(always)]
fn fragment_verdict(source: Source) -> Verdict {
    if source.in_control_plane() {
        Verdict::new(Reason::Fragment, true)
    } else {
        PASS
    }
}

#[inline(always)]
fn transport(ctx: &XdpContext, protocol: u8, l4: usize, source: Source) -> Verdict {
    if l4 > MAX_L4_OFFSET {
        return source.malformed();
    }
    match protocol {
        IPPROTO_TCP => {
            let Some(port) = be16(ctx, l4 + 2) else {
                return source.malformed();
            };
            let Some([data_offset, flags]) = array::<2>(ctx, l4 + 12) else {
                return source.malformed();
            };
            let header_len = usize::from(data_offset >> 4) * 4;
            if header_len < 20 || array::<2>(ctx, l4 + 18).is_none() {
                return source.malformed();
            }
            let syn = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
            if !syn {
                // Established traffic, including replies to the node's own connections.
                return PASS;
            }
            if source.in_control_plane() {
                return Verdict {
                    protocol,
                    l4: l4 as u16,
                    ..Verdict::new(Reason::ControlPlaneSyn, true)
                };
            }
            protected_port(port, source, protocol, l4)
        }
        IPPROTO_UDP => {
            let Some(port) = be16(ctx, l4 + 2) else {
                return source.malformed();
            };
            if array::<2>(ctx, l4 + 6).is_none() {
                return source.malformed();
            }
            protected_port(port, source, protocol, l4)
        }
        // ICMP (path-MTU errors included) and everything else passes.
        _ => PASS,
    }
}

#[inline(always)]
fn protected_port(port: u16, source: Source, protocol: u8, l4: usize) -> Verdict {
    // SAFETY: a hash-map lookup; the value is only tested for presence.
    let protected = unsafe { PORTS.get(&port) }.is_some();
    if protected && !source.allowed_on_protected_ports() {
        Verdict {
            protocol,
            l4: l4 as u16,
            ..Verdict::new(Reason::ProtectedPort, true)
        }
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
fn report(ctx: &XdpContext, verdict: &Verdict, dropped: bool) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a successful per-CPU lookup; XDP programs do not migrate between CPUs.
    let budget = unsafe { &mut *budget };
    // The coarse clock (tick resolution) is plenty for a one-second window and spares every
    // drop a clock-source read. SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(budget.window_start_ns) >= 1_000_000_000 {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= EVENTS_PER_SECOND {
        budget.suppressed += 1;
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        budget.suppressed += 1;
        return;
    };
    budget.sent += 1;
    let mut event = DropEvent {
        reason: verdict.reason as u32,
        protocol: verdict.protocol,
        dropped: dropped as u8,
        suppressed: budget.suppressed,
        ..DropEvent::default()
    };
    budget.suppressed = 0;
    addresses(ctx, &mut event);
    let l4 = usize::from(verdict.l4);
    if verdict.protocol != 0 && l4 <= MAX_L4_OFFSET {
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
