//! tether-server keeps nothing an agent or a client leaves behind, and no agent or client can
//! make it grow without bound.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::Duration;

use bytes::Bytes;
use tether_proto::Packet;
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::fake_agent::FakeAgent;
use tether_tests::frontend::{Event, GrpcTunnel, grpc_client, http_connect};
use tether_tests::peers::metric;
use tether_tests::process::{rss_kib, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ESTABLISHED: &str = "konnectivity_network_proxy_server_established_connections ";

/// A gRPC client that breaks the protocol on an established connection must not leave the
/// agent's connection (and the server's entry) open until the destination next speaks.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_grpc_client_releases_the_destination_at_once() {
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let port = cluster.server.health_port;
    let (silent, mut closed) = destination::silent_until_closed().await;
    let mut client = grpc_client(&cluster.target).await.unwrap();

    // DATA for a connection this stream does not own.
    let mut tunnel = GrpcTunnel::dial(&mut client, &silent.to_string())
        .await
        .unwrap()
        .unwrap();
    tunnel
        .sender()
        .send(Packet::data(
            tunnel.connect_id + 1,
            Bytes::from_static(b"x"),
        ))
        .await
        .unwrap();
    assert_eq!(
        tunnel.next().await.unwrap(),
        Some(Event::Closed("mismatched connection IDs".into()))
    );
    tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the destination stayed open after a mismatched connectID");

    // DIAL_CLS on a connection that is already established.
    let tunnel = GrpcTunnel::dial(&mut client, &silent.to_string())
        .await
        .unwrap()
        .unwrap();
    tunnel.sender().send(Packet::close_dial(1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the destination stayed open after DIAL_CLS on an open connection");
    assert!(
        wait_until(Duration::from_secs(5), || metric(port, ESTABLISHED)
            == Some(0.0)),
        "the server still counts the connections"
    );
}

/// A client that closes asks the agent to close; the agent's CLOSE_RSP is the expected answer,
/// not an unknown one.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_close_is_answered_not_rejected() {
    let unknown = "tether_server_rejected_total{reason=\"close_unknown_connect_id\"}";
    for mode in [Mode::HttpConnect, Mode::Grpc] {
        let cluster = Cluster::start(mode, Transport::Uds, &[], &[]).unwrap();
        let port = cluster.server.health_port;
        let echo = destination::echo().await.to_string();
        for _ in 0..5 {
            match mode {
                Mode::HttpConnect => {
                    let stream = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
                    drop(stream);
                }
                Mode::Grpc => {
                    let mut client = grpc_client(&cluster.target).await.unwrap();
                    let tunnel = GrpcTunnel::dial(&mut client, &echo).await.unwrap().unwrap();
                    drop(tunnel);
                }
            }
        }
        assert!(
            wait_until(Duration::from_secs(5), || metric(port, ESTABLISHED)
                == Some(0.0)),
            "{mode:?}: connections still counted"
        );
        // Every CLOSE_RSP has had time to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            metric(port, unknown),
            None,
            "{mode:?}: a close was counted as unknown"
        );
    }
}

/// One agent sends DATA for connections it does not have, up to a million times, and never
/// reads the CLOSE_REQs that earns it. The server cuts it off instead of queueing (or spawning)
/// without end; its memory and tasks stay bounded, and another agent keeps tunnelling.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_floods_and_never_reads_is_cut_off() {
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--proxy-strategies=destHost"],
        &["--agent-identifiers=ipv4=127.0.0.1"],
    )
    .unwrap();
    let port = cluster.server.health_port;
    let pid = cluster.server.logged.process.pid();
    let echo = destination::echo().await.to_string();
    let rss_before = rss_kib(pid);
    let tasks_before = metric(port, "tether_tasks ").unwrap_or(0.0);

    let hostile = FakeAgent::connect(cluster.server.agent_port, &cluster.pki.ca(), "hostile")
        .await
        .unwrap();
    let _never_read = hostile.from_server;
    let tx = hostile.to_server;
    let flood = tokio::spawn(async move {
        for i in 0..1_000_000i64 {
            let packet = Packet::data(1_000_000 + i, Bytes::from_static(b"x"));
            if tx.send(packet).await.is_err() {
                break;
            }
        }
    });
    let (mut peak_rss, mut peak_tasks) = (rss_before, tasks_before);
    let cut = "tether_server_rejected_total{reason=\"agent_not_reading\"} ";
    let cut_off = wait_until(Duration::from_secs(60), || {
        peak_rss = peak_rss.max(rss_kib(pid));
        peak_tasks = peak_tasks.max(metric(port, "tether_tasks ").unwrap_or(0.0));
        metric(port, cut).is_some_and(|n| n >= 1.0) || flood.is_finished()
    });
    flood.abort();
    assert!(cut_off, "neither cut off nor done within 60 s");
    assert_eq!(metric(port, cut), Some(1.0), "the agent was not cut off");
    let mut stream = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    stream.write_all(b"still here").await.unwrap();
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"still here");
    let grew = peak_rss.saturating_sub(rss_before);
    assert!(grew < 64 * 1024, "resident memory grew by {grew} KiB");
    assert!(
        peak_tasks < tasks_before + 50.0,
        "tasks went from {tasks_before} to {peak_tasks}"
    );
}

/// A gRPC client that goes away while its connection waits for the agent's window (the
/// destination stopped reading, so nothing more of the client's stream is read) releases the
/// connection at once: the session notices the response stream dropped instead of waiting for
/// a window that will not open. The client is written frame by frame, so that leaving means
/// its connection closing with data still unread, as when kube-apiserver's client gives up.
#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_client_that_leaves_while_blocked_releases_its_connection() {
    use tether_tests::raw_h2::{Event as H2Event, RawH2};
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let port = cluster.server.health_port;
    let hole = destination::black_hole().await.to_string();
    let io = tether_tests::frontend::raw_h2(&cluster.target)
        .await
        .unwrap();
    let mut h2 = RawH2::handshake(io, b"localhost").await.unwrap();
    let stream = h2.open_proxy().await.unwrap();
    h2.send(stream, &Packet::dial_request(&hole, 5), false)
        .await
        .unwrap();
    let connect_id = loop {
        match h2.next().await.unwrap().1 {
            H2Event::Packet(packet) => match packet.into_message() {
                tether_proto::Message::DialResponse(rsp) => break rsp.connect_id,
                other => panic!("expected DIAL_RSP, got {other:?}"),
            },
            H2Event::Headers(_) => {}
            H2Event::Trailers(trailers) => panic!("stream ended: {trailers:?}"),
        }
    };
    // 7.6 MB: far past the agent's window and the destination's socket buffers, within the
    // HTTP/2 windows the server grants.
    let piece = Bytes::from(vec![0u8; 16_000]);
    for _ in 0..480 {
        h2.send(stream, &Packet::data(connect_id, piece.clone()), false)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(port, ESTABLISHED), Some(1.0));
    drop(h2);
    assert!(
        wait_until(Duration::from_secs(5), || metric(port, ESTABLISHED)
            == Some(0.0)),
        "the server still holds the connection of a client that left"
    );
}

/// After a CONNECT client's half-close, a destination that answers slowly, or a client that
/// reads a large answer slowly, is given all the time it needs while the reply moves; a
/// destination that neither reads nor answers is closed once both directions have stood still
/// for --half-close-timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_half_closed_connection_lasts_while_it_moves() {
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--half-close-timeout=1s"],
        &[],
    )
    .unwrap();
    // Reads to EOF, then answers a byte every 400 ms for 4 s.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            stream.write_all(&[b'0' + i]).await.unwrap();
        }
    });
    let mut client = http_connect(&cluster.target, &slow.to_string())
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), client.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"0123456789", "a slow reply was cut short");

    // A client that reads a large reply slowly after its half-close is not cut either.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let big = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        stream.write_all(&vec![9u8; 1 << 20]).await.unwrap();
    });
    let mut client = http_connect(&cluster.target, &big.to_string())
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match client.read(&mut buf).await.unwrap() {
            0 => break,
            n => got += n,
        }
    }
    assert_eq!(got, 1 << 20, "a slowly read reply was cut short");

    let silent = destination::never_reads().await;
    let mut client = http_connect(&cluster.target, &silent.to_string())
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "a half-closed connection to a silent destination was still open after 10 s"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed after {:?}, before --half-close-timeout",
        started.elapsed()
    );
}
