//! The ways around the guard, tried end to end with the packets an attacker would send, from a
//! control-plane namespace to a node namespace whose agent guards its veth. Each attack is
//! first run in monitor mode, where it must get through and be counted as what enforce would
//! drop (so the packet is a real way in, not one the kernel refuses anyway), then in enforce
//! mode, where it must not get through. Counters carry over between the two agents (they are
//! pinned), so both counts are read from the second.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tether_tests::guard_site::{CP, NODE, Site, log_field, metric_in};
use tether_tests::netns::{Netns, veth};
use tether_tests::procs::Agent;

/// A second address in the control-plane namespace, outside --control-plane-cidr: a pod, a
/// bastion, anything that is not the control plane.
const ELSEWHERE: &str = "10.77.0.9";
const CP6: &str = "fd77::1";
const NODE6: &str = "fd77::2";
const ELSEWHERE6: &str = "fd77::9";

fn site(tag: &str) -> Site {
    let site = Site::new(tag);
    site.cp
        .ip(&["addr", "add", &format!("{ELSEWHERE}/24"), "dev", "eth0"])
        .unwrap();
    for (ns, address) in [(&site.cp, CP6), (&site.cp, ELSEWHERE6), (&site.node, NODE6)] {
        ns.ip(&[
            "addr",
            "add",
            &format!("{address}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    }
    site
}

fn guard_flags(mode: &str, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        format!("--guard-mode={mode}"),
        "--guard-interface=eth0".to_owned(),
        format!("--control-plane-cidr={CP}/32,{CP6}/128"),
    ];
    flags.extend(extra.iter().map(|f| (*f).to_owned()));
    flags
}

fn start(site: &Site, mode: &str, extra: &[&str]) -> Agent {
    let flags = guard_flags(mode, extra);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    site.agent(&refs)
}

/// Reads `(reason, action)` from the agent's /metrics, 0 when absent.
fn counted(site: &Site, agent: &Agent, reason: &str, action: &str) -> u64 {
    site.guard_packets(agent, reason, action).unwrap_or(0)
}

/// Sends `datagram` from `from` to `to` in the control-plane namespace, after `prepare` has
/// set the socket up; returns whether a socket bound to `to` in the node namespace got it.
fn udp_arrives(
    site: &Site,
    from: &str,
    to: SocketAddr,
    datagram: &[u8],
    prepare: impl Fn(&UdpSocket) + Send + Sync,
) -> bool {
    let receiver = site.node.run(|| UdpSocket::bind(to)).unwrap().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    site.cp
        .run(|| {
            let sender = UdpSocket::bind((from.parse::<std::net::IpAddr>().unwrap(), 0)).unwrap();
            prepare(&sender);
            sender.send_to(datagram, to).unwrap();
        })
        .unwrap();
    let mut buf = vec![0u8; datagram.len() + 1];
    matches!(receiver.recv(&mut buf), Ok(n) if n == datagram.len())
}

/// An IPv6 destination-options header of `len` bytes (a multiple of 8) made of unknown
/// options the receiver must skip; set on a socket, every datagram it sends carries it.
fn destination_options(len: usize) -> Vec<u8> {
    let mut header = vec![0, u8::try_from(len / 8 - 1).unwrap()];
    while header.len() < len {
        let room = len - header.len() - 2;
        let data = room.min(200);
        // Option type 0x1e: unknown, action bits 00 ("skip over this option").
        header.extend_from_slice(&[0x1e, u8::try_from(data).unwrap()]);
        header.resize(header.len() + data, 0);
    }
    header
}

fn set_destination_options(socket: &UdpSocket, header: &[u8]) {
    // SAFETY: setsockopt reads `header.len()` bytes from a live slice.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            header.as_ptr().cast(),
            libc::socklen_t::try_from(header.len()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
}

/// Item 1: a datagram the sender's kernel splits into fragments reaches a protected port
/// unless the first fragment is judged; a destination-options header longer than the guard
/// reads hides the port.
#[test]
fn fragments_and_long_headers_do_not_reach_protected_ports() {
    let site = site("frag");
    let big = vec![0x5a; 3000];
    let kubelet4: SocketAddr = format!("{NODE}:10255").parse().unwrap();
    let kubelet6: SocketAddr = format!("[{NODE6}]:10255").parse().unwrap();
    let open4: SocketAddr = format!("{NODE}:9999").parse().unwrap();
    let open6: SocketAddr = format!("[{NODE6}]:9999").parse().unwrap();
    let options = destination_options(608);
    let attacks = |site: &Site| {
        [
            udp_arrives(site, ELSEWHERE, kubelet4, &big, |_| {}),
            udp_arrives(site, ELSEWHERE6, kubelet6, &big, |_| {}),
            udp_arrives(site, ELSEWHERE6, kubelet6, b"hello", |s| {
                set_destination_options(s, &options)
            }),
        ]
    };

    let monitor = start(&site, "monitor", &[]);
    assert_eq!(
        attacks(&site),
        [true; 3],
        "without enforcement each attack must reach the port, or it proves nothing"
    );
    drop(monitor);

    let enforce = start(&site, "enforce", &[]);
    assert_eq!(attacks(&site), [false; 3]);
    assert!(counted(&site, &enforce, "protected_port", "pass") >= 2);
    assert!(counted(&site, &enforce, "unparseable", "pass") >= 1);
    assert!(counted(&site, &enforce, "protected_port", "drop") >= 2);
    assert!(counted(&site, &enforce, "unparseable", "drop") >= 1);
    // Fragmented traffic to ports nobody protects still reassembles.
    assert!(udp_arrives(&site, ELSEWHERE, open4, &big, |_| {}));
    assert!(udp_arrives(&site, ELSEWHERE6, open6, &big, |_| {}));
}

/// A VXLAN overlay between the control plane and the node: device `device` with VNI `vni` on
/// UDP `port`, the node's end at 10.`subnet`.0.2, where a listener on :8080 stands for a pod.
/// Returns a probe for whether a connection from the control plane through the overlay gets
/// in; it accepts what got in before, so a full backlog never passes for a drop.
fn overlay(
    site: &Site,
    device: &str,
    vni: u32,
    port: u16,
    subnet: u8,
) -> impl Fn(&Site) -> bool + use<> {
    let (vni, port) = (vni.to_string(), port.to_string());
    for (ns, local, remote, host) in [(&site.cp, CP, NODE, 1), (&site.node, NODE, CP, 2)] {
        ns.ip(&[
            "link", "add", device, "type", "vxlan", "id", &vni, "local", local, "remote", remote,
            "dstport", &port, "dev", "eth0",
        ])
        .unwrap();
        ns.ip(&[
            "addr",
            "add",
            &format!("10.{subnet}.0.{host}/24"),
            "dev",
            device,
        ])
        .unwrap();
        ns.ip(&["link", "set", device, "up"]).unwrap();
    }
    let pod: SocketAddr = format!("10.{subnet}.0.2:8080").parse().unwrap();
    let listener = site.node.run(|| TcpListener::bind(pod)).unwrap().unwrap();
    listener.set_nonblocking(true).unwrap();
    move |site: &Site| {
        while listener.accept().is_ok() {}
        site.cp
            .run(|| TcpStream::connect_timeout(&pod, Duration::from_millis(500)).is_ok())
            .unwrap()
    }
}

/// Item 2: a VXLAN tunnel from the control plane to the node decapsulates on a device the
/// guard is not on, and the packet inside comes from an overlay address no CIDR names.
#[test]
fn a_tunnel_from_the_control_plane_is_no_way_in() {
    let site = site("tun");
    let through_tunnel = overlay(&site, "vx0", 42, 4789, 99);

    let monitor = start(&site, "monitor", &[]);
    assert!(through_tunnel(&site), "the overlay itself does not work");
    drop(monitor);

    let enforce = start(&site, "enforce", &[]);
    assert!(!through_tunnel(&site), "a connection got in through VXLAN");
    assert!(counted(&site, &enforce, "encapsulated", "pass") >= 1);
    assert!(counted(&site, &enforce, "encapsulated", "drop") >= 1);
    // Drop events are log lines: the line is the subject.
    let event = enforce
        .logged
        .logs
        .wait_for("guard drop", Duration::from_secs(5))
        .expect("no drop event");
    assert_eq!(log_field(&event, "reason"), "encapsulated");
    assert_eq!(log_field(&event, "destination"), format!("{NODE}:4789"));
    drop(enforce);

    let allowed = start(&site, "enforce", &["--guard-allow-tunnel=udp:4789"]);
    let before = counted(&site, &allowed, "encapsulated", "drop");
    assert!(
        through_tunnel(&site),
        "--guard-allow-tunnel did not let it in"
    );
    assert_eq!(counted(&site, &allowed, "encapsulated", "drop"), before);
}

/// The kernel decapsulates VXLAN on whatever port a device names, not only on the ports
/// `--guard-tunnel-port` lists: overlays on ports of their own, one there before the agent
/// starts and one made while it runs, are no way in either; allowing a port lets that one in.
#[test]
fn a_tunnel_on_a_port_of_its_own_is_no_way_in() {
    let site = site("tunport");
    let before = overlay(&site, "vx0", 42, 4790, 99);

    let monitor = start(&site, "monitor", &[]);
    assert!(before(&site), "the overlay itself does not work");
    drop(monitor);

    let enforce = start(&site, "enforce", &[]);
    assert!(
        !before(&site),
        "a connection got in through VXLAN on port 4790"
    );
    let later = overlay(&site, "vx1", 43, 4791, 98);
    let deadline = Instant::now() + Duration::from_secs(5);
    while later(&site) {
        assert!(
            Instant::now() < deadline,
            "connections still get in through a VXLAN device made on port 4791 after the agent started"
        );
    }
    assert!(!later(&site), "the drop on port 4791 did not last");
    assert!(counted(&site, &enforce, "encapsulated", "drop") >= 2);
    drop(enforce);

    let allowed = start(&site, "enforce", &["--guard-allow-tunnel=udp:4790"]);
    assert!(
        before(&site),
        "--guard-allow-tunnel did not let port 4790 in"
    );
    assert!(!later(&site), "allowing port 4790 let port 4791 in");
    drop(allowed);

    let monitor = start(&site, "monitor", &[]);
    assert!(later(&site), "the second overlay itself does not work");
    drop(monitor);
}

/// The next packet `socket` receives within its read timeout.
fn receive(socket: &Socket) -> Option<Vec<u8>> {
    let mut buf = [std::mem::MaybeUninit::new(0u8); 2048];
    let n = socket.recv(&mut buf).ok()?;
    // SAFETY: every byte was initialised when the buffer was made.
    Some(
        buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect(),
    )
}

/// Sends a bare ACK from the control plane to `port` on the node, as a raw segment, and
/// returns whether the node answered it with a RST (what a listener does with an ACK it has
/// no handshake for).
fn bare_ack_answered(site: &Site, port: u16) -> bool {
    let (cp, node): (Ipv4Addr, Ipv4Addr) = (CP.parse().unwrap(), NODE.parse().unwrap());
    site.cp
        .run(|| {
            let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).unwrap();
            raw.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let source_port: u16 = 47000;
            let mut segment = Vec::new();
            segment.extend_from_slice(&source_port.to_be_bytes());
            segment.extend_from_slice(&port.to_be_bytes());
            segment.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0x20, 0]);
            segment.extend_from_slice(&[5 << 4, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
            let length = u16::try_from(segment.len()).unwrap().to_be_bytes();
            let checksum = tether_tests::packets::internet_checksum(&[
                &cp.octets(),
                &node.octets(),
                &[0, 6],
                &length,
                &segment,
            ]);
            segment[16..18].copy_from_slice(&checksum.to_be_bytes());
            let to = SocketAddr::V4(SocketAddrV4::new(node, 0));
            raw.send_to(&segment, &to.into()).unwrap();
            while let Some(packet) = receive(&raw) {
                let l4 = usize::from(packet[0] & 0x0f) * 4;
                if packet.len() < l4 + 14 || packet[12..16] != node.octets() {
                    continue;
                }
                let tcp = &packet[l4..];
                let from = u16::from_be_bytes([tcp[0], tcp[1]]);
                let to = u16::from_be_bytes([tcp[2], tcp[3]]);
                if from == port && to == source_port && tcp[13] & 0x04 != 0 {
                    return true;
                }
            }
            false
        })
        .unwrap()
}

/// Item 4: a segment from the control plane that is not a SYN reaches a listener (with SYN
/// cookies in play, a well-guessed ACK opens a connection the guard never saw a SYN for).
/// The node's own connections to the control plane keep flowing.
#[test]
fn control_plane_acks_reach_connections_not_listeners() {
    let site = site("ack");
    let monitor = start(&site, "monitor", &[]);
    assert!(
        bare_ack_answered(&site, 10250),
        "the kubelet's listener did not answer a bare ACK"
    );
    drop(monitor);

    let enforce = start(&site, "enforce", &[]);
    assert!(
        !bare_ack_answered(&site, 10250),
        "a bare ACK from the control plane reached the kubelet's listener"
    );
    assert!(counted(&site, &enforce, "control_plane_to_listener", "pass") >= 1);
    assert!(counted(&site, &enforce, "control_plane_to_listener", "drop") >= 1);
    // The tunnel (the agent's own connection to the server) and other outbound connections
    // are control-plane ACKs too, and must pass.
    assert!(site.through_tunnel().ends_with("hello"));
    assert!(site.outbound_works());
    assert_eq!(
        counted(&site, &enforce, "control_plane_to_listener", "drop"),
        1
    );
}

/// Item 5: a control-plane CIDR written IPv4-mapped guards the IPv4 control plane.
#[test]
fn an_ipv4_mapped_control_plane_cidr_guards_ipv4() {
    let site = site("map");
    let agent = site.agent(&[
        "--guard-interface=eth0",
        &format!("--control-plane-cidr=::ffff:{CP}/128"),
    ]);
    assert!(
        site.direct(Duration::from_millis(500)).is_err(),
        "a direct connection got through a mapped CIDR"
    );
    assert!(counted(&site, &agent, "control_plane_syn", "drop") >= 1);
    assert!(site.through_tunnel().ends_with("hello"));
}

/// The control plane's own SYNs over IPv6, which the other cases here do not send.
#[test]
fn ipv6_control_plane_syns_are_dropped() {
    let site = site("six");
    let kubelet = site
        .node
        .run(|| TcpListener::bind(format!("[{NODE6}]:10250")))
        .unwrap()
        .unwrap();
    let connect = |site: &Site| {
        site.cp
            .run(|| {
                let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
                let from: SocketAddr = format!("[{CP6}]:0").parse().unwrap();
                socket.bind(&from.into()).unwrap();
                let to: SocketAddr = format!("[{NODE6}]:10250").parse().unwrap();
                socket.connect_timeout(&to.into(), Duration::from_millis(500))
            })
            .unwrap()
    };
    let monitor = start(&site, "monitor", &[]);
    connect(&site).expect("IPv6 path broken without enforcement");
    drop(monitor);
    let enforce = start(&site, "enforce", &[]);
    assert!(
        connect(&site).is_err(),
        "an IPv6 SYN from the control plane got in"
    );
    assert!(counted(&site, &enforce, "control_plane_syn", "pass") >= 1);
    assert!(counted(&site, &enforce, "control_plane_syn", "drop") >= 1);
    drop(kubelet);
}

/// Item 3: the control plane also reaches the node over a second interface, by its own route,
/// and over a third that appears while the agent runs. Each is guarded, and counted apart.
#[test]
fn every_interface_that_routes_to_the_control_plane_is_guarded() {
    let site = site("ifs");
    let direct = |ns: &Netns, to: &str| {
        ns.run(|| {
            TcpStream::connect_timeout(
                &format!("{to}:10250").parse().unwrap(),
                Duration::from_millis(500),
            )
            .is_ok()
        })
        .unwrap()
    };
    let second = Netns::new("ifs-cp2").unwrap();
    veth(
        &second,
        "eth0",
        "10.88.0.1/24",
        &site.node,
        "eth1",
        "10.88.0.2/24",
    )
    .unwrap();
    let _kubelet1 = site
        .node
        .run(|| TcpListener::bind("10.88.0.2:10250"))
        .unwrap()
        .unwrap();
    assert!(direct(&second, "10.88.0.2"), "eth1 does not work at all");
    let agent = site.agent(&[&format!(
        "--control-plane-cidr={CP}/32,10.88.0.1/32,10.89.0.1/32"
    )]);
    assert!(
        !direct(&second, "10.88.0.2"),
        "the control plane got in over the interface of its own route"
    );

    let third = Netns::new("ifs-cp3").unwrap();
    veth(
        &third,
        "eth0",
        "10.89.0.1/24",
        &site.node,
        "eth2",
        "10.89.0.2/24",
    )
    .unwrap();
    let _kubelet2 = site
        .node
        .run(|| TcpListener::bind("10.89.0.2:10250"))
        .unwrap()
        .unwrap();
    assert!(
        tether_tests::process::wait_until(Duration::from_secs(5), || {
            tether_tests::guard_site::xdp_attach_mode(&site.node, "eth2").is_some()
        }),
        "an interface that appeared later was not guarded"
    );
    assert!(
        !direct(&third, "10.89.0.2"),
        "the control plane got in over an interface that appeared later"
    );
    for interface in ["eth1", "eth2"] {
        let series = format!(
            r#"tether_agent_guard_interface_packets_total{{interface="{interface}",reason="control_plane_syn",action="drop"}}"#
        );
        assert!(
            metric_in(&site.node, agent.health_port, &series) >= Some(1),
            "{series}"
        );
    }
    assert_eq!(
        metric_in(
            &site.node,
            agent.health_port,
            r#"tether_agent_guard_interface_packets_total{interface="eth0",reason="control_plane_syn",action="drop"}"#
        ),
        Some(0)
    );
    let (code, status) = site.guard_cli("status");
    assert_eq!(code, 0);
    assert!(status.contains("on eth2:"), "{status}");

    drop(third);
    assert!(
        tether_tests::process::wait_until(Duration::from_secs(5), || {
            !site.bpffs.root().join("links/eth2").exists()
        }),
        "a vanished interface kept its pin"
    );
}

/// Whether `packet` (IP first) is a SYN-ACK to `to`, port `port`.
fn is_syn_ack_to(packet: &[u8], to: std::net::IpAddr, port: u16) -> bool {
    let (destination, protocol, l4): (&[u8], u8, usize) = match packet.first() {
        Some(b) if b >> 4 == 4 && packet.len() >= 40 => (
            &packet[16..20],
            packet[9],
            usize::from(packet[0] & 0x0f) * 4,
        ),
        Some(b) if b >> 4 == 6 && packet.len() >= 60 => (&packet[24..40], packet[6], 40),
        _ => return false,
    };
    let to = match to {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    protocol == 6
        && destination == to
        && packet.get(l4 + 2..l4 + 4) == Some(&port.to_be_bytes()[..])
        && packet.get(l4 + 13).is_some_and(|f| f & 0x12 == 0x12)
}

/// A node whose route to part of the control plane is a tun device (as a WireGuard, OpenVPN
/// or IPsec-VTI uplink is): its frames begin with the IP header, and the agent must guard it
/// with the program that reads them so. A SYN from the control plane written into the device
/// gets no SYN-ACK; one from elsewhere does, so the device does carry connections.
#[test]
fn an_uplink_without_an_ethernet_header_is_guarded() {
    use std::net::IpAddr;
    use tether_tests::packets::{SYN, TCP, ipv4, ipv6, tcp, with_checksums};

    let site = Site::new("tun");
    let mut tun = tether_tests::tun::Tun::create(&site.node, "tun0").unwrap();
    site.node
        .ip(&["addr", "add", "10.99.0.2/24", "dev", "tun0"])
        .unwrap();
    site.node
        .ip(&["addr", "add", "fd99::2/64", "dev", "tun0", "nodad"])
        .unwrap();
    let listener = site
        .node
        .run(|| TcpListener::bind("[::]:0"))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cp4, other4): (IpAddr, IpAddr) =
        ("10.99.0.1".parse().unwrap(), "10.99.0.5".parse().unwrap());
    let (cp6, other6): (IpAddr, IpAddr) = ("fd99::1".parse().unwrap(), "fd99::5".parse().unwrap());
    // Each attempt from its own port: a half-open connection of an earlier one resends its
    // SYN-ACK.
    let mut source_port = 41000;
    let mut answered = |from: IpAddr| {
        source_port += 1;
        let mut segment = tcp(port, SYN, 0);
        segment[..2].copy_from_slice(&u16::to_be_bytes(source_port));
        let syn = match from {
            IpAddr::V4(a) => [ipv4(a.octets(), [10, 99, 0, 2], TCP, 20, 0, 0), segment].concat(),
            IpAddr::V6(a) => [
                ipv6(
                    a.octets(),
                    "fd99::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                    TCP,
                    20,
                ),
                segment,
            ]
            .concat(),
        };
        tun.inject(&with_checksums(syn)).unwrap();
        !tun.sent_within(Duration::from_millis(400), |p| {
            is_syn_ack_to(p, from, source_port)
        })
        .is_empty()
    };
    assert!(
        answered(cp4) && answered(cp6),
        "the tun device does not deliver connections at all"
    );

    // No --guard-interface: the routes through tun0 to the control plane make it an uplink.
    let agent = site.agent(&[
        "--guard-mode=enforce",
        &format!("--control-plane-cidr={CP}/32,{cp4}/32,{cp6}/128"),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !site.guard_cli("status").1.contains("tun0 (program") {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard never went on tun0: {}",
            site.guard_cli("status").1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !answered(cp4),
        "an IPv4 SYN from the control plane got through tun0"
    );
    assert!(
        !answered(cp6),
        "an IPv6 SYN from the control plane got through tun0"
    );
    assert!(
        answered(other4) && answered(other6),
        "tun0 no longer carries other connections"
    );
    let dropped = metric_in(
        &site.node,
        agent.health_port,
        r#"tether_agent_guard_interface_packets_total{interface="tun0",reason="control_plane_syn",action="drop"}"#,
    );
    assert!(dropped >= Some(2), "tun0's drops: {dropped:?}");
    drop(listener);
}

/// Routes outside the main table and every nexthop of a multipath route carry the control
/// plane's traffic too: a node whose route to one control-plane address is a multipath route
/// over two interfaces, and whose route to another sits in a table an `ip rule` chooses (as
/// cloud VPC CNIs route through secondary interfaces), is guarded on all three; a direct
/// connection over the policy-routed one is dropped.
#[test]
fn every_nexthop_and_every_routing_table_is_guarded() {
    let site = site("rt");
    // Two interfaces for the multipath route; their far ends need not lead anywhere.
    for (near, far) in [("mp0", "mp0p"), ("mp1", "mp1p")] {
        site.node
            .ip(&["link", "add", near, "type", "veth", "peer", "name", far])
            .unwrap();
        for link in [near, far] {
            site.node.ip(&["link", "set", link, "up"]).unwrap();
        }
    }
    site.node
        .ip(&[
            "route",
            "add",
            "10.98.0.0/24",
            "nexthop",
            "dev",
            "mp0",
            "nexthop",
            "dev",
            "mp1",
        ])
        .unwrap();
    // A control-plane address reached only through table 100: host addresses (/32) keep the
    // kernel from adding a main-table route for the link.
    let other = Netns::new("rt-cp2").unwrap();
    veth(
        &other,
        "eth0",
        "10.97.0.1/32",
        &site.node,
        "pr0",
        "10.97.0.2/32",
    )
    .unwrap();
    other
        .ip(&["route", "add", "10.97.0.2/32", "dev", "eth0"])
        .unwrap();
    site.node
        .ip(&["route", "add", "10.97.0.0/24", "dev", "pr0", "table", "100"])
        .unwrap();
    site.node
        .ip(&["rule", "add", "to", "10.97.0.0/24", "table", "100"])
        .unwrap();
    let _kubelet = site
        .node
        .run(|| TcpListener::bind("10.97.0.2:10250"))
        .unwrap()
        .unwrap();
    let direct = || connects(&other, "10.97.0.2:10250");
    assert!(direct(), "the policy-routed interface does not work at all");

    let agent = site.agent(&[&format!(
        "--control-plane-cidr={CP}/32,10.98.0.1/32,10.97.0.1/32"
    )]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, status) = site.guard_cli("status");
        if ["eth0", "mp0", "mp1", "pr0"]
            .iter()
            .all(|i| status.contains(&format!("{i} (program")))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every interface to the control plane is guarded: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !direct(),
        "the control plane got in over the policy-routed interface"
    );
    assert!(
        metric_in(
            &site.node,
            agent.health_port,
            r#"tether_agent_guard_interface_packets_total{interface="pr0",reason="control_plane_syn",action="drop"}"#,
        ) >= Some(1)
    );
}

/// What else opens a way in from the control plane: an SCTP INIT and a DCCP Request open
/// connections as a TCP SYN does, and L2TPv3 and MPLS in IP, L2TP over UDP (1701), IPsec
/// NAT traversal (4500) and MPLS in UDP (6635) carry packets Linux decapsulates on a device
/// without the guard. With the default flags each is dropped; the replies to the node's own
/// SCTP and DCCP connections (INIT-ACK, Response) pass.
#[test]
fn other_transports_and_tunnels_from_the_control_plane_are_dropped() {
    let site = site("tx");
    let node: SocketAddr = format!("{NODE}:0").parse().unwrap();
    let raw = |protocol: i32, payload: &[u8]| {
        site.cp
            .run(|| {
                let socket =
                    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(protocol))).unwrap();
                socket.send_to(payload, &node.into()).unwrap();
            })
            .unwrap();
    };
    // SCTP: ports, verification tag, checksum, then a chunk (type, flags, length).
    let sctp = |chunk: u8| {
        let mut packet = vec![0x9c, 0x40, 0x0b, 0x59, 0, 0, 0, 0, 0, 0, 0, 0];
        packet.extend_from_slice(&[chunk, 0, 0, 20]);
        packet.resize(32, 0);
        packet
    };
    // DCCP: ports, data offset, CCVal/CsCov, checksum, then the type in bits 1-4.
    let dccp = |kind: u8| {
        let mut packet = vec![0x9c, 0x40, 0x0b, 0x59, 4, 0, 0, 0, kind << 1, 0, 0, 0];
        packet.resize(16, 0);
        packet
    };
    let send_all = || {
        raw(132, &sctp(1));
        raw(33, &dccp(0));
        raw(132, &sctp(2));
        raw(33, &dccp(1));
        raw(115, &[0; 24]);
        raw(137, &[0; 24]);
        for port in [1701, 4500, 6635] {
            site.cp
                .run(|| {
                    UdpSocket::bind(format!("{CP}:0"))
                        .unwrap()
                        .send_to(&[0; 24], format!("{NODE}:{port}"))
                        .unwrap();
                })
                .unwrap();
        }
    };
    // Counted (new connections, tunnels) as `action`.
    let counts = |agent: &Agent, action: &str| {
        (
            counted(&site, agent, "control_plane_syn", action),
            counted(&site, agent, "encapsulated", action),
        )
    };
    let expect = |agent: &Agent, action: &str, before: (u64, u64)| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while counts(agent, action) != (before.0 + 2, before.1 + 5) {
            assert!(
                std::time::Instant::now() < deadline,
                "{action}: (new connections, tunnels) went from {before:?} to {:?}",
                counts(agent, action)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Monitor mode counts each as what enforce would drop, and drops nothing.
    let monitor = start(&site, "monitor", &[]);
    let before = counts(&monitor, "pass");
    send_all();
    expect(&monitor, "pass", before);
    assert_eq!(counts(&monitor, "drop"), (0, 0));
    drop(monitor);
    let enforce = start(&site, "enforce", &[]);
    let before = counts(&enforce, "drop");
    send_all();
    expect(&enforce, "drop", before);
}

/// A pod in `pod` at `address`, listening on :8080. Returns a probe for whether a connection
/// from `from` gets in; it accepts what got in before, so a full backlog never passes for a
/// drop.
fn pod_listener(pod: &Netns, address: &str) -> impl Fn(&Netns) -> bool + use<> {
    let at: SocketAddr = format!("{address}:8080").parse().unwrap();
    let listener = pod.run(|| TcpListener::bind(at)).unwrap().unwrap();
    listener.set_nonblocking(true).unwrap();
    move |from: &Netns| {
        while listener.accept().is_ok() {}
        from.run(|| TcpStream::connect_timeout(&at, Duration::from_millis(500)).is_ok())
            .unwrap()
    }
}

/// Whether a TCP connection from `from` to `to` opens within half a second.
fn connects(from: &Netns, to: &str) -> bool {
    let to: SocketAddr = to.parse().unwrap();
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok())
        .unwrap()
}

/// A veth from `ns`'s `name` to `eth0` in `peer`, without addresses.
fn veth_to(ns: &Netns, name: &str, peer: &Netns) {
    ns.ip(&[
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer.name(),
    ])
    .unwrap();
}

/// A bridge on the node: the control plane at 10.66.0.1 on a VXLAN whose node end, vxb, is a
/// port of br0 (its underlay, 10.65.0.0/24, does not route to the control plane); a pod at
/// 10.66.0.3 on br0's port pv0; br0 holds 10.66.0.2. Returns the control plane's namespace
/// and the pod's, everything up.
fn bridged_pod(site: &Site, tag: &str) -> (Netns, Netns) {
    let node = &site.node;
    let cp_bridge = Netns::new(&format!("{tag}-cpb")).unwrap();
    let bridged = Netns::new(&format!("{tag}-podb")).unwrap();
    veth(
        &cp_bridge,
        "eth0",
        "10.65.0.1/24",
        node,
        "up1",
        "10.65.0.2/24",
    )
    .unwrap();
    for (ns, local, remote, underlay) in [
        (&cp_bridge, "10.65.0.1", "10.65.0.2", "eth0"),
        (node, "10.65.0.2", "10.65.0.1", "up1"),
    ] {
        ns.ip(&[
            "link", "add", "vxb", "type", "vxlan", "id", "7", "local", local, "remote", remote,
            "dstport", "4789", "dev", underlay,
        ])
        .unwrap();
    }
    cp_bridge
        .ip(&["addr", "add", "10.66.0.1/24", "dev", "vxb"])
        .unwrap();
    node.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    node.ip(&["link", "set", "vxb", "master", "br0"]).unwrap();
    node.ip(&["addr", "add", "10.66.0.2/24", "dev", "br0"])
        .unwrap();
    veth_to(node, "pv0", &bridged);
    node.ip(&["link", "set", "pv0", "master", "br0"]).unwrap();
    bridged
        .ip(&["addr", "add", "10.66.0.3/24", "dev", "eth0"])
        .unwrap();
    for (ns, links) in [
        (&cp_bridge, &["vxb"][..]),
        (node, &["vxb", "br0", "pv0"][..]),
        (&bridged, &["eth0"][..]),
    ] {
        for link in links {
            ns.ip(&["link", "set", link, "up"]).unwrap();
        }
    }
    (cp_bridge, bridged)
}

/// Pods whose frames enter the node below the interface the routes name: a bridge that holds
/// the node's address with the uplink (here a VXLAN, as an L2 extension has it; a NIC or a
/// bond is the same) and a pod's veth as ports, as bridged CNIs and VM hosts have it, and a
/// macvlan that holds the node's address beside a pod's macvlan on the same uplink, as Multus
/// setups have it. The bridge forwards a pod's frames from port to port and the uplink hands
/// a macvlan pod its frames directly, so neither passes the bridge or the node's macvlan. The
/// guard must sit where the frames enter (the bridge's uplink port, the macvlan's lower
/// device), and stay off the pod's own port.
#[test]
fn pods_behind_a_bridge_or_macvlan_uplink_are_no_way_in() {
    let site = site("below");
    let node = &site.node;
    let (cp_bridge, bridged) = bridged_pod(&site, "below");
    // The macvlan: the control plane at 10.55.0.1 on the far end of up2, the node at
    // 10.55.0.2 on mv0 over up2, the pod at 10.55.0.3 on a macvlan of up2 of its own.
    let cp_macvlan = Netns::new("below-cpm").unwrap();
    let macvlan = Netns::new("below-podm").unwrap();
    veth_to(node, "up2", &cp_macvlan);
    cp_macvlan
        .ip(&["addr", "add", "10.55.0.1/24", "dev", "eth0"])
        .unwrap();
    node.ip(&[
        "link", "add", "mv0", "link", "up2", "type", "macvlan", "mode", "bridge",
    ])
    .unwrap();
    node.ip(&["addr", "add", "10.55.0.2/24", "dev", "mv0"])
        .unwrap();
    node.ip(&[
        "link", "add", "mvp", "link", "up2", "type", "macvlan", "mode", "bridge",
    ])
    .unwrap();
    node.ip(&["link", "set", "mvp", "netns", macvlan.name()])
        .unwrap();
    macvlan
        .ip(&["addr", "add", "10.55.0.3/24", "dev", "mvp"])
        .unwrap();
    for (ns, links) in [
        (node, &["up2", "mv0"][..]),
        (&cp_macvlan, &["eth0"][..]),
        (&macvlan, &["mvp"][..]),
    ] {
        for link in links {
            ns.ip(&["link", "set", link, "up"]).unwrap();
        }
    }
    let to_bridged = pod_listener(&bridged, "10.66.0.3");
    let to_macvlan = pod_listener(&macvlan, "10.55.0.3");
    // Found by their routes, as on a node: br0 and mv0 route to the control plane.
    let flags = format!("--control-plane-cidr={CP}/32,10.66.0.1/32,10.55.0.1/32");

    let monitor = site.agent(&["--guard-mode=monitor", &flags]);
    // A bridge port starts forwarding once the bridge has seen it up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !to_bridged(&cp_bridge) {
        assert!(Instant::now() < deadline, "the bridge itself does not work");
    }
    assert!(to_macvlan(&cp_macvlan), "the macvlan itself does not work");
    let would = counted(&site, &monitor, "control_plane_syn", "pass");
    assert!(
        would >= 2,
        "monitor mode counted {would} of the SYNs to pods as would-drop"
    );
    drop(monitor);

    // The uplink joins the bridge while the agent runs: until then the bridge has only a
    // pod's port and is guarded itself, then it gives way to the uplink port (the kernel
    // refuses XDP on a port while its bridge has a program).
    node.ip(&["link", "set", "vxb", "nomaster"]).unwrap();
    let enforce = site.agent(&["--guard-mode=enforce", &flags]);
    let on = |interface| tether_tests::guard_site::xdp_attach_mode(node, interface).is_some();
    assert!(
        on("br0") && !on("vxb"),
        "a bridge without an uplink port is not guarded itself"
    );
    node.ip(&["link", "set", "vxb", "master", "br0"]).unwrap();
    assert!(
        tether_tests::process::wait_until(Duration::from_secs(5), || on("vxb") && !on("br0")),
        "the guard did not move to the uplink port that joined the bridge"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while to_bridged(&cp_bridge) {
        assert!(
            Instant::now() < deadline,
            "the control plane reached a pod through the uplink's bridge"
        );
    }
    assert!(
        !to_bridged(&cp_bridge),
        "the control plane reached a pod through the uplink's bridge"
    );
    assert!(
        !to_macvlan(&cp_macvlan),
        "the control plane reached a pod on a macvlan of the node's uplink"
    );
    for (interface, serves) in [
        ("vxb", "the bridge's uplink port"),
        ("up2", "the macvlan's lower device"),
    ] {
        assert!(
            tether_tests::guard_site::xdp_attach_mode(node, interface).is_some(),
            "no guard on {interface}, {serves}"
        );
        let series = format!(
            r#"tether_agent_guard_interface_packets_total{{interface="{interface}",reason="control_plane_syn",action="drop"}}"#
        );
        assert!(
            metric_in(node, enforce.health_port, &series) >= Some(1),
            "{series}"
        );
    }
    assert_eq!(
        tether_tests::guard_site::xdp_attach_mode(node, "pv0"),
        None,
        "the guard sits on a pod's own bridge port"
    );
}

/// Sends `frame` out of the control plane's eth0 as it is, through a packet socket, and
/// returns whether the node answered the SYN inside it (from `NODE`:10250 to port 40000, the
/// source port `packets::tcp` writes) with a SYN-ACK.
fn frame_answered(site: &Site, frame: &[u8]) -> bool {
    let (cp, node): (Ipv4Addr, Ipv4Addr) = (CP.parse().unwrap(), NODE.parse().unwrap());
    site.cp
        .run(|| {
            let all = (libc::ETH_P_ALL as u16).to_be();
            let socket = Socket::new(
                Domain::PACKET,
                Type::RAW,
                Some(Protocol::from(i32::from(all))),
            )
            .unwrap();
            // SAFETY: writes one sockaddr_ll, which fits the storage, and reports its length.
            let ((), address) = unsafe {
                socket2::SockAddr::try_init(|storage, len| {
                    let link = storage.cast::<libc::sockaddr_ll>();
                    (*link).sll_family = libc::AF_PACKET as u16;
                    (*link).sll_protocol = all;
                    (*link).sll_ifindex =
                        i32::try_from(libc::if_nametoindex(c"eth0".as_ptr())).unwrap();
                    *len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap();
                    Ok(())
                })
            }
            .unwrap();
            socket.bind(&address).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            socket.send(frame).unwrap();
            let deadline = Instant::now() + Duration::from_millis(700);
            while Instant::now() < deadline {
                let Some(got) = receive(&socket) else {
                    continue;
                };
                // Untagged IPv4 from the node's port 10250, a SYN-ACK to the control plane's
                // port 40000.
                let syn_ack = got.get(12..14) == Some(&[0x08, 0x00][..])
                    && got.get(26..30) == Some(&node.octets()[..])
                    && got.get(34..36) == Some(&10250u16.to_be_bytes()[..])
                    && is_syn_ack_to(&got[14..], cp.into(), 40000);
                if syn_ack {
                    return true;
                }
            }
            false
        })
        .unwrap()
}

/// Linux strips any number of priority tags (802.1Q with VLAN ID 0) from a frame and
/// delivers the packet inside as if untagged. A control-plane SYN behind three of them,
/// more than the guard parses, reached the kubelet; behind three or eight it is dropped.
#[test]
fn priority_tags_the_kernel_strips_hide_no_syn() {
    use tether_tests::packets::{SYN, TCP, ipv4, tcp, with_checksums};
    let site = site("prio");
    let mac = |ns: &Netns| -> Vec<u8> {
        let out = ns.ip(&["-j", "link", "show", "eth0"]).unwrap();
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        links[0]["address"]
            .as_str()
            .unwrap()
            .split(':')
            .map(|octet| u8::from_str_radix(octet, 16).unwrap())
            .collect()
    };
    let (cp, node): (Ipv4Addr, Ipv4Addr) = (CP.parse().unwrap(), NODE.parse().unwrap());
    let syn = with_checksums(
        [
            ipv4(cp.octets(), node.octets(), TCP, 20, 0, 0),
            tcp(10250, SYN, 0),
        ]
        .concat(),
    );
    let behind = |tags: usize| -> Vec<u8> {
        let mut frame = mac(&site.node);
        frame.extend(mac(&site.cp));
        for _ in 0..tags {
            frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x00]);
        }
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&syn);
        frame
    };

    let monitor = start(&site, "monitor", &[]);
    for tags in [0, 3, 8] {
        assert!(
            frame_answered(&site, &behind(tags)),
            "the kubelet did not answer a SYN behind {tags} priority tags"
        );
    }
    assert!(counted(&site, &monitor, "unparseable", "pass") >= 2);
    drop(monitor);

    let enforce = start(&site, "enforce", &[]);
    for tags in [0, 3, 8] {
        assert!(
            !frame_answered(&site, &behind(tags)),
            "a control-plane SYN behind {tags} priority tags reached the kubelet"
        );
    }
    assert!(counted(&site, &enforce, "unparseable", "drop") >= 2);
}

/// Where the bridge's uplink port cannot take the guard (another XDP program holds it, a
/// CNI's say), the bridge itself gets it, as before the guard went below bridges: the node's
/// own listeners on the bridge's address stay out of the control plane's reach.
#[test]
fn a_bridge_whose_uplink_port_is_taken_is_guarded_itself() {
    use tether_agent::guard_program::{GuardProgram, Layout};
    let site = site("taken");
    let node = &site.node;
    let (cp_bridge, _bridged) = bridged_pod(&site, "taken");
    tether_tests::guard_site::kubelet(node, "10.66.0.2", "bridge");
    let to_node = || connects(&cp_bridge, "10.66.0.2:10250");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !to_node() {
        assert!(Instant::now() < deadline, "the bridge itself does not work");
    }
    // Another XDP program on the uplink port, held by this process (an unpinned link).
    let other = node
        .run(|| {
            let (mut program, _logs) = GuardProgram::load(None).unwrap();
            program.attach("vxb", Layout::Ethernet).unwrap();
            program
        })
        .unwrap();
    let agent = site.agent(&[
        "--guard-mode=enforce",
        &format!("--control-plane-cidr={CP}/32,10.66.0.1/32"),
    ]);
    assert!(
        tether_tests::guard_site::xdp_attach_mode(node, "br0").is_some(),
        "the bridge is not guarded in place of its uplink port"
    );
    assert!(
        !to_node(),
        "the control plane reached the node through the bridge"
    );
    // The warning is the subject: it is how an operator learns that bridged pods are not
    // guarded.
    agent
        .logged
        .logs
        .wait_for(
            "XDP guard attached to the interface itself",
            Duration::from_secs(5),
        )
        .expect("no warning that the guard stands in for the uplink port");
    drop(other);
}
