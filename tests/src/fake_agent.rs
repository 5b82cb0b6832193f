//! An agent stand-in built on `proto`: it opens `AgentService/Connect` to tether-server with
//! the metadata it is told to send, and hands the test both directions, so tests can feed the
//! server hostile packets.

use std::io;
use std::path::Path;

use anyhow::Result;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tether_proto::Packet;
use tether_proto::agent::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Streaming};

pub struct FakeAgent {
    pub to_server: mpsc::Sender<Packet>,
    pub from_server: Streaming<Packet>,
}

impl FakeAgent {
    /// Connects to 127.0.0.1:`port`, trusting `ca`, presenting `agent_id`.
    pub async fn connect(port: u16, ca: &Path, agent_id: &str) -> Result<Self> {
        Self::open(channel(port, ca).await?, agent_id).await
    }

    /// Opens an agent stream on an existing connection.
    pub async fn open(channel: Channel, agent_id: &str) -> Result<Self> {
        Self::open_with(channel, agent_id, &[]).await
    }

    /// Opens an agent stream with further metadata (`authorization`, `agentidentifiers`).
    pub async fn open_with(
        channel: Channel,
        agent_id: &str,
        metadata: &[(&'static str, &str)],
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("agentid", MetadataValue::try_from(agent_id)?);
        for (key, value) in metadata {
            request
                .metadata_mut()
                .insert(*key, MetadataValue::try_from(*value)?);
        }
        let from_server = AgentServiceClient::new(channel)
            .connect(request)
            .await?
            .into_inner();
        Ok(FakeAgent {
            to_server: tx,
            from_server,
        })
    }
}

/// One TLS connection to the agent port on 127.0.0.1:`port`, trusting `ca`; agent streams
/// opened on it share it.
pub async fn channel(port: u16, ca: &Path) -> Result<Channel> {
    channel_from(std::net::Ipv4Addr::LOCALHOST, port, ca).await
}

/// [`channel`] from `source`, an address on loopback: as many agents as addresses.
pub async fn channel_from(source: std::net::Ipv4Addr, port: u16, ca: &Path) -> Result<Channel> {
    let tls = tls_connector(ca)?;
    Ok(Endpoint::from_static("http://agent-port")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind((source, 0).into())?;
                let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
                let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
                Ok::<_, io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
            }
        }))
        .await?)
}

/// TLS as an agent speaks it (trusting `ca`, offering h2), without a client certificate.
pub fn tls_connector(ca: &Path) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(std::sync::Arc::new(config)))
}
