//! The small HTTP servers both binaries run for probes and scrapes (`/healthz`, `/readyz`,
//! `/metrics`, …). Routing is the caller's: it maps a request to a [`Reply`].

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::AcceptBackoff;

/// What a route answers.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
    pub location: Option<String>,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            location: None,
        }
    }

    pub fn not_found() -> Self {
        Reply::text(StatusCode::NOT_FOUND, "404 page not found\n")
    }

    /// The registry in the Prometheus text format ([`crate::exposition`]).
    pub fn metrics(registry: &Registry) -> Self {
        match crate::exposition::text(registry) {
            Ok(body) => Reply {
                status: StatusCode::OK,
                content_type: crate::exposition::CONTENT_TYPE,
                body,
                location: None,
            },
            Err(_) => Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            ),
        }
    }

    pub fn redirect(location: String) -> Self {
        Reply {
            status: StatusCode::MOVED_PERMANENTLY,
            content_type: "text/plain; charset=utf-8",
            body: String::new(),
            location: Some(location),
        }
    }
}

/// A request as routes see it.
pub struct Query<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub host: Option<&'a str>,
}

pub trait Routes: Send + Sync + 'static {
    fn route(&self, request: &Query<'_>) -> Reply;
}

/// Connections served at once; more wait in the kernel's backlog. Probes and scrapes need a
/// handful.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this (probes send theirs at once).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; hyper answers 431 past it.
const MAX_BUFFER: usize = 16 << 10;
/// A kept-alive connection is closed (between requests) after this, so none holds a slot for
/// good.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long an open request may take to finish once the server stops.
const FINISH: Duration = Duration::from_secs(1);
/// How long a closing connection keeps reading what its client still sends.
const LINGER: Duration = Duration::from_millis(500);

/// Serves `routes` on `listener` until `shutdown` completes; then closes its connections.
pub async fn serve(
    listener: TcpListener,
    routes: Arc<dyn Routes>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::new();
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %err, "admin listener accept failed; backing off");
                    backoff.wait().await;
                    continue;
                }
            },
        };
        backoff.reset();
        let routes = routes.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            // A synchronous answer keeps the service future `Unpin`, which taking the socket
            // back from hyper requires.
            let service = service_fn(move |request: Request<Incoming>| {
                std::future::ready(Ok::<_, Infallible>(respond(routes.as_ref(), &request)))
            });
            let mut connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BUFFER)
                .serve_connection(TokioIo::new(stream), service);
            let ended = tokio::select! {
                _ = poll_fn(|cx| connection.poll_without_shutdown(cx)) => true,
                () = stop.cancelled() => false,
                () = tokio::time::sleep(MAX_CONNECTION_AGE) => false,
            };
            if !ended {
                Pin::new(&mut connection).graceful_shutdown();
                let finish = poll_fn(|cx| connection.poll_without_shutdown(cx));
                if tokio::time::timeout(FINISH, finish).await.is_err() {
                    return;
                }
            }
            linger(connection.into_parts().io.into_inner()).await;
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// Closing a socket that still has unread input makes the kernel answer with a reset, which can
/// destroy the response still on its way (the 431 for an oversized head, say). So the server
/// half-closes first and reads what the client is still sending, for a bounded time.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let drain = async { while let Ok(1..) = stream.read(&mut sink).await {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

fn respond(routes: &dyn Routes, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let reply = routes.route(&Query {
        path: request.uri().path(),
        query: request.uri().query(),
        host,
    });
    let mut response = Response::builder()
        .status(reply.status)
        .header(header::CONTENT_TYPE, reply.content_type);
    if let Some(location) = reply.location {
        response = response.header(header::LOCATION, location);
    }
    response
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
