//! `--server-addresses=each`: the agent is given every server, as a list of addresses or as a
//! name that resolves to all of them, and holds one stream to each with no load balancer and
//! no servercount; it follows the name's records as they change, and is back on a restarted
//! server by itself.
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is how a failed check reports"
)]

use std::path::Path;
use std::time::Duration;

use tether_tests::cluster::{Mode, Transport};
use tether_tests::peers::{self, Impl, Peer, ServerPorts};
use tether_tests::pki::Pki;
use tether_tests::process::wait_until;

const NAME: &str = "servers.tether.test";

/// Three servers on 127.0.0.1, .2 and .3, all on one agent port, each announcing a servercount
/// of 1: only by the addresses can an agent know there are three.
fn servers(pki: &Pki) -> (u16, Vec<ServerPorts>, Vec<Peer>) {
    let agent_port = peers::free_port().unwrap();
    let ports: Vec<ServerPorts> = (0..3)
        .map(|_| ServerPorts {
            agent: agent_port,
            ..ServerPorts::free().unwrap()
        })
        .collect();
    let servers = (0..3).map(|i| server(pki, &ports, i)).collect();
    (agent_port, ports, servers)
}

fn server(pki: &Pki, ports: &[ServerPorts], i: usize) -> Peer {
    peers::server(
        &Impl::Tether,
        pki,
        Mode::HttpConnect,
        Transport::Uds,
        &pki.dir().join(format!("s{i}.sock")),
        ports[i],
        &[
            format!("--agent-bind-address=127.0.0.{}", i + 1),
            format!("--server-id=server-{i}"),
        ],
    )
    .unwrap()
}

fn pki() -> Pki {
    Pki::new(&["127.0.0.2", "127.0.0.3", NAME]).unwrap()
}

fn hosts_file(path: &Path, last_octets: &[u8]) {
    use std::io::Write;
    // Rewritten in place: the agent's /etc/hosts is this file's inode, mounted.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)
        .unwrap();
    for octet in last_octets {
        writeln!(file, "127.0.0.{octet} {NAME}").unwrap();
    }
}

#[test]
fn an_address_list_reaches_every_server_and_a_restarted_one_again() {
    let pki = pki();
    let (agent_port, ports, mut servers) = servers(&pki);
    let agent = peers::agent(
        &Impl::Tether,
        &pki,
        agent_port,
        &[
            "--proxy-server-host=127.0.0.1,127.0.0.2,127.0.0.3".into(),
            "--server-addresses=each".into(),
        ],
    )
    .unwrap();
    assert!(
        peers::holds_servers(agent.health_port, 3.0),
        "{}",
        peers::logs_of(&agent, &servers)
    );

    servers.remove(1).kill().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || peers::metric(
            agent.health_port,
            "konnectivity_network_proxy_agent_open_server_connections "
        ) == Some(2.0)),
        "{}",
        peers::logs_of(&agent, &servers)
    );
    servers.insert(1, server(&pki, &ports, 1));
    assert!(
        peers::holds_servers(agent.health_port, 3.0),
        "the agent did not come back to the restarted server\n{}",
        peers::logs_of(&agent, &servers)
    );
    // Without its agent, the restarted server would not be ready.
    assert!(tether_tests::procs::wait_ready(
        servers[1].health_port,
        Duration::from_secs(5)
    ));
}

#[test]
fn a_name_is_followed_as_its_records_change() {
    let pki = pki();
    let (agent_port, _ports, mut servers) = servers(&pki);
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    hosts_file(&hosts, &[1, 2]);
    let agent = peers::agent_in(
        &Impl::Tether,
        &pki,
        agent_port,
        &[
            format!("--proxy-server-host={NAME}"),
            "--server-addresses=each".into(),
            "--resolve-interval=200ms".into(),
        ],
        Some(&hosts),
    )
    .unwrap();
    assert!(
        peers::holds_servers(agent.health_port, 2.0),
        "{}",
        peers::logs_of(&agent, &servers)
    );

    // .1 leaves the records and .3 joins: .3 is dialled; .1's stream is kept while it lasts.
    hosts_file(&hosts, &[2, 3]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            peers::metric(
                agent.health_port,
                "konnectivity_network_proxy_agent_open_server_connections ",
            ) == Some(3.0)
        }),
        "{}",
        peers::logs_of(&agent, &servers)
    );
    assert!(tether_tests::procs::wait_ready(
        servers[2].health_port,
        Duration::from_secs(5)
    ));
    // Once .1's server stops, nothing dials it again: the agent holds the two it resolves.
    servers.remove(0).kill().unwrap();
    assert!(
        peers::holds_servers(agent.health_port, 2.0),
        "{}",
        peers::logs_of(&agent, &servers)
    );
    let failures_before = connect_failures(&agent);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        connect_failures(&agent),
        failures_before,
        "the agent still dials an address gone from the records\n{}",
        peers::logs_of(&agent, &servers)
    );
}

fn connect_failures(agent: &Peer) -> f64 {
    peers::metrics_page(agent.health_port)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("tether_agent_server_connect_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
