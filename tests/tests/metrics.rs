//! /metrics carries upstream Konnectivity's metric names (dashboards and e2e suites built on
//! upstream scrape them) and the standard `process_*` set, on both binaries.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use tether_tests::backend;
use tether_tests::cluster::{Cluster, Mode, Transport};
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

#[tokio::test(flavor = "multi_thread")]
async fn both_binaries_export_upstreams_names_and_the_process_set() {
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    let echo = backend::echo().await.to_string();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let mut tunnel = GrpcTunnel::dial(&mut client, &echo).await.unwrap().unwrap();
    tunnel.send(b"ping").await.unwrap();
    tunnel.next().await.unwrap();
    tunnel.close().await.unwrap();
    tunnel.read_to_close().await.unwrap();
    let (_refusing, closed) = backend::refusing_port();
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
    assert_exported(cluster.agent.as_ref().unwrap().health_port, &samples);
}
