//! `tether-server probe`, the operator's diagnostic client, against a real server and agent in
//! every frontend mode and transport: what it reports when the destination is reachable, when
//! the dial fails, when no agent is connected and when the server is not there.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::process::{Command, Output};

use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::procs::built;

const AGENT_ID: &str = "node-probe-7";

fn probe(cluster: &Cluster, mode: Mode, extra: &[&str]) -> Output {
    cluster
        .target
        .probe_command(mode)
        .unwrap()
        .arg("--timeout=5s")
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}stderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn reports_reachable_and_unreachable(mode: Mode, transport: Transport) {
    let hello = destination::hello().await.to_string();
    // Held for the whole test: a port merely closed could be taken by another test meanwhile.
    let (_refusing, closed) = destination::refusing_port();
    let closed = closed.to_string();
    let agent_id = format!("--agent-id={AGENT_ID}");
    let cluster = Cluster::start(mode, transport, &[], &[&agent_id]).unwrap();

    let out = probe(&cluster, mode, &["--http-get=/healthz", &hello]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("reachable: yes"), "{report}");
    assert!(
        report.contains(&format!("agent: \"{AGENT_ID}\"")),
        "the probe must name the agent that served the dial:\n{report}"
    );
    assert!(report.contains("dial time: "), "{report}");
    assert!(
        report.contains("reply: HTTP/1.1 200 OK"),
        "the request went through the tunnel:\n{report}"
    );

    // The agent's own words for the failure, whichever frontend carried them.
    let out = probe(&cluster, mode, &[&closed]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("reachable: no"), "{report}");
    assert!(
        report.contains(&format!("agent: \"{AGENT_ID}\"")),
        "{report}"
    );
    assert!(
        report.contains("connection refused"),
        "the dial error, verbatim:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_over_the_socket() {
    reports_reachable_and_unreachable(Mode::Grpc, Transport::Uds).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_over_mtls() {
    reports_reachable_and_unreachable(Mode::Grpc, Transport::Mtls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_connect_over_the_socket() {
    reports_reachable_and_unreachable(Mode::HttpConnect, Transport::Uds).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_connect_over_mtls() {
    reports_reachable_and_unreachable(Mode::HttpConnect, Transport::Mtls).await;
}

#[test]
fn no_agent_is_reported_as_the_server_says_it() {
    for mode in [Mode::Grpc, Mode::HttpConnect] {
        let cluster = Cluster::server_only(mode, Transport::Uds, &[]).unwrap();
        let out = probe(&cluster, mode, &["10.0.0.1:10250"]);
        let report = text(&out);
        assert_eq!(out.status.code(), Some(1), "{report}");
        assert!(report.contains("No agent available"), "{mode:?}: {report}");
        assert!(report.contains("agent: unknown"), "{mode:?}: {report}");
    }
}

#[test]
fn a_server_that_is_not_there_is_exit_code_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("konnectivity-server.socket");
    let out = Command::new(built("tether-server").unwrap())
        .args(["probe", "--uds-name"])
        .arg(&socket)
        .arg("10.0.0.1:10250")
        .output()
        .unwrap();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert!(
        report.contains(&format!("cannot connect to {}", socket.display()))
            && report.contains("No such file or directory"),
        "{report}"
    );
}
