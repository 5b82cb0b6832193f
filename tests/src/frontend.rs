//! Clients that behave like kube-apiserver's egress dialer: gRPC `Proxy` streams (one dial per
//! stream) and HTTP CONNECT, over a Unix socket or mTLS TCP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tether_proto::proxy::proxy_service_client::ProxyServiceClient;
use tether_proto::{Message, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::Pki;

/// Where the frontend listens.
#[derive(Clone)]
pub enum Target {
    Uds(PathBuf),
    /// mTLS TCP on 127.0.0.1:port, presenting the named client pair from the PKI.
    Tls {
        port: u16,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

impl Target {
    /// `tether-server probe` aimed at this frontend in `mode`, flags as an operator passes
    /// them; the destination and any other flags are the caller's to add.
    pub fn probe_command(&self, mode: crate::cluster::Mode) -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(crate::procs::built("tether-server")?);
        cmd.arg("probe").arg(match mode {
            crate::cluster::Mode::Grpc => "--mode=grpc",
            crate::cluster::Mode::HttpConnect => "--mode=http-connect",
        });
        match self {
            Target::Uds(path) => {
                cmd.arg(format!("--uds-name={}", path.display()));
            }
            Target::Tls {
                port,
                ca,
                cert,
                key,
            } => {
                cmd.arg(format!("--server=127.0.0.1:{port}"))
                    .arg("--tls-server-name=localhost")
                    .arg(format!("--ca-cert={}", ca.display()))
                    .arg(format!("--client-cert={}", cert.display()))
                    .arg(format!("--client-key={}", key.display()));
            }
        }
        Ok(cmd)
    }

    pub fn tls(port: u16, pki: &Pki, client: &str) -> Self {
        let pair = pki.pair(client);
        Target::Tls {
            port,
            ca: pki.ca(),
            cert: pair.cert,
            key: pair.key,
        }
    }
}

fn tls_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

async fn tls_stream(
    port: u16,
    ca: &Path,
    cert: &Path,
    key: &Path,
    alpn: &[u8],
) -> Result<TlsStream<TcpStream>> {
    let config = tls_config(ca, cert, key, alpn)?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost")?;
    Ok(TlsConnector::from(config).connect(name, tcp).await?)
}

/// A gRPC channel to the frontend.
pub async fn grpc_client(target: &Target) -> Result<ProxyServiceClient<Channel>> {
    let endpoint = Endpoint::from_static("http://frontend");
    let channel = match target.clone() {
        Target::Uds(path) => {
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await?
        }
        Target::Tls {
            port,
            ca,
            cert,
            key,
        } => {
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
                    async move {
                        tls_stream(port, &ca, &cert, &key, b"h2")
                            .await
                            .map(TokioIo::new)
                            .map_err(|e| std::io::Error::other(e.to_string()))
                    }
                }))
                .await?
        }
    };
    Ok(ProxyServiceClient::new(channel))
}

/// One dialled connection over a gRPC `Proxy` stream.
pub struct GrpcTunnel {
    pub connect_id: i64,
    tx: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
}

/// What the far side sent.
#[derive(Debug, PartialEq)]
pub enum Event {
    Data(Bytes),
    Closed(String),
    DialClosed,
}

impl GrpcTunnel {
    /// Dials `address`; `Err` carries the DIAL_RSP error text.
    pub async fn dial(
        client: &mut ProxyServiceClient<Channel>,
        address: &str,
    ) -> Result<Result<Self, String>> {
        let (tx, rx) = mpsc::channel(64);
        let random = 1 + i64::from(std::process::id());
        tx.send(Packet::dial_request(address, random)).await?;
        let mut inbound = client.proxy(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound
            .message()
            .await?
            .context("stream ended before DIAL_RSP")?;
        match first.into_message() {
            Message::DialResponse(rsp) => {
                if rsp.random != random {
                    bail!("DIAL_RSP echoed random {} instead of {random}", rsp.random);
                }
                if !rsp.error.is_empty() {
                    return Ok(Err(rsp.error));
                }
                Ok(Ok(GrpcTunnel {
                    connect_id: rsp.connect_id,
                    tx,
                    inbound,
                }))
            }
            other => bail!("expected DIAL_RSP, got {other:?}"),
        }
    }

    /// A sender for this tunnel's stream, to write from another task while this one reads.
    pub fn sender(&self) -> mpsc::Sender<Packet> {
        self.tx.clone()
    }

    pub async fn send(&self, data: &[u8]) -> Result<()> {
        self.tx
            .send(Packet::data(self.connect_id, Bytes::copy_from_slice(data)))
            .await?;
        Ok(())
    }

    pub async fn close(&self) -> Result<()> {
        self.tx.send(Packet::close_request(self.connect_id)).await?;
        Ok(())
    }

    pub async fn next(&mut self) -> Result<Option<Event>> {
        let Some(packet) = self.inbound.message().await? else {
            return Ok(None);
        };
        Ok(Some(match packet.into_message() {
            Message::Data(d) => Event::Data(d.data),
            Message::CloseResponse(c) => Event::Closed(c.error),
            Message::CloseDial(_) => Event::DialClosed,
            other => bail!("unexpected packet {other:?}"),
        }))
    }

    /// Reads DATA until CLOSE_RSP; returns the bytes and the close error text.
    pub async fn read_to_close(&mut self) -> Result<(Vec<u8>, String)> {
        let mut out = Vec::new();
        loop {
            match self.next().await? {
                Some(Event::Data(d)) => out.extend_from_slice(&d),
                Some(Event::Closed(error)) => return Ok((out, error)),
                Some(Event::DialClosed) | None => bail!("stream ended without CLOSE_RSP"),
            }
        }
    }
}

/// Any byte stream a CONNECT client can use.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens a raw connection to the frontend for HTTP/1.1 (no request sent yet).
pub async fn raw(target: &Target) -> Result<Box<dyn Io>> {
    open(target, b"http/1.1").await
}

/// Opens a raw connection for HTTP/2 (prior knowledge on a Unix socket, ALPN `h2` over TLS).
pub async fn raw_h2(target: &Target) -> Result<Box<dyn Io>> {
    open(target, b"h2").await
}

async fn open(target: &Target, alpn: &[u8]) -> Result<Box<dyn Io>> {
    Ok(match target {
        Target::Uds(path) => Box::new(UnixStream::connect(path).await?),
        Target::Tls {
            port,
            ca,
            cert,
            key,
        } => Box::new(tls_stream(*port, ca, cert, key, alpn).await?),
    })
}

/// Sends `CONNECT target` as kube-apiserver does. `Ok(stream)` after exactly the 200 line;
/// `Err(response)` with the whole failure response otherwise.
pub async fn http_connect(target: &Target, address: &str) -> Result<Result<Box<dyn Io>, String>> {
    let mut stream = raw(target).await?;
    stream
        .write_all(format!("CONNECT {address} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    const OK: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let mut head = vec![0u8; OK.len()];
    let mut got = 0;
    while got < OK.len() {
        let n =
            tokio::time::timeout(Duration::from_secs(20), stream.read(&mut head[got..])).await??;
        if n == 0 {
            break;
        }
        got += n;
        if head[..got] != OK[..got] {
            break;
        }
    }
    if got == OK.len() && head == OK {
        return Ok(Ok(stream));
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    head.truncate(got);
    head.extend_from_slice(&rest);
    Ok(Err(String::from_utf8_lossy(&head).into_owned()))
}
