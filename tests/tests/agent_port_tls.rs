//! TLS on the agent port as agents meet it: the suite the server picks, and session tickets
//! (`--session-ticket-key-file`), with which a restarted server takes its agents back without
//! certificate signatures while a ticket never lets in what a full handshake would refuse.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_tests::peers::{free_port, metric};
use tether_tests::pki::{Pair, Pki, Validity};
use tether_tests::procs::{Agent, Server};

const WAIT: Duration = Duration::from_secs(15);
const RESUMED: &str = "tether_server_tls_handshakes_total{listener=\"agent\",kind=\"resumed\"} ";
const FULL: &str = "tether_server_tls_handshakes_total{listener=\"agent\",kind=\"full\"} ";
const REFUSED: &str = "tether_server_tls_handshake_failures_total{listener=\"agent\",reason=\"resumed_certificate_refused\"} ";
const UNKNOWN_CA: &str = "tether_server_tls_handshake_failures_total{listener=\"agent\",reason=\"peer_certificate_unknown_ca\"} ";
const EXPIRED: &str = "tether_server_tls_handshake_failures_total{listener=\"agent\",reason=\"peer_certificate_expired\"} ";
const AGENTS: &str = "konnectivity_network_proxy_server_ready_backend_connections ";

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, &[byte; 32]).unwrap();
    path
}

/// A server on agent port `port` that requires client certificates signed by `client_ca`,
/// sealing tickets with `key` (or with keys of its own when `None`).
fn server(pki: &Pki, port: u16, client_ca: &Path, key: Option<&Path>) -> Server {
    let pair = pki.pair("server");
    let mut args = vec![
        "--mode=http-connect".to_owned(),
        format!("--uds-name={}", pki.dir().join("frontend.sock").display()),
        "--delete-existing-uds-file".to_owned(),
        "--server-port=0".to_owned(),
        format!("--agent-port={port}"),
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        format!("--cluster-ca-cert={}", client_ca.display()),
    ];
    if let Some(key) = key {
        args.push(format!("--session-ticket-key-file={}", key.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args).unwrap()
}

fn agent(pki: &Pki, pair: &Pair, port: u16) -> Agent {
    Agent::start(&[
        &format!("--proxy-server-port={port}"),
        &format!("--ca-cert={}", pki.ca().display()),
        &format!("--agent-cert={}", pair.cert.display()),
        &format!("--agent-key={}", pair.key.display()),
        "--sync-interval=100ms",
        "--sync-interval-cap=1s",
    ])
    .unwrap()
}

fn count(port: u16, prefix: &str) -> f64 {
    metric(port, prefix).unwrap_or(0.0)
}

/// Whether the server on health port `port` comes to hold the agent's stream.
fn agent_back(port: u16) -> bool {
    tether_tests::process::wait_until(WAIT, || count(port, AGENTS) >= 1.0)
}

#[test]
fn an_agent_resumes_after_a_restart_only_when_the_ticket_key_is_the_same() {
    let pki = Pki::new(&[]).unwrap();
    let key = key_file(pki.dir(), "ticket.key", 7);
    let other_key = key_file(pki.dir(), "other.key", 8);
    let port = free_port().unwrap();
    let first = server(&pki, port, &pki.ca(), Some(&key));
    let _agent = agent(&pki, &pki.pair("agent"), port);
    assert!(agent_back(first.health_port));
    assert_eq!(count(first.health_port, FULL), 1.0);
    drop(first);

    let same_key = server(&pki, port, &pki.ca(), Some(&key));
    assert!(agent_back(same_key.health_port));
    assert_eq!(count(same_key.health_port, RESUMED), 1.0);
    assert_eq!(
        count(same_key.health_port, FULL),
        0.0,
        "no certificate work after a restart with the same key"
    );
    drop(same_key);

    // Another key cannot open the ticket: the agent is back through a full handshake.
    let new_key = server(&pki, port, &pki.ca(), Some(&other_key));
    assert!(agent_back(new_key.health_port));
    assert_eq!(count(new_key.health_port, RESUMED), 0.0);
    assert_eq!(count(new_key.health_port, FULL), 1.0);
}

/// The operator rotates the client CA to lock out certificates the old one signed. A ticket
/// from before carries such a certificate, and the restarted server holds the same ticket key:
/// resuming it must not be a way back in.
#[test]
fn a_ticket_does_not_outlive_the_ca_that_vouched_for_it() {
    let pki = Pki::new(&[]).unwrap();
    let key = key_file(pki.dir(), "ticket.key", 7);
    let port = free_port().unwrap();
    let first = server(&pki, port, &pki.ca(), Some(&key));
    let _agent = agent(&pki, &pki.pair("agent"), port);
    assert!(agent_back(first.health_port));
    drop(first);

    let rotated = server(&pki, port, &pki.dir().join("stranger-ca.pem"), Some(&key));
    assert!(
        tether_tests::process::wait_until(WAIT, || count(rotated.health_port, UNKNOWN_CA) >= 1.0),
        "the agent is refused, through a full handshake"
    );
    // Long enough for several reconnects at --sync-interval-cap=1s.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(rotated.health_port, AGENTS), 0.0, "no agent got in");
    assert_eq!(count(rotated.health_port, RESUMED), 0.0);
}

/// A certificate that expires after its session's ticket was issued: the ticket still opens,
/// the session it resumes must not go on.
#[test]
fn a_ticket_does_not_outlive_its_certificate() {
    let pki = Pki::new(&[]).unwrap();
    let key = key_file(pki.dir(), "ticket.key", 7);
    // Long enough for the first connection on a busy machine.
    let life = Duration::from_secs(6);
    let made = std::time::Instant::now();
    let short_lived = pki
        .outside_validity("agent-short", Validity::ExpiresIn(life), false)
        .unwrap();
    let port = free_port().unwrap();
    let first = server(&pki, port, &pki.ca(), Some(&key));
    let _agent = agent(&pki, &short_lived, port);
    assert!(agent_back(first.health_port));
    drop(first);
    // Until it has expired, with a second to spare (X.509 times have whole seconds).
    let expired = made + life + Duration::from_secs(1);
    std::thread::sleep(expired.saturating_duration_since(std::time::Instant::now()));

    let restarted = server(&pki, port, &pki.ca(), Some(&key));
    assert!(
        tether_tests::process::wait_until(WAIT, || count(restarted.health_port, REFUSED) >= 1.0),
        "the agent resumed with its ticket and the server refused the session"
    );
    // Its later attempts fail too, whether they resume again (the refused session had already
    // handed it a new ticket) or come as full handshakes that fail on the certificate.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(restarted.health_port, AGENTS), 0.0, "no agent got in");
    assert_eq!(count(restarted.health_port, RESUMED), 0.0);
    assert!(
        count(restarted.health_port, REFUSED) + count(restarted.health_port, EXPIRED) >= 2.0,
        "the agent kept trying and was refused each time"
    );
}

/// rustls clients put AES-256-GCM-SHA384 first; the server picks a SHA-256 suite anyway,
/// whose key schedule the CPU computes in hardware.
#[tokio::test]
async fn the_server_picks_a_sha256_suite_whatever_the_client_prefers() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = rustls::crypto::ring::default_provider();
    assert_eq!(
        provider.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        "the client's own first choice"
    );
    let pki = Pki::new(&[]).unwrap();
    let port = free_port().unwrap();
    let _server = server(&pki, port, &pki.ca(), None);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let pair = pki.pair("agent");
    let chain = CertificateDer::pem_file_iter(&pair.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&pair.key).unwrap())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
}
