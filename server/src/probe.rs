//! `tether-server probe HOST:PORT`: dials through a running server's frontend exactly as
//! kube-apiserver's egress selector does (gRPC `Proxy` stream or HTTP CONNECT, over the Unix
//! socket or mTLS TCP) and reports whether the destination is reachable through the tunnel,
//! which agent served the dial, how long the dial took, and the error verbatim when it failed.
//!
//! The probe asks the server to name the agent (gRPC metadata / request header `tether-probe`);
//! a server that does not understand the question (upstream's) ignores it, and the agent is then
//! reported as unknown. kube-apiserver never asks, so what it receives is unchanged.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tether_proto::proxy::proxy_service_client::ProxyServiceClient;
use tether_proto::{Message, Packet};
use tether_runtime::tls::{self, Identity, PemFile};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Endpoint, Uri};

use crate::config::{Mode, ProbeArgs};

use tether_proto::metadata::{PROBE as PROBE_HEADER, PROBE_AGENT as AGENT_HEADER};

/// Largest reply read back for `--http-get`.
const MAX_REPLY: usize = 64 * 1024;

/// What the probe found; its exit code tells scripts which.
pub enum Outcome {
    Reachable {
        agent: Option<String>,
        dial_time: Duration,
        reply: Option<String>,
    },
    /// The server answered and the dial failed; `error` is what it said, verbatim.
    Unreachable {
        agent: Option<String>,
        error: String,
    },
}

impl Outcome {
    /// 0 reachable, 1 unreachable; 2 (an `Err` from [`run`]) is "could not ask".
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Reachable { .. } => 0,
            Outcome::Unreachable { .. } => 1,
        }
    }
}

struct AgentName<'a>(&'a Option<String>);

impl fmt::Display for AgentName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(agent) => write!(f, "{agent:?}"),
            None => f.write_str("unknown (the server did not say)"),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reachable {
                agent,
                dial_time,
                reply,
            } => {
                writeln!(f, "reachable: yes")?;
                writeln!(f, "agent: {}", AgentName(agent))?;
                writeln!(f, "dial time: {:.1} ms", dial_time.as_secs_f64() * 1e3)?;
                if let Some(reply) = reply {
                    writeln!(f, "reply: {reply}")?;
                }
                Ok(())
            }
            Outcome::Unreachable { agent, error } => {
                writeln!(f, "reachable: no")?;
                writeln!(f, "agent: {}", AgentName(agent))?;
                writeln!(f, "error: {error}")
            }
        }
    }
}

/// Runs one probe. `Err` means the server itself could not be asked (not reachable, TLS
/// refused, protocol broken); the chain says which.
pub async fn run(args: &ProbeArgs) -> Result<Outcome> {
    let transport = Transport::from_args(args)?;
    match args.mode {
        Mode::Grpc => grpc(args, transport).await,
        Mode::HttpConnect => connect(args, transport).await,
    }
}

enum Transport {
    Uds(PathBuf),
    Tls {
        address: String,
        name: ServerName<'static>,
        config: std::sync::Arc<rustls::ClientConfig>,
    },
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl Transport {
    fn from_args(args: &ProbeArgs) -> Result<Self> {
        if let Some(path) = &args.uds_name {
            return Ok(Transport::Uds(path.clone()));
        }
        let Some(address) = &args.server else {
            bail!("say where the server's frontend is: --uds-name PATH or --server HOST:PORT");
        };
        let (host, _) = address
            .rsplit_once(':')
            .with_context(|| format!("--server {address:?}: expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = args.tls_server_name.as_deref().unwrap_or(host).to_owned();
        let name = ServerName::try_from(name.clone())
            .with_context(|| format!("{name:?} is not a DNS name or IP address"))?;
        // `requires_all` on --server guarantees the three files.
        let file =
            |flag, path: &Option<PathBuf>| PemFile::new(flag, path.clone().unwrap_or_default());
        let identity = Identity::load(
            file("client-cert", &args.client_cert),
            file("client-key", &args.client_key),
        )?;
        let alpn = match args.mode {
            Mode::Grpc => vec!["h2".to_owned()],
            Mode::HttpConnect => vec!["http/1.1".to_owned()],
        };
        let config = tls::client_config(&file("ca-cert", &args.ca_cert), Some(&identity), &alpn)?;
        Ok(Transport::Tls {
            address: address.clone(),
            name,
            config,
        })
    }

    async fn open(&self) -> Result<Box<dyn Io>> {
        Ok(match self {
            Transport::Uds(path) => Box::new(
                UnixStream::connect(path)
                    .await
                    .with_context(|| format!("cannot connect to {}", path.display()))?,
            ),
            Transport::Tls {
                address,
                name,
                config,
            } => {
                let tcp = TcpStream::connect(address.as_str())
                    .await
                    .with_context(|| format!("cannot connect to {address}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {address} failed"))?;
                Box::new(tls)
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Transport::Uds(path) => format!("unix:{}", path.display()),
            Transport::Tls { address, .. } => format!("tls:{address}"),
        }
    }
}

async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {limit:?}"))?
}

async fn grpc(args: &ProbeArgs, transport: Transport) -> Result<Outcome> {
    let server = transport.describe();
    // Connected here, so that a failure reads as ours rather than through tonic's layers; the
    // channel takes this one stream and never reconnects.
    let stream = within(
        args.timeout,
        &format!("connecting to {server}"),
        transport.open(),
    )
    .await?;
    let stream = std::sync::Mutex::new(Some(stream));
    let connector = tower::service_fn(move |_: Uri| {
        let stream = stream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        async move {
            stream
                .map(TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the probe's connection is gone"))
        }
    });
    let channel = within(args.timeout, &format!("HTTP/2 with {server}"), async {
        Endpoint::from_static("http://konnectivity-server")
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("no HTTP/2 connection with {server}"))
    })
    .await?;
    let mut client = ProxyServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let random = i64::from(rand::random::<u32>()) + 1;
    tx.send(Packet::dial_request(&args.target, random))
        .await
        .context("queueing the DIAL_REQ")?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        PROBE_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    let started = Instant::now();
    let (agent, mut inbound, first) = within(args.timeout, "the dial", async {
        let response = client
            .proxy(request)
            .await
            .with_context(|| format!("the server refused the Proxy stream on {server}"))?;
        let agent = response
            .metadata()
            .get(AGENT_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut inbound = response.into_inner();
        let first = inbound
            .message()
            .await
            .context("reading the DIAL_RSP")?
            .context("the server ended the stream without a DIAL_RSP")?;
        Ok((agent, inbound, first))
    })
    .await?;
    let dial_time = started.elapsed();
    let Message::DialResponse(answer) = first.into_message() else {
        bail!("the server's first packet was not a DIAL_RSP");
    };
    if !answer.error.is_empty() {
        return Ok(Outcome::Unreachable {
            agent,
            error: answer.error,
        });
    }
    let connect_id = answer.connect_id;
    let reply = match &args.http_get {
        None => None,
        Some(path) => Some(
            within(args.timeout, "the HTTP reply", async {
                tx.send(Packet::data(connect_id, http_request(&args.target, path)))
                    .await
                    .context("sending the request")?;
                let mut reply = BytesMut::new();
                while reply.len() < MAX_REPLY && !has_status_line(&reply) {
                    let Some(packet) = inbound.message().await? else {
                        break;
                    };
                    match packet.into_message() {
                        Message::Data(data) => reply.extend_from_slice(&data.data),
                        Message::CloseResponse(_) => break,
                        _ => {}
                    }
                }
                Ok(status_line(&reply))
            })
            .await?,
        ),
    };
    // Close as kube-apiserver does; the server's CLOSE_RSP is not waited for.
    let _ = tx.send(Packet::close_request(connect_id)).await;
    Ok(Outcome::Reachable {
        agent,
        dial_time,
        reply,
    })
}

async fn connect(args: &ProbeArgs, transport: Transport) -> Result<Outcome> {
    let server = transport.describe();
    let mut stream = within(
        args.timeout,
        &format!("connecting to {server}"),
        transport.open(),
    )
    .await?;
    let started = Instant::now();
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{PROBE_HEADER}: 1\r\n\r\n",
        target = args.target
    );
    stream
        .write_all(request.as_bytes())
        .await
        .with_context(|| format!("sending CONNECT to {server}"))?;
    let (status, agent, body) =
        within(args.timeout, "the dial", read_response(&mut stream)).await?;
    let dial_time = started.elapsed();
    if status != 200 {
        // The body is the server's own words, which name the cause.
        let mut text = String::from_utf8_lossy(&body).trim().to_owned();
        if text.is_empty() {
            text = format!("HTTP status {status}");
        }
        return Ok(Outcome::Unreachable { agent, error: text });
    }
    let reply = match &args.http_get {
        None => None,
        Some(path) => Some(
            within(args.timeout, "the HTTP reply", async {
                stream
                    .write_all(&http_request(&args.target, path))
                    .await
                    .context("sending the request")?;
                let mut reply = BytesMut::from(&body[..]);
                while reply.len() < MAX_REPLY && !has_status_line(&reply) {
                    if stream.read_buf(&mut reply).await? == 0 {
                        break;
                    }
                }
                Ok(status_line(&reply))
            })
            .await?,
        ),
    };
    Ok(Outcome::Reachable {
        agent,
        dial_time,
        reply,
    })
}

/// Reads the CONNECT response: its status, the agent header, and what followed the head (the
/// error text of a refusal, read until the server closes).
async fn read_response(stream: &mut Box<dyn Io>) -> Result<(u16, Option<String>, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!(
                "the server closed the connection before a complete response ({} bytes: {:?})",
                buf.len(),
                String::from_utf8_lossy(&buf)
            );
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response
            .parse(&buf)
            .context("the server's response is not HTTP")?
        {
            httparse::Status::Partial if buf.len() < MAX_REPLY => continue,
            httparse::Status::Partial => bail!("the server's response head exceeds 64 KiB"),
            httparse::Status::Complete(len) => {
                let status = response.code.unwrap_or(0);
                let agent = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(AGENT_HEADER))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                let mut rest = buf.split_off(len);
                if status != 200 {
                    // A refusal ends the connection; a short wait bounds a server that does not.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while rest.len() < MAX_REPLY && stream.read_buf(&mut rest).await? > 0 {}
                        Ok::<_, std::io::Error>(())
                    })
                    .await;
                }
                return Ok((status, agent, rest.freeze()));
            }
        }
    }
}

fn http_request(target: &str, path: &str) -> Bytes {
    Bytes::from(format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: tether-server-probe\r\nConnection: close\r\n\r\n"
    ))
}

fn has_status_line(reply: &[u8]) -> bool {
    reply.windows(2).any(|w| w == b"\r\n")
}

fn status_line(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(reply);
    match text.split_once("\r\n") {
        Some((line, _)) => line.to_owned(),
        None if text.is_empty() => "(the destination closed without a reply)".to_owned(),
        None => text.into_owned(),
    }
}
