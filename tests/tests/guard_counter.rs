//! The first eBPF program end to end: the embedded object is loaded by the agent's
//! `guard_program`, attached to a veth inside a namespace this test creates, and its per-CPU
//! counters and aya-log records come back to userspace.

use std::io::Write;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};

use tether_agent::guard_program::GuardProgram;
use tether_agent_common::{Mode, Reason};
use tether_tests::netns::{Netns, veth};
use tether_tests::require_root;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn xdp_guard_counts_every_packet_and_its_logs_reach_tracing() {
    require_root();
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_log::LogTracer::init().unwrap();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
    .unwrap();

    let node = Netns::new("node").unwrap();
    let peer = Netns::new("peer").unwrap();
    veth(&node, "eth0", "10.77.0.1/24", &peer, "eth0", "10.77.0.2/24").unwrap();

    let (mut program, mut logs) = GuardProgram::load(None).unwrap();
    // Enforce with an empty policy: everything passes and is counted.
    program.set_mode(Mode::Enforce).unwrap();
    let mode = node
        .run(|| program.attach("eth0", tether_agent::guard_program::Layout::Ethernet))
        .unwrap()
        .unwrap();
    assert_eq!(
        mode.label(),
        "native",
        "veth supports native XDP on this kernel"
    );

    const DATAGRAMS: u64 = 100;
    const PAYLOAD: usize = 64;
    peer.run(|| {
        let socket = UdpSocket::bind("10.77.0.2:0").unwrap();
        for _ in 0..DATAGRAMS {
            socket.send_to(&[0x5a; PAYLOAD], "10.77.0.1:9").unwrap();
        }
    })
    .unwrap();

    let counters = program.counters().unwrap();
    assert_eq!(counters[0].reason, Reason::Pass);
    let pass = counters[0].passed;
    assert!(
        pass.packets >= DATAGRAMS,
        "guard saw {} packets, expected at least {DATAGRAMS}",
        pass.packets
    );
    // Ethernet + IPv4 + UDP headers around each payload.
    let wire = (PAYLOAD + 14 + 20 + 8) as u64;
    assert!(
        pass.bytes >= DATAGRAMS * wire,
        "guard counted {} bytes, expected at least {}",
        pass.bytes,
        DATAGRAMS * wire
    );

    logs.flush();
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("tether_guard: first pass packet on this CPU"),
        "aya-log record did not reach tracing; captured:\n{text}"
    );
}

/// Drops are counted once, per interface slot, and the totals are the sum of the slots: a slot
/// the agent takes from an interface must keep what it counted in the totals, and drops on an
/// interface without a slot must be counted too.
#[test]
fn drops_stay_in_the_totals_when_an_interface_loses_its_counter_slot() {
    use tether_agent::guard_program::{Cidr, Layout, Policy};

    require_root();
    let node = Netns::new("slots").unwrap();
    let peer = Netns::new("slotp").unwrap();
    veth(&node, "eth0", "10.78.0.1/24", &peer, "eth0", "10.78.0.2/24").unwrap();
    veth(&node, "eth1", "10.79.0.1/24", &peer, "eth1", "10.79.0.2/24").unwrap();

    let (mut program, _logs) = GuardProgram::load(None).unwrap();
    program
        .set_policy(&Policy {
            control_plane: Vec::new(),
            // UDP to a protected port from a source not allowed: one drop per datagram.
            protected_ports: vec![10250],
            allowed: vec![Cidr {
                addr: [192, 0, 2, 1].into(),
                len: 32,
            }],
            tunnel_protocols: Vec::new(),
            tunnel_ports: Vec::new(),
        })
        .unwrap();
    program.set_mode(Mode::Enforce).unwrap();
    node.run(|| program.attach("eth0", Layout::Ethernet))
        .unwrap()
        .unwrap();
    let claim = |program: &mut GuardProgram, interfaces: &[&str]| {
        let names: Vec<String> = interfaces.iter().map(|i| i.to_string()).collect();
        let uncounted = node
            .run(|| program.count_interfaces(&names))
            .unwrap()
            .unwrap();
        assert!(uncounted.is_empty(), "{uncounted:?}");
    };
    let send = |datagrams: u64| {
        peer.run(|| {
            let socket = UdpSocket::bind("10.78.0.2:0").unwrap();
            for _ in 0..datagrams {
                socket.send_to(b"knock", "10.78.0.1:10250").unwrap();
            }
        })
        .unwrap();
    };
    let dropped = |program: &GuardProgram| {
        let counters = program.counters().unwrap();
        let protected = counters
            .iter()
            .find(|c| c.reason == Reason::ProtectedPort)
            .unwrap();
        protected.dropped.packets
    };
    let on_interfaces = |program: &GuardProgram| -> Vec<(String, u64)> {
        let counters = program.counters_handle().unwrap();
        node.run(|| counters.read().map(|counts| counts.per_interface))
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|i| {
                let protected = i
                    .counts
                    .iter()
                    .find(|c| c.reason == Reason::ProtectedPort)
                    .unwrap();
                (i.interface, protected.dropped.packets)
            })
            .collect()
    };

    claim(&mut program, &["eth0"]);
    send(10);
    assert_eq!(dropped(&program), 10);
    assert_eq!(on_interfaces(&program), [("eth0".to_string(), 10)]);

    // eth0's slot is given up: its ten drops stay in the totals, and drops on it from now on
    // are counted as unclaimed.
    claim(&mut program, &["eth1"]);
    assert_eq!(dropped(&program), 10);
    assert_eq!(on_interfaces(&program), [("eth1".to_string(), 0)]);
    send(5);
    assert_eq!(dropped(&program), 15);

    // Back to eth0: its slot starts from zero, the totals go on.
    claim(&mut program, &["eth0", "eth1"]);
    send(3);
    assert_eq!(dropped(&program), 18);
    assert_eq!(
        on_interfaces(&program),
        [("eth0".to_string(), 3), ("eth1".to_string(), 0)]
    );
}
