//! /metrics carries upstream Konnectivity's metric names (dashboards and e2e suites built on
//! upstream scrape them) and the standard `process_*` set, on both binaries.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::{GrpcTunnel, grpc_client};
use tether_tests::procs::http_get;

const PROCESS: [&str; 9] = [
    "process_cpu_seconds_total ",
    "process_resident_memory_bytes ",
    "process_virtual_memory_bytes ",
    "process_start_time_seconds ",
    "process_open_fds ",
    "process_max_fds ",
    "process_virtual_memory_max_bytes ",
    "process_network_receive_bytes_total ",
    "process_network_transmit_bytes_total ",
];

/// Every name in `samples` starts a sample line. (Labelled families with no series yet, such as
/// `stream_errors_total`, print nothing, as upstream's do.)
fn assert_exported(port: u16, samples: &[&str]) {
    let (_, text) = http_get(port, "/metrics").unwrap();
    let missing: Vec<&str> = samples
        .iter()
        .chain(PROCESS.iter())
        .filter(|name| !text.lines().any(|l| l.starts_with(*name)))
        .copied()
        .collect();
    assert!(missing.is_empty(), "no samples for {missing:?} in:\n{text}");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    assert!(value("process_resident_memory_bytes ") > 1e6);
    assert!(value("process_open_fds ") >= 3.0);
}

/// Each `(family, type)` has that `# TYPE` line: the types upstream's source gives its metrics
/// (its two counters named `…_count` included), in the text format it serves.
fn assert_typed(port: u16, families: &[(&str, &str)]) {
    let (_, text) = http_get(port, "/metrics").unwrap();
    for (family, kind) in families {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {family} {kind}")),
            "{family} is not a {kind} in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_binaries_export_upstreams_names_and_the_process_set() {
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let echo = destination::echo().await.to_string();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let mut tunnel = GrpcTunnel::dial(&mut client, &echo).await.unwrap().unwrap();
    tunnel.send(b"ping").await.unwrap();
    tunnel.next().await.unwrap();
    tunnel.close().await.unwrap();
    tunnel.read_to_close().await.unwrap();
    let (_refusing, closed) = destination::refusing_port();
    let closed = closed.to_string();
    assert!(
        GrpcTunnel::dial(&mut client, &closed)
            .await
            .unwrap()
            .is_err()
    );

    let server = "konnectivity_network_proxy_server_";
    let samples: Vec<String> = [
        "dial_duration_seconds_bucket",
        "frontend_write_duration_seconds_bucket",
        "connection_duration_seconds_bucket",
        "grpc_connections{service_method=\"Connect\"}",
        "http_connections ",
        "ready_backend_connections ",
        "ready_backends{proxy_strategy=\"default\"}",
        "pending_backend_dials ",
        "established_connections ",
        "full_receive_channels{service_method=\"Connect\"} 0",
        "dial_failure_count{reason=\"error_response\"}",
        "stream_packets_total{segment=\"from_agent\",packet_type=\"DIAL_RSP\"}",
    ]
    .iter()
    .map(|name| format!("{server}{name}"))
    .collect();
    let samples: Vec<&str> = samples.iter().map(String::as_str).collect();
    assert_exported(cluster.server.health_port, &samples);
    let p = server;
    assert_typed(
        cluster.server.health_port,
        &[
            (&format!("{p}dial_duration_seconds"), "histogram"),
            (&format!("{p}frontend_write_duration_seconds"), "histogram"),
            (&format!("{p}grpc_connections"), "gauge"),
            (&format!("{p}http_connections"), "gauge"),
            (&format!("{p}ready_backend_connections"), "gauge"),
            (&format!("{p}pending_backend_dials"), "gauge"),
            (&format!("{p}full_receive_channels"), "gauge"),
            (&format!("{p}dial_failure_count"), "counter"),
            (&format!("{p}stream_packets_total"), "counter"),
        ],
    );

    let agent = "konnectivity_network_proxy_agent_";
    let samples: Vec<String> = [
        "dial_duration_seconds_bucket",
        "open_server_connections ",
        "known_server_count ",
        "open_endpoint_connections ",
        "endpoint_dial_failure_total{reason=\"unknown\"}",
        "stream_packets_total{segment=\"from_agent\",packet_type=\"DATA\"}",
    ]
    .iter()
    .map(|name| format!("{agent}{name}"))
    .collect();
    let samples: Vec<&str> = samples.iter().map(String::as_str).collect();
    let health = cluster.agent.as_ref().unwrap().health_port;
    assert_exported(health, &samples);
    let p = agent;
    assert_typed(
        health,
        &[
            (&format!("{p}dial_duration_seconds"), "histogram"),
            (&format!("{p}open_server_connections"), "gauge"),
            (&format!("{p}known_server_count"), "gauge"),
            (&format!("{p}open_endpoint_connections"), "gauge"),
            (&format!("{p}endpoint_dial_failure_total"), "counter"),
            (&format!("{p}stream_packets_total"), "counter"),
        ],
    );
}

/// A scrape is the Prometheus text format upstream serves, under its media type.
#[test]
fn the_page_is_prometheus_text() {
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let port = cluster.server.health_port;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    std::io::Read::read_to_string(&mut stream, &mut page).unwrap();
    let (head, body) = page.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        !body.contains("# EOF") && !body.contains("# UNIT"),
        "{body}"
    );
}
