//! The XDP guard's parser and verdicts on fuzzed frames, run in the kernel with
//! BPF_PROG_TEST_RUN, against a model of the policy written here from its documented rules.
//! The action and the reason counter that moved must both agree with the model.
//!
//! Runs as root. The process moves into a network namespace of its own, where port 10250 has
//! a listener and nothing else exists, so the guard's socket lookup has one answer the model
//! can know.
#![no_main]

use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tether_agent::guard_program::{GuardProgram, KernelLogs, Layout, Policy};
use tether_agent_common::{Mode, Reason};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const LISTENER_PORT: u16 = 10250;
const PROTECTED: [u16; 2] = [10250, 10255];
const TUNNEL_PROTOCOLS: [u8; 6] = [4, 41, 47, 50, 115, 137];
const TUNNEL_PORTS: [u16; 3] = [4789, 6081, 8472];
const MAX_EXTENSION_HEADERS: usize = 8;
const MAX_CHAIN: usize = 512;
const MAX_L4_OFFSET: usize = 14 + 8 + MAX_CHAIN;

struct Guard {
    program: GuardProgram,
    _logs: KernelLogs,
    _listeners: [TcpListener; 2],
    mode: Mode,
}

fn guard() -> &'static Mutex<Guard> {
    static GUARD: OnceLock<Mutex<Guard>> = OnceLock::new();
    GUARD.get_or_init(|| {
        // SAFETY: called once, before this process opens any socket, from a single thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET) needs root");
        let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, LISTENER_PORT)).expect("listen v4");
        let v6 = socket_v6_only(LISTENER_PORT);
        let (mut program, logs) = GuardProgram::load(None).expect("load the guard");
        program
            .set_policy(&Policy {
                control_plane: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
                protected_ports: PROTECTED.to_vec(),
                allowed: vec!["192.168.7.0/24".parse().unwrap()],
                tunnel_protocols: TUNNEL_PROTOCOLS.to_vec(),
                tunnel_ports: TUNNEL_PORTS.to_vec(),
            })
            .expect("policy");
        program.set_mode(Mode::Enforce).expect("mode");
        Mutex::new(Guard {
            program,
            _logs: logs,
            _listeners: [v4, v6],
            mode: Mode::Enforce,
        })
    })
}

/// A listener on [::]:port that takes IPv6 only, so that IPv4 lookups find the IPv4 one
/// (std sets no IPV6_V6ONLY before bind).
fn socket_v6_only(port: u16) -> TcpListener {
    // SAFETY: plain socket calls on a descriptor this function owns until it hands it over;
    // the address structure is zeroed, then filled in.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let one: libc::c_int = 1;
        let size = size_of::<libc::c_int>() as libc::socklen_t;
        let rc = libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const one).cast(),
            size,
        );
        assert_eq!(rc, 0, "IPV6_V6ONLY");
        let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
        addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        addr.sin6_port = port.to_be();
        let size = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&raw const addr).cast(), size),
            0,
            "bind [::]:{port}"
        );
        assert_eq!(libc::listen(fd, 16), 0, "listen");
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}

/// What the policy says about a frame: the reason, and whether it is to be dropped.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Expected(Reason, bool);

const PASS: Expected = Expected(Reason::Pass, false);

struct Frame<'a>(&'a [u8]);

impl Frame<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.0
            .get(at..at + N)
            .map(|s| s.try_into().expect("length"))
    }
    fn be16(&self, at: usize) -> Option<u16> {
        self.bytes::<2>(at).map(u16::from_be_bytes)
    }
}

#[derive(Clone, Copy)]
enum Src {
    V4(usize),
    V6(usize),
}

impl Src {
    fn control_plane(self, f: &Frame) -> bool {
        match self {
            Src::V4(at) => f.bytes::<4>(at).is_some_and(|a| a[0] == 10),
            Src::V6(at) => f.bytes::<16>(at).is_some_and(|a| a[0] == 0xfd),
        }
    }
    fn allowed(self, f: &Frame) -> bool {
        match self {
            Src::V4(at) => f.bytes::<4>(at).is_some_and(|a| a[..3] == [192, 168, 7]),
            Src::V6(_) => false,
        }
    }
    fn malformed(self, f: &Frame) -> Expected {
        Expected(Reason::Malformed, self.control_plane(f))
    }
    fn unparseable(self, f: &Frame) -> Expected {
        Expected(Reason::Unparseable, !self.allowed(f))
    }
    fn fragment(self, f: &Frame) -> Expected {
        if self.control_plane(f) {
            Expected(Reason::Fragment, true)
        } else {
            PASS
        }
    }
    /// Cut short inside a header: a first fragment would be completed by reassembly.
    fn truncated(self, f: &Frame, first_fragment: bool) -> Expected {
        if first_fragment {
            self.unparseable(f)
        } else {
            self.malformed(f)
        }
    }
}

fn model(f: &Frame) -> Expected {
    let Some((ethertype, l3)) = f.be16(12).and_then(|e| past_tags(f, e, 14, 2)) else {
        return Expected(Reason::Malformed, false);
    };
    match ethertype {
        0x0800 => ipv4(f, l3),
        0x86dd => ipv6(f, l3),
        0x8100 | 0x88a8 => deeply_tagged(f, l3),
        _ => PASS,
    }
}

/// Up to `n` VLAN tags read past from `ethertype`, read just before `at`: the ethertype after
/// them and where its header starts; `None` when the frame ends inside a tag.
fn past_tags(f: &Frame, mut ethertype: u16, mut at: usize, n: usize) -> Option<(u16, usize)> {
    for _ in 0..n {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        ethertype = f.be16(at + 2)?;
        at += 4;
    }
    Some((ethertype, at))
}

/// Behind a third tag: up to eight tags in all are read past, and the source alone decides.
fn deeply_tagged(f: &Frame, l3: usize) -> Expected {
    let Some((ethertype, l3)) = past_tags(f, 0x8100, l3, 6) else {
        return Expected(Reason::Malformed, false);
    };
    match ethertype {
        0x0800 => Src::V4(l3 + 12).unparseable(f),
        0x86dd => Src::V6(l3 + 8).unparseable(f),
        0x8100 | 0x88a8 => Expected(Reason::Malformed, true),
        _ => PASS,
    }
}

fn ipv4(f: &Frame, l3: usize) -> Expected {
    let src = Src::V4(l3 + 12);
    let Some(h) = f.bytes::<20>(l3) else {
        return src.malformed(f);
    };
    let header_len = usize::from(h[0] & 0xf) * 4;
    if h[0] >> 4 != 4 || header_len < 20 {
        return src.malformed(f);
    }
    let more_fragments = h[6] & 0x20 != 0;
    let offset = u16::from_be_bytes([h[6] & 0x1f, h[7]]);
    if offset != 0 || (more_fragments && src.control_plane(f)) {
        return src.fragment(f);
    }
    let mut l4 = l3 + header_len;
    let mut protocol = h[9];
    // One authentication header is looked through; a second makes the packet unparseable.
    if protocol == 51 {
        let Some(&[following, len]) = f.0.get(l4..l4 + 2) else {
            return src.truncated(f, more_fragments);
        };
        if following == 51 {
            return src.unparseable(f);
        }
        protocol = following;
        l4 += (usize::from(len) + 2) * 4;
    }
    if protocol != 6 && protocol != 17 && f.0.len() < l4 {
        return src.truncated(f, more_fragments);
    }
    transport(f, src, protocol, l4, more_fragments)
}

fn ipv6(f: &Frame, l3: usize) -> Expected {
    let src = Src::V6(l3 + 8);
    let Some(h) = f.bytes::<40>(l3) else {
        return src.malformed(f);
    };
    if h[0] >> 4 != 6 {
        return src.malformed(f);
    }
    let mut first_fragment = false;
    let mut next = h[6];
    let mut at = l3 + 40;
    let mut walked = 0;
    while matches!(next, 0 | 43 | 44 | 51 | 60) {
        if walked == MAX_EXTENSION_HEADERS {
            return src.unparseable(f);
        }
        walked += 1;
        // The fragment header is judged on four bytes; the others need two.
        let need = if next == 44 { 4 } else { 2 };
        let Some(head) = f.0.get(at..at + need) else {
            return src.truncated(f, first_fragment);
        };
        let (following, len) = (head[0], head[1]);
        at += match next {
            // Authentication header: 4-octet units, less two.
            51 => (usize::from(len) + 2) * 4,
            44 => {
                let field = u16::from_be_bytes([head[2], head[3]]);
                if field >> 3 != 0 {
                    return src.fragment(f);
                }
                if field & 1 != 0 {
                    if src.control_plane(f) {
                        return src.fragment(f);
                    }
                    first_fragment = true;
                }
                8
            }
            // Hop-by-hop, routing, destination options: 8-octet units after the first.
            _ => (usize::from(len) + 1) * 8,
        };
        next = following;
        if at - l3 > MAX_CHAIN {
            return src.unparseable(f);
        }
    }
    transport(f, src, next, at, first_fragment)
}

fn transport(f: &Frame, src: Src, protocol: u8, l4: usize, first_fragment: bool) -> Expected {
    if l4 > MAX_L4_OFFSET {
        return src.unparseable(f);
    }
    let protected = |port: u16| PROTECTED.contains(&port);
    match protocol {
        6 => {
            let Some(h) = f.bytes::<20>(l4) else {
                return src.truncated(f, first_fragment);
            };
            if h[12] >> 4 < 5 {
                return src.malformed(f);
            }
            let (syn, rst, ack) = (h[13] & 0x02 != 0, h[13] & 0x04 != 0, h[13] & 0x10 != 0);
            let port = u16::from_be_bytes([h[2], h[3]]);
            if !syn || ack {
                let to_listener = port == LISTENER_PORT;
                if !syn && !rst && ack && src.control_plane(f) && to_listener {
                    return Expected(Reason::ControlPlaneToListener, true);
                }
                return PASS;
            }
            if src.control_plane(f) {
                return Expected(Reason::ControlPlaneSyn, true);
            }
            if protected(port) && !src.allowed(f) {
                return Expected(Reason::ProtectedPort, true);
            }
            PASS
        }
        17 => {
            let Some(h) = f.bytes::<8>(l4) else {
                return src.truncated(f, first_fragment);
            };
            let port = u16::from_be_bytes([h[2], h[3]]);
            if protected(port) && !src.allowed(f) {
                Expected(Reason::ProtectedPort, true)
            } else if TUNNEL_PORTS.contains(&port) && src.control_plane(f) {
                Expected(Reason::Encapsulated, true)
            } else {
                PASS
            }
        }
        // SCTP (the first chunk's type after a 12-octet header) and DCCP (the packet type in
        // bits 1-4 of the ninth octet): an INIT or a Request from the control plane opens a
        // connection.
        132 | 33 => {
            let at = if protocol == 132 { 12 } else { 8 };
            let Some([kind, _]) = f.bytes::<2>(l4 + at) else {
                return src.truncated(f, first_fragment);
            };
            let opens = if protocol == 132 {
                kind == 1
            } else {
                (kind >> 1) & 0x0f == 0
            };
            if opens && src.control_plane(f) {
                Expected(Reason::ControlPlaneSyn, true)
            } else {
                PASS
            }
        }
        _ if TUNNEL_PROTOCOLS.contains(&protocol) && src.control_plane(f) => {
            Expected(Reason::Encapsulated, true)
        }
        _ => PASS,
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the mode (and the device layout, below); the rest is the frame (the
    // kernel wants a whole Ethernet header, and frames fit a page).
    let Some((&flags, frame)) = data.split_first() else {
        return;
    };
    if frame.len() < 14 || frame.len() > 1600 {
        return;
    }
    let mode = if flags & 1 == 0 {
        Mode::Enforce
    } else {
        Mode::Monitor
    };
    let mut guard = guard().lock().expect("guard lock");
    if guard.mode != mode {
        guard.program.set_mode(mode).expect("mode");
        guard.mode = mode;
    }
    // The second bit runs the guard for IP-first devices on the frame without its Ethernet
    // header, when the header names the version the IP header has: the same packet must get
    // the same verdict on either device. (The test run wants 14 bytes at least.)
    let version = frame.get(14).map(|b| b >> 4);
    let ip_first = flags & 2 != 0
        && frame.len() >= 28
        && matches!(
            (&frame[12..14], version),
            ([0x08, 0x00], Some(4)) | ([0x86, 0xdd], Some(6))
        );
    let before = guard.program.counters().expect("counters");
    let action = if ip_first {
        guard
            .program
            .run_packet_as(Layout::Ip, &frame[14..])
            .expect("test run")
    } else {
        guard.program.run_packet(frame).expect("test run")
    };
    let after = guard.program.counters().expect("counters");
    let Expected(reason, drop) = model(&Frame(frame));
    let enforce = mode == Mode::Enforce;
    let want_action = if drop && enforce { XDP_DROP } else { XDP_PASS };
    let moved: Vec<(Reason, bool)> = before
        .iter()
        .zip(&after)
        .flat_map(|(b, a)| {
            let passed = a.passed.packets - b.passed.packets;
            let dropped = a.dropped.packets - b.dropped.packets;
            std::iter::repeat_n((a.reason, false), passed as usize)
                .chain(std::iter::repeat_n((a.reason, true), dropped as usize))
        })
        .collect();
    assert_eq!(
        (action, moved.as_slice()),
        (want_action, &[(reason, drop && enforce)][..]),
        "the guard disagrees with the model ({reason:?}, drop {drop}, {mode:?}, IP first {ip_first}) on {frame:02x?}"
    );
});
