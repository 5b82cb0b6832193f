//! Opens one server stream: a fresh TCP + TLS connection (so a load balancer in front of the
//! replicas can send each attempt elsewhere), the `AgentService/Connect` call with the agent's
//! metadata, and the server's `serverid`/`servercount` response headers.
//!
//! Certificates, keys and the token are read from disk for every connection, so rotated files
//! take effect at the next reconnect without a restart.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tether_proto::Packet;
use tether_proto::codec::PacketCodec;
use tether_proto::metadata;
use tether_runtime::handshake::HandshakeFailure;
use tether_runtime::read_ahead::ReadAhead;
use tether_runtime::tls::{self, Identity, TlsError};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_stream::Stream;
use tonic::codec::{Codec, Streaming};
use tonic::transport::{Endpoint, Uri};
use tonic::{Code, Status};
use tower::{Service, ServiceExt};

use super::body::PacketBody;
use crate::config::{Config, read_token};

/// Upstream agents wait forever for the server's headers; we do not.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_MESSAGE: usize = 16 << 20;
// `--probe-interval` and `--peer-timeout` are done by the kernel: an idle stream sends a TCP
// keepalive probe every interval, and a server that acknowledges nothing, data or probe, for
// the timeout fails the socket, which ends the stream and sends the agent back to its sync
// loop. Upstream checks its gRPC channel's state instead, which only changes once an HTTP/2
// ping times out, and pings cannot come often: gRPC servers drop clients that ping more than
// every few minutes. Keepalive probes are answered by the peer's kernel and cost one empty
// segment.
/// Upstream's proto declares no package.
const CONNECT_PATH: &str = "/AgentService/Connect";
const STREAM_WINDOW: u32 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS material")]
    Tls(#[from] TlsError),
    #[error("--service-account-token-path {path}: {why}")]
    Token { path: String, why: String },
    #[error("{what} is not a valid gRPC header value")]
    Header { what: &'static str },
    #[error("cannot reach the proxy server at {address}")]
    Transport {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "TLS with the proxy server at {address} failed: {}{}",
        failure.explain("the proxy server"),
        flags_to_check(*failure)
    )]
    Handshake {
        address: String,
        failure: HandshakeFailure,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "the proxy server refused the stream ({}): {}",
        tether_proto::grpc_code_name(status.code()),
        status.message()
    )]
    Refused { status: tonic::Status },
    #[error("cannot build the Connect request: {0}")]
    BadRequest(String),
    #[error("the proxy server sent no response headers within {0:?}")]
    HeadersTimeout(Duration),
    #[error("the proxy server's response headers are unusable: {0}")]
    BadHeaders(String),
}

/// Where one stream goes: the host as the operator named it (the name the server's
/// certificate must carry) and, when the agent picked one of its addresses itself, that
/// address; otherwise the name is resolved at each dial.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub address: Option<std::net::SocketAddr>,
}

/// `host:port`, with an IPv6 literal in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            Some(address) if address.ip().to_string() != self.host => {
                write!(f, "{} ({address})", host_port(&self.host, self.port))
            }
            _ => f.write_str(&host_port(&self.host, self.port)),
        }
    }
}

/// A stream that is up: the server's identity and its packets.
pub struct Connected {
    pub server_id: String,
    pub server_count: u32,
    /// The server accepted tether's per-connection flow control.
    pub flow_control: bool,
    pub inbound: Streaming<Packet>,
}

/// The agent's TLS settings, kept while the files behind them stay the same. rustls resumes
/// a session only under the settings that made it, and each connect reads the files again (to
/// pick up rotated ones): built afresh every time, the settings would never resume, and a
/// server restarted with the same ticket key would cost every agent a full handshake again.
#[derive(Default)]
pub struct TlsSettings {
    current: Mutex<Option<Built>>,
}

struct Built {
    ca: Vec<u8>,
    identity: Option<Identity>,
    config: Arc<ClientConfig>,
}

impl TlsSettings {
    fn get(
        &self,
        config: &Config,
        identity: Option<Identity>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let ca = config.ca.contents()?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(built) = &*current
            && built.ca == ca
            && match (&built.identity, &identity) {
                (Some(a), Some(b)) => a.same_as(b),
                (None, None) => true,
                _ => false,
            }
        {
            return Ok(built.config.clone());
        }
        let client = tls::client_config(&config.ca, identity.as_ref(), &config.alpn)?;
        *current = Some(Built {
            ca,
            identity,
            config: client.clone(),
        });
        Ok(client)
    }
}

pub async fn connect(
    config: &Config,
    tls_settings: &TlsSettings,
    target: &Target,
    outbound: impl Stream<Item = Packet> + Send + 'static,
) -> Result<Connected, ConnectError> {
    let identity = match &config.client_identity {
        Some((cert, key)) => Some(Identity::load(cert.clone(), key.clone())?),
        None => None,
    };
    let tls = tls_settings.get(config, identity)?;
    let host = target.host.clone();
    let address = target.to_string();
    let dial = target
        .address
        .map_or_else(|| host_port(&host, target.port), |a| a.to_string());
    let transport_error = |source: tonic::transport::Error| match HandshakeFailure::find(&source) {
        Some(failure) => ConnectError::Handshake {
            address: address.clone(),
            failure,
            source,
        },
        None => ConnectError::Transport {
            address: address.clone(),
            source,
        },
    };
    // The URI only names the HTTP/2 authority; the connector below decides where to dial.
    let endpoint = Endpoint::from_shared(format!("http://{}", host_port(&host, target.port)))
        .map_err(transport_error)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(config.keepalive)
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // One HTTP/2 stream carries every tunnel; with 64 KiB default windows it stalls on
        // WINDOW_UPDATE round trips. Per-tunnel limits come from the tunnel's own window.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW)
        .max_frame_size(tether_proto::MAX_HTTP2_FRAME)
        .tcp_nodelay(true);
    let connector = {
        let dial = dial.clone();
        let host = host.clone();
        let (probe_interval, peer_timeout) = (config.probe_interval, config.peer_timeout);
        tower::service_fn(move |_: Uri| {
            let tls = TlsConnector::from(tls.clone());
            let dial = dial.clone();
            let host = host.clone();
            async move {
                let name = ServerName::try_from(host).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "proxy server host is not a valid TLS name",
                    )
                })?;
                let tcp = TcpStream::connect(&dial).await?;
                tcp.set_nodelay(true)?;
                tether_runtime::net::probe_peer(&tcp, probe_interval, peer_timeout)?;
                let mut stream = tls.connect(name, ReadAhead::new(tcp)).await?;
                // rustls stops taking plaintext at 64 KiB of unsent records by default, so a
                // 256 KiB DATA frame left in four writes, each waking the server.
                stream
                    .get_mut()
                    .1
                    .set_buffer_limit(Some(tether_proto::MAX_HTTP2_FRAME as usize));
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        })
    };
    let mut channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(transport_error)?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(CONNECT_PATH)
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    let value = |what: &'static str, text: &str| {
        HeaderValue::from_str(text).map_err(|_| ConnectError::Header { what })
    };
    request = request
        .header(metadata::AGENT_ID, value("--agent-id", &config.agent_id)?)
        .header(
            metadata::AGENT_IDENTIFIERS,
            value("--agent-identifiers", &config.agent_identifiers)?,
        );
    if config.flow_control {
        request = request.header(metadata::FLOW_CONTROL, "1");
    }
    if let Some(path) = &config.token_path {
        let token = read_token(path).map_err(|why| ConnectError::Token {
            path: path.display().to_string(),
            why,
        })?;
        request = request.header(
            metadata::AUTHORIZATION,
            value("the token", &format!("Bearer {token}"))?,
        );
    }
    let request = request
        .body(tonic::body::Body::new(PacketBody::new(outbound)))
        .map_err(|err| ConnectError::BadRequest(err.to_string()))?;

    let call = async {
        channel.ready().await?;
        channel.call(request).await
    };
    let response = tokio::time::timeout(HEADERS_TIMEOUT, call)
        .await
        .map_err(|_| ConnectError::HeadersTimeout(HEADERS_TIMEOUT))?
        .map_err(transport_error)?;
    let (parts, body) = response.into_parts();
    let decoder = PacketCodec::default().decoder();
    // A grpc-status in the headers is a trailers-only answer: a refusal unless it says OK.
    let inbound = match Status::from_header_map(&parts.headers) {
        Some(status) if status.code() != Code::Ok => return Err(ConnectError::Refused { status }),
        Some(_) => Streaming::new_empty(decoder, body),
        None => Streaming::new_response(decoder, body, parts.status, None, Some(MAX_MESSAGE)),
    };
    let md = &parts.headers;
    let one = |key: &str| -> Result<String, ConnectError> {
        let values: Vec<_> = md.get_all(key).iter().collect();
        match values.as_slice() {
            [value] => value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| ConnectError::BadHeaders(format!("{key} is not text"))),
            other => Err(ConnectError::BadHeaders(format!(
                "expected one {key}, got {}",
                other.len()
            ))),
        }
    };
    let server_id = one(metadata::SERVER_ID)?;
    let server_count = one(metadata::SERVER_COUNT)?
        .parse::<u32>()
        .map_err(|_| ConnectError::BadHeaders("servercount is not a number".into()))?;
    let flow_control = md.get(metadata::FLOW_CONTROL).is_some_and(|v| v == "1");
    Ok(Connected {
        server_id,
        server_count,
        flow_control,
        inbound,
    })
}

/// The agent's flags behind each TLS failure it can see: rustls' own text ("invalid peer
/// certificate: BadSignature") names the symptom only.
fn flags_to_check(failure: HandshakeFailure) -> &'static str {
    use HandshakeFailure::*;
    match failure {
        PeerCertificateUnknownCa => {
            " (--ca-cert must hold the CA that signed the server's agent-port certificate)"
        }
        PeerCertificateWrongName => " (it must name --proxy-server-host)",
        OurCertificateExpired | OurCertificateUnknownCa | OurCertificateRefused => {
            " (--agent-cert and --agent-key)"
        }
        PeerRequiresCertificate => " (set --agent-cert and --agent-key)",
        Plaintext => " (--proxy-server-port must be the server's agent port)",
        _ => "",
    }
}

impl ConnectError {
    /// The metric label for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Tls(_) => "tls_material",
            ConnectError::Token { .. } => "token_file",
            ConnectError::Header { .. } | ConnectError::BadRequest(_) => "bad_request",
            ConnectError::Transport { .. } => "unreachable",
            ConnectError::Handshake { failure, .. } => failure.label(),
            ConnectError::Refused { status } => match status.code() {
                Code::Unauthenticated => "unauthenticated",
                Code::PermissionDenied => "permission_denied",
                _ => "refused",
            },
            ConnectError::HeadersTimeout(_) => "headers_timeout",
            ConnectError::BadHeaders(_) => "bad_headers",
        }
    }
}
