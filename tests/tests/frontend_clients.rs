//! The frontends against clients tether did not write, or that send what real clients send:
//! grpcio's C core, and a `:authority` (or `Host`) that is not a URI authority, byte for byte.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::process::Command;

use bytes::Bytes;
use tether_proto::{Message, Packet};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::{Target, raw, raw_h2};
use tether_tests::raw_h2::{Event, RawH2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What grpc-go sends as `:authority` when kube-apiserver dials the frontend's socket by path.
const SOCKET_PATH_AUTHORITY: &[u8] =
    b"%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket";

fn packet(event: Event) -> Message {
    match event {
        Event::Packet(packet) => packet.into_message(),
        other => panic!("expected a packet, got {other:?}"),
    }
}

/// Two `Proxy` streams on one connection, the second naming the authority through HPACK's
/// dynamic table as grpc-go does: dial, echo both ways, close, clean trailers.
async fn socket_path_authority_case(transport: Transport) {
    let echo = destination::echo().await.to_string();
    let cluster = Cluster::start(Mode::Grpc, transport, &[], &[]).unwrap();
    let io = raw_h2(&cluster.target).await.unwrap();
    let mut h2 = RawH2::handshake(io, SOCKET_PATH_AUTHORITY).await.unwrap();
    for round in 0..2u8 {
        let stream = h2.open_proxy().await.unwrap();
        let random = 77 + i64::from(round);
        h2.send(stream, &Packet::dial_request(&echo, random), false)
            .await
            .unwrap();
        let (id, headers) = h2.next().await.unwrap();
        assert_eq!(id, stream);
        match headers {
            Event::Headers(headers) => assert!(
                headers.contains(&(":status".into(), "200".into())),
                "{headers:?}"
            ),
            other => panic!("expected response headers, got {other:?}"),
        }
        let Message::DialResponse(rsp) = packet(h2.next().await.unwrap().1) else {
            panic!("first packet is not DIAL_RSP");
        };
        assert_eq!((rsp.random, rsp.error.as_str()), (random, ""));
        let payload = Bytes::from(vec![b'a' + round; 3000]);
        h2.send(
            stream,
            &Packet::data(rsp.connect_id, payload.clone()),
            false,
        )
        .await
        .unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < payload.len() {
            match packet(h2.next().await.unwrap().1) {
                Message::Data(data) => {
                    assert_eq!(data.connect_id, rsp.connect_id);
                    echoed.extend_from_slice(&data.data);
                }
                other => panic!("expected DATA, got {other:?}"),
            }
        }
        assert_eq!(echoed, payload);
        h2.send(stream, &Packet::close_request(rsp.connect_id), true)
            .await
            .unwrap();
        match packet(h2.next().await.unwrap().1) {
            Message::CloseResponse(close) => {
                assert_eq!(
                    (close.connect_id, close.error.as_str()),
                    (rsp.connect_id, "")
                )
            }
            other => panic!("expected CLOSE_RSP, got {other:?}"),
        }
        match h2.next().await.unwrap() {
            (id, Event::Trailers(trailers)) if id == stream => assert!(
                trailers.contains(&("grpc-status".into(), "0".into())),
                "{trailers:?}"
            ),
            other => panic!("expected trailers, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_frontend_over_uds_accepts_a_socket_path_authority() {
    socket_path_authority_case(Transport::Uds).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_frontend_over_mtls_accepts_a_socket_path_authority() {
    socket_path_authority_case(Transport::Mtls).await;
}

/// grpcio, gRPC's C core (what Python, Ruby and C++ clients use), through DIAL_REQ, 1 MiB of
/// DATA echoed back, and CLOSE_REQ/CLOSE_RSP. Over a Unix socket it sends the percent-encoded
/// socket path as `:authority`, as grpc-go does.
fn grpcio_case(transport: Transport) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let echo = runtime.block_on(destination::echo()).to_string();
    let cluster = Cluster::start(Mode::Grpc, transport, &[], &[]).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/proxy_client.py");
    let mut cmd = Command::new(tether_tests::python().unwrap());
    cmd.arg(script).args(["--address", &echo]);
    match &cluster.target {
        Target::Uds(path) => {
            cmd.arg(format!("--target=unix:{}", path.display()));
        }
        Target::Tls {
            port,
            ca,
            cert,
            key,
        } => {
            cmd.arg(format!("--target=localhost:{port}"))
                .arg(format!("--ca={}", ca.display()))
                .arg(format!("--cert={}", cert.display()))
                .arg(format!("--key={}", key.display()));
        }
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["echoed"], 1 << 20);
}

#[test]
fn grpcio_client_over_uds() {
    grpcio_case(Transport::Uds);
}

#[test]
fn grpcio_client_over_mtls() {
    grpcio_case(Transport::Mtls);
}

/// kube-apiserver sends `Host: 127.0.0.1`; other clients send anything, or nothing. The
/// CONNECT frontend dials the request target whatever the Host header says.
#[tokio::test(flavor = "multi_thread")]
async fn connect_frontend_ignores_any_host_header() {
    let echo = destination::echo().await.to_string();
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[]).unwrap();
    let hosts = [
        "Host: %2Fetc%2Fkubernetes%2Fkonnectivity-server.socket\r\n",
        "Host: [not a host\r\n",
        "",
    ];
    for host in hosts {
        let mut stream = raw(&cluster.target).await.unwrap();
        stream
            .write_all(format!("CONNECT {echo} HTTP/1.1\r\n{host}\r\n").as_bytes())
            .await
            .unwrap();
        let expected = b"HTTP/1.1 200 Connection Established\r\n\r\n";
        let mut head = vec![0; expected.len()];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(head, expected, "with {host:?}");
        stream.write_all(b"ping").await.unwrap();
        let mut reply = [0; 4];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"ping");
    }
}
