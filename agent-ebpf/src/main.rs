//! tether's kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build-ebpf` and
//! embedded in `tether-agent`; the layouts they share with userspace live in `agent-common`.
//!
//! `tether_guard` (XDP) makes the tunnel the only way in: new connections from the control
//! plane, segments of it that would land on a listening socket, its tunnels and fragments, and
//! direct hits on protected node ports are dropped before the kernel allocates anything for
//! them. Every read is bounds-checked. A packet that cannot be parsed at all is malformed and
//! dropped when it came from the control plane; one that parses but not far enough to decide
//! (too long a header chain, a first fragment cut short) is dropped unless its source is
//! allowed: what the guard cannot read, it does not let through.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, bpf_sock_tuple, xdp_action};
use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_sk_release, bpf_skc_lookup_tcp};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf};
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use tether_agent_common::{
    COUNTER_SLOTS, Counter, DROP_COUNTER_ENTRIES, DropCounters, DropEvent, EVENT_CLOCK_EVERY,
    EVENTS_PER_SECOND, EVENTS_RING_BYTES, EventBudget, GuardConfig, INTERFACE_SLOTS, MAX_PORTS,
    MAX_PREFIXES, Mode, PORT_PROTECTED, PORT_TUNNEL, Reason, TABLE_ALL, TABLE_NONE, TABLE_TRIE,
    UNCLAIMED_SLOT, counter_slot, low_block_holds, top_slot, tunnel_bit,
};

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "IF_COUNTERS")]
static IF_COUNTERS: PerCpuArray<DropCounters> =
    PerCpuArray::with_max_entries(DROP_COUNTER_ENTRIES, 0);
#[map(name = "CONFIG")]
// Mappable: the agent changes single fields in place (see its `guard_program::shared_config`).
static CONFIG: Array<GuardConfig> = Array::with_max_entries(1, BPF_F_MMAPABLE);
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

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_AH: u8 = 51;
/// The first chunk of an SCTP packet that opens an association.
const SCTP_INIT: u8 = 1;
/// A DCCP packet that opens a connection (the type in bits 1-4 of the ninth octet).
const DCCP_REQUEST: u8 = 0;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// `struct sock` states (include/net/tcp_states.h) of sockets no connection of the node's own
/// is in: a listener, and a listener's half-open request.
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the namespace of the receiving device.
const CURRENT_NETNS: u64 = u64::MAX;
/// IPv6 extension headers followed before giving up (and calling the packet unparseable).
const MAX_EXTENSION_HEADERS: usize = 8;
/// Longest IPv6 header chain (fixed header and extension headers) walked before giving up
/// (and calling the packet unparseable). Measured from the IP header, so a packet is judged
/// alike behind any link-layer header.
const MAX_CHAIN: usize = 512;
/// VLAN tags read past, in a frame with more than the two whose contents are parsed. Linux
/// strips any number of priority tags (VLAN ID 0) and delivers what is inside as if untagged
/// (eight of them, on a veth), so a frame with more tags than this is dropped whoever sent
/// it: where its IP header is cannot be told.
const MAX_VLAN_TAGS: usize = 8;
/// Farthest a transport header can start (behind Ethernet and two VLAN tags); keeps offsets
/// bounded for the verifier.
const MAX_L4_OFFSET: usize = ETH_HLEN + 8 + MAX_CHAIN;

// `inline(always)` on an entry point reaches the function aya's macro wraps: without it the
// whole guard becomes a BPF-to-BPF call, which costs the fast path a third of its time.
#[xdp]
#[inline(always)]
pub fn tether_guard(ctx: XdpContext) -> u32 {
    guard::<ETH_HLEN, { ETH_HLEN + 40 }, { ETH_HLEN + 60 }>(&ctx)
}

/// The guard for devices whose frames begin with the IP header (tun, WireGuard, ipip, sit,
/// PPP, raw-IP modems): the same verdicts, read from offset 0. The agent picks it by the
/// device's type; read with the Ethernet layout, two octets of the source address would be
/// taken for an ethertype and everything would pass.
#[xdp]
#[inline(always)]
pub fn tether_guard_ip(ctx: XdpContext) -> u32 {
    guard::<0, 40, 60>(&ctx)
}

/// `L2` is where the IP header starts (the link-layer header's length); `PLAIN4` and `PLAIN6`
/// are `L2` plus an option-less IPv4 or IPv6 header and a TCP header, the windows the fast
/// paths read (passed in, as array lengths cannot be computed from a generic).
#[inline(always)]
fn guard<const L2: usize, const PLAIN4: usize, const PLAIN6: usize>(ctx: &XdpContext) -> u32 {
    const { assert!(PLAIN4 == L2 + 40 && PLAIN6 == L2 + 60) };
    let Some(config) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let mode = config.mode;
    if mode == Mode::Off as u32 {
        return xdp_action::XDP_PASS;
    }
    let mut transport = Transport::default();
    let verdict = match plain_tcp::<L2, PLAIN4, PLAIN6>(ctx, config) {
        Some(false) => {
            count(ctx, Reason::Pass);
            return xdp_action::XDP_PASS;
        }
        Some(true) => {
            transport = Transport {
                protocol: IPPROTO_TCP,
                l4: (L2 + 20) as u16,
            };
            Verdict::new(Reason::ControlPlaneSyn, true)
        }
        None => classify::<L2>(ctx, config, &mut transport),
    };
    let drop = verdict.drop && mode == Mode::Enforce as u32;
    if verdict.drop {
        count_drop::<L2>(ctx, config, verdict.reason, &transport, drop);
    } else {
        count(ctx, verdict.reason);
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

/// What is known about the packet around its transport header.
#[derive(Clone, Copy)]
struct Packet<'a> {
    source: Source<'a>,
    /// The first piece of a fragmented datagram: a transport header cut short is then not
    /// malformed (the kernel would reassemble it) but unparseable.
    first_fragment: bool,
    /// `GuardConfig::tunnels`.
    tunnels: u32,
}

impl Packet<'_> {
    /// The packet ends inside a header the verdict needs.
    #[inline(always)]
    fn truncated(self, ctx: &XdpContext) -> Verdict {
        if self.first_fragment {
            self.source.unparseable(ctx)
        } else {
            self.source.malformed(ctx)
        }
    }
}

/// Where the source address sits in the packet, with the config whose control-plane table
/// is asked before the tries. The address is read only when a verdict needs it: established
/// traffic from outside the control plane's /16s, the bulk of what passes, reads only its
/// first two octets.
#[derive(Clone, Copy)]
enum Source<'a> {
    V4(usize, &'a GuardConfig),
    V6(usize, &'a GuardConfig),
}

impl Source<'_> {
    /// Whether the control plane sent the packet; an unreadable address is not the control
    /// plane's.
    #[inline(always)]
    fn in_control_plane(self, ctx: &XdpContext) -> bool {
        match self {
            Source::V4(at, config) => {
                reread::<4>(ctx, at).is_some_and(|a| v4_in_control_plane(config, a))
            }
            Source::V6(at, config) => {
                reread::<16>(ctx, at).is_some_and(|a| match config.v6_top[top_slot(a[0], a[1])] {
                    TABLE_NONE => false,
                    TABLE_ALL => true,
                    _ => CP_V6.get(&Key::new(128, a)).is_some(),
                })
            }
        }
    }

    /// Unparsable past the IP version: dropped only when the control plane sent it.
    #[inline(always)]
    fn malformed(self, ctx: &XdpContext) -> Verdict {
        malformed(self.in_control_plane(ctx))
    }

    /// Well-formed as far as it was read, but not far enough to decide: fail closed.
    #[inline(always)]
    fn unparseable(self, ctx: &XdpContext) -> Verdict {
        Verdict::new(Reason::Unparseable, !self.allowed_on_protected_ports(ctx))
    }

    #[inline(always)]
    fn allowed_on_protected_ports(self, ctx: &XdpContext) -> bool {
        match self {
            Source::V4(at, _) => {
                reread::<4>(ctx, at).is_some_and(|a| ALLOW_V4.get(&Key::new(32, a)).is_some())
            }
            Source::V6(at, _) => {
                reread::<16>(ctx, at).is_some_and(|a| ALLOW_V6.get(&Key::new(128, a)).is_some())
            }
        }
    }

    /// Whether a segment that is not a SYN would be taken by a listening socket (or a
    /// listener's half-open request) on this node, rather than by a connection.
    #[inline(always)]
    fn lands_on_listener(self, ctx: &XdpContext, l4: usize) -> bool {
        let Some(ports) = reread::<4>(ctx, l4) else {
            return false;
        };
        // bpf_sock_tuple's IPv6 form; the IPv4 form is its first 12 bytes. Addresses and ports
        // stay in network byte order, as the helper wants them.
        let mut tuple = [0u8; 36];
        let size = match self {
            Source::V4(at, _) => {
                let Some(addresses) = reread::<8>(ctx, at) else {
                    return false;
                };
                tuple[..8].copy_from_slice(&addresses);
                tuple[8..12].copy_from_slice(&ports);
                12
            }
            Source::V6(at, _) => {
                let Some(addresses) = reread::<32>(ctx, at) else {
                    return false;
                };
                tuple[..32].copy_from_slice(&addresses);
                tuple[32..].copy_from_slice(&ports);
                36
            }
        };
        // SAFETY: the tuple lives on this stack frame for the call, `size` is the length of
        // the form it holds, and the context is this program's own.
        let socket = unsafe {
            bpf_skc_lookup_tcp(
                ctx.ctx.cast(),
                tuple.as_mut_ptr().cast::<bpf_sock_tuple>(),
                size,
                CURRENT_NETNS,
                0,
            )
        };
        if socket.is_null() {
            return false;
        }
        // SAFETY: a non-null socket from the lookup; `state` is readable on any socket the
        // helper returns, and the reference is released right after.
        let state = unsafe { (*socket).state };
        // SAFETY: releases the reference the lookup took, exactly once.
        unsafe { bpf_sk_release(socket.cast()) };
        state == TCP_LISTEN || state == TCP_NEW_SYN_RECV
    }
}

/// Whether the control plane holds an IPv4 address: the table says, or leaves it to the trie.
#[inline(always)]
fn v4_in_control_plane(config: &GuardConfig, address: [u8; 4]) -> bool {
    match config.v4_top[top_slot(address[0], address[1])] {
        TABLE_NONE => false,
        TABLE_ALL => true,
        TABLE_TRIE => v4_in_trie(address),
        block => v4_in_block(config, address, block),
    }
}

#[inline(always)]
fn v4_in_trie(address: [u8; 4]) -> bool {
    CP_V4.get(&Key::new(32, address)).is_some()
}

/// The table's lower levels for a /16 that holds part of the control plane: its block of
/// /24s, then the /24's bitmap of addresses.
#[inline(always)]
fn v4_in_block(config: &GuardConfig, address: [u8; 4], block: u8) -> bool {
    match config.v4_mid[usize::from(block)][usize::from(address[2])] {
        TABLE_NONE => false,
        TABLE_ALL => true,
        TABLE_TRIE => v4_in_trie(address),
        low => low_block_holds(&config.v4_low[usize::from(low)], address[3]),
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

/// [`array`] for a field nearer the packet's start than a check already made (the source
/// address after the transport header, say). With the ordinary loads the compiler drops
/// such a check, as the earlier one implies it, and reads through a register the verifier
/// gave no range; where the IP header's offset is a constant (IP-first devices) the verifier
/// then refuses the program. Reading the packet's start and end afresh keeps the check. The
/// fast paths never need it.
#[inline(always)]
fn reread<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    // SAFETY: the context pointer is the kernel's xdp_md for this run; both fields are
    // readable (the verifier rewrites these loads to the packet's pointers).
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + N > end {
        return None;
    }
    // SAFETY: as in `array`.
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

/// Most of what a node receives, and a SYN flood from the control plane, decided after one
/// bounds check: TCP in an untagged IPv4 packet without options or fragmentation. A segment
/// that opens nothing from a /16 without any control-plane source passes (`Some(false)`); a
/// SYN from the control plane is dropped (`Some(true)`). `classify` decides these the same
/// way in more steps, and everything else.
#[inline(always)]
fn plain_tcp<const L2: usize, const PLAIN4: usize, const PLAIN6: usize>(
    ctx: &XdpContext,
    config: &GuardConfig,
) -> Option<bool> {
    let headers = window::<PLAIN4>(ctx, 0)?;
    let ipv4 = if L2 == ETH_HLEN {
        headers[12..14] == ETH_P_IP.to_be_bytes()
    } else {
        headers[0] >> 4 == 4
    };
    if !ipv4 {
        let ipv6 = if L2 == ETH_HLEN {
            headers[12..14] == ETH_P_IPV6.to_be_bytes()
        } else {
            headers[0] >> 4 == 6
        };
        let plain6 = ipv6 && plain_tcp6::<L2, PLAIN6>(ctx, config);
        return plain6.then_some(false);
    }
    let tcp = L2 + 20;
    // Version 4, a 20-byte header.
    let plain = headers[L2] == 0x45
        // Neither more fragments nor an offset.
        && headers[L2 + 6] & 0x3f == 0
        && headers[L2 + 7] == 0
        && headers[L2 + 9] == IPPROTO_TCP
        && headers[tcp + 12] >> 4 >= 5;
    if !plain {
        return None;
    }
    let source = [
        headers[L2 + 12],
        headers[L2 + 13],
        headers[L2 + 14],
        headers[L2 + 15],
    ];
    let flags = headers[tcp + 13];
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        // From the control plane's /16s, the listener check in `classify` decides.
        let top = config.v4_top[top_slot(source[0], source[1])];
        return (top == TABLE_NONE).then_some(false);
    }
    // Not from the control plane, the port check in `classify` decides.
    v4_in_control_plane(config, source).then_some(true)
}

/// For IPv6, what passes in `plain_tcp`: a segment that opens nothing, with TCP right after
/// the fixed header, from a first 16 bits that hold no control-plane prefix. SYNs take the
/// long way: an IPv6 prefix longer than /16 is in the trie.
#[inline(always)]
fn plain_tcp6<const L2: usize, const PLAIN6: usize>(
    ctx: &XdpContext,
    config: &GuardConfig,
) -> bool {
    let at = L2 + 40;
    let Some(headers) = window::<PLAIN6>(ctx, 0) else {
        return false;
    };
    let flags = headers[at + 13];
    headers[L2] >> 4 == 6
        && headers[L2 + 6] == IPPROTO_TCP
        && headers[at + 12] >> 4 >= 5
        && (flags & TCP_SYN == 0 || flags & TCP_ACK != 0)
        && config.v6_top[top_slot(headers[L2 + 8], headers[L2 + 9])] == TABLE_NONE
}

#[inline(always)]
fn classify<const L2: usize>(
    ctx: &XdpContext,
    config: &GuardConfig,
    found: &mut Transport,
) -> Verdict {
    if L2 != ETH_HLEN {
        // The device hands over IP alone; the version says which. Anything else (MPLS on a
        // tun device, say) is not delivered as IP, as on Ethernet.
        let Some([first, _]) = array::<2>(ctx, 0) else {
            return malformed(false);
        };
        return match first >> 4 {
            4 => ipv4(ctx, 0, config, found),
            6 => ipv6(ctx, 0, config, found),
            _ => PASS,
        };
    }
    let Some(ethertype) = be16(ctx, 12) else {
        return malformed(false);
    };
    // Untagged IPv4 first: it is most of what a node receives.
    if ethertype == ETH_P_IP {
        return ipv4(ctx, ETH_HLEN, config, found);
    }
    // Up to two VLAN tags (802.1Q, or 802.1ad outer + 802.1Q inner).
    let Some((ethertype, offset)) = past_tags::<2>(ctx, ethertype, ETH_HLEN) else {
        return malformed(false);
    };
    match ethertype {
        ETH_P_IP => ipv4(ctx, offset, config, found),
        ETH_P_IPV6 => ipv6(ctx, offset, config, found),
        ETH_P_8021Q | ETH_P_8021AD => deeply_tagged(ctx, offset, config),
        // ARP and everything else is not ours to judge.
        _ => PASS,
    }
}

/// A frame with a third VLAN tag at `offset`. Parsing what it carries behind every depth of
/// tags would take the verifier past its limit, and priority tags are stripped whatever
/// their number, so it is judged by its source alone: unparseable, dropped unless the
/// source may reach protected ports (the control plane's is dropped either way). Nested VLAN
/// devices and priority-tagged QinQ rarely reach a node with more than two.
#[inline(always)]
fn deeply_tagged(ctx: &XdpContext, offset: usize, config: &GuardConfig) -> Verdict {
    let Some((ethertype, offset)) = past_tags::<{ MAX_VLAN_TAGS - 2 }>(ctx, ETH_P_8021Q, offset)
    else {
        return malformed(false);
    };
    match ethertype {
        ETH_P_IP => Source::V4(offset + 12, config).unparseable(ctx),
        ETH_P_IPV6 => Source::V6(offset + 8, config).unparseable(ctx),
        ETH_P_8021Q | ETH_P_8021AD => Verdict::new(Reason::Malformed, true),
        _ => PASS,
    }
}

/// Reads past up to N VLAN tags, the first of which `ethertype` (read just before `offset`)
/// announces: the ethertype after them and where what it announces starts, or `None` when the
/// frame ends inside a tag.
#[inline(always)]
fn past_tags<const N: usize>(
    ctx: &XdpContext,
    mut ethertype: u16,
    mut offset: usize,
) -> Option<(u16, usize)> {
    for _ in 0..N {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16(ctx, offset + 2)?;
        offset += 4;
    }
    Some((ethertype, offset))
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize, config: &GuardConfig, found: &mut Transport) -> Verdict {
    let source = Source::V4(l3 + 12, config);
    let Some(header) = window::<20>(ctx, l3) else {
        return source.malformed(ctx);
    };
    let version_ihl = header[0];
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return source.malformed(ctx);
    }
    // Flags (more-fragments) and the 13-bit offset; the reserved and don't-fragment bits
    // say nothing about fragmentation.
    let fragment = u16::from_be_bytes([header[6] & 0x3f, header[7]]);
    let first_fragment = fragment != 0;
    if fragment & 0x1fff != 0 || (first_fragment && source.in_control_plane(ctx)) {
        // A later piece carries no header to judge: without its first piece, which is
        // judged like a whole packet, it never reassembles.
        return fragment_verdict(ctx, source);
    }
    let mut protocol = header[9];
    let mut l4 = l3 + header_len;
    let packet = Packet {
        source,
        first_fragment,
        tunnels: config.tunnels,
    };
    // An authentication header hides nothing: the kernel checks it and delivers what
    // follows, a SYN included, so the verdict is on what follows (as behind IPv6's). One is
    // read past; behind a second the packet is unparseable.
    if protocol == IPPROTO_AH {
        let Some([following, len]) = array::<2>(ctx, l4) else {
            return packet.truncated(ctx);
        };
        if following == IPPROTO_AH {
            return source.unparseable(ctx);
        }
        protocol = following;
        l4 += (usize::from(len) + 2) * 4;
    }
    // Options (and an authentication header) must be present in full; a TCP or UDP header
    // read past them proves it anyway.
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP && array::<2>(ctx, l4 - 2).is_none() {
        return packet.truncated(ctx);
    }
    transport(ctx, protocol, l4, packet, found)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize, config: &GuardConfig, found: &mut Transport) -> Verdict {
    let source = Source::V6(l3 + 8, config);
    let Some(header) = window::<40>(ctx, l3) else {
        return source.malformed(ctx);
    };
    if header[0] >> 4 != 6 {
        return source.malformed(ctx);
    }
    let mut packet = Packet {
        source,
        first_fragment: false,
        tunnels: config.tunnels,
    };
    let mut next = header[6];
    let mut offset = l3 + 40;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let step = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units after the first.
            0 | 43 | 60 => {
                let Some([following, len]) = array::<2>(ctx, offset) else {
                    return packet.truncated(ctx);
                };
                next = following;
                (usize::from(len) + 1) * 8
            }
            // Authentication header: length in 4-octet units, less two.
            IPPROTO_AH => {
                let Some([following, len]) = array::<2>(ctx, offset) else {
                    return packet.truncated(ctx);
                };
                next = following;
                (usize::from(len) + 2) * 4
            }
            // Fragment header: fixed 8 octets.
            44 => {
                let Some([following, _, offset_high, offset_low]) = array::<4>(ctx, offset) else {
                    return packet.truncated(ctx);
                };
                let field = u16::from_be_bytes([offset_high, offset_low]);
                if field & 0xfff8 != 0 {
                    return fragment_verdict(ctx, source);
                }
                if field & 1 != 0 {
                    if source.in_control_plane(ctx) {
                        return fragment_verdict(ctx, source);
                    }
                    packet.first_fragment = true;
                }
                // Offset 0 without more fragments is an "atomic" fragment: Linux takes it as
                // the whole packet it is, and so is it judged.
                next = following;
                8
            }
            _ => break,
        };
        offset += step;
        if offset - l3 > MAX_CHAIN {
            return source.unparseable(ctx);
        }
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        // The chain is longer than we follow.
        return source.unparseable(ctx);
    }
    transport(ctx, next, offset, packet, found)
}

#[inline(always)]
fn fragment_verdict(ctx: &XdpContext, source: Source<'_>) -> Verdict {
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
    packet: Packet<'_>,
    found: &mut Transport,
) -> Verdict {
    let source = packet.source;
    if l4 > MAX_L4_OFFSET {
        return source.unparseable(ctx);
    }
    match protocol {
        IPPROTO_TCP => {
            let Some(header) = window::<20>(ctx, l4) else {
                return packet.truncated(ctx);
            };
            if header[12] >> 4 < 5 {
                return source.malformed(ctx);
            }
            let flags = header[13];
            if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
                // Not a new connection. From the control plane, it must belong to one the
                // node opened: an ACK that a listener would take could complete a
                // SYN-cookie handshake the guard never saw the SYN of.
                if flags & (TCP_SYN | TCP_RST) == 0
                    && flags & TCP_ACK != 0
                    && source.in_control_plane(ctx)
                    && source.lands_on_listener(ctx, l4)
                {
                    *found = Transport {
                        protocol,
                        l4: l4 as u16,
                    };
                    return Verdict::new(Reason::ControlPlaneToListener, true);
                }
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
            // SAFETY: a hash-map lookup; the value is copied out.
            let flags = unsafe { PORTS.get(&port) }.copied().unwrap_or(0);
            if flags & PORT_PROTECTED != 0 && !source.allowed_on_protected_ports(ctx) {
                *found = Transport {
                    protocol,
                    l4: l4 as u16,
                };
                return Verdict::new(Reason::ProtectedPort, true);
            }
            PASS
        }
        IPPROTO_UDP => {
            let Some(header) = window::<8>(ctx, l4) else {
                return packet.truncated(ctx);
            };
            let port = u16::from_be_bytes([header[2], header[3]]);
            // SAFETY: a hash-map lookup; the value is copied out.
            let flags = unsafe { PORTS.get(&port) }.copied().unwrap_or(0);
            if flags == 0 {
                return PASS;
            }
            let reason = if flags & PORT_PROTECTED != 0 && !source.allowed_on_protected_ports(ctx) {
                Reason::ProtectedPort
            } else if flags & PORT_TUNNEL != 0 && source.in_control_plane(ctx) {
                Reason::Encapsulated
            } else {
                return PASS;
            };
            *found = Transport {
                protocol,
                l4: l4 as u16,
            };
            Verdict::new(reason, true)
        }
        // The other connection-oriented transports: what opens a connection from the control
        // plane is dropped as a SYN is; replies to the node's own pass.
        IPPROTO_SCTP | IPPROTO_DCCP => {
            // SCTP: 12-octet common header, then the first chunk's type; DCCP: the packet type
            // in the ninth octet.
            let at = if protocol == IPPROTO_SCTP { 12 } else { 8 };
            let Some([kind, _]) = array::<2>(ctx, l4 + at) else {
                return packet.truncated(ctx);
            };
            let opens = if protocol == IPPROTO_SCTP {
                kind == SCTP_INIT
            } else {
                (kind >> 1) & 0x0f == DCCP_REQUEST
            };
            if opens && source.in_control_plane(ctx) {
                *found = Transport { protocol, l4: 0 };
                return Verdict::new(Reason::ControlPlaneSyn, true);
            }
            PASS
        }
        _ => {
            if tunnel_bit(protocol) & packet.tunnels != 0 && source.in_control_plane(ctx) {
                *found = Transport { protocol, l4: 0 };
                return Verdict::new(Reason::Encapsulated, true);
            }
            // ICMP (path-MTU errors included) and everything else passes.
            PASS
        }
    }
}

/// Counts a packet whose verdict passes it (see `count_drop` for the others).
#[inline(always)]
fn count(ctx: &XdpContext, reason: Reason) {
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_slot(reason, false)) {
        // SAFETY: the pointer comes from a successful per-CPU map lookup, so it is valid for
        // this CPU's slot, and XDP programs do not migrate between CPUs while running.
        let counter = unsafe { &mut *slot };
        // One line per CPU once traffic flows, to show the guard sees it. Drops have their
        // own events; logging them here too would cost the verifier a log writer per verdict.
        if counter.packets == 0 && reason as u32 == Reason::Pass as u32 {
            info!(
                ctx,
                "tether_guard: first pass packet on this CPU ({} bytes)", len
            );
        }
        counter.packets += 1;
        counter.bytes += len;
    }
}

/// Counts a drop (or would-drop) against the interface it arrived on (or as unclaimed), and
/// reports it within that counter slot's event budget.
#[inline(always)]
fn count_drop<const L2: usize>(
    ctx: &XdpContext,
    config: &GuardConfig,
    reason: Reason,
    transport: &Transport,
    dropped: bool,
) {
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = ifindex % INTERFACE_SLOTS;
    let slot = if config.interface_slots[slot as usize] == ifindex {
        slot
    } else {
        UNCLAIMED_SLOT
    };
    let Some(counters) = IF_COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a successful per-CPU lookup; XDP programs do not migrate between CPUs.
    let counters = unsafe { &mut *counters };
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(counter) = counters
        .slots
        .get_mut(counter_slot(reason, dropped) as usize)
    {
        counter.packets += 1;
        counter.bytes += len;
    }
    report::<L2>(ctx, &mut counters.budget, reason, transport, dropped);
}

/// Sends a [`DropEvent`] for a packet the policy drops, within `budget` (this CPU's, for the
/// counter slot the drop was counted in).
///
/// Runs only on the drop path, so it re-reads the addresses instead of carrying them through
/// the fast path's parse.
#[inline(always)]
fn report<const L2: usize>(
    ctx: &XdpContext,
    budget: &mut EventBudget,
    reason: Reason,
    transport: &Transport,
    dropped: bool,
) {
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
    addresses::<L2>(ctx, &mut event);
    let l4 = usize::from(transport.l4);
    if matches!(transport.protocol, IPPROTO_TCP | IPPROTO_UDP) && l4 <= MAX_L4_OFFSET {
        if let Some(port) = reread::<2>(ctx, l4).map(u16::from_be_bytes) {
            event.source_port = port;
        }
        if let Some(port) = reread::<2>(ctx, l4 + 2).map(u16::from_be_bytes) {
            event.destination_port = port;
        }
    }
    entry.write(event);
    entry.submit(0);
}

/// Fills in the family and addresses, skipping VLAN tags as `classify` does.
#[inline(always)]
fn addresses<const L2: usize>(ctx: &XdpContext, event: &mut DropEvent) {
    let mut l3 = L2;
    let ethertype = if L2 == ETH_HLEN {
        let Some(mut ethertype) = reread::<2>(ctx, 12).map(u16::from_be_bytes) else {
            return;
        };
        for _ in 0..MAX_VLAN_TAGS {
            if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
                break;
            }
            let Some(inner) = reread::<2>(ctx, l3 + 2).map(u16::from_be_bytes) else {
                return;
            };
            ethertype = inner;
            l3 += 4;
        }
        ethertype
    } else {
        match reread::<2>(ctx, 0) {
            Some([first, _]) if first >> 4 == 4 => ETH_P_IP,
            Some([first, _]) if first >> 4 == 6 => ETH_P_IPV6,
            _ => return,
        }
    };
    if ethertype == ETH_P_IP {
        if let Some(both) = reread::<8>(ctx, l3 + 12) {
            event.family = 4;
            event.source[..4].copy_from_slice(&both[..4]);
            event.destination[..4].copy_from_slice(&both[4..]);
        }
    } else if ethertype == ETH_P_IPV6 {
        if let Some(both) = reread::<32>(ctx, l3 + 8) {
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
