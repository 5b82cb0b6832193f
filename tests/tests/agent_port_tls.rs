//! TLS on the agent port as agents meet it: the suite the server picks.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::path::Path;

use tether_tests::peers::free_port;
use tether_tests::pki::Pki;
use tether_tests::procs::Server;

/// A server on agent port `port` that requires client certificates signed by `client_ca`.
fn server(pki: &Pki, port: u16, client_ca: &Path) -> Server {
    let pair = pki.pair("server");
    let args = [
        "--mode=http-connect".to_owned(),
        format!("--uds-name={}", pki.dir().join("frontend.sock").display()),
        "--delete-existing-uds-file".to_owned(),
        "--server-port=0".to_owned(),
        format!("--agent-port={port}"),
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        format!("--cluster-ca-cert={}", client_ca.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args).unwrap()
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
    let _server = server(&pki, port, &pki.ca());
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
