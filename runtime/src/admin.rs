//! The small HTTP servers both binaries run for probes and scrapes (`/healthz`, `/readyz`,
//! `/metrics`, …). Routing is the caller's: it maps a request to a [`Reply`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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

    /// The registry in the Prometheus/OpenMetrics text format.
    pub fn metrics(registry: &Registry) -> Self {
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => Reply {
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
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

/// Serves `routes` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    routes: Arc<dyn Routes>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "admin listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(respond(routes.as_ref(), &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(60))
                .max_buf_size(1 << 20)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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
