//! Listening sockets: TCP (with the TLS handshake done off the accept loop) and Unix sockets.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};

use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use tether_runtime::read_ahead::ReadAhead;

use crate::metrics::Metrics;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A TLS connection accepted on one of our ports.
pub struct TlsConn {
    stream: TlsStream<ReadAhead<TcpStream>>,
    peer: SocketAddr,
}

impl TlsConn {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl std::os::fd::AsRawFd for TlsConn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.get_ref().0.as_raw_fd()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, so one slow or hostile
/// client cannot hold up the others.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    role: &'static str,
    metrics: Arc<Metrics>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(role, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(ReadAhead::new(tcp)))
                    .await
                {
                    Ok(Ok(mut stream)) => {
                        // rustls stops taking plaintext at 64 KiB of unsent records by
                        // default: a 256 KiB DATA frame would leave in four writes, each
                        // waking the reader. Memory stays bounded by the tunnels' windows.
                        stream
                            .get_mut()
                            .1
                            .set_buffer_limit(Some(tether_proto::MAX_HTTP2_FRAME as usize));
                        let _ = conn_tx.send(Ok(TlsConn { stream, peer })).await;
                    }
                    Ok(Err(err)) => {
                        metrics.reject("tls_handshake_failed");
                        tracing::warn!(role, %peer, error = %err, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.reject("tls_handshake_timeout");
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

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = SocketAddr;

    fn connect_info(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
