//! Signals: the first SIGTERM drains (open tunnels continue, new ones are refused), the
//! deadline or the last tunnel ending finishes the process.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::http_connect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// DRAINs the server has received.
const DRAINS: &str = r#"konnectivity_network_proxy_server_stream_packets_total{segment="from_agent",packet_type="DRAIN"}"#;

/// Waits until the server has received the agent's DRAIN.
fn server_heard_drain(cluster: &Cluster) -> bool {
    tokio::task::block_in_place(|| {
        tether_tests::procs::wait_metric(
            cluster.server.health_port,
            DRAINS,
            1.0,
            Duration::from_secs(5),
        )
    })
}

async fn echo_once(stream: &mut Box<dyn tether_tests::frontend::Io>, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_drain_keeps_open_tunnels_refuses_new_ones_and_exits_when_they_end() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--drain-timeout=30s"],
    )
    .unwrap();
    let echo = destination::echo().await.to_string();
    let mut open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    echo_once(&mut open, b"before").await;

    let agent = cluster.agent.as_mut().unwrap();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    assert!(server_heard_drain(&cluster), "server never received DRAIN");
    let refused = http_connect(&cluster.target, &echo)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 502 Bad Gateway"), "{refused}");
    assert!(refused.contains("draining"), "{refused}");
    echo_once(&mut open, b"during drain").await;

    drop(open);
    let agent = cluster.agent.as_mut().unwrap();
    let status = agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
    // It ended its stream before leaving, instead of dropping the connection under it. The
    // log line is the subject: only it says how the stream ended.
    let gone = cluster
        .server
        .logged
        .logs
        .wait_for("agent disconnected", Duration::from_secs(5))
        .expect("server never saw the agent leave");
    assert!(gone.contains("agent closed the stream"), "{gone}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_drain_deadline_closes_what_is_left() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--drain-timeout=1s"],
    )
    .unwrap();
    let echo = destination::echo().await.to_string();
    let mut open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    echo_once(&mut open, b"x").await;
    let agent = cluster.agent.as_mut().unwrap();
    let start = Instant::now();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(status.success());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "exited after {took:?}"
    );
    assert!(agent.logged.logs.contains("drain deadline reached"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_stops_the_agent_at_once() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--drain-timeout=60s"],
    )
    .unwrap();
    let echo = destination::echo().await.to_string();
    let _open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    let agent = cluster.agent.as_mut().unwrap();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    assert!(
        server_heard_drain(&cluster),
        "the agent did not start draining"
    );
    let agent = cluster.agent.as_mut().unwrap();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(3))
        .unwrap();
    assert!(!status.success(), "a forced stop reports failure");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_graceful_shutdown_lets_open_tunnels_finish() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--graceful-shutdown-timeout=20s"],
        &[],
    )
    .unwrap();
    let echo = destination::echo().await.to_string();
    let mut open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    cluster
        .server
        .logged
        .process
        .signal(Signal::SIGTERM)
        .unwrap();
    let tether_tests::frontend::Target::Uds(socket) = &cluster.target else {
        panic!("a Unix-socket frontend")
    };
    assert!(
        tether_tests::process::wait_until(Duration::from_secs(5), || {
            std::os::unix::net::UnixStream::connect(socket).is_err()
        }),
        "the server still takes new frontend connections"
    );
    echo_once(&mut open, b"still flowing").await;
    drop(open);
    let status = cluster
        .server
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "server exited with {status}");
}

/// tether-server in this process, HTTP CONNECT on a Unix socket, every port chosen by the
/// kernel.
async fn in_process_server(pki: &tether_tests::pki::Pki) -> tether_server::app::Server {
    use clap::Parser;
    let pair = pki.pair("server");
    let args = tether_server::config::Args::try_parse_from([
        "tether-server".to_owned(),
        "--mode=http-connect".into(),
        format!("--uds-name={}", pki.dir().join("s.sock").display()),
        "--server-port=0".into(),
        "--agent-port=0".into(),
        "--health-port=0".into(),
        "--admin-port=0".into(),
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        "--allow-unauthenticated-agents".into(),
    ])
    .unwrap();
    let config = tether_server::config::Config::from_args(&args).unwrap();
    tether_server::app::start(config).await.unwrap()
}

/// A drain ends at its deadline with what is still open closed (client and agent both told),
/// and every listener, the health and admin ports included, stops; with nothing open it
/// returns at once.
#[tokio::test(flavor = "multi_thread")]
async fn server_drain_closes_what_is_left_and_stops_every_listener() {
    use tether_proto::{Message, Packet};
    use tether_tests::fake_agent::FakeAgent;
    use tether_tests::frontend::Target;

    let pki = tether_tests::pki::Pki::new(&[]).unwrap();
    let idle = in_process_server(&pki).await;
    let started = Instant::now();
    assert_eq!(idle.drain(Duration::from_secs(30)).await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let pki = tether_tests::pki::Pki::new(&[]).unwrap();
    let server = in_process_server(&pki).await;
    let mut agent = FakeAgent::connect(server.agent_addr.port(), &pki.ca(), "a")
        .await
        .unwrap();
    let target = Target::Uds(pki.dir().join("s.sock"));
    let client = tokio::spawn(async move { http_connect(&target, "192.0.2.1:80").await });
    let Some(Message::DialRequest(dial)) = agent
        .from_server
        .message()
        .await
        .unwrap()
        .map(Packet::into_message)
    else {
        panic!("no DIAL_REQ")
    };
    agent
        .to_server
        .send(Packet::dial_response(dial.random, 7, ""))
        .await
        .unwrap();
    let mut open = client.await.unwrap().unwrap().unwrap();

    let started = Instant::now();
    assert_eq!(server.drain(Duration::from_millis(500)).await, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), open.read_to_end(&mut rest))
        .await
        .expect("the client's connection stayed open")
        .unwrap();
    let mut told = false;
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(Some(packet)) = agent.from_server.message().await {
            told |= matches!(packet.into_message(), Message::CloseRequest(c) if c.connect_id == 7);
        }
    })
    .await;
    assert!(ended.is_ok(), "the agent stream stayed open");
    assert!(told, "the agent was not asked to close the connection");
    for (what, port) in [
        ("health", server.health_addr.port()),
        ("admin", server.admin_addr.port()),
        ("agent", server.agent_addr.port()),
    ] {
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "the {what} port still accepts"
        );
    }
    assert!(
        tokio::net::UnixStream::connect(pki.dir().join("s.sock"))
            .await
            .is_err(),
        "the frontend socket still accepts"
    );
}

/// After SIGTERM each binary exits successfully only once every task it started has ended
/// (otherwise it names how many are left and fails): here with the guard's tasks, the dial
/// hooks' Service map follower and an open tunnel in the agent, and that tunnel in the server.
#[test]
fn both_binaries_exit_with_every_task_ended() {
    use tether_tests::guard_site::{CP, NODE, Site, open_through};
    let mut site = Site::new("exit");
    let cgroup = tether_tests::cgroup::TestCgroup::new("exit").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("services");
    std::fs::write(&map, format!("10.96.0.10:80/tcp {NODE}:10250\n")).unwrap();
    let mut agent = site.agent_in_cgroup(
        &cgroup,
        None,
        &[
            "--guard-interface=eth0".into(),
            format!("--control-plane-cidr={CP}/32"),
            format!("--service-map-file={}", map.display()),
            "--drain-timeout=1s".into(),
        ],
    );
    let open = open_through(&site.socket, NODE).unwrap();
    exits_cleanly_on_sigterm("agent", &mut agent.logged);
    exits_cleanly_on_sigterm("server", &mut site.server.logged);
    drop(open);
}

fn exits_cleanly_on_sigterm(who: &str, logged: &mut tether_tests::procs::Logged) {
    logged.process.signal(Signal::SIGTERM).unwrap();
    let status = logged
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(
        status.success(),
        "{who} exited with {status}:\n{}",
        logged.logs.lines().join("\n")
    );
}
