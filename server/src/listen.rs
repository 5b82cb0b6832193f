//! Listening sockets: TCP with TLS, and Unix sockets. Accepting never spins (an error such as
//! running out of file descriptors backs off, and is counted), TLS handshakes run off the
//! accept loop with a limit on how many are in flight, and a TLS connection that carries no
//! stream for the idle timeout is closed.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use rustls::{HandshakeKind, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tether_runtime::handshake::{HandshakeFailure, looks_like_tls};
use tether_runtime::net::AcceptBackoff;
use tether_runtime::read_ahead::ReadAhead;

use crate::identity::CertNames;
use crate::metrics::Metrics;
use crate::tickets;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in flight per listener; past it, connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 128;

/// Binds a Unix socket at `path` (mode 0770, as upstream's umask gives).
pub fn bind_uds(path: &Path, delete_existing: bool) -> io::Result<UnixListener> {
    if delete_existing {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o770))?;
    Ok(listener)
}

fn accept_failed(metrics: &Metrics, role: &'static str, err: &io::Error) {
    metrics.accept_error(role);
    tracing::warn!(role, error = %err, "accept failed; backing off");
}

/// Connections accepted on a Unix socket, until `stop`.
pub fn uds_incoming(
    listener: UnixListener,
    role: &'static str,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> ReceiverStream<io::Result<UdsConn>> {
    let (tx, rx) = mpsc::channel(16);
    tasks.spawn(async move {
        let mut backoff = AcceptBackoff::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    let conn = UdsConn {
                        stream,
                        checked: false,
                        metrics: metrics.clone(),
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(err) => {
                    accept_failed(&metrics, role, &err);
                    backoff.wait().await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// AsyncWrite for a connection wrapper: every write goes straight to its `stream`.
macro_rules! write_through {
    ($conn:ty) => {
        impl AsyncWrite for $conn {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.stream).poll_write(cx, buf)
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.stream).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.stream.is_write_vectored()
            }
        }
    };
}

/// A connection on the plaintext Unix socket (HTTP CONNECT or gRPC without TLS). A TLS
/// client that reaches it by mistake would get a protocol error that names neither TLS nor
/// the socket; its first bytes are checked once, and such a client is counted, told off in
/// the log, and cut off.
pub struct UdsConn {
    stream: UnixStream,
    checked: bool,
    metrics: Arc<Metrics>,
}

impl std::os::fd::AsRawFd for UdsConn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }
}

impl tonic::transport::server::Connected for UdsConn {
    type ConnectInfo = <UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for UdsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut self.stream).poll_read(cx, buf))?;
        if !self.checked && buf.filled().len() > before {
            self.checked = true;
            if looks_like_tls(&buf.filled()[before..]) {
                self.metrics
                    .handshake_failure("frontend_uds", "tls_on_plaintext_socket");
                tracing::warn!(
                    "a TLS client connected to the frontend's Unix socket, which speaks \
                     plaintext: point TLS clients at --server-port, or let this one use the \
                     socket without TLS (kube-apiserver's egress selector: transport.uds)"
                );
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS client on the plaintext Unix socket",
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(UdsConn);

/// How a TLS listener treats its connections.
#[derive(Clone, Debug)]
pub struct TlsLimits {
    /// A connection that carries no stream this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Probe the peer this often and give it up after four silent intervals (`None`: leave
    /// it to HTTP/2 keepalive).
    pub probe: Option<Duration>,
    /// Connections not yet proven (see [`Pending`]), bounded per source and in all.
    pub pending: Option<Arc<Pending>>,
    /// Clients present certificates: a resumed session's are checked again for validity.
    pub client_certificates: bool,
}

/// Agent-port connections that have not yet carried an accepted agent stream: a stranger
/// holds TLS state and can queue TokenReviews, so there are at most so many per source
/// address and in all. Past either, a new connection is closed at once (counted); a
/// connection stops counting once its agent stream is accepted ([`ConnInfo::prove`]).
#[derive(Debug)]
pub struct Pending {
    per_source: usize,
    total: usize,
    held: std::sync::Mutex<(HashMap<IpAddr, usize>, usize)>,
}

impl Pending {
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Pending {
            per_source,
            total,
            held: std::sync::Mutex::default(),
        })
    }

    /// A place for one more unproven connection from `source`, or why there is none.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<PendingSlot, &'static str> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (per_source, total) = &mut *held;
        if *total >= self.total {
            return Err("agent_pending_connections");
        }
        let mine = per_source.entry(source).or_default();
        if *mine >= self.per_source {
            return Err("agent_pending_connections_per_source");
        }
        *mine += 1;
        *total += 1;
        Ok(PendingSlot {
            pending: self.clone(),
            source,
        })
    }
}

/// One unproven connection's place, given back when it is proven or closed.
#[derive(Debug)]
pub struct PendingSlot {
    pending: Arc<Pending>,
    source: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut held = self.pending.held.lock().unwrap_or_else(|p| p.into_inner());
        let (per_source, total) = &mut *held;
        *total -= 1;
        if let Some(mine) = per_source.get_mut(&self.source) {
            *mine -= 1;
            if *mine == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// Silent probe intervals after which an agent is given up: four of `--agent-probe-interval`
/// (20 s by default, longer than an ordinary network blip).
const PROBE_MISSES: u32 = 3;

/// Accepts TCP connections and completes TLS handshakes concurrently (at most
/// [`MAX_HANDSHAKES`] at once), so one slow or hostile client cannot hold up the others.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    role: &'static str,
    limits: TlsLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let handshaking = tasks.clone();
    tasks.spawn(async move {
        let mut backoff = AcceptBackoff::new();
        loop {
            let slot = tokio::select! {
                slot = handshakes.clone().acquire_owned() => slot,
                () = stop.cancelled() => return,
            };
            let Ok(slot) = slot else { return };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => {
                    backoff.reset();
                    accepted
                }
                Err(err) => {
                    accept_failed(&metrics, role, &err);
                    backoff.wait().await;
                    continue;
                }
            };
            let pending = match limits.pending.as_ref().map(|p| p.admit(peer.ip())) {
                None => None,
                Some(Ok(slot)) => Some(slot),
                Some(Err(reason)) => {
                    metrics.reject(reason);
                    tracing::debug!(role, %peer, reason, "closed a connection: too many unproven ones");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if let Some(interval) = limits.probe
                && let Err(err) =
                    tether_runtime::net::probe_peer(&tcp, interval, interval * (PROBE_MISSES + 1))
            {
                tracing::warn!(role, %peer, error = %err, "cannot set TCP keepalive on a connection");
            }
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let metrics = metrics.clone();
            let idle_timeout = limits.idle_timeout;
            let client_certificates = limits.client_certificates;
            handshaking.spawn(async move {
                let handshake = acceptor.accept(ReadAhead::new(tcp));
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
                drop(slot);
                match result {
                    Ok(Ok(mut stream)) => {
                        let session = stream.get_ref().1;
                        let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
                        if resumed
                            && client_certificates
                            && let Err(err) = tickets::still_valid(
                                session.peer_certificates(),
                                x509_parser::time::ASN1Time::now(),
                            )
                        {
                            metrics.handshake_failure(role, "resumed_certificate_refused");
                            tracing::warn!(
                                role,
                                %peer,
                                error = %err,
                                "refused a resumed TLS session: its client certificate is no longer valid"
                            );
                            return;
                        }
                        metrics.handshake(role, resumed);
                        // rustls stops taking plaintext at 64 KiB of unsent records by
                        // default: a 256 KiB DATA frame would leave in four writes, each
                        // waking the reader. Memory stays bounded by the connections' windows.
                        stream
                            .get_mut()
                            .1
                            .set_buffer_limit(Some(tether_proto::MAX_HTTP2_FRAME as usize));
                        let conn = TlsConn::new(stream, peer, idle_timeout, pending);
                        let _ = conn_tx.send(Ok(conn)).await;
                    }
                    Ok(Err(err)) => {
                        let failure =
                            HandshakeFailure::find(&err).unwrap_or(HandshakeFailure::Other);
                        metrics.handshake_failure(role, failure.label());
                        tracing::warn!(
                            role,
                            %peer,
                            reason = failure.label(),
                            error = %err,
                            "TLS handshake failed: {}",
                            failure.explain(&format!(
                                "the {} at {peer}",
                                if role == "agent" { "agent" } else { "client" }
                            ))
                        );
                    }
                    Err(_) => {
                        metrics.handshake_failure(role, "timeout");
                        tracing::warn!(role, %peer, "TLS handshake timed out");
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Who is on the other end of a TLS connection, and how many streams it carries. gRPC
/// services find it in their requests' extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// What the client certificate names, when the peer presented one.
    pub client: Option<Arc<CertNames>>,
    streams: Arc<Streams>,
    /// Its place among the unproven connections, until [`ConnInfo::prove`].
    pending: Arc<std::sync::Mutex<Option<PendingSlot>>>,
}

#[derive(Debug, Default)]
struct Streams {
    open: AtomicUsize,
    /// Bumped whenever the count reaches zero, so the connection restarts its idle clock.
    idled: AtomicUsize,
    /// The connection's reader, woken to start that clock: otherwise it would sleep until
    /// the peer next sends a byte.
    reader: AtomicWaker,
}

impl ConnInfo {
    /// The connection carries an accepted agent stream: it no longer counts as unproven.
    pub fn prove(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Counts a stream on this connection until the returned guard is dropped.
    pub fn stream(&self) -> StreamGuard {
        self.streams.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.streams.clone())
    }
}

pub struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idled.fetch_add(1, Ordering::AcqRel);
            self.0.reader.wake();
        }
    }
}

/// A TLS connection accepted on one of our ports.
pub struct TlsConn {
    stream: TlsStream<ReadAhead<TcpStream>>,
    info: ConnInfo,
    idle: Option<Idle>,
}

/// The clock of a connection that carries no stream.
struct Idle {
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The `idled` count the deadline was set for.
    seen: usize,
}

impl TlsConn {
    fn new(
        stream: TlsStream<ReadAhead<TcpStream>>,
        peer: SocketAddr,
        idle_timeout: Option<Duration>,
        pending: Option<PendingSlot>,
    ) -> Self {
        let client = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| CertNames::from_der(cert))
            .map(Arc::new);
        TlsConn {
            stream,
            info: ConnInfo {
                peer,
                client,
                streams: Arc::default(),
                pending: Arc::new(std::sync::Mutex::new(pending)),
            },
            idle: idle_timeout.map(|timeout| Idle {
                timeout,
                deadline: Box::pin(tokio::time::sleep(timeout)),
                seen: 0,
            }),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.info.peer
    }

    /// True once the connection has carried no stream for its idle timeout.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(idle) = &mut self.idle else {
            return false;
        };
        self.info.streams.reader.register(cx.waker());
        if self.info.streams.open.load(Ordering::Acquire) > 0 {
            return false;
        }
        let idled = self.info.streams.idled.load(Ordering::Acquire);
        if idled != idle.seen {
            idle.seen = idled;
            idle.deadline.as_mut().reset(Instant::now() + idle.timeout);
        }
        idle.deadline.as_mut().poll(cx).is_ready()
    }
}

impl std::os::fd::AsRawFd for TlsConn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.get_ref().0.as_raw_fd()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // The connection's task always waits in a read: the idle clock wakes it here.
        if self.idle_expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection carried no stream for the idle timeout",
            )));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

write_through!(TlsConn);
