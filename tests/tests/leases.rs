//! Server Leases between tether's own binaries, against the stand-in kube-apiserver: servers
//! publish them, agents count them, and a server that dies without deleting its Lease stops
//! being counted once the Lease lapses and a surviving server deletes it.
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is how a failed check reports"
)]

use std::time::Duration;

use tether_tests::cluster::{Mode, Transport};
use tether_tests::kube_api::{Cluster, KubeApi};
use tether_tests::peers::{self, Impl, Peer, ServerPorts};
use tether_tests::pki::Pki;
use tether_tests::process::wait_until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_servers_that_come_and_go_by_their_leases() {
    let pki = Pki::new(&[]).unwrap();
    let api_pair = pki.pair("server");
    let (api, api_port) =
        KubeApi::start_on_loopback(Cluster::default(), &api_pair.cert, &api_pair.key);
    let kubeconfig = KubeApi::kubeconfig(pki.dir(), api_port, &pki.ca());
    let kube = format!("--kubeconfig={}", kubeconfig.display());
    let ports: Vec<ServerPorts> = (0..3).map(|_| ServerPorts::free().unwrap()).collect();
    let mut servers: Vec<Peer> = (0..3)
        .map(|i| {
            peers::server(
                &Impl::Tether,
                &pki,
                Mode::HttpConnect,
                Transport::Uds,
                &pki.dir().join(format!("s{i}.sock")),
                ports[i],
                &[
                    kube.clone(),
                    "--enable-lease-controller".into(),
                    "--lease-duration=3s".into(),
                    "--lease-renew-interval=1s".into(),
                    format!("--server-id=server-{i}"),
                ],
            )
            .unwrap()
        })
        .collect();
    let lb = peers::balancer(&ports).await;
    let agent = peers::agent(
        &Impl::Tether,
        &pki,
        lb.port(),
        &[kube.clone(), "--count-server-leases".into()],
    )
    .unwrap();
    let logs = |servers: &[Peer]| peers::logs_of(&agent, servers);
    assert!(
        peers::holds_servers(agent.health_port, 3.0),
        "{}",
        logs(&servers)
    );

    // Killed: its Lease stays until it lapses and a surviving server deletes it.
    servers.remove(0).kill().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || api
            .leases
            .list("kube-system")
            .len()
            == 2),
        "nobody deleted the dead server's Lease: {:#?}\n{}",
        api.leases.list("kube-system"),
        logs(&servers)
    );
    let culled: f64 = servers
        .iter()
        .filter_map(|s| {
            peers::metric(
                s.health_port,
                "konnectivity_network_proxy_server_culled_leases_count ",
            )
        })
        .sum();
    assert_eq!(culled, 1.0, "{}", logs(&servers));
    assert!(
        peers::holds_servers(agent.health_port, 2.0),
        "{}",
        logs(&servers)
    );

    // Stopped: the server deletes its own Lease as it drains.
    let stopped = servers.remove(0);
    stopped
        .logged
        .process
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || api
            .leases
            .list("kube-system")
            .len()
            == 1),
        "the stopped server left its Lease: {:#?}",
        api.leases.list("kube-system")
    );
    drop(stopped);
    assert!(
        peers::holds_servers(agent.health_port, 1.0),
        "{}",
        logs(&servers)
    );
    let names: Vec<String> = api
        .leases
        .list("kube-system")
        .iter()
        .map(|l| l["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["konnectivity-proxy-server-server-2"]);
}
