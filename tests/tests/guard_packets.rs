//! The XDP guard's verdicts, run in the real kernel with BPF_PROG_TEST_RUN on hand-built
//! frames: every verdict and every malformed shape, each with the counter it must move.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use tether_agent::guard_program::{GuardProgram, KernelLogs, Layout, Policy};
use tether_agent_common::{Mode, Reason};
use tether_tests::packets::*;
use tether_tests::require_root;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CP4: [u8; 4] = [10, 1, 2, 3];
const OTHER4: [u8; 4] = [172, 16, 0, 9];
const ALLOWED4: [u8; 4] = [192, 168, 7, 7];
const NODE4: [u8; 4] = [10, 200, 0, 2];
const CP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const OTHER6: [u8; 16] = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const NODE6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn guard(mode: Mode) -> (GuardProgram, KernelLogs) {
    require_root();
    let (mut program, logs) = GuardProgram::load(None).unwrap();
    program
        .set_policy(&Policy {
            control_plane: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            protected_ports: vec![10250, 10255],
            allowed: vec!["192.168.7.0/24".parse().unwrap()],
            tunnel_protocols: tether_agent_common::TUNNEL_PROTOCOLS
                .iter()
                .map(|(protocol, _)| *protocol)
                .collect(),
            tunnel_ports: vec![4789, 6081, 8472],
        })
        .unwrap();
    program.set_mode(mode).unwrap();
    (program, logs)
}

/// Runs `packet` and checks the action and that exactly the expected counter moved by one.
fn expect(
    program: &mut GuardProgram,
    name: &str,
    packet: &[u8],
    action: u32,
    reason: Reason,
    dropped: bool,
) {
    let before = program.counters().unwrap();
    let got = program.run_packet(packet).unwrap();
    assert_eq!(got, action, "{name}: wrong XDP action");
    let after = program.counters().unwrap();
    for (b, a) in before.iter().zip(&after) {
        let moved_passed = a.passed.packets - b.passed.packets;
        let moved_dropped = a.dropped.packets - b.dropped.packets;
        let want_passed = u64::from(a.reason == reason && !dropped);
        let want_dropped = u64::from(a.reason == reason && dropped);
        assert_eq!(
            (moved_passed, moved_dropped),
            (want_passed, want_dropped),
            "{name}: counter for {} moved by (passed {moved_passed}, dropped {moved_dropped})",
            a.reason.label()
        );
    }
}

fn syn4(src: [u8; 4], port: u16) -> Vec<u8> {
    frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(src, NODE4, TCP, 20, 0, 0),
        &tcp(port, SYN, 0),
    ])
}

#[test]
fn ipv4_verdicts() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let drop = |g: &mut GuardProgram, name, p: &[u8], r| expect(g, name, p, XDP_DROP, r, true);
    let pass =
        |g: &mut GuardProgram, name, p: &[u8]| expect(g, name, p, XDP_PASS, Reason::Pass, false);

    drop(
        &mut g,
        "control-plane SYN to any port",
        &syn4(CP4, 443),
        Reason::ControlPlaneSyn,
    );
    drop(
        &mut g,
        "control-plane SYN to the kubelet",
        &syn4(CP4, 10250),
        Reason::ControlPlaneSyn,
    );
    let syn_ack = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 20, 0, 0),
        &tcp(40000, SYN | ACK, 0),
    ]);
    pass(
        &mut g,
        "control-plane SYN-ACK (reply to the node's own dial)",
        &syn_ack,
    );
    let ack = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 20, 0, 0),
        &tcp(10250, ACK, 0),
    ]);
    pass(&mut g, "control-plane established segment", &ack);
    drop(
        &mut g,
        "SYN to a protected port from elsewhere",
        &syn4(OTHER4, 10255),
        Reason::ProtectedPort,
    );
    pass(
        &mut g,
        "SYN to a protected port from an allowed source",
        &syn4(ALLOWED4, 10250),
    );
    pass(
        &mut g,
        "SYN to an unprotected port from elsewhere",
        &syn4(OTHER4, 8080),
    );
    let udp_kubelet = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(OTHER4, NODE4, UDP, 12, 0, 0),
        &udp(10255, 4),
    ]);
    drop(
        &mut g,
        "UDP to a protected port",
        &udp_kubelet,
        Reason::ProtectedPort,
    );
    let udp_dns = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, UDP, 12, 0, 0),
        &udp(53, 4),
    ]);
    pass(&mut g, "UDP reply from the control plane", &udp_dns);
    let with_options = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 32, 3, 0),
        &tcp(443, SYN, 3),
    ]);
    drop(
        &mut g,
        "SYN with IP and TCP options",
        &with_options,
        Reason::ControlPlaneSyn,
    );
    let first_fragment = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 20, 0, 0x2000),
        &tcp(443, SYN, 0),
    ]);
    drop(
        &mut g,
        "first fragment from the control plane",
        &first_fragment,
        Reason::Fragment,
    );
    let later_fragment = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 8, 0, 0x0010),
        &[0u8; 8],
    ]);
    drop(
        &mut g,
        "later fragment from the control plane",
        &later_fragment,
        Reason::Fragment,
    );
    let other_fragment = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(OTHER4, NODE4, UDP, 8, 0, 0x2000),
        &udp(53, 0),
    ]);
    pass(&mut g, "fragment from elsewhere", &other_fragment);
    let icmp = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, ICMP, 8, 0, 0),
        &[3, 4, 0, 0, 0, 0, 5, 0xdc],
    ]);
    pass(
        &mut g,
        "ICMP fragmentation-needed from the control plane",
        &icmp,
    );
    let arp = frame(&[&ethernet(&[], ETH_ARP), &[0u8; 28]]);
    pass(&mut g, "ARP", &arp);
}

#[test]
fn vlan_tags_are_looked_through() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let tagged = frame(&[
        &ethernet(&[VLAN], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 20, 0, 0),
        &tcp(443, SYN, 0),
    ]);
    expect(
        &mut g,
        "802.1Q",
        &tagged,
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
    let qinq = frame(&[
        &ethernet(&[QINQ, VLAN], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 20, 0, 0),
        &tcp(443, SYN, 0),
    ]);
    expect(
        &mut g,
        "802.1ad + 802.1Q",
        &qinq,
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
    // Linux strips any number of priority tags (VLAN ID 0) and delivers what is inside, so
    // behind a third tag the source alone decides: only one allowed on protected ports gets
    // through, and past eight tags nothing does.
    let tagged = |tags: usize, source: [u8; 4], port: u16| {
        frame(&[
            &ethernet(&vec![VLAN; tags], ETH_IP),
            &ipv4(source, NODE4, TCP, 20, 0, 0),
            &tcp(port, SYN, 0),
        ])
    };
    for tags in [3, 8] {
        for (name, source) in [("the control plane", CP4), ("elsewhere", OTHER4)] {
            expect(
                &mut g,
                &format!("{tags} tags, from {name}"),
                &tagged(tags, source, 443),
                XDP_DROP,
                Reason::Unparseable,
                true,
            );
        }
        expect(
            &mut g,
            &format!("{tags} tags, from an allowed source"),
            &tagged(tags, ALLOWED4, 10250),
            XDP_PASS,
            Reason::Unparseable,
            false,
        );
    }
    expect(
        &mut g,
        "nine tags",
        &tagged(9, ALLOWED4, 443),
        XDP_DROP,
        Reason::Malformed,
        true,
    );
}

#[test]
fn ipv6_verdicts_through_extension_chains() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let syn6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(CP6, NODE6, TCP, 20),
        &tcp(443, SYN, 0),
    ]);
    expect(
        &mut g,
        "IPv6 control-plane SYN",
        &syn6,
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
    let chain = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(CP6, NODE6, 0, 48),
        &ipv6_extension(43, 1),
        &ipv6_extension(60, 2),
        &ipv6_extension(TCP, 1),
        &tcp(443, SYN, 0),
    ]);
    expect(
        &mut g,
        "hop-by-hop, routing, destination options, TCP",
        &chain,
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
    let udp6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 60, 16),
        &ipv6_extension(UDP, 1),
        &udp(10250, 0),
    ]);
    expect(
        &mut g,
        "IPv6 UDP to a protected port",
        &udp6,
        XDP_DROP,
        Reason::ProtectedPort,
        true,
    );
    let frag6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(CP6, NODE6, 44, 28),
        &ipv6_fragment(TCP, 0, true),
        &tcp(443, SYN, 0),
    ]);
    expect(
        &mut g,
        "IPv6 fragment from the control plane",
        &frag6,
        XDP_DROP,
        Reason::Fragment,
        true,
    );
    let frag6_other = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 44, 16),
        &ipv6_fragment(UDP, 0, true),
        &udp(53, 0),
    ]);
    expect(
        &mut g,
        "IPv6 fragment from elsewhere",
        &frag6_other,
        XDP_PASS,
        Reason::Pass,
        false,
    );
    let mut eight = vec![ethernet(&[], ETH_IPV6), ipv6(CP6, NODE6, 60, 8 * 8 + 20)];
    for i in 0..8 {
        eight.push(ipv6_extension(if i == 7 { TCP } else { 60 }, 1));
    }
    eight.push(tcp(443, SYN, 0));
    let refs: Vec<&[u8]> = eight.iter().map(Vec::as_slice).collect();
    expect(
        &mut g,
        "eight extension headers are followed",
        &frame(&refs),
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
}

/// The ways around the port check that fragments and long header chains used to open: each
/// packet here passed before, from any source outside the control plane.
#[test]
fn fragments_and_long_chains_do_not_skip_the_port_check() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let drop = |g: &mut GuardProgram, name, p: &[u8], r| expect(g, name, p, XDP_DROP, r, true);
    let first4 = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(OTHER4, NODE4, TCP, 20, 0, 0x2000),
        &tcp(10250, SYN, 0),
    ]);
    drop(
        &mut g,
        "IPv4 first fragment: SYN to the kubelet",
        &first4,
        Reason::ProtectedPort,
    );
    let first4_udp = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(OTHER4, NODE4, UDP, 16, 0, 0x2000),
        &udp(10255, 8),
    ]);
    drop(
        &mut g,
        "IPv4 first fragment: UDP to a protected port",
        &first4_udp,
        Reason::ProtectedPort,
    );
    // RFC 1858's tiny fragment: the ports fit, the flags are in the next piece.
    let tiny = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(OTHER4, NODE4, TCP, 8, 0, 0x2000),
        &tcp(10250, SYN, 0)[..8],
    ]);
    drop(
        &mut g,
        "IPv4 first fragment cut inside TCP",
        &tiny,
        Reason::Unparseable,
    );
    let tiny_allowed = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(ALLOWED4, NODE4, TCP, 8, 0, 0x2000),
        &tcp(10250, SYN, 0)[..8],
    ]);
    expect(
        &mut g,
        "the same from an allowed source",
        &tiny_allowed,
        XDP_PASS,
        Reason::Unparseable,
        false,
    );
    let atomic = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 44, 28),
        &ipv6_fragment(TCP, 0, false),
        &tcp(10250, SYN, 0),
    ]);
    drop(
        &mut g,
        "IPv6 atomic fragment: SYN to the kubelet",
        &atomic,
        Reason::ProtectedPort,
    );
    let atomic_cp = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(CP6, NODE6, 44, 28),
        &ipv6_fragment(TCP, 0, false),
        &tcp(443, SYN, 0),
    ]);
    drop(
        &mut g,
        "IPv6 atomic fragment from the control plane is a plain SYN",
        &atomic_cp,
        Reason::ControlPlaneSyn,
    );
    let first6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 44, 28),
        &ipv6_fragment(TCP, 0, true),
        &tcp(10250, SYN, 0),
    ]);
    drop(
        &mut g,
        "IPv6 first fragment: SYN to the kubelet",
        &first6,
        Reason::ProtectedPort,
    );
    let later6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 44, 16),
        &ipv6_fragment(TCP, 1, false),
        &[0u8; 8],
    ]);
    expect(
        &mut g,
        "IPv6 later fragment from elsewhere (its first piece decides)",
        &later6,
        XDP_PASS,
        Reason::Pass,
        false,
    );
    let mut nine = vec![ethernet(&[], ETH_IPV6), ipv6(OTHER6, NODE6, 60, 8 * 9 + 20)];
    for i in 0..9 {
        nine.push(ipv6_extension(if i == 8 { TCP } else { 60 }, 1));
    }
    nine.push(tcp(10250, SYN, 0));
    let refs: Vec<&[u8]> = nine.iter().map(Vec::as_slice).collect();
    drop(
        &mut g,
        "IPv6 chain longer than followed",
        &frame(&refs),
        Reason::Unparseable,
    );
    let long_options = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 60, 70 * 8 + 20),
        &ipv6_extension(TCP, 70),
        &tcp(10250, SYN, 0),
    ]);
    drop(
        &mut g,
        "IPv6 destination options longer than read",
        &long_options,
        Reason::Unparseable,
    );
    let mut ah = vec![TCP, 1];
    ah.resize(12, 0);
    let with_ah = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 51, 12 + 20),
        &ah,
        &tcp(10250, SYN, 0),
    ]);
    drop(
        &mut g,
        "IPv6 authentication header before TCP",
        &with_ah,
        Reason::ProtectedPort,
    );
}

/// Tunnels from the control plane: the packet inside would be decapsulated on a device the
/// guard is not on. Dropped unless the operator allows that tunnel.
#[test]
fn tunnels_from_the_control_plane_are_dropped_unless_allowed() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let inner = frame(&[&ipv4(CP4, NODE4, TCP, 20, 0, 0), &tcp(10250, SYN, 0)]);
    for (name, protocol) in [("IPIP", 4), ("IPv6 in IPv4", 41), ("GRE", 47), ("ESP", 50)] {
        let outer = frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(CP4, NODE4, protocol, inner.len(), 0, 0),
            &inner,
        ]);
        expect(&mut g, name, &outer, XDP_DROP, Reason::Encapsulated, true);
        let elsewhere = frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(OTHER4, NODE4, protocol, inner.len(), 0, 0),
            &inner,
        ]);
        expect(
            &mut g,
            "the same from elsewhere",
            &elsewhere,
            XDP_PASS,
            Reason::Pass,
            false,
        );
    }
    let in6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(CP6, NODE6, 4, inner.len()),
        &inner,
    ]);
    expect(
        &mut g,
        "IPv4 in IPv6",
        &in6,
        XDP_DROP,
        Reason::Encapsulated,
        true,
    );
    for port in [4789, 8472, 6081] {
        let vxlan = frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(CP4, NODE4, UDP, 8 + 8 + 14 + inner.len(), 0, 0),
            &udp(port, 8 + 14 + inner.len()),
        ]);
        expect(
            &mut g,
            "UDP tunnel",
            &vxlan,
            XDP_DROP,
            Reason::Encapsulated,
            true,
        );
    }
    g.set_policy(&Policy {
        control_plane: vec!["10.0.0.0/8".parse().unwrap()],
        tunnel_protocols: vec![4, 41, 50],
        tunnel_ports: vec![4789, 6081],
        ..Policy::default()
    })
    .unwrap();
    let gre = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, 47, inner.len(), 0, 0),
        &inner,
    ]);
    expect(&mut g, "allowed GRE", &gre, XDP_PASS, Reason::Pass, false);
    let flannel = frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CP4, NODE4, UDP, 8 + 64, 0, 0),
        &udp(8472, 64),
    ]);
    expect(
        &mut g,
        "allowed UDP port",
        &flannel,
        XDP_PASS,
        Reason::Pass,
        false,
    );
}

#[test]
fn truncated_packets_are_malformed_and_dropped_only_from_the_control_plane() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let cut = |p: Vec<u8>, len: usize| p[..len].to_vec();
    let vlan_cut = cut(frame(&[&ethernet(&[VLAN], ETH_IP), &[0u8; 20]]), 16);
    expect(
        &mut g,
        "cut inside a VLAN tag",
        &vlan_cut,
        XDP_PASS,
        Reason::Malformed,
        false,
    );
    let ip_cut = cut(syn4(CP4, 443), 14 + 10);
    expect(
        &mut g,
        "cut before the source address",
        &ip_cut,
        XDP_PASS,
        Reason::Malformed,
        false,
    );
    // The first octets say control plane (fd00::/8 is whole /16s), but the address is cut:
    // an unreadable source is nobody's.
    let ip6_cut = cut(
        frame(&[
            &ethernet(&[], ETH_IPV6),
            &ipv6(CP6, NODE6, TCP, 20),
            &tcp(443, SYN, 0),
        ]),
        14 + 8 + 10,
    );
    expect(
        &mut g,
        "cut inside the IPv6 source address",
        &ip6_cut,
        XDP_PASS,
        Reason::Malformed,
        false,
    );
    let options_cut = cut(
        frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(CP4, NODE4, TCP, 20, 4, 0),
            &tcp(443, SYN, 0),
        ]),
        14 + 24,
    );
    expect(
        &mut g,
        "cut inside IPv4 options, control plane",
        &options_cut,
        XDP_DROP,
        Reason::Malformed,
        true,
    );
    let tcp_cut = cut(syn4(CP4, 443), 14 + 20 + 12);
    expect(
        &mut g,
        "cut inside TCP, control plane",
        &tcp_cut,
        XDP_DROP,
        Reason::Malformed,
        true,
    );
    let tcp_cut_other = cut(syn4(OTHER4, 443), 14 + 20 + 12);
    expect(
        &mut g,
        "cut inside TCP, elsewhere",
        &tcp_cut_other,
        XDP_PASS,
        Reason::Malformed,
        false,
    );
    let udp_cut = cut(
        frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(CP4, NODE4, UDP, 8, 0, 0),
            &udp(53, 0),
        ]),
        14 + 20 + 4,
    );
    expect(
        &mut g,
        "cut inside UDP, control plane",
        &udp_cut,
        XDP_DROP,
        Reason::Malformed,
        true,
    );
    let mut bad_version = syn4(CP4, 443);
    bad_version[14] = 0x55;
    expect(
        &mut g,
        "IPv4 EtherType with version 5",
        &bad_version,
        XDP_DROP,
        Reason::Malformed,
        true,
    );
    let mut short_ihl = syn4(CP4, 443);
    short_ihl[14] = 0x44;
    expect(
        &mut g,
        "IHL below 5",
        &short_ihl,
        XDP_DROP,
        Reason::Malformed,
        true,
    );
    let v6_cut = cut(
        frame(&[
            &ethernet(&[], ETH_IPV6),
            &ipv6(CP6, NODE6, 0, 8),
            &ipv6_extension(TCP, 1),
        ]),
        14 + 40 + 1,
    );
    expect(
        &mut g,
        "cut inside an IPv6 extension header",
        &v6_cut,
        XDP_DROP,
        Reason::Malformed,
        true,
    );
}

#[test]
fn monitor_counts_what_it_would_drop_and_off_counts_nothing() {
    let (mut g, _logs) = guard(Mode::Monitor);
    expect(
        &mut g,
        "monitor: control-plane SYN",
        &syn4(CP4, 443),
        XDP_PASS,
        Reason::ControlPlaneSyn,
        false,
    );
    g.set_mode(Mode::Off).unwrap();
    let before = g.counters().unwrap();
    assert_eq!(g.run_packet(&syn4(CP4, 443)).unwrap(), XDP_PASS);
    assert_eq!(g.counters().unwrap(), before, "off must not count");
    g.set_mode(Mode::Enforce).unwrap();
    expect(
        &mut g,
        "enforce again, no reload",
        &syn4(CP4, 443),
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
}

/// A control-plane prefix written in its IPv4-mapped IPv6 form guards the IPv4 addresses it
/// maps (it used to be stored as IPv6, which no IPv4 packet ever matches).
#[test]
fn ipv4_mapped_prefixes_guard_ipv4_sources() {
    let (mut g, _logs) = guard(Mode::Enforce);
    g.set_policy(&Policy {
        control_plane: vec!["::ffff:172.16.0.0/108".parse().unwrap()],
        protected_ports: vec![10250],
        ..Policy::default()
    })
    .unwrap();
    expect(
        &mut g,
        "SYN from a source in the mapped prefix",
        &syn4(OTHER4, 443),
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
}

#[test]
fn policy_changes_apply_at_runtime() {
    let (mut g, _logs) = guard(Mode::Enforce);
    expect(
        &mut g,
        "before",
        &syn4(OTHER4, 8080),
        XDP_PASS,
        Reason::Pass,
        false,
    );
    g.set_policy(&Policy {
        control_plane: vec!["172.16.0.0/12".parse().unwrap()],
        protected_ports: vec![8080],
        ..Policy::default()
    })
    .unwrap();
    expect(
        &mut g,
        "after adding the prefix",
        &syn4(OTHER4, 8080),
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
    expect(
        &mut g,
        "old prefix removed",
        &syn4(CP4, 443),
        XDP_PASS,
        Reason::Pass,
        false,
    );
    expect(
        &mut g,
        "old port removed",
        &syn4(ALLOWED4, 10250),
        XDP_PASS,
        Reason::Pass,
        false,
    );
}

/// Control-plane membership is answered by the table's levels (/16, /24, address) and, where
/// the table has no room or no levels (IPv6 past /16), by the tries: each answer, in the
/// kernel, agrees with the prefixes, also after a change that rewrites every block.
#[test]
fn control_plane_table_levels_and_trie_agree_with_the_prefixes() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let verdict = |g: &mut GuardProgram, source: [u8; 4]| g.run_packet(&syn4(source, 443)).unwrap();
    let verdict6 = |g: &mut GuardProgram, source: [u8; 16]| {
        let packet = frame(&[
            &ethernet(&[], ETH_IPV6),
            &ipv6(source, NODE6, TCP, 20),
            &tcp(443, SYN, 0),
        ]);
        g.run_packet(&packet).unwrap()
    };
    let check = |g: &mut GuardProgram, cases: &[([u8; 4], bool)]| {
        for (source, control_plane) in cases {
            let want = if *control_plane { XDP_DROP } else { XDP_PASS };
            assert_eq!(verdict(g, *source), want, "{source:?}");
        }
    };
    // One /32 in each of 300 /16s, more than the table has blocks for: some are left to the
    // trie, and every one must still be dropped.
    let scattered: Vec<_> = (0..300u16)
        .map(|i| {
            let [a, b] = (0x6400 + i).to_be_bytes();
            [a, b, 1, 1]
        })
        .collect();
    let mut control_plane: Vec<tether_agent::guard_program::Cidr> = [
        "10.88.0.1/32",
        "10.88.0.64/26",
        "10.88.7.0/24",
        "10.89.0.0/17",
        "172.16.0.0/12",
        "fd00::/16",
        "2001:db8:1::/48",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    control_plane.extend(scattered.iter().map(|a| tether_agent::guard_program::Cidr {
        addr: std::net::Ipv4Addr::from(*a).into(),
        len: 32,
    }));
    g.set_policy(&Policy {
        control_plane,
        ..Policy::default()
    })
    .unwrap();
    check(
        &mut g,
        &[
            ([10, 88, 0, 1], true),
            ([10, 88, 0, 2], false),
            ([10, 88, 0, 64], true),
            ([10, 88, 0, 127], true),
            ([10, 88, 0, 128], false),
            ([10, 88, 7, 9], true),
            ([10, 88, 8, 9], false),
            ([10, 89, 127, 1], true),
            ([10, 89, 128, 1], false),
            ([172, 31, 0, 1], true),
            ([172, 32, 0, 1], false),
            ([192, 168, 7, 7], false),
        ],
    );
    for source in &scattered {
        assert_eq!(verdict(&mut g, *source), XDP_DROP, "{source:?}");
        let mut neighbour = *source;
        neighbour[3] = 2;
        assert_eq!(verdict(&mut g, neighbour), XDP_PASS, "{neighbour:?}");
    }
    let v6 = |text: &str| text.parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!(verdict6(&mut g, v6("fd00::9")), XDP_DROP);
    assert_eq!(verdict6(&mut g, v6("fd01::9")), XDP_PASS);
    assert_eq!(verdict6(&mut g, v6("2001:db8:1::9")), XDP_DROP);
    assert_eq!(verdict6(&mut g, v6("2001:db8:2::9")), XDP_PASS);

    // Blocks are handed out anew: 10.88's block now holds other addresses.
    g.set_policy(&Policy {
        control_plane: ["10.88.0.2/32", "10.90.0.0/24"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect(),
        ..Policy::default()
    })
    .unwrap();
    check(
        &mut g,
        &[
            ([10, 88, 0, 1], false),
            ([10, 88, 0, 2], true),
            ([10, 88, 0, 64], false),
            ([10, 88, 7, 9], false),
            ([10, 89, 0, 1], false),
            ([10, 90, 0, 200], true),
            ([10, 90, 1, 1], false),
            ([172, 16, 0, 1], false),
            ([100, 0, 1, 1], false),
        ],
    );
    assert_eq!(verdict6(&mut g, v6("fd00::9")), XDP_PASS);
}

/// Each drop is reported through the ring buffer with its addresses, ports and reason, at most
/// EVENTS_PER_SECOND per CPU; the next event after the budget ran out says how many were left
/// out.
#[test]
fn drops_are_reported_as_sampled_events() {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    use tether_agent_common::{EVENT_CLOCK_EVERY, EVENTS_PER_SECOND};

    let (mut program, _logs) = guard(Mode::Enforce);
    let mut events = program.drop_events().unwrap();
    // One CPU, so one budget: the counts below are exact.
    let mut cpu = CpuSet::new();
    cpu.set(0).unwrap();
    sched_setaffinity(Pid::from_raw(0), &cpu).unwrap();

    let syn = frame(&[
        &ethernet(&[VLAN], ETH_IP),
        &ipv4(CP4, NODE4, TCP, 20, 0, 0),
        &tcp(22, SYN, 0),
    ]);
    assert_eq!(program.run_packet(&syn).unwrap(), XDP_DROP);
    let udp6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(OTHER6, NODE6, 60, 8 + 16),
        &ipv6_extension(UDP, 1),
        &udp(10255, 8),
    ]);
    assert_eq!(program.run_packet(&udp6).unwrap(), XDP_DROP);
    let got = events.drain();
    assert_eq!(got.len(), 2, "{got:#?}");
    let (syn_event, udp_event) = (&got[0], &got[1]);
    assert_eq!(syn_event.reason, Some(Reason::ControlPlaneSyn));
    assert!(syn_event.dropped);
    assert_eq!(syn_event.source, Some(std::net::IpAddr::from(CP4)));
    assert_eq!(syn_event.destination, Some(std::net::IpAddr::from(NODE4)));
    assert_eq!(
        (
            syn_event.protocol,
            syn_event.source_port,
            syn_event.destination_port
        ),
        ("tcp", 40000, 22)
    );
    assert_eq!(udp_event.reason, Some(Reason::ProtectedPort));
    assert_eq!(udp_event.source, Some(std::net::IpAddr::from(OTHER6)));
    assert_eq!(udp_event.destination, Some(std::net::IpAddr::from(NODE6)));
    assert_eq!(
        (
            udp_event.protocol,
            udp_event.source_port,
            udp_event.destination_port
        ),
        ("udp", 5353, 10255)
    );

    // A fresh window: wait it out, then flood it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Small enough that the packet after the window ends still reads the clock.
    const FLOOD: u32 = 30;
    const _: () = assert!(FLOOD - EVENTS_PER_SECOND < EVENT_CLOCK_EVERY);
    for _ in 0..FLOOD {
        assert_eq!(program.run_packet(&syn).unwrap(), XDP_DROP);
    }
    let flood = events.drain();
    assert_eq!(flood.len(), EVENTS_PER_SECOND as usize);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(program.run_packet(&syn).unwrap(), XDP_DROP);
    let next = events.drain();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].suppressed, FLOOD - EVENTS_PER_SECOND);
}

/// A segment from the control plane that is not a SYN is looked up among the node's sockets:
/// the return traffic of a connection the node opened passes, one that a listener would take
/// (a SYN-cookie ACK, a probe) is dropped. Sockets are real, in a namespace of this test's.
#[test]
fn control_plane_segments_reach_connections_not_listeners() {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use tether_tests::netns::Netns;

    require_root();
    let ns = Netns::new("skc").unwrap();
    for address in ["10.1.2.3/32", "10.200.0.2/32", "fd00::1/128", "fe80::2/128"] {
        ns.ip(&["addr", "add", address, "dev", "lo"]).unwrap();
    }
    ns.run(|| {
        let (mut g, _logs) = guard(Mode::Enforce);
        // The node's own connection to the control plane, from its port `local` to CP:40000
        // (the source port every built segment carries).
        let service = TcpListener::bind((std::net::Ipv4Addr::from(CP4), 40000)).unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from((NODE4, 0)).into()).unwrap();
        socket
            .connect(&SocketAddr::from((CP4, 40000)).into())
            .unwrap();
        let own = TcpStream::from(socket);
        let local = own.local_addr().unwrap().port();
        let _accepted = service.accept().unwrap();
        let kubelet = TcpListener::bind("0.0.0.0:10250").unwrap();
        let kubelet6 = TcpListener::bind("[::]:10251").unwrap();

        let segment = |src: [u8; 4], port: u16, flags: u8| {
            frame(&[
                &ethernet(&[], ETH_IP),
                &ipv4(src, NODE4, TCP, 20, 0, 0),
                &tcp(port, flags, 0),
            ])
        };
        let pass = |g: &mut GuardProgram, name, p: &[u8]| {
            expect(g, name, p, XDP_PASS, Reason::Pass, false)
        };
        pass(
            &mut g,
            "ACK on the node's own connection",
            &segment(CP4, local, ACK),
        );
        expect(
            &mut g,
            "ACK from the control plane to a listener",
            &segment(CP4, 10250, ACK),
            XDP_DROP,
            Reason::ControlPlaneToListener,
            true,
        );
        expect(
            &mut g,
            "ACK with data (PSH) to a listener",
            &segment(CP4, 10250, ACK | 0x08),
            XDP_DROP,
            Reason::ControlPlaneToListener,
            true,
        );
        pass(
            &mut g,
            "RST to a listener (the kernel drops it anyway)",
            &segment(CP4, 10250, 0x04 | ACK),
        );
        pass(
            &mut g,
            "ACK to a port nothing listens on (the kernel answers RST)",
            &segment(CP4, 10999, ACK),
        );
        pass(
            &mut g,
            "ACK to a listener from outside the control plane",
            &segment(OTHER4, 10250, ACK),
        );
        let ack6 = frame(&[
            &ethernet(&[], ETH_IPV6),
            &ipv6(CP6, NODE6, TCP, 20),
            &tcp(10251, ACK, 0),
        ]);
        expect(
            &mut g,
            "IPv6 ACK from the control plane to a listener",
            &ack6,
            XDP_DROP,
            Reason::ControlPlaneToListener,
            true,
        );
        drop((own, kubelet, kubelet6));
    })
    .unwrap();
}

/// Which counter one run moved: (reason, dropped).
fn run_counted(program: &mut GuardProgram, layout: Layout, packet: &[u8]) -> (u32, Reason, bool) {
    let before = program.counters().unwrap();
    let action = program.run_packet_as(layout, packet).unwrap();
    let after = program.counters().unwrap();
    let moved: Vec<(Reason, bool)> = before
        .iter()
        .zip(&after)
        .flat_map(|(b, a)| {
            let passed = a.passed.packets - b.passed.packets;
            let dropped = a.dropped.packets - b.dropped.packets;
            [(a.reason, false, passed), (a.reason, true, dropped)]
        })
        .filter(|(_, _, n)| *n > 0)
        .map(|(reason, dropped, n)| {
            assert_eq!(n, 1, "one run moved {} by {n}", reason.label());
            (reason, dropped)
        })
        .collect();
    assert_eq!(moved.len(), 1, "one run moved {moved:?}");
    (action, moved[0].0, moved[0].1)
}

/// Devices whose frames begin with the IP header (tun, WireGuard, ipip, sit, PPP) get the
/// guard for that layout, which decides every packet as the Ethernet guard decides the same
/// packet behind an Ethernet header. Read with the Ethernet layout, the same bytes would all
/// pass: two octets of the source address stand where the ethertype is looked for.
#[test]
fn ip_first_frames_get_the_verdicts_ethernet_frames_get() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let v4 = |src, protocol, l4: &[u8], fragment| {
        frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(src, NODE4, protocol, l4.len(), 0, fragment),
            l4,
        ])
    };
    let v6 = |src, next, l4: &[u8]| {
        frame(&[
            &ethernet(&[], ETH_IPV6),
            &ipv6(src, NODE6, next, l4.len()),
            l4,
        ])
    };
    let cases: Vec<(&str, Vec<u8>, Reason, bool)> = vec![
        (
            "control-plane SYN",
            v4(CP4, TCP, &tcp(443, SYN, 0), 0),
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "control-plane SYN with IP options",
            frame(&[
                &ethernet(&[], ETH_IP),
                &ipv4(CP4, NODE4, TCP, 20, 2, 0),
                &tcp(443, SYN, 0),
            ]),
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "established segment from elsewhere",
            v4(OTHER4, TCP, &tcp(443, ACK, 0), 0),
            Reason::Pass,
            false,
        ),
        (
            "SYN to a protected port from elsewhere",
            v4(OTHER4, TCP, &tcp(10250, SYN, 0), 0),
            Reason::ProtectedPort,
            true,
        ),
        (
            "SYN to a protected port from an allowed source",
            v4(ALLOWED4, TCP, &tcp(10250, SYN, 0), 0),
            Reason::Pass,
            false,
        ),
        (
            "UDP to a protected port from elsewhere",
            v4(OTHER4, UDP, &udp(10255, 4), 0),
            Reason::ProtectedPort,
            true,
        ),
        (
            "VXLAN from the control plane",
            v4(CP4, UDP, &udp(4789, 8), 0),
            Reason::Encapsulated,
            true,
        ),
        (
            "IPIP from the control plane",
            v4(CP4, 4, &ipv4(CP4, NODE4, TCP, 0, 0, 0), 0),
            Reason::Encapsulated,
            true,
        ),
        (
            "a later fragment from the control plane",
            v4(CP4, TCP, &[0; 16], 0x0010),
            Reason::Fragment,
            true,
        ),
        (
            "IPv6 control-plane SYN",
            v6(CP6, TCP, &tcp(443, SYN, 0)),
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "IPv6 control-plane SYN behind extension headers",
            frame(&[
                &ethernet(&[], ETH_IPV6),
                &ipv6(CP6, NODE6, 0, 36),
                &ipv6_extension(TCP, 2),
                &tcp(443, SYN, 0),
            ]),
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "IPv6 established segment from elsewhere",
            v6(OTHER6, TCP, &tcp(443, ACK, 0)),
            Reason::Pass,
            false,
        ),
        (
            "IPv6 SYN to a protected port from elsewhere",
            v6(OTHER6, TCP, &tcp(10255, SYN, 0)),
            Reason::ProtectedPort,
            true,
        ),
        (
            "control-plane SYN cut inside its TCP header",
            v4(CP4, TCP, &tcp(443, SYN, 0)[..10], 0),
            Reason::Malformed,
            true,
        ),
    ];
    for (name, ethernet_frame, reason, dropped) in cases {
        let action = if dropped { XDP_DROP } else { XDP_PASS };
        let want = (action, reason, dropped);
        assert_eq!(
            run_counted(&mut g, Layout::Ethernet, &ethernet_frame),
            want,
            "{name}, behind Ethernet"
        );
        let ip = &ethernet_frame[14..];
        assert_eq!(
            run_counted(&mut g, Layout::Ip, ip),
            want,
            "{name}, IP first"
        );
        if dropped {
            assert_eq!(
                g.run_packet(ip).unwrap(),
                XDP_PASS,
                "{name}: the Ethernet guard cannot read an IP-first frame"
            );
        }
    }
    // Not IP (MPLS on a tun device, say) is not the guard's to judge, as on Ethernet; an IPv4
    // header cut short before its addresses is malformed, from no one it could name (the
    // kernel's test runs take nothing shorter than 14 bytes).
    assert_eq!(
        run_counted(&mut g, Layout::Ip, &[0x10; 40]),
        (XDP_PASS, Reason::Pass, false)
    );
    let mut short = [0u8; 14];
    short[0] = 0x45;
    assert_eq!(
        run_counted(&mut g, Layout::Ip, &short),
        (XDP_PASS, Reason::Malformed, false)
    );
}

/// SCTP and DCCP from the control plane: what opens a connection (an INIT chunk, a Request)
/// is dropped as a SYN is, replies pass, and one too short to tell is malformed. L2TPv3 and
/// MPLS in IP are tunnels.
#[test]
fn sctp_and_dccp_open_connections_as_tcp_does_and_more_tunnels_are_dropped() {
    let (mut g, _logs) = guard(Mode::Enforce);
    let packet = |src, protocol, l4: &[u8]| {
        frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(src, NODE4, protocol, l4.len(), 0, 0),
            l4,
        ])
    };
    let sctp = |chunk: u8| [[0; 12].as_slice(), &[chunk, 0, 0, 20], &[0; 16]].concat();
    let dccp = |kind: u8| {
        [
            [0, 1, 0, 2, 4, 0, 0, 0, kind << 1, 0, 0, 0].as_slice(),
            &[0; 4],
        ]
        .concat()
    };
    let cases: [(&str, Vec<u8>, u32, Reason, bool); 9] = [
        (
            "SCTP INIT from the control plane",
            packet(CP4, 132, &sctp(1)),
            XDP_DROP,
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "SCTP INIT-ACK from the control plane",
            packet(CP4, 132, &sctp(2)),
            XDP_PASS,
            Reason::Pass,
            false,
        ),
        (
            "SCTP INIT from elsewhere",
            packet(OTHER4, 132, &sctp(1)),
            XDP_PASS,
            Reason::Pass,
            false,
        ),
        (
            "SCTP cut before its first chunk",
            packet(CP4, 132, &[0; 12]),
            XDP_DROP,
            Reason::Malformed,
            true,
        ),
        (
            "DCCP Request from the control plane",
            packet(CP4, 33, &dccp(0)),
            XDP_DROP,
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "DCCP Response from the control plane",
            packet(CP4, 33, &dccp(1)),
            XDP_PASS,
            Reason::Pass,
            false,
        ),
        (
            "DCCP Request from elsewhere",
            packet(OTHER4, 33, &dccp(0)),
            XDP_PASS,
            Reason::Pass,
            false,
        ),
        (
            "L2TPv3 from the control plane",
            packet(CP4, 115, &[0; 16]),
            XDP_DROP,
            Reason::Encapsulated,
            true,
        ),
        (
            "MPLS in IP from the control plane",
            packet(CP4, 137, &[0; 16]),
            XDP_DROP,
            Reason::Encapsulated,
            true,
        ),
    ];
    for (name, frame, action, reason, dropped) in cases {
        expect(&mut g, name, &frame, action, reason, dropped);
    }
    let sctp6 = frame(&[
        &ethernet(&[], ETH_IPV6),
        &ipv6(CP6, NODE6, 132, 32),
        &sctp(1),
    ]);
    expect(
        &mut g,
        "IPv6 SCTP INIT from the control plane",
        &sctp6,
        XDP_DROP,
        Reason::ControlPlaneSyn,
        true,
    );
}

/// IPsec's authentication header signs a packet without hiding it: given a security
/// association, the kernel checks it and delivers what follows, a SYN to the kubelet
/// included. Behind IPv4's, as behind IPv6's, the verdict is on what follows.
#[test]
fn what_follows_an_ipv4_authentication_header_is_judged() {
    const AH: u8 = 51;
    const ESP: u8 = 50;
    let (mut g, _logs) = guard(Mode::Enforce);
    // Next header, length (4-octet units, less two: 12 octets with a 4-octet ICV), SPI,
    // sequence number, ICV.
    let ah = |next: u8| [[next, 1].as_slice(), &[0; 10]].concat();
    let packet = |src, l4: &[&[u8]]| {
        let payload: usize = l4.iter().map(|part| part.len()).sum();
        let mut parts: Vec<&[u8]> = Vec::new();
        let eth = ethernet(&[], ETH_IP);
        let ip = ipv4(src, NODE4, AH, payload, 0, 0);
        parts.push(&eth);
        parts.push(&ip);
        parts.extend_from_slice(l4);
        frame(&parts)
    };
    let syn_to = |port| tcp(port, SYN, 0);
    let cases: [(&str, Vec<u8>, u32, Reason, bool); 7] = [
        (
            "a SYN from the control plane behind AH",
            packet(CP4, &[&ah(TCP), &syn_to(80)]),
            XDP_DROP,
            Reason::ControlPlaneSyn,
            true,
        ),
        (
            "a SYN to the kubelet from elsewhere behind AH",
            packet(OTHER4, &[&ah(TCP), &syn_to(10250)]),
            XDP_DROP,
            Reason::ProtectedPort,
            true,
        ),
        (
            "a SYN to another port from elsewhere behind AH",
            packet(OTHER4, &[&ah(TCP), &syn_to(80)]),
            XDP_PASS,
            Reason::Pass,
            false,
        ),
        (
            "a SYN to the kubelet from an allowed source behind AH",
            packet(ALLOWED4, &[&ah(TCP), &syn_to(10250)]),
            XDP_PASS,
            Reason::Pass,
            false,
        ),
        (
            "ESP from the control plane behind AH",
            packet(CP4, &[&ah(ESP), &[0; 16]]),
            XDP_DROP,
            Reason::Encapsulated,
            true,
        ),
        (
            "two authentication headers from elsewhere",
            packet(OTHER4, &[&ah(AH), &ah(TCP), &syn_to(10250)]),
            XDP_DROP,
            Reason::Unparseable,
            true,
        ),
        (
            "an authentication header cut short, from the control plane",
            packet(CP4, &[&ah(TCP)[..8]]),
            XDP_DROP,
            Reason::Malformed,
            true,
        ),
    ];
    for (name, frame, action, reason, dropped) in cases {
        expect(&mut g, name, &frame, action, reason, dropped);
    }
}
