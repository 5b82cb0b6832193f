//! Wires the server together and returns what it bound, so `main` only waits for signals and
//! tests can run the whole program on port 0.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::StatusCode;
use tether_proto::agent::agent_service_server::AgentServiceServer;
use tether_proto::proxy::proxy_service_server::ProxyServiceServer;
use tether_runtime::admin::{self, Query, Reply, Routes};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server as GrpcServer;

use crate::agent_service::Agents;
use crate::config::{Config, FrontendTransport, Mode};
use crate::frontend::authority::AuthorityFilter;
use crate::frontend::connect::ConnectFrontend;
use crate::frontend::grpc::Frontends;
use crate::listen::{bind_uds, tls_incoming};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::token_auth::TokenAuth;
use crate::tunnel::Settings;
use tether_runtime::net::bind_tcp;

/// Largest gRPC message accepted (upstream peers send at most 4 MiB).
const MAX_MESSAGE: usize = 16 << 20;
/// HTTP/2 receive windows: one agent stream carries every tunnel, and 64 KiB defaults stall
/// it on WINDOW_UPDATE round trips. Per-tunnel limits come from each tunnel's own window
/// (tether agents) or bounded queue (upstream agents).
const STREAM_WINDOW: u32 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--{flag}: cannot listen on {address}")]
    Bind {
        flag: &'static str,
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("agent token authentication")]
    TokenAuth(#[from] crate::token_auth::SetupError),
}

#[derive(Debug, Clone)]
pub enum FrontendAddr {
    Tcp(SocketAddr),
    Uds(PathBuf),
}

/// A running server.
pub struct Server {
    pub agent_addr: SocketAddr,
    pub frontend_addr: FrontendAddr,
    pub health_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    stop_frontends: watch::Sender<bool>,
}

pub async fn start(config: Config) -> Result<Server, StartError> {
    let token_auth = match &config.token_auth {
        Some(settings) => Some(Arc::new(TokenAuth::new(settings).await?)),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(config.strategies.clone(), metrics.clone()));
    let (stop_frontends, stop_rx) = watch::channel(false);

    let bind = |flag: &'static str, host: String, port: u16| async move {
        bind_tcp(&host, port)
            .await
            .map_err(|source| StartError::Bind {
                flag,
                address: format!("{host}:{port}"),
                source,
            })
    };
    let agent_listener = bind("agent-port", config.agent_host.clone(), config.agent_port).await?;
    let health_listener = bind(
        "health-port",
        config.health_host.clone(),
        config.health_port,
    )
    .await?;
    let admin_listener = bind("admin-port", config.admin_host.clone(), config.admin_port).await?;
    let local = |flag: &'static str, l: &tokio::net::TcpListener| {
        l.local_addr().map_err(|source| StartError::Bind {
            flag,
            address: "its local address".into(),
            source,
        })
    };
    let agent_addr = local("agent-port", &agent_listener)?;
    let health_addr = local("health-port", &health_listener)?;
    let admin_addr = local("admin-port", &admin_listener)?;

    // Agents.
    let agents = Agents {
        registry: registry.clone(),
        metrics: metrics.clone(),
        server_id: config.server_id.clone(),
        server_count: config.server_count,
        queue_packets: config.agent_queue_packets,
        settings: Settings {
            queue_bytes: config.frontend_queue_bytes,
            buffer_bytes: config.stream_buffer_bytes,
            stall_timeout: config.stall_timeout,
            dial_timeout: config.backend_dial_timeout,
            flow_control: false,
        },
        token_auth,
    };
    let incoming = tls_incoming(
        agent_listener,
        config.agent_tls.clone(),
        "agent",
        metrics.clone(),
    );
    let agent_server = GrpcServer::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW)
        .max_frame_size(Some(tether_proto::MAX_HTTP2_FRAME))
        .max_concurrent_streams(Some(u32::MAX))
        .add_service(
            AgentServiceServer::new(agents)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    tokio::spawn(async move {
        if let Err(err) = agent_server.serve_with_incoming(incoming).await {
            tracing::error!(error = %err, "agent gRPC server failed");
        }
    });

    // Frontends.
    let stop = Box::pin(async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|stop| *stop).await;
    });
    let frontend_addr = match (&config.frontend, config.mode) {
        (
            FrontendTransport::Uds {
                path,
                delete_existing,
            },
            mode,
        ) => {
            let listener = bind_uds(path, *delete_existing).map_err(|source| StartError::Bind {
                flag: "uds-name",
                address: path.display().to_string(),
                source,
            })?;
            match mode {
                Mode::Grpc => {
                    let incoming = UnixListenerStream::new(listener)
                        .map(|conn| conn.map(AuthorityFilter::new));
                    let server = grpc_frontend(&config, &registry, &metrics);
                    tokio::spawn(async move {
                        if let Err(err) = server.serve_with_incoming_shutdown(incoming, stop).await
                        {
                            tracing::error!(error = %err, "frontend gRPC server failed");
                        }
                    });
                }
                Mode::HttpConnect => {
                    let frontend = connect_frontend(&registry, &metrics);
                    let mut incoming = UnixListenerStream::new(listener).take_until(stop);
                    tokio::spawn(async move {
                        while let Some(conn) = incoming.next().await {
                            match conn {
                                Ok(conn) => {
                                    tokio::spawn(frontend.clone().serve(conn, "uds".into()));
                                }
                                Err(err) => tracing::warn!(error = %err, "frontend accept failed"),
                            }
                        }
                    });
                }
            }
            FrontendAddr::Uds(path.clone())
        }
        (FrontendTransport::Tcp { host, port, tls }, mode) => {
            let listener = bind("server-port", host.clone(), *port).await?;
            let addr = local("server-port", &listener)?;
            let incoming = tls_incoming(listener, tls.clone(), "frontend", metrics.clone());
            match mode {
                Mode::Grpc => {
                    let server = grpc_frontend(&config, &registry, &metrics);
                    let incoming = incoming.map(|conn| conn.map(AuthorityFilter::new));
                    tokio::spawn(async move {
                        if let Err(err) = server.serve_with_incoming_shutdown(incoming, stop).await
                        {
                            tracing::error!(error = %err, "frontend gRPC server failed");
                        }
                    });
                }
                Mode::HttpConnect => {
                    let frontend = connect_frontend(&registry, &metrics);
                    let mut incoming = incoming.take_until(stop);
                    tokio::spawn(async move {
                        while let Some(Ok(conn)) = incoming.next().await {
                            let peer = conn.peer().to_string();
                            tokio::spawn(frontend.clone().serve(conn, peer));
                        }
                    });
                }
            }
            FrontendAddr::Tcp(addr)
        }
    };

    let health: Arc<dyn Routes> = Arc::new(HealthRoutes {
        registry: registry.clone(),
        metrics: metrics.clone(),
    });
    tokio::spawn(admin::serve(
        health_listener,
        health,
        std::future::pending(),
    ));
    let admin_routes: Arc<dyn Routes> = Arc::new(AdminRoutes {
        metrics: metrics.clone(),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        admin_routes,
        std::future::pending(),
    ));

    let gauge = metrics.established.clone();
    tokio::spawn(tether_runtime::trim_memory_when_idle(move || {
        usize::try_from(gauge.get()).unwrap_or(0)
    }));
    tracing::info!(
        agent = %agent_addr,
        frontend = ?frontend_addr,
        mode = ?config.mode,
        health = %health_addr,
        admin = %admin_addr,
        server_id = config.server_id,
        server_count = config.server_count,
        "tether-server listening"
    );
    Ok(Server {
        agent_addr,
        frontend_addr,
        health_addr,
        admin_addr,
        registry,
        metrics,
        stop_frontends,
    })
}

fn grpc_frontend(
    config: &Config,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
) -> tonic::transport::server::Router {
    GrpcServer::builder()
        .http2_keepalive_interval(Some(config.frontend_keepalive))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW)
        // Recent kube-apiservers open one stream per dial on a single connection.
        .max_concurrent_streams(Some(u32::MAX))
        .add_service(
            ProxyServiceServer::new(Frontends {
                registry: registry.clone(),
                metrics: metrics.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        )
}

fn connect_frontend(registry: &Arc<Registry>, metrics: &Arc<Metrics>) -> Arc<ConnectFrontend> {
    Arc::new(ConnectFrontend {
        registry: registry.clone(),
        metrics: metrics.clone(),
    })
}

impl Server {
    /// Stops accepting frontend connections and waits, at most `deadline`, for open tunnels and
    /// pending dials to finish. Returns how many were still open.
    pub async fn drain(&self, deadline: Duration) -> i64 {
        let _ = self.stop_frontends.send(true);
        let start = Instant::now();
        loop {
            let open = self.metrics.established.get() + self.metrics.pending_dials.get();
            if open <= 0 || start.elapsed() >= deadline {
                return open.max(0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct HealthRoutes {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl Routes for HealthRoutes {
    fn route(&self, request: &Query<'_>) -> Reply {
        match request.path {
            "/healthz" => Reply::text(StatusCode::OK, "ok"),
            "/readyz" | "/ready" => {
                if self.registry.ready() {
                    Reply::text(StatusCode::OK, "ok")
                } else {
                    Reply::text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no connection to any proxy agent",
                    )
                }
            }
            "/metrics" => Reply::metrics(&self.metrics.registry),
            _ => Reply::not_found(),
        }
    }
}

struct AdminRoutes {
    metrics: Arc<Metrics>,
}

impl Routes for AdminRoutes {
    fn route(&self, request: &Query<'_>) -> Reply {
        match request.path {
            "/metrics" => Reply::metrics(&self.metrics.registry),
            _ => Reply::not_found(),
        }
    }
}
