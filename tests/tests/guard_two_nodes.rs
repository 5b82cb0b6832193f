//! Two nodes, each with its agent and its guard enforcing, behind one control plane: dials to
//! each node's kubelet (logs, exec) reach it through that node's own agent. With the server's
//! documented strategy, destHost,default, and the agents advertising their nodes' addresses
//! (one by flag, as the DaemonSet does from the downward API, one by the agent's default), no
//! dial is handed to the other node's agent, whose direct dial the target's guard would drop.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::Duration;

use tether_tests::bpffs::Bpffs;
use tether_tests::guard_site::{get_through, kubelet, metric_in, start_server};
use tether_tests::netns::{Netns, veth};
use tether_tests::pki::Pki;
use tether_tests::procs::{Agent, wait_ready};
use tether_tests::require_root;

/// The control plane's address on each node's link, and the node's.
const NODES: [(&str, &str, &str); 2] = [
    ("a", "10.78.1.1", "10.78.1.2"),
    ("b", "10.78.2.1", "10.78.2.2"),
];

#[test]
fn each_nodes_kubelet_is_reached_through_its_own_agent_with_both_guards_on() {
    require_root();
    let cp_addresses: Vec<&str> = NODES.iter().map(|(_, cp, _)| *cp).collect();
    let pki = Pki::new(&cp_addresses).unwrap();
    let socket = pki.dir().join("s.sock");
    let cp = Netns::new("two-cp").unwrap();
    let mut nodes = Vec::new();
    for (name, cp_address, node_address) in NODES {
        let node = Netns::new(&format!("two-{name}")).unwrap();
        veth(
            &cp,
            &format!("to-{name}"),
            &format!("{cp_address}/24"),
            &node,
            "eth0",
            &format!("{node_address}/24"),
        )
        .unwrap();
        node.ip(&["route", "add", "default", "via", cp_address])
            .unwrap();
        nodes.push(node);
    }
    // The control plane routes between the nodes, as a cluster network does.
    cp.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap()
        .unwrap();
    kubelet(&nodes[0], NODES[0].2, "node-a");
    kubelet(&nodes[1], NODES[1].2, "node-b");

    let server = start_server(
        &cp,
        &pki,
        &socket,
        &["--proxy-strategies=destHost,default".to_owned()],
    );

    let bpffs = [Bpffs::mount().unwrap(), Bpffs::mount().unwrap()];
    let control_plane = format!("--control-plane-cidr={}", cp_addresses.join(","));
    let agents: Vec<Agent> = NODES
        .iter()
        .enumerate()
        .map(|(i, (_, cp_address, node_address))| {
            let mut args = vec![
                format!("--proxy-server-host={cp_address}"),
                format!("--proxy-server-port={}", server.agent_port),
                format!("--ca-cert={}", pki.ca().display()),
                format!("--bpffs-root={}", bpffs[i].root().display()),
                "--guard-mode=enforce".into(),
                control_plane.clone(),
            ];
            if i == 0 {
                args.push(format!("--agent-identifiers=ipv4={node_address}"));
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let agent = Agent::start_in(&nodes[i], &refs).unwrap();
            assert!(
                nodes[i]
                    .run(|| wait_ready(agent.health_port, Duration::from_secs(10)))
                    .unwrap()
            );
            agent
        })
        .collect();
    // The subject is the start line: it tells the operator what the agent advertises.
    let started = agents[1]
        .logged
        .logs
        .wait_for("tether-agent started", Duration::from_secs(1))
        .unwrap();
    assert!(
        started.contains(&format!("ipv4={}", NODES[1].2)),
        "the agent without --agent-identifiers did not advertise its node: {started}"
    );

    // Each node's guard refuses the other node directly: the dial a wrong agent would make.
    let cross = nodes[0]
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &format!("{}:10250", NODES[1].2).parse().unwrap(),
                Duration::from_millis(500),
            )
        })
        .unwrap();
    assert!(cross.is_err(), "node a reached node b's kubelet directly");

    for round in 0..10 {
        for (name, _, node_address) in NODES {
            let reply = get_through(&socket, node_address)
                .unwrap_or_else(|err| panic!("round {round}: dial to node {name} failed: {err}"));
            assert!(
                reply.ends_with(&format!("node-{name}")),
                "round {round}: node {name}'s dial answered {reply:?}"
            );
        }
    }
    // Every dial went to the node's own agent, which dials its kubelet on the node itself:
    // neither guard had anything to drop.
    for (i, agent) in agents.iter().enumerate() {
        let metric = |series: &str| metric_in(&nodes[i], agent.health_port, series);
        let dropped =
            metric(r#"tether_agent_guard_packets_total{reason="protected_port",action="drop"}"#);
        // The one cross-node attempt above, on node b.
        assert_eq!(dropped, Some(u64::from(i == 1)), "node {}", NODES[i].0);
        let dials = metric("konnectivity_network_proxy_agent_dial_duration_seconds_count");
        assert_eq!(dials, Some(10), "node {}", NODES[i].0);
    }
}
