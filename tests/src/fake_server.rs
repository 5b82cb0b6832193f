//! A proxy-server stand-in built on `proto`: it records what each agent stream presents and
//! hands the test both directions of the stream, so tests can check the agent's metadata and
//! feed it hostile packets.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use tether_proto::Packet;
use tether_proto::agent::agent_service_server::{AgentService, AgentServiceServer};
use tether_runtime::tls::{Identity, PemFile};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::pki::Pki;

/// What one agent stream presented.
#[derive(Clone, Debug, Default)]
pub struct Presented {
    pub agent_id: Option<String>,
    pub identifiers: Option<String>,
    pub authorization: Option<String>,
}

/// One accepted agent stream.
pub struct FakeStream {
    pub to_agent: mpsc::Sender<Packet>,
    pub from_agent: Streaming<Packet>,
}

pub struct FakeServer {
    pub port: u16,
    pub presented: Arc<Mutex<Vec<Presented>>>,
    pub streams: mpsc::Receiver<FakeStream>,
}

struct Service {
    presented: Arc<Mutex<Vec<Presented>>>,
    streams: mpsc::Sender<FakeStream>,
    server_id: String,
}

type PacketStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Packet, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let md = request.metadata();
        let get = |key: &str| md.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.presented
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .push(Presented {
                agent_id: get("agentid"),
                identifiers: get("agentidentifiers"),
                authorization: get("authorization"),
            });
        let (tx, rx) = mpsc::channel(1024);
        let _ = self
            .streams
            .send(FakeStream {
                to_agent: tx,
                from_agent: request.into_inner(),
            })
            .await;
        let mut response = Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            Ok,
        )) as PacketStream);
        response.metadata_mut().insert(
            "serverid",
            MetadataValue::try_from(self.server_id.as_str()).map_err(|_| Status::internal("id"))?,
        );
        response
            .metadata_mut()
            .insert("servercount", MetadataValue::from(1u32));
        Ok(response)
    }
}

impl FakeServer {
    /// Listens with the PKI's server certificate on 127.0.0.1.
    pub async fn start(pki: &Pki, server_id: &str) -> Result<Self> {
        let pair = pki.pair("server");
        let identity = Identity::load(
            PemFile::new("cert", &pair.cert),
            PemFile::new("key", &pair.key),
        )?;
        let tls = tether_runtime::tls::server_config(&identity, None, &[b"h2"], false)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let metrics = Arc::new(tether_server::metrics::Metrics::new());
        let incoming = tether_server::listen::tls_incoming(
            listener,
            tls,
            "fake",
            tether_server::listen::TlsLimits {
                idle_timeout: None,
                probe: None,
                pending: None,
                client_certificates: false,
            },
            metrics,
            Default::default(),
            &tokio_util::task::TaskTracker::new(),
        );
        let presented = Arc::new(Mutex::new(Vec::new()));
        let (streams_tx, streams) = mpsc::channel(16);
        let service = Service {
            presented: presented.clone(),
            streams: streams_tx,
            server_id: server_id.to_owned(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(incoming),
        );
        Ok(FakeServer {
            port,
            presented,
            streams,
        })
    }

    pub fn presented(&self) -> Vec<Presented> {
        self.presented.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// A server that answers the first `Connect` with proper headers and then one gRPC message
/// whose body is not protobuf at all. Returns its port, and how many streams it answered so.
pub async fn garbage_server(pki: &Pki) -> Result<(u16, Arc<std::sync::atomic::AtomicUsize>)> {
    let pair = pki.pair("server");
    let identity = Identity::load(
        PemFile::new("cert", &pair.cert),
        PemFile::new("key", &pair.key),
    )?;
    let tls = tokio_rustls::TlsAcceptor::from(tether_runtime::tls::server_config(
        &identity,
        None,
        &[b"h2"],
        false,
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, counter) = (tls.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let response = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .header("serverid", "garbage")
                        .header("servercount", "1")
                        .body(())
                        .expect("response");
                    let Ok(mut body) = respond.send_response(response, false) else {
                        return;
                    };
                    // gRPC frame: uncompressed, 6 bytes, then bytes that are no valid Packet
                    // (field 15 with the reserved wire type 7).
                    let frame = bytes::Bytes::from_static(&[
                        0, 0, 0, 0, 6, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f,
                    ]);
                    let _ = body.send_data(frame, false);
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                        drop(body);
                    });
                }
            });
        }
    });
    Ok((port, answered))
}
