//! Nobody who can reach one of tether-server's ports can make it hold without bound: TLS
//! handshakes in flight, streams per agent connection, idle agent connections, probe and scrape
//! connections, and accept loops when the process runs out of file descriptors.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::fake_agent::{self, FakeAgent};
use tether_tests::frontend::Target;
use tether_tests::peers::metric;
use tether_tests::process::{cpu_time, open_fds, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENT_STREAMS: &str =
    "konnectivity_network_proxy_server_grpc_connections{service_method=\"Connect\"} ";

/// Waits until the server's peer closes `stream` (EOF or reset), at most `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// The health port serves at most 64 connections at once, closes one that sends no request
/// head within 5 s, and refuses heads over 16 KiB.
#[test]
fn probe_connections_are_capped_and_timed_out() {
    let cluster = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &[]).unwrap();
    let pid = cluster.server.logged.process.pid();
    let port = cluster.server.health_port;
    let base = open_fds(pid);
    let started = Instant::now();
    let mut silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = open_fds(pid) - base;
    assert!(
        held <= 64,
        "the server holds {held} silent probe connections"
    );
    for stream in &mut silent {
        assert!(
            closed_within(stream, Duration::from_secs(15)),
            "a silent connection was not closed"
        );
    }
    // Two rounds of the 5 s header timeout and 0.5 s linger (64, then 36), not upstream's 60 s.
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "silent connections closed only after {:?}",
        started.elapsed()
    );

    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let header = "x".repeat(20 << 10);
    // The server may stop reading once the head is too long; what counts is its answer.
    let _ = big.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {header}\r\n\r\n").as_bytes(),
    );
    let mut answer = String::new();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = big.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "a 20 KiB request head got {answer:?}"
    );
    assert!(
        metric(port, "tether_tasks ").is_some(),
        "health port stopped serving"
    );
}

/// A connection to the agent port from `source` (an address on loopback).
fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let bind: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&bind.into()).unwrap();
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// Hundreds of clients that connect to the agent port and never start TLS hold at most the
/// handshake limit of the server's file descriptors, and one source address at most its
/// share of unproven connections; agents still get in once they leave.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_are_limited() {
    let cluster = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &[]).unwrap();
    let pid = cluster.server.logged.process.pid();
    let port = cluster.server.agent_port;
    let base = open_fds(pid);
    // One source: its 32 unproven connections, no more.
    let from_one: Vec<TcpStream> = (0..100).map(|_| connect_from("127.0.0.2", port)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = open_fds(pid) - base;
    assert!(
        (30..=34).contains(&held),
        "100 stalled connections from one address hold {held} descriptors (limit 32 per source)"
    );
    drop(from_one);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Ten sources, 30 each: the handshake limit.
    let stalled: Vec<TcpStream> = (0..300)
        .map(|i| connect_from(&format!("127.0.1.{}", i % 10 + 1), port))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = open_fds(pid) - base;
    assert!(
        (100..=130).contains(&held),
        "300 stalled handshakes hold {held} descriptors (limit 128)"
    );
    drop(stalled);
    let agent = tokio::time::timeout(
        Duration::from_secs(15),
        FakeAgent::connect(cluster.server.agent_port, &cluster.pki.ca(), "late"),
    )
    .await;
    assert!(
        matches!(agent, Ok(Ok(_))),
        "an agent could not connect afterwards"
    );
}

/// One TLS connection carries at most 8 agent streams; a second connection is not held to
/// the first one's count.
#[tokio::test(flavor = "multi_thread")]
async fn agent_streams_per_connection_are_limited() {
    let cluster = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &[]).unwrap();
    let (port, ca) = (cluster.server.agent_port, cluster.pki.ca());
    let health = cluster.server.health_port;
    let channel = fake_agent::channel(port, &ca).await.unwrap();
    let mut opening = Vec::new();
    for i in 0..20 {
        let channel = channel.clone();
        opening.push(tokio::spawn(async move {
            FakeAgent::open(channel, &format!("agent-{i}")).await
        }));
    }
    assert!(
        wait_until(Duration::from_secs(10), || metric(health, AGENT_STREAMS)
            == Some(8.0)),
        "streams on one connection: {:?}",
        metric(health, AGENT_STREAMS)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(metric(health, AGENT_STREAMS), Some(8.0));
    let _other = FakeAgent::connect(port, &ca, "other").await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || metric(
        health,
        AGENT_STREAMS
    ) == Some(9.0)));
    for task in opening {
        task.abort();
    }
}

/// An agent-port connection that carries no agent stream is closed after
/// `--agent-idle-timeout`, both when it never opens one and once its last one ends; one with
/// a stream open stays.
#[tokio::test(flavor = "multi_thread")]
async fn idle_agent_connections_are_closed() {
    let cluster = Cluster::server_only(
        Mode::HttpConnect,
        Transport::Uds,
        &["--agent-idle-timeout=1s"],
    )
    .unwrap();
    let (port, ca) = (cluster.server.agent_port, cluster.pki.ca());
    let pid = cluster.server.logged.process.pid();

    // HTTP/2 preface and SETTINGS, then nothing.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = fake_agent::tls_connector(&ca)
        .unwrap()
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a connection with no stream stayed open 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );

    let base = open_fds(pid);
    let channel = fake_agent::channel(port, &ca).await.unwrap();
    let agent = FakeAgent::open(channel.clone(), "busy").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        metric(cluster.server.health_port, AGENT_STREAMS),
        Some(1.0),
        "a connection with an open stream was closed"
    );
    assert!(open_fds(pid) > base);
    drop(agent);
    assert!(
        wait_until(Duration::from_secs(5), || open_fds(pid) <= base),
        "the connection stayed open after its last stream ended"
    );
    drop(channel);
}

/// `prlimit` on another process's open-files limit; returns the soft limit it replaced.
fn set_nofile(pid: u32, soft: &str) -> String {
    let old = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            "--nofile",
            "--output=SOFT",
            "--noheadings",
        ])
        .output()
        .unwrap();
    let old = String::from_utf8(old.stdout).unwrap().trim().to_owned();
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed");
    old
}

/// A frontend listener out of file descriptors backs off instead of spinning, counts each
/// failure, and serves the connections that waited once descriptors are free again; in both
/// modes, which share the accept loop.
#[tokio::test(flavor = "multi_thread")]
async fn accept_backs_off_when_out_of_descriptors() {
    for mode in [Mode::HttpConnect, Mode::Grpc] {
        let cluster = Cluster::server_only(mode, Transport::Uds, &[]).unwrap();
        let Target::Uds(path) = &cluster.target else {
            unreachable!("a UDS cluster has a UDS target")
        };
        let pid = cluster.server.logged.process.pid();
        let port = cluster.server.health_port;
        let old = set_nofile(pid, &(open_fds(pid) + 8).to_string());
        let mut waiting = Vec::new();
        for _ in 0..20 {
            waiting.push(tokio::net::UnixStream::connect(path).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = cpu_time(pid);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let used = cpu_time(pid) - before;
        set_nofile(pid, &old);
        assert!(
            used < Duration::from_millis(300),
            "{mode:?}: the server used {used:?} of CPU in 3 s out of descriptors"
        );
        let errors = "tether_server_accept_errors_total{listener=\"frontend\"} ";
        assert!(
            wait_until(Duration::from_secs(5), || metric(port, errors)
                .is_some_and(|n| n >= 1.0)),
            "{mode:?}: accept errors not counted: {:?}",
            metric(port, errors)
        );
        if mode == Mode::HttpConnect {
            let last = waiting.last_mut().unwrap();
            last.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
                .await
                .unwrap();
            let mut answer = vec![0u8; 12];
            tokio::time::timeout(Duration::from_secs(5), last.read_exact(&mut answer))
                .await
                .expect("a connection that waited out the shortage was never served")
                .unwrap();
            assert_eq!(&answer, b"HTTP/1.1 500");
        }
    }
}
