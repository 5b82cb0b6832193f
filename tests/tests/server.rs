//! tether-server end to end: real processes, real TLS, both frontend modes over UDS and mTLS.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::{Duration, Instant};

use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::{GrpcTunnel, grpc_client, http_connect, raw};
use tether_tests::procs::http_get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: destination\r\n\r\n";

async fn http_get_through(cluster: &Cluster, mode: Mode) -> String {
    let addr = destination::hello().await.to_string();
    match mode {
        Mode::Grpc => {
            let mut client = grpc_client(&cluster.target).await.unwrap();
            let mut tunnel = GrpcTunnel::dial(&mut client, &addr).await.unwrap().unwrap();
            assert!(tunnel.connect_id > 0);
            tunnel.send(GET).await.unwrap();
            let (bytes, error) = tunnel.read_to_close().await.unwrap();
            assert_eq!(error, "", "the destination's close is a normal close");
            String::from_utf8(bytes).unwrap()
        }
        Mode::HttpConnect => {
            let mut stream = http_connect(&cluster.target, &addr).await.unwrap().unwrap();
            stream.write_all(GET).await.unwrap();
            let mut out = String::new();
            stream.read_to_string(&mut out).await.unwrap();
            out
        }
    }
}

async fn http_get_case(mode: Mode, transport: Transport) {
    let cluster = Cluster::start(mode, transport, &[], &[]).unwrap();
    let response = http_get_through(&cluster, mode).await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("hello from destination"), "{response}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http_get_through_grpc_over_uds() {
    http_get_case(Mode::Grpc, Transport::Uds).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_get_through_grpc_over_mtls() {
    http_get_case(Mode::Grpc, Transport::Mtls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_get_through_connect_over_uds() {
    http_get_case(Mode::HttpConnect, Transport::Uds).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_get_through_connect_over_mtls() {
    http_get_case(Mode::HttpConnect, Transport::Mtls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dial_to_a_closed_port_returns_the_agents_error_promptly() {
    let (_refusing, closed) = destination::refusing_port();
    let closed = closed.to_string();
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let start = Instant::now();
    let error = GrpcTunnel::dial(&mut client, &closed)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(
        error,
        format!("dial tcp {closed}: connect: connection refused")
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );

    let connect = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();
    let response = http_connect(&connect.target, &closed)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(
        response,
        format!(
            "HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ndial tcp {closed}: connect: connection refused"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_agent_gets_the_upstream_error() {
    let addr = destination::hello().await.to_string();
    let grpc = Cluster::server_only(Mode::Grpc, Transport::Uds, &[]).unwrap();
    let mut client = grpc_client(&grpc.target).await.unwrap();
    let error = GrpcTunnel::dial(&mut client, &addr)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(error, "No agent available");
    assert_eq!(
        http_get(grpc.server.health_port, "/readyz").unwrap(),
        (500, "no connection to any proxy agent".to_owned())
    );

    let connect = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &[]).unwrap();
    let response = http_connect(&connect.target, &addr)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(
        response,
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ncurrently no tunnels available: No agent available"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_bad_targets_are_refused_precisely_and_counted() {
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();

    let mut garbage = raw(&cluster.target).await.unwrap();
    garbage
        // (TLS on this socket has its own refusal: tls_failures.rs.)
        .write_all(b"\x00\xff not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    garbage.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request"), "{reply}");

    let bad = http_connect(&cluster.target, "node%1:99999")
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(bad.starts_with("HTTP/1.1 400 Bad Request"), "{bad}");
    assert!(bad.contains("invalid CONNECT target"), "{bad}");

    // Everyone else is still served.
    let response = http_get_through(&cluster, Mode::HttpConnect).await;
    assert!(response.ends_with("hello from destination"), "{response}");

    let (_, metrics) = http_get(cluster.server.health_port, "/metrics").unwrap();
    assert!(
        metrics.contains(r#"tether_server_rejected_total{reason="connect_malformed_request"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tether_server_rejected_total{reason="connect_bad_target"} 1"#),
        "{metrics}"
    );
    assert!(
        cluster
            .server
            .logged
            .logs
            .contains("malformed HTTP request on the CONNECT frontend")
    );
    assert!(
        cluster
            .server
            .logged
            .logs
            .contains("refused CONNECT to an unparsable target")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_mid_dial_cancels_the_dial_at_the_agent() {
    let (stuck, _fillers, _listener) = destination::stuck().await;
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--dial-timeout=30s"],
    )
    .unwrap();
    let mut client = raw(&cluster.target).await.unwrap();
    client
        .write_all(format!("CONNECT {stuck} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    let agent = cluster.agent.as_ref().unwrap();
    assert!(agent_got_dial_close(agent), "agent never saw DIAL_CLS");
    assert!(
        cluster
            .server
            .logged
            .logs
            .contains("client went away while the dial was pending")
    );
    let (_, metrics) = http_get(cluster.server.health_port, "/metrics").unwrap();
    assert!(
        metrics.contains(
            r#"konnectivity_network_proxy_server_dial_failure_count{reason="frontend_close"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("konnectivity_network_proxy_server_pending_backend_dials 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_agent_is_counted_and_answered_while_others_are_served() {
    use tether_proto::{Message, Packet};
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();
    let mut hostile = tether_tests::fake_agent::FakeAgent::connect(
        cluster.server.agent_port,
        &cluster.pki.ca(),
        "hostile",
    )
    .await
    .unwrap();
    hostile
        .to_server
        .send(Packet {
            r#type: 77,
            payload: None,
        })
        .await
        .unwrap();
    hostile
        .to_server
        .send(Packet::data(999, bytes::Bytes::from_static(b"x")))
        .await
        .unwrap();
    hostile
        .to_server
        .send(Packet::close_response(998, ""))
        .await
        .unwrap();
    // A late answer to a dial nobody is waiting for, with an endpoint it opened.
    hostile
        .to_server
        .send(Packet::dial_response(123_456, 5, ""))
        .await
        .unwrap();
    hostile
        .to_server
        .send(Packet::dial_request("10.0.0.1:1", 1))
        .await
        .unwrap();

    let mut closes = Vec::new();
    while closes.len() < 2 {
        let packet = tokio::time::timeout(Duration::from_secs(5), hostile.from_server.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match packet.into_message() {
            Message::CloseRequest(req) => closes.push(req.connect_id),
            other => panic!("server sent {other:?}"),
        }
    }
    closes.sort();
    assert_eq!(
        closes,
        vec![5, 999],
        "the server must ask the agent to close orphan endpoints"
    );

    // Everyone else is still served. Each dial picks either agent at random; retry until the
    // real one answers (30 tries of 1 s: ten straight picks of the hostile one is a 1-in-1024
    // event, thirty is negligible).
    let ok = tether_tests::process::wait_until(Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let addr = destination::hello().await.to_string();
                // A dial routed to the hostile agent is never answered; give each try 1 s.
                let attempt = tokio::time::timeout(
                    Duration::from_secs(1),
                    http_connect(&cluster.target, &addr),
                )
                .await;
                match attempt {
                    Ok(Ok(Ok(mut s))) => {
                        let _ = s.write_all(GET).await;
                        let mut out = String::new();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            s.read_to_string(&mut out),
                        )
                        .await;
                        out.ends_with("hello from destination")
                    }
                    _ => false,
                }
            })
        })
    });
    assert!(ok, "the real agent stopped serving");
    let (_, metrics) = http_get(cluster.server.health_port, "/metrics").unwrap();
    for reason in [
        "unexpected_packet_from_agent",
        "data_unknown_connect_id",
        "close_unknown_connect_id",
    ] {
        assert!(
            metrics.contains(&format!(
                r#"tether_server_rejected_total{{reason="{reason}"}}"#
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
    assert!(metrics.contains(r#"konnectivity_network_proxy_server_dial_failure_count{reason="unrecognized_response"} 1"#), "{metrics}");
    assert!(
        cluster
            .server
            .logged
            .logs
            .contains("agent sent a packet type agents never send")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_dial_timeout_gives_the_upstream_504() {
    let (stuck, _fillers, _listener) = destination::stuck().await;
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--backend-dial-timeout=500ms"],
        &["--dial-timeout=30s"],
    )
    .unwrap();
    let start = std::time::Instant::now();
    let response = http_connect(&cluster.target, &stuck.to_string())
        .await
        .unwrap()
        .err()
        .unwrap();
    assert_eq!(
        response,
        "HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBackend dial timeout: timed out waiting for backend dial\r\n"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let agent = cluster.agent.as_ref().unwrap();
    assert!(agent_got_dial_close(agent), "agent never saw DIAL_CLS");
}

/// Waits until `agent` has received a DIAL_CLS.
fn agent_got_dial_close(agent: &tether_tests::procs::Agent) -> bool {
    tokio::task::block_in_place(|| {
        tether_tests::procs::wait_metric(
            agent.health_port,
            r#"konnectivity_network_proxy_agent_stream_packets_total{segment="to_agent",packet_type="DIAL_CLS"}"#,
            1.0,
            Duration::from_secs(5),
        )
    })
}
