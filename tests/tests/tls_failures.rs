//! TLS and authentication failures between agent and server, each as an operator meets it:
//! both sides log what is wrong in words that say what to fix, and each counts it under its
//! own reason (`tether_server_tls_handshake_failures_total`,
//! `tether_agent_server_connect_failures_total`).
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::Duration;

use tether_tests::peers::metric;
use tether_tests::pki::{Pair, Pki, Validity};
use tether_tests::procs::{Agent, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// A server whose agent port presents `cert`, requiring client certificates when
/// `client_ca`.
fn server(pki: &Pki, cert: &Pair, client_ca: bool) -> Server {
    let mut args = vec![
        "--mode=http-connect".to_owned(),
        format!("--uds-name={}", pki.dir().join("frontend.sock").display()),
        "--server-port=0".to_owned(),
        format!("--cluster-cert={}", cert.cert.display()),
        format!("--cluster-key={}", cert.key.display()),
    ];
    args.push(if client_ca {
        format!("--cluster-ca-cert={}", pki.ca().display())
    } else {
        "--allow-unauthenticated-agents".to_owned()
    });
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args).unwrap()
}

fn agent(server_port: u16, ca: &std::path::Path, extra: &[String]) -> Agent {
    let mut args = vec![
        format!("--proxy-server-port={server_port}"),
        format!("--ca-cert={}", ca.display()),
        "--sync-interval=100ms".to_owned(),
        "--sync-interval-cap=1s".to_owned(),
    ];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(&args).unwrap()
}

fn client_flags(pair: &Pair) -> Vec<String> {
    vec![
        format!("--agent-cert={}", pair.cert.display()),
        format!("--agent-key={}", pair.key.display()),
    ]
}

/// Waits until `port`'s /metrics has `line_prefix` at one or more.
fn counted(port: u16, line_prefix: &str) -> bool {
    tether_tests::process::wait_until(WAIT, || metric(port, line_prefix).is_some_and(|v| v >= 1.0))
}

struct Case {
    name: &'static str,
    /// What the agent's log says.
    agent_says: &'static str,
    agent_reason: &'static str,
    /// What the server's log says, and its reason (on the agent listener).
    server_says: &'static str,
    server_reason: &'static str,
}

/// The errors an operator reads on each side are the subject of these tests, with the
/// metrics that count them.
fn check(case: &Case, server: &Server, agent: &Agent) {
    let name = case.name;
    assert!(
        agent.logged.logs.wait_for(case.agent_says, WAIT).is_some(),
        "{name}: the agent never said {:?}",
        case.agent_says
    );
    assert!(
        counted(
            agent.health_port,
            &format!(
                "tether_agent_server_connect_failures_total{{reason=\"{}\"}} ",
                case.agent_reason
            )
        ),
        "{name}: the agent did not count {}",
        case.agent_reason
    );
    assert!(
        server
            .logged
            .logs
            .wait_for(case.server_says, WAIT)
            .is_some(),
        "{name}: the server never said {:?}",
        case.server_says
    );
    assert!(
        counted(
            server.health_port,
            &format!(
                "tether_server_tls_handshake_failures_total{{listener=\"agent\",reason=\"{}\"}} ",
                case.server_reason
            )
        ),
        "{name}: the server did not count {}",
        case.server_reason
    );
}

#[test]
fn certificate_problems_are_named_on_both_sides() {
    let pki = Pki::new(&[]).unwrap();
    let good_server = pki.pair("server");
    let expired_server = pki
        .outside_validity("server-expired", Validity::Expired, true)
        .unwrap();
    let future_server = pki
        .outside_validity("server-future", Validity::NotYetValid, true)
        .unwrap();
    let expired_agent = pki
        .outside_validity("agent-expired", Validity::Expired, false)
        .unwrap();
    let agent_pair = pki.pair("agent");
    let stranger_ca = pki.dir().join("stranger-ca.pem");

    let cases: Vec<(Case, &Pair, bool, std::path::PathBuf, Vec<String>)> = vec![
        (
            Case {
                name: "expired server certificate",
                agent_says: "the certificate of the proxy server has expired",
                agent_reason: "peer_certificate_expired",
                server_says: "refused this side's certificate as expired",
                server_reason: "our_certificate_expired",
            },
            &expired_server,
            false,
            pki.ca(),
            vec![],
        ),
        (
            Case {
                name: "server certificate not yet valid",
                agent_says: "the certificate of the proxy server is not valid yet",
                agent_reason: "peer_certificate_not_yet_valid",
                server_says: "refused this side's certificate as expired or not yet valid",
                server_reason: "our_certificate_expired",
            },
            &future_server,
            false,
            pki.ca(),
            vec![],
        ),
        (
            Case {
                name: "server certificate from a CA the agent does not trust",
                agent_says: "is not signed by a CA this side trusts (--ca-cert",
                agent_reason: "peer_certificate_unknown_ca",
                server_says: "does not trust the CA that signed this side's certificate",
                server_reason: "our_certificate_unknown_ca",
            },
            &good_server,
            false,
            stranger_ca.clone(),
            vec![],
        ),
        (
            Case {
                name: "server certificate for another name",
                agent_says: "does not name the host it was reached by (it must name --proxy-server-host)",
                agent_reason: "peer_certificate_wrong_name",
                server_says: "refused this side's certificate",
                server_reason: "our_certificate_refused",
            },
            &good_server,
            false,
            pki.ca(),
            vec!["--proxy-server-host=127.0.0.2".to_owned()],
        ),
        (
            Case {
                name: "expired agent certificate",
                agent_says: "refused this side's certificate as expired or not yet valid",
                agent_reason: "our_certificate_expired",
                server_says: "the certificate of the agent at",
                server_reason: "peer_certificate_expired",
            },
            &good_server,
            true,
            pki.ca(),
            client_flags(&expired_agent),
        ),
        (
            Case {
                name: "no agent certificate where one is required",
                agent_says: "requires a client certificate and this side presented none (set --agent-cert",
                agent_reason: "peer_requires_certificate",
                server_says: "sent no client certificate, and this port requires one",
                server_reason: "peer_sent_no_certificate",
            },
            &good_server,
            true,
            pki.ca(),
            vec![],
        ),
    ];
    // The control: the good pair connects.
    let control = server(&pki, &good_server, true);
    let connected = agent(control.agent_port, &pki.ca(), &client_flags(&agent_pair));
    assert!(
        tether_tests::procs::wait_ready(control.health_port, WAIT),
        "a valid agent certificate did not connect"
    );
    drop(connected);
    for (case, cert, client_ca, ca, extra) in &cases {
        let server = server(&pki, cert, *client_ca);
        let agent = agent(server.agent_port, ca, extra);
        check(case, &server, &agent);
    }
}

/// A peer that does not speak TLS, on either side of the agent port, and a TLS client on the
/// frontend's plaintext Unix socket.
#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_tls_mixups_are_named() {
    let pki = Pki::new(&[]).unwrap();
    let server = server(&pki, &pki.pair("server"), false);

    // The agent pointed at a plaintext HTTP port (the server's health port). What each side
    // says about it is the subject.
    let agent = agent(server.health_port, &pki.ca(), &[]);
    assert!(
        agent
            .logged
            .logs
            .wait_for("does not speak TLS", WAIT)
            .is_some(),
        "the agent did not say the port is plaintext"
    );
    assert!(counted(
        agent.health_port,
        "tether_agent_server_connect_failures_total{reason=\"plaintext_peer\"} "
    ));

    // A plaintext HTTP/2 client on the agent port.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", server.agent_port))
        .await
        .unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut rest)).await;
    // What the server says about it is the subject.
    assert!(
        server
            .logged
            .logs
            .wait_for("does not speak TLS", WAIT)
            .is_some(),
        "the server did not say the client is plaintext"
    );
    assert!(counted(
        server.health_port,
        "tether_server_tls_handshake_failures_total{listener=\"agent\",reason=\"plaintext_peer\"} "
    ));

    // A TLS client on the plaintext Unix socket.
    let uds = tokio::net::UnixStream::connect(pki.dir().join("frontend.sock"))
        .await
        .unwrap();
    let config = tether_runtime::tls::client_config(
        &tether_runtime::tls::PemFile::new("ca-cert", pki.ca()),
        None,
        &[],
    )
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, uds);
    let result = tokio::time::timeout(WAIT, handshake).await.unwrap();
    assert!(
        result.is_err(),
        "a TLS handshake succeeded on the plaintext socket"
    );
    // What the server says about it is the subject.
    assert!(
        server
            .logged
            .logs
            .wait_for("a TLS client connected to the frontend's Unix socket", WAIT)
            .is_some(),
        "the server did not say a TLS client used the Unix socket"
    );
    assert!(counted(
        server.health_port,
        "tether_server_tls_handshake_failures_total{listener=\"frontend_uds\",reason=\"tls_on_plaintext_socket\"} "
    ));
}

/// The certificate the agent port presents to a new connection.
async fn presented(port: u16, ca: &std::path::Path) -> Vec<u8> {
    let tls = tether_tests::fake_agent::tls_connector(ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// kubeadm renews certificates in place every year: the server notices a renewed
/// `--cluster-cert`/`--cluster-key` and presents it to new connections without a restart,
/// keeps presenting the old one while the files do not load together (a certificate
/// renewed before its key), and exports when the served certificate expires.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let pki = Pki::new(&[]).unwrap();
    let served = pki.server("served").unwrap();
    let server = server(&pki, &served, false);
    let port = server.agent_port;
    let original = der(&served.cert);
    assert_eq!(presented(port, &pki.ca()).await, original);

    let renewed = pki.server("renewed").unwrap();
    // The certificate first, alone: it does not match the key still in place.
    std::fs::copy(&renewed.cert, &served.cert).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        presented(port, &pki.ca()).await,
        original,
        "a certificate without its key was served"
    );
    std::fs::copy(&renewed.key, &served.key).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while presented(port, &pki.ca()).await != der(&renewed.cert) {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expiry = metric(
        server.health_port,
        r#"tether_server_certificate_expiry_timestamp_seconds{certificate="cluster-cert"}"#,
    )
    .expect("no certificate expiry metric");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "the served certificate expires at {expiry}");
}
