//! tether-agent end to end against tether-server (and a hostile stand-in): real processes,
//! real TLS.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::hash::{DefaultHasher, Hasher};
use std::time::{Duration, Instant};

use tether_proto::{Message, Packet};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::fake_server::FakeServer;
use tether_tests::frontend::{Event, GrpcTunnel, grpc_client, http_connect};
use tether_tests::pki::Pki;
use tether_tests::process::wait_until;
use tether_tests::procs::{Agent, Server, connect_server_args, http_get, wait_ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn metric(port: u16, line_prefix: &str) -> Option<f64> {
    let (_, text) = http_get(port, "/metrics").ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_mib_each_way_arrives_byte_exact() {
    const TOTAL: usize = 100 << 20;
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();
    let echo = destination::echo().await.to_string();
    let stream = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sender = tokio::spawn(async move {
        let mut hash = DefaultHasher::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < TOTAL {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = ((sent + i) % 251) as u8;
            }
            hash.write(&chunk);
            writer.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        hash.finish()
    });
    let mut hash = DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    while received < TOTAL {
        let n = match tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf)).await {
            Ok(n) => n.unwrap(),
            Err(_) => {
                let (_, a) =
                    http_get(cluster.agent.as_ref().unwrap().health_port, "/metrics").unwrap();
                let (_, s) = http_get(cluster.server.health_port, "/metrics").unwrap();
                panic!("stalled at {received}\nAGENT\n{a}\nSERVER\n{s}");
            }
        };
        assert!(n > 0, "tunnel closed after {received} bytes");
        hash.write(&buf[..n]);
        received += n;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(
        hash.finish(),
        sender.await.unwrap(),
        "echoed bytes differ from what was sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_connections_at_once() {
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();
    let echo = destination::echo().await.to_string();
    let mut streams = Vec::new();
    for _ in 0..500 {
        streams.push(http_connect(&cluster.target, &echo).await.unwrap().unwrap());
    }
    let agent_port = cluster.agent.as_ref().unwrap().health_port;
    assert_eq!(
        metric(
            agent_port,
            "konnectivity_network_proxy_agent_open_endpoint_connections "
        ),
        Some(500.0)
    );
    for (i, stream) in streams.iter_mut().enumerate() {
        let msg = format!("conn {i:04}");
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    drop(streams);
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric(
                agent_port,
                "konnectivity_network_proxy_agent_open_endpoint_connections ",
            ) == Some(0.0)
        }),
        "connections were not released after the clients closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_port_error_text_reaches_the_client() {
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let (_refusing, closed) = destination::refusing_port();
    let closed = closed.to_string();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let error = GrpcTunnel::dial(&mut client, &closed)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(error.ends_with("connect: connection refused"), "{error}");
    let agent_port = cluster.agent.as_ref().unwrap().health_port;
    assert_eq!(
        metric(
            agent_port,
            r#"konnectivity_network_proxy_agent_endpoint_dial_failure_total{reason="unknown"}"#
        ),
        Some(1.0)
    );
}

/// Sends into a destination that never reads; returns the close error, or `None` when the
/// tunnel pushed back (the sender blocked) instead of closing.
async fn fill_black_hole(stuck: &mut GrpcTunnel) -> Option<String> {
    let chunk = vec![0u8; 32 * 1024];
    // Far more than the kernel's socket buffers plus any queue or window.
    for _ in 0..1024 {
        match tokio::time::timeout(Duration::from_millis(500), stuck.send(&chunk)).await {
            Err(_) => return None,
            Ok(Err(_)) => break,
            Ok(Ok(())) => {}
        }
        if let Ok(Ok(Some(Event::Closed(error)))) =
            tokio::time::timeout(Duration::from_millis(1), stuck.next()).await
        {
            return Some(error);
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), stuck.next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(Event::Closed(error)) => Some(error),
        other => panic!("expected CLOSE_RSP, got {other:?}"),
    }
}

async fn stalled_destination_case(agent_args: &[&str]) -> (Option<String>, Cluster) {
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], agent_args).unwrap();
    let echo = destination::echo().await.to_string();
    let hole = destination::black_hole().await.to_string();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let mut interactive = GrpcTunnel::dial(&mut client, &echo).await.unwrap().unwrap();
    let baseline = tether_tests::rtt::grpc_rtt(&mut interactive, 20)
        .await
        .unwrap();
    let mut stuck = GrpcTunnel::dial(&mut client, &hole).await.unwrap().unwrap();
    let outcome = fill_black_hole(&mut stuck).await;
    let during = tether_tests::rtt::grpc_rtt(&mut interactive, 20)
        .await
        .unwrap();
    assert!(
        during <= baseline + Duration::from_millis(100),
        "round trip went from {baseline:?} to {during:?} while another destination stalled"
    );
    (outcome, cluster)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_destination_pushes_back_on_its_own_connection_only() {
    let (outcome, cluster) = stalled_destination_case(&[]).await;
    assert_eq!(
        outcome, None,
        "with flow control the sender waits instead of the tunnel closing"
    );
    let agent_port = cluster.agent.as_ref().unwrap().health_port;
    assert_eq!(
        metric(agent_port, "tether_agent_queue_full_total "),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_the_server_restarts() {
    let pki = Pki::new(&[]).unwrap();
    let port = tether_tests::peers::free_port().unwrap();
    let uds = pki.dir().join("s.sock");
    let agent_port = format!("--agent-port={port}");
    let args = connect_server_args(&pki, &uds, &[&agent_port]);
    let server = Server::start(&args).unwrap();
    let _agent = Agent::start(&[
        &format!("--proxy-server-port={port}"),
        &format!("--ca-cert={}", pki.ca().display()),
        "--sync-interval=100ms",
        "--sync-interval-cap=1s",
    ])
    .unwrap();
    assert!(wait_ready(server.health_port, Duration::from_secs(10)));
    drop(server);

    let restarted = Server::start(&args).unwrap();
    let start = Instant::now();
    assert!(
        wait_ready(restarted.health_port, Duration::from_secs(5)),
        "agent did not come back"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "reconnect took {:?} (cap 1s)",
        start.elapsed()
    );
    let target = tether_tests::frontend::Target::Uds(uds);
    let hello = destination::hello().await.to_string();
    let mut stream = http_connect(&target, &hello).await.unwrap().unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.ends_with("hello from destination"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn holds_one_stream_per_server_when_server_count_is_two() {
    let pki = Pki::new(&[]).unwrap();
    let pair = pki.pair("server");
    let start = |id: &str| {
        let args = [
            format!("--cluster-cert={}", pair.cert.display()),
            format!("--cluster-key={}", pair.key.display()),
            "--allow-unauthenticated-agents".to_owned(),
            format!(
                "--uds-name={}",
                pki.dir().join(format!("{id}.sock")).display()
            ),
            "--server-port=0".into(),
            "--server-count=2".into(),
            format!("--server-id={id}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&args).unwrap()
    };
    let a = start("server-a");
    let b = start("server-b");
    let lb = tether_tests::lb::round_robin(vec![
        format!("127.0.0.1:{}", a.agent_port).parse().unwrap(),
        format!("127.0.0.1:{}", b.agent_port).parse().unwrap(),
    ])
    .await;
    let agent = Agent::start(&[
        &format!("--proxy-server-port={}", lb.port()),
        &format!("--ca-cert={}", pki.ca().display()),
        "--sync-interval=50ms",
        "--sync-interval-cap=500ms",
    ])
    .unwrap();
    assert!(
        wait_ready(a.health_port, Duration::from_secs(10)),
        "server a has no agent"
    );
    assert!(
        wait_ready(b.health_port, Duration::from_secs(10)),
        "server b has no agent"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        metric(
            agent.health_port,
            "konnectivity_network_proxy_agent_open_server_connections ",
        ) == Some(2.0)
    }));
    assert_eq!(
        metric(
            agent.health_port,
            "konnectivity_network_proxy_agent_known_server_count "
        ),
        Some(2.0)
    );
    // Stays at two: no third stream to an already-held server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(
            agent.health_port,
            "konnectivity_network_proxy_agent_open_server_connections "
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn presents_upstream_metadata_and_a_rotated_token_on_reconnect() {
    let pki = Pki::new(&[]).unwrap();
    let mut fake = FakeServer::start(&pki, "fake-1").await.unwrap();
    let token = pki.dir().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let _agent = Agent::start(&[
        &format!("--proxy-server-port={}", fake.port),
        &format!("--ca-cert={}", pki.ca().display()),
        &format!("--service-account-token-path={}", token.display()),
        "--agent-id=node-1",
        "--agent-identifiers=host=node-1&ipv4=10.0.0.5",
        "--sync-interval=100ms",
        "--sync-interval-cap=500ms",
    ])
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), fake.streams.recv())
        .await
        .unwrap()
        .unwrap();
    let presented = fake.presented();
    assert_eq!(presented[0].agent_id.as_deref(), Some("node-1"));
    assert_eq!(
        presented[0].identifiers.as_deref(),
        Some("host=node-1&ipv4=10.0.0.5")
    );
    assert_eq!(
        presented[0].authorization.as_deref(),
        Some("Bearer first-token"),
        "trailing newline trimmed"
    );

    std::fs::write(&token, "second-token").unwrap();
    drop(first); // the server ends the stream; the agent reconnects
    let _second = tokio::time::timeout(Duration::from_secs(10), fake.streams.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fake.presented()[1].authorization.as_deref(),
        Some("Bearer second-token")
    );
}

/// An agent with `extra` flags connected to a stand-in server, and its stream there.
async fn against_stand_in(
    extra: &[&str],
) -> (
    Pki,
    FakeServer,
    Agent,
    tether_tests::fake_server::FakeStream,
) {
    let pki = Pki::new(&[]).unwrap();
    let mut fake = FakeServer::start(&pki, "stand-in").await.unwrap();
    let port = format!("--proxy-server-port={}", fake.port);
    let ca = format!("--ca-cert={}", pki.ca().display());
    let mut args = vec![port.as_str(), ca.as_str()];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(10), fake.streams.recv())
        .await
        .unwrap()
        .unwrap();
    (pki, fake, agent, stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_hostile_server() {
    let (_pki, _fake, agent, mut stream) = against_stand_in(&[]).await;

    let unknown_type = Packet {
        r#type: 99,
        payload: None,
    };
    stream.to_agent.send(unknown_type).await.unwrap();
    stream
        .to_agent
        .send(Packet::data(0, bytes::Bytes::from_static(b"x")))
        .await
        .unwrap();
    stream
        .to_agent
        .send(Packet::data(777, bytes::Bytes::from_static(b"x")))
        .await
        .unwrap();
    stream
        .to_agent
        .send(Packet::close_request(778))
        .await
        .unwrap();
    stream
        .to_agent
        .send(Packet::dial_response(1, 1, ""))
        .await
        .unwrap();
    let (_refusing, closed) = destination::refusing_port();
    let closed = closed.to_string();
    const DIALS: usize = 10_000;
    let sender = stream.to_agent.clone();
    tokio::spawn(async move {
        for i in 0..DIALS {
            let _ = sender
                .send(Packet::dial_request(closed.clone(), 1_000 + i as i64))
                .await;
        }
    });

    let mut close_rsps = Vec::new();
    let mut dial_rsps = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while dial_rsps < DIALS || close_rsps.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "agent answered {dial_rsps} dials and {} closes",
            close_rsps.len()
        );
        let packet = tokio::time::timeout(Duration::from_secs(30), stream.from_agent.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match packet.into_message() {
            Message::DialResponse(rsp) => {
                assert!(!rsp.error.is_empty());
                dial_rsps += 1;
            }
            Message::CloseResponse(rsp) => close_rsps.push((rsp.connect_id, rsp.error)),
            other => panic!("unexpected {other:?}"),
        }
    }
    close_rsps.sort();
    assert_eq!(
        close_rsps,
        vec![
            (777, "unrecognized connectID".to_owned()),
            (778, "Unknown connectID".to_owned())
        ]
    );
    assert_eq!(
        http_get(agent.health_port, "/healthz").unwrap(),
        (200, "ok".to_owned())
    );
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", agent.logged.process.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:").map(|v| {
                v.trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
            })
        })
        .unwrap();
    assert!(rss_kib < 200 * 1024, "agent RSS grew to {rss_kib} KiB");
    let rejected = |reason: &str| {
        metric(
            agent.health_port,
            &format!(r#"tether_agent_rejected_total{{reason="{reason}"}}"#),
        )
    };
    assert_eq!(rejected("data_connect_id_zero"), Some(1.0));
    assert_eq!(rejected("data_unknown_connect_id"), Some(1.0));
    assert_eq!(
        rejected("unexpected_packet_from_server"),
        Some(2.0),
        "unknown type and DIAL_RSP"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_lets_the_reply_come_back() {
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();
    let replier = destination::reply_after_eof().await.to_string();
    let mut stream = http_connect(&cluster.target, &replier)
        .await
        .unwrap()
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "got 5 bytes");
    let agent_port = cluster.agent.as_ref().unwrap().health_port;
    assert!(
        wait_until(Duration::from_secs(5), || {
            metric(
                agent_port,
                "konnectivity_network_proxy_agent_open_endpoint_connections ",
            ) == Some(0.0)
        }),
        "connection not released after both sides finished"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_flow_control_eof_closes_both_directions_as_upstream() {
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--flow-control=false"],
    )
    .unwrap();
    let replier = destination::reply_after_eof().await.to_string();
    let mut stream = http_connect(&cluster.target, &replier)
        .await
        .unwrap()
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reply, "",
        "upstream semantics: the client's EOF ends the whole connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_protobuf_from_the_server_drops_that_stream_only() {
    let pki = Pki::new(&[]).unwrap();
    let (port, answered) = tether_tests::fake_server::garbage_server(&pki)
        .await
        .unwrap();
    let agent = Agent::start(&[
        &format!("--proxy-server-port={port}"),
        &format!("--ca-cert={}", pki.ca().display()),
        "--sync-interval=100ms",
        "--sync-interval-cap=300ms",
    ])
    .unwrap();
    // It drops that stream and keeps reconnecting with backoff: the server answers again.
    assert!(
        wait_until(Duration::from_secs(10), || answered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2),
        "the agent kept a stream that sent garbage"
    );
    // The log line is the subject here: it tells the operator why the stream went.
    let lost = agent
        .logged
        .logs
        .wait_for("lost proxy server stream", Duration::from_secs(5))
        .expect("the agent did not say why it dropped the stream");
    assert!(lost.to_lowercase().contains("decode"), "{lost}");
    assert_eq!(
        http_get(agent.health_port, "/healthz").unwrap(),
        (200, "ok".to_owned())
    );
    assert!(
        metric(agent.health_port, r#"konnectivity_network_proxy_agent_server_connection_failure_count{direction="from_server"}"#)
            .is_some_and(|n| n >= 1.0)
    );
}

/// The CA bundle (like the client certificate and key) is read at every connection attempt: an
/// agent that cannot verify the server recovers as soon as the file on disk is fixed, without a
/// restart — how rotated certificates reach a running agent.
#[test]
fn a_replaced_ca_bundle_is_used_by_the_next_connection() {
    let cluster = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &[]).unwrap();
    let stranger = Pki::new(&[]).unwrap();
    let bundle = stranger.dir().join("bundle.pem");
    std::fs::copy(stranger.ca(), &bundle).unwrap();
    let ca = format!("--ca-cert={}", bundle.display());
    let args = [
        format!("--proxy-server-port={}", cluster.server.agent_port),
        "--sync-interval=100ms".into(),
        "--sync-interval-cap=500ms".into(),
        ca,
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&refs).unwrap();
    // The error an operator reads is the subject.
    assert!(
        agent
            .logged
            .logs
            .wait_for(
                "the certificate of the proxy server is not signed by a CA this side trusts (--ca-cert",
                Duration::from_secs(5)
            )
            .is_some(),
        "the agent did not report the failed verification"
    );
    assert!(!wait_ready(
        cluster.server.health_port,
        Duration::from_millis(500)
    ));

    std::fs::copy(cluster.pki.ca(), &bundle).unwrap();
    assert!(
        wait_ready(cluster.server.health_port, Duration::from_secs(5)),
        "the agent kept the old CA bundle"
    );
}

/// A server that vanishes without a FIN or RST (its host died, a partition) is given up once
/// it has acknowledged nothing for `--peer-timeout` (probed every `--probe-interval` while the
/// stream is idle); without the probe the stream would wait for an HTTP/2 keepalive ping
/// (`--keepalive-time`, one hour by default). Both processes live in a namespace of their own,
/// whose firewall swallows everything the server sends.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stops_answering_is_given_up_after_the_peer_timeout() {
    use tether_tests::netns::Netns;

    let ns = Netns::new("probe").unwrap();
    let pki = Pki::new(&[]).unwrap();
    let uds = pki.dir().join("probe.sock");
    let server_args = connect_server_args(&pki, &uds, &[]);
    let (server, agent) = tether_tests::procs::connected_in(
        &ns,
        &pki.ca(),
        &server_args,
        &["--probe-interval=1s", "--peer-timeout=4s"],
    )
    .unwrap();

    ns.swallow_tcp("--sport", server.agent_port).unwrap();
    let cut = Instant::now();
    // With its only stream gone the agent is no longer ready.
    let lost = ns
        .run(|| {
            wait_until(Duration::from_secs(15), || {
                http_get(agent.health_port, "/readyz").is_ok_and(|(s, _)| s != 200)
            })
        })
        .unwrap();
    let took = cut.elapsed();
    assert!(lost, "the agent still holds a stream to a silent server");
    assert!(
        took < Duration::from_secs(8),
        "gave up after {took:?}; the peer timeout is 4s"
    );
}

/// The first packet from the agent that `pick` takes, skipping the others.
async fn next_from_agent<T>(
    stream: &mut tether_tests::fake_server::FakeStream,
    pick: impl Fn(Message) -> Option<T>,
) -> T {
    loop {
        let packet = stream.from_agent.message().await.unwrap();
        let message = packet.expect("the agent ended the stream").into_message();
        if let Some(picked) = pick(message) {
            return picked;
        }
    }
}

/// The server asks the agent to close a connection whose destination stopped reading: the
/// agent's writer, blocked on that destination with what the server sent before its CLOSE_REQ,
/// gives up once the socket has taken nothing for --stall-timeout, instead of holding the
/// socket and that queue for good, outside --max-connections. (A stand-in server that sends
/// DATA without flow control, as upstream's does; the queues are large enough that the stream
/// is never held, so the stall handling of a held stream does not apply.)
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_connection_to_a_stalled_destination_is_let_go() {
    let (_pki, _fake, agent, mut stream) = against_stand_in(&[
        "--stall-timeout=1s",
        "--conn-queue-bytes=67108864",
        "--stream-buffer-bytes=134217728",
    ])
    .await;
    let pid = agent.logged.process.pid();
    let hole = destination::black_hole().await.to_string();
    let base = tether_tests::process::open_fds(pid);
    stream
        .to_agent
        .send(Packet::dial_request(hole, 1))
        .await
        .unwrap();
    let connect_id = next_from_agent(&mut stream, |m| match m {
        Message::DialResponse(dial) => Some(dial.connect_id),
        _ => None,
    })
    .await;
    // More than the kernel's socket buffers take: the rest waits in the agent.
    let chunk = bytes::Bytes::from(vec![0u8; 256 * 1024]);
    for _ in 0..64 {
        stream
            .to_agent
            .send(Packet::data(connect_id, chunk.clone()))
            .await
            .unwrap();
    }
    stream
        .to_agent
        .send(Packet::close_request(connect_id))
        .await
        .unwrap();
    let closed = next_from_agent(&mut stream, |m| match m {
        Message::CloseResponse(close) => Some(close),
        _ => None,
    })
    .await;
    assert_eq!(closed.connect_id, connect_id);
    assert!(
        tether_tests::process::open_fds(pid) > base,
        "the destination was let go before it could stall"
    );
    assert!(
        wait_until(Duration::from_secs(6), || {
            tether_tests::process::open_fds(pid) <= base
        }),
        "the agent still holds the stalled destination's socket"
    );
    assert!(
        metric(agent.health_port, "tether_agent_stalled_closes_total ").is_some_and(|n| n >= 1.0)
    );
}

/// A server that keeps sending CLOSE_REQs for connections the agent never had, and reads
/// nothing: each asks for an answer the agent cannot send. The agent stops reading once its
/// queue of unsent answers is full, and gives the stream up after --stall-timeout, instead of
/// queueing answers for as long as the server sends (which it did: its memory grew with them).
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_sends_without_reading_cannot_grow_the_agents_queue() {
    let (_pki, mut fake, agent, stream) = against_stand_in(&["--stall-timeout=1s"]).await;
    let pid = agent.logged.process.pid();
    let rss_before = tether_tests::process::rss_kib(pid);
    let tether_tests::fake_server::FakeStream {
        to_agent,
        from_agent,
    } = stream;
    // Held, never polled: the agent's sends back up behind HTTP/2 flow control.
    let _unread = from_agent;
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        for id in 1_000_000..1_400_000i64 {
            if to_agent.send(Packet::close_request(id)).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let gave_up = tokio::task::block_in_place(|| {
        tether_tests::procs::wait_metric(
            agent.health_port,
            r#"konnectivity_network_proxy_agent_server_connection_failure_count{direction="from_server"}"#,
            1.0,
            Duration::from_secs(20),
        )
    });
    let rss_after = tether_tests::process::rss_kib(pid);
    sender.abort();
    assert!(
        gave_up,
        "the agent kept reading a server that does not read (RSS {rss_before} -> {rss_after} KiB)"
    );
    // The log line is the subject here: it tells the operator why the stream went.
    assert!(
        agent
            .logged
            .logs
            .wait_for("it does not read its stream", Duration::from_secs(5))
            .is_some()
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // It reconnects, as after any lost stream.
    let again = tokio::time::timeout(Duration::from_secs(10), fake.streams.recv()).await;
    assert!(
        matches!(again, Ok(Some(_))),
        "no new stream after giving up"
    );
}
