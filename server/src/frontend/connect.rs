//! HTTP CONNECT frontend (`--mode http-connect`), over a Unix socket or mTLS TCP.
//!
//! The response bytes are written by hand because kube-apiserver checks them closely: exactly
//! `HTTP/1.1 200 Connection Established\r\n\r\n` and nothing else before connection data (it
//! rejects a 200 followed by buffered bytes), and upstream's status lines for each failure.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tether_runtime::net::peer_hung_up;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::connect_head::{Head, HeadError, HeadReader, MAX_HEAD, validate_target};
use crate::connection::{Connection, DialCause, End, ToFrontend};
use crate::metrics::Metrics;
use crate::outbox::AgentGone;
use crate::registry::Registry;

/// Upstream's read-header timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Most client bytes per read (one or a few DATA packets).
const CHUNK: usize = 256 * 1024;
/// Read size for a connection that is idle or interactive.
const MIN_READ: usize = 512;

pub struct ConnectFrontend {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// `--half-close-timeout`.
    pub half_close_timeout: Duration,
}

impl ConnectFrontend {
    /// Serves one client connection to its end.
    pub async fn serve<S>(self: Arc<Self>, mut stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
    {
        self.metrics.http_connections.inc();
        let result = self.serve_inner(&mut stream, &peer).await;
        self.metrics.http_connections.dec();
        if let Err(reason) = result {
            tracing::info!(%peer, reason, "CONNECT request ended");
        }
        // A client that stopped reading cannot take a TLS close_notify either.
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }

    async fn serve_inner<S>(&self, stream: &mut S, peer: &str) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
    {
        let (Head { target, probe }, mut leftover) = match tokio::time::timeout(
            HEADER_TIMEOUT,
            read_head(stream),
        )
        .await
        {
            Err(_) => {
                self.metrics.reject("connect_header_timeout");
                return Err("no complete request head within 60s".into());
            }
            Ok(Err(HeadError::Closed)) => return Err("client closed before a request".into()),
            Ok(Err(HeadError::Malformed(why))) => {
                self.metrics.reject("connect_malformed_request");
                tracing::warn!(%peer, why, "malformed HTTP request on the CONNECT frontend");
                let _ = write(stream, "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request").await;
                return Err(format!("malformed request: {why}"));
            }
            Ok(Err(HeadError::NotConnect(method))) => {
                self.metrics.reject("connect_method");
                let _ = write(stream, "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n\r\nthis proxy only supports CONNECT passthrough\n").await;
                return Err(format!("method {method} is not CONNECT"));
            }
            Ok(Ok(head)) => head,
        };
        if let Err(why) = validate_target(&target) {
            self.metrics.reject("connect_bad_target");
            tracing::warn!(%peer, target, why, "refused CONNECT to an unparsable target");
            let _ = write(stream, &format!("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ninvalid CONNECT target {target:?}: {why}\r\n")).await;
            return Err(format!("bad target {target:?}"));
        }
        let agent_stream = match self.registry.pick_or_wait(&target).await {
            Ok(agent_stream) => agent_stream,
            Err(refusal) => {
                self.metrics.dial_failure("no_agent");
                let _ = write(stream, &format!("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\ncurrently no tunnels available: {refusal}")).await;
                return Err(refusal.to_string());
            }
        };
        let random = i64::from(rand::random::<u32>()) << 31 | i64::from(rand::random::<u32>() >> 1);
        let connection = agent_stream.open(random);
        // The socket outlives the connection's entry in its agent stream, where progress is read.
        connection.progress.watch_socket(stream.as_raw_fd());
        if connection.dial(&target).await.is_err() {
            let _ = write(stream, "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nFailed to tunnel dial request: agent stream closed\r\n").await;
            return Err("agent stream closed before the dial was sent".into());
        }

        // Wait for the agent's answer, noticing a client that gives up meanwhile.
        let first = loop {
            // Early bytes land straight in `leftover`: no scratch buffer in this future, which
            // every waiting connection would otherwise keep.
            leftover.reserve(1024);
            tokio::select! {
                event = connection.mailbox.pop() => break event,
                read = stream.read_buf(&mut leftover) => match read {
                    Ok(0) | Err(_) => {
                        connection.end_from_frontend(End::FrontendGone).await;
                        self.metrics.reject("connect_client_gone_mid_dial");
                        tracing::info!(%peer, target, "client went away while the dial was pending; cancelled it");
                        return Err("client disconnected mid-dial".into());
                    }
                    Ok(_) if leftover.len() <= MAX_HEAD => {}
                    Ok(_) => {
                        connection.end_from_frontend(End::FrontendGone).await;
                        self.metrics.reject("connect_early_data");
                        return Err("client sent too much before the connection was up".into());
                    }
                },
            }
        };
        match first {
            Some(ToFrontend::DialOk { .. }) => {}
            Some(ToFrontend::DialFailed { error, cause }) => {
                let response = failure_response(&error, cause);
                let _ = write(
                    stream,
                    &naming_agent(response, probe, &agent_stream.agent_id),
                )
                .await;
                return Err(format!("dial to {target} failed: {error}"));
            }
            Some(ToFrontend::DialClosed) | None => return Err("agent cancelled the dial".into()),
            Some(other) => return Err(format!("unexpected first event {other:?}")),
        };
        let established = naming_agent(
            "HTTP/1.1 200 Connection Established\r\n\r\n".to_owned(),
            probe,
            &agent_stream.agent_id,
        );
        if write(stream, &established).await.is_err() {
            connection.end_from_frontend(End::FrontendGone).await;
            return Err("client went away before the 200".into());
        }
        if !leftover.is_empty()
            && connection
                .send_data(leftover.split().freeze())
                .await
                .is_err()
        {
            return Err("agent stream closed".into());
        }
        pump(stream, &connection, &self.metrics, self.half_close_timeout).await;
        Ok(())
    }
}

/// Moves bytes both ways until the connection ends. With a tether agent (flow control
/// negotiated) a client's EOF is a half-close: the agent gets a FIN and the reply still flows
/// back until the agent closes, or until neither direction has moved for `half_close_timeout`.
/// Toward upstream agents, EOF closes both directions, as upstream.
async fn pump<S>(
    stream: &mut S,
    connection: &Arc<Connection>,
    metrics: &Metrics,
    half_close_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let fd = stream.as_raw_fd();
    enum Up {
        Eof,
        ClientError,
        AgentGone,
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let upstream = async {
        // Sized to the traffic: an idle connection holds a small buffer, a bulk one grows to
        // CHUNK and shrinks again when reads get small.
        let mut want = MIN_READ;
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(want);
            match reader.read_buf(&mut buf).await {
                Ok(0) => return Up::Eof,
                Err(_) => return Up::ClientError,
                Ok(n) => {
                    want = if n >= want {
                        (want * 2).min(CHUNK)
                    } else if n < want / 4 {
                        (want / 2).max(MIN_READ)
                    } else {
                        want
                    };
                    match forward(connection, buf.split().freeze(), fd, half_close_timeout).await {
                        Forward::Sent => {}
                        Forward::AgentGone => return Up::AgentGone,
                        Forward::Stuck => return Up::ClientError,
                    }
                }
            }
        }
    };
    // Returns whether the client went away (as opposed to the agent closing).
    let downstream = async {
        while let Some(event) = connection.mailbox.pop().await {
            match event {
                // The agent's FIN: the destination will send nothing more.
                ToFrontend::Data(data) if data.is_empty() => {
                    let _ = writer.shutdown().await;
                }
                ToFrontend::Data(data) => {
                    let started = std::time::Instant::now();
                    let mut rest = &data[..];
                    while !rest.is_empty() {
                        match writer.write(rest).await {
                            Ok(0) | Err(_) => return true,
                            Ok(n) => {
                                connection.progress.wrote(n);
                                rest = &rest[n..];
                            }
                        }
                    }
                    // TLS takes what the socket cannot yet and holds it until the next write
                    // or a flush: without this, the tail of a download can sit in rustls
                    // for good.
                    if writer.flush().await.is_err() {
                        return true;
                    }
                    metrics
                        .frontend_write_duration
                        .observe(started.elapsed().as_secs_f64());
                    connection.delivered(data.len());
                }
                ToFrontend::Closed { .. } => return false,
                _ => {}
            }
        }
        false
    };
    tokio::pin!(upstream, downstream);
    let client_gone = tokio::select! {
        // Given up on (its agent stream closed it while blocked writing to a stalled client).
        () = connection.abandoned() => false,
        up = &mut upstream => match up {
            Up::Eof if connection.half_close() => {
                if connection.send_fin().await.is_err() {
                    true
                } else {
                    match unless_still(connection, half_close_timeout, || true, &mut downstream).await {
                        Some(gone) => gone,
                        None => {
                            metrics.reject("connect_half_close_timeout");
                            tracing::info!(
                                connect_id = connection.connect_id(),
                                timeout = ?half_close_timeout,
                                "half-closed connection idle in both directions; closed"
                            );
                            true
                        }
                    }
                }
            }
            Up::Eof | Up::ClientError => true,
            Up::AgentGone => false,
        },
        gone = &mut downstream => gone,
    };
    if client_gone {
        connection.end_from_frontend(End::FrontendGone).await;
    }
}

/// Upstream's response to a failed agent dial, with the status chosen from the error text.
/// For `tether-server probe`, which asked: a header after the status line naming the agent.
fn naming_agent(response: String, probe: bool, agent_id: &str) -> String {
    if !probe {
        return response;
    }
    let header = format!(
        "\r\n{}: {}\r\n",
        tether_proto::metadata::PROBE_AGENT,
        tether_proto::metadata::probe_agent_value(agent_id)
    );
    response.replacen("\r\n", &header, 1)
}

fn failure_response(error: &str, cause: DialCause) -> String {
    match cause {
        DialCause::Timeout => "HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBackend dial timeout: timed out waiting for backend dial\r\n".into(),
        DialCause::StreamGone => format!("HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBackend context error: {error}\r\n"),
        DialCause::Agent => {
            let status = status_for(error);
            format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{error}")
        }
    }
}

/// Upstream's mapping from dial error text to status: first matching rule wins.
pub fn status_for(error: &str) -> &'static str {
    let lower = error.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    if any(&["i/o timeout", "deadline exceeded", "timeout"]) {
        "504 Gateway Timeout"
    } else if any(&["too many open files"]) {
        "503 Service Unavailable"
    } else {
        "502 Bad Gateway"
    }
}

enum Forward {
    Sent,
    AgentGone,
    /// The client hung up while its bytes waited for window, and nothing moved.
    Stuck,
}

/// Sends client bytes on, waiting for the connection's window as long as it takes. A client
/// that hung up meanwhile gives up once neither direction has moved for `limit`: nobody is
/// left to care, and a destination that never reads would otherwise hold the connection, on
/// both sides, for good.
async fn forward(connection: &Connection, data: Bytes, client: RawFd, limit: Duration) -> Forward {
    let outcome = |sent: Result<(), AgentGone>| match sent {
        Ok(()) => Forward::Sent,
        Err(AgentGone) => Forward::AgentGone,
    };
    let send = connection.send_data(data);
    tokio::pin!(send);
    // Most sends go out at once, without a timer.
    if let Some(sent) = send.as_mut().now_or_never() {
        return outcome(sent);
    }
    match unless_still(connection, limit, || peer_hung_up(client), send).await {
        Some(sent) => outcome(sent),
        None => Forward::Stuck,
    }
}

/// Runs `work` to its end, or gives it up (`None`) once the connection has stood still, neither
/// direction moving, for `limit` while `gone` holds. Looked at once a second, or more often
/// for a shorter limit.
async fn unless_still<T>(
    connection: &Connection,
    limit: Duration,
    gone: impl Fn() -> bool,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    let check = limit.min(Duration::from_secs(1));
    let mut last = connection.motion();
    let mut still = Duration::ZERO;
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            () = tokio::time::sleep(check) => {}
        }
        let now = connection.motion();
        if now != last || !gone() {
            last = now;
            still = Duration::ZERO;
        } else {
            still += check;
            if still >= limit {
                return None;
            }
        }
    }
}

/// Reads the request head; returns it and any bytes after it.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Head, BytesMut), HeadError> {
    let mut reader = HeadReader::default();
    loop {
        if stream
            .read_buf(reader.buffer())
            .await
            .map_err(|_| HeadError::Closed)?
            == 0
        {
            return Err(reader.closed());
        }
        if let Some(done) = reader.parse()? {
            return Ok(done);
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, text: &str) -> std::io::Result<()> {
    stream.write_all(text.as_bytes()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_dial_errors_to_upstream_statuses() {
        assert_eq!(
            status_for("dial tcp 10.0.0.1:80: i/o timeout"),
            "504 Gateway Timeout"
        );
        assert_eq!(
            status_for("accept4: too many open files"),
            "503 Service Unavailable"
        );
        assert_eq!(
            status_for("dial tcp 10.0.0.1:80: connect: connection refused"),
            "502 Bad Gateway"
        );
        assert_eq!(status_for("something else"), "502 Bad Gateway");
    }
}
