//! Wires the server together and returns what it bound, so `main` only waits for signals and
//! tests can run the whole program on port 0.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use tether_proto::agent::agent_service_server::AgentServiceServer;
use tether_proto::proxy::proxy_service_server::ProxyServiceServer;
use tether_runtime::admin::{self, Query, Reply, Routes};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server as GrpcServer;
use tonic::transport::server::Connected;

use crate::agent_service::Agents;
use crate::config::{Config, FrontendTransport, Mode};
use crate::connection::Settings;
use crate::frontend::authority::AuthorityFilter;
use crate::frontend::connect::ConnectFrontend;
use crate::frontend::grpc::Frontends;
use crate::identity::{Binding, StreamLimit};
use crate::listen::{Pending, TlsLimits, bind_uds, tls_incoming, uds_incoming};
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::registry::Registry;
use crate::token_auth::TokenAuth;
use tether_runtime::net::bind_tcp;

/// Largest gRPC message accepted (upstream peers send at most 4 MiB).
const MAX_MESSAGE: usize = 16 << 20;
/// HTTP/2 receive windows: one agent stream carries every connection, and 64 KiB defaults stall
/// it on WINDOW_UPDATE round trips. Per-connection limits come from each connection's own window
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
    #[error(
        "token authentication and server leases need kube-apiserver; set --kubeconfig to reach it from outside a pod"
    )]
    Kube(#[from] tether_runtime::kube_client::KubeClientError),
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
    /// Cancelled to stop taking frontend connections.
    stop_frontends: CancellationToken,
    /// Cancelled to stop everything else: the agent port, the admin and health servers, and
    /// whatever frontends are still open.
    shutdown: CancellationToken,
    /// One task per frontend connection (CONNECT socket or gRPC `Proxy` stream).
    frontends: TaskTracker,
    /// Every other long-lived task.
    tasks: TaskTracker,
}

/// Agent streams one TLS connection may carry (an agent opens one per connection).
const AGENT_STREAMS_PER_CONNECTION: u32 = 8;

pub async fn start(config: Config) -> Result<Server, StartError> {
    let shutdown = CancellationToken::new();
    let stop_frontends = shutdown.child_token();
    let (frontends, tasks) = (TaskTracker::new(), TaskTracker::new());
    if config.agents_unauthenticated {
        tracing::warn!(
            "agents are not authenticated (--allow-unauthenticated-agents): anyone who reaches the agent port can register as an agent and receive tunnelled connections"
        );
    }
    let mut metrics = Metrics::new();
    metrics
        .registry
        .register_collector(Box::new(crate::metrics::CertificateExpiry(
            config.served_certificates.clone(),
        )));
    let metrics = Arc::new(metrics);
    let kube = if config.token_auth.is_some() || config.leases.is_some() {
        Some(tether_runtime::kube_client::client(config.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    let token_auth = match (&config.token_auth, &kube) {
        (Some(settings), Some(client)) => Some(Arc::new(TokenAuth::new(
            settings,
            client.clone(),
            metrics.clone(),
        ))),
        _ => None,
    };
    if let Some(auth) = &token_auth {
        tasks.spawn(auth.clone().keep_answers(shutdown.clone()));
    }
    if let (Some(settings), Some(client)) = (&config.leases, kube) {
        let controller = crate::leases::LeaseController::new(
            client,
            &config.server_id,
            settings.clone(),
            metrics.clone(),
        );
        // Deleted as soon as draining starts: agents stop counting a server that is leaving.
        tasks.spawn(controller.run(stop_frontends.clone()));
    }
    // Token-bound claims are checked against every Node's status, which a node may write.
    let nodes = match (&token_auth, config.binding) {
        (Some(auth), Binding::Token) => {
            let nodes = Arc::new(Nodes::default());
            let api = auth.node_api();
            let (following, stop) = (nodes.clone(), shutdown.clone());
            tasks.spawn(async move { following.follow(api, stop).await });
            Some(nodes)
        }
        _ => None,
    };
    let registry = Arc::new(
        Registry::new(config.strategies.clone(), metrics.clone())
            .binding(config.binding != Binding::Off, nodes)
            .hold_dials_until(
                config
                    .hold_dials_after_start
                    .map(|window| tokio::time::Instant::now() + window),
            ),
    );

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
        binding: config.binding,
        streams: StreamLimit::new(config.max_agent_streams_per_identity),
        tracker: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    let incoming = tls_incoming(
        agent_listener,
        config.agent_tls.clone(),
        "agent",
        TlsLimits {
            idle_timeout: Some(config.agent_idle_timeout),
            probe: Some(config.agent_probe_interval),
            pending: Some(Pending::new(
                config.max_pending_agent_connections.0,
                config.max_pending_agent_connections.1,
            )),
            client_certificates: config.agent_certificates,
        },
        metrics.clone(),
        shutdown.clone(),
        &tasks,
    );
    let agent_server = GrpcServer::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW)
        .max_frame_size(Some(tether_proto::MAX_HTTP2_FRAME))
        .max_concurrent_streams(Some(AGENT_STREAMS_PER_CONNECTION))
        .add_service(
            AgentServiceServer::new(agents)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    let stop = shutdown.clone();
    tasks.spawn(async move {
        if let Err(err) = agent_server
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %err, "agent gRPC server failed");
        }
    });

    // Frontends.
    let frontend = FrontendWiring {
        config: &config,
        registry: &registry,
        metrics: &metrics,
        connections: &frontends,
        stop: &stop_frontends,
        tasks: &tasks,
    };
    let frontend_addr = match &config.frontend {
        FrontendTransport::Uds {
            path,
            delete_existing,
        } => {
            let listener = bind_uds(path, *delete_existing).map_err(|source| StartError::Bind {
                flag: "uds-name",
                address: path.display().to_string(),
                source,
            })?;
            let incoming = uds_incoming(
                listener,
                "frontend",
                metrics.clone(),
                stop_frontends.clone(),
                &tasks,
            );
            frontend.serve(incoming, |_| "uds".into());
            FrontendAddr::Uds(path.clone())
        }
        FrontendTransport::Tcp { host, port, tls } => {
            let listener = bind("server-port", host.clone(), *port).await?;
            let addr = local("server-port", &listener)?;
            let incoming = tls_incoming(
                listener,
                tls.clone(),
                "frontend",
                TlsLimits {
                    idle_timeout: None,
                    probe: None,
                    pending: None,
                    client_certificates: true,
                },
                metrics.clone(),
                stop_frontends.clone(),
                &tasks,
            );
            frontend.serve(incoming, |conn| conn.peer().to_string());
            FrontendAddr::Tcp(addr)
        }
    };

    let health: Arc<dyn Routes> = Arc::new(HealthRoutes {
        registry: registry.clone(),
        metrics: metrics.clone(),
    });
    tasks.spawn(admin::serve(
        health_listener,
        health,
        shutdown.clone().cancelled_owned(),
    ));
    let admin_routes: Arc<dyn Routes> = Arc::new(AdminRoutes {
        metrics: metrics.clone(),
    });
    tasks.spawn(admin::serve(
        admin_listener,
        admin_routes,
        shutdown.clone().cancelled_owned(),
    ));

    let gauge = metrics.established.clone();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let trim = tether_runtime::trim_memory_when_idle(move || {
            usize::try_from(gauge.get()).unwrap_or(0)
        });
        tokio::select! {
            () = trim => {}
            () = stop.cancelled() => {}
        }
    });
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
        shutdown,
        frontends,
        tasks,
    })
}

/// What a frontend listener is served with, whichever its transport.
struct FrontendWiring<'a> {
    config: &'a Config,
    registry: &'a Arc<Registry>,
    metrics: &'a Arc<Metrics>,
    /// Each frontend connection's task, which a drain waits for.
    connections: &'a TaskTracker,
    stop: &'a CancellationToken,
    tasks: &'a TaskTracker,
}

impl FrontendWiring<'_> {
    /// Serves `--mode` on the connections `incoming` yields, until `stop`; `peer` names a
    /// CONNECT client in the logs.
    fn serve<S>(&self, incoming: ReceiverStream<io::Result<S>>, peer: fn(&S) -> String)
    where
        S: AsyncRead + AsyncWrite + AsRawFd + Connected + Unpin + Send + 'static,
    {
        match self.config.mode {
            Mode::Grpc => {
                let incoming = incoming.map(|conn| conn.map(AuthorityFilter::new));
                let server = GrpcServer::builder()
                    .http2_keepalive_interval(Some(self.config.frontend_keepalive))
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(STREAM_WINDOW)
                    // Recent kube-apiservers open one stream per dial on a single connection.
                    .max_concurrent_streams(Some(u32::MAX))
                    .add_service(
                        ProxyServiceServer::new(Frontends {
                            registry: self.registry.clone(),
                            metrics: self.metrics.clone(),
                            tracker: self.connections.clone(),
                        })
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE),
                    );
                let stop = self.stop.clone();
                self.tasks.spawn(async move {
                    if let Err(err) = server
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                    {
                        tracing::error!(error = %err, "frontend gRPC server failed");
                    }
                });
            }
            Mode::HttpConnect => {
                let frontend = Arc::new(ConnectFrontend {
                    registry: self.registry.clone(),
                    metrics: self.metrics.clone(),
                    half_close_timeout: self.config.half_close_timeout,
                });
                let mut incoming = incoming;
                let connections = self.connections.clone();
                self.tasks.spawn(async move {
                    while let Some(Ok(conn)) = incoming.next().await {
                        let peer = peer(&conn);
                        connections.spawn(frontend.clone().serve(conn, peer));
                    }
                });
            }
        }
    }
}

impl Server {
    /// Stops taking frontend connections and waits, at most `deadline`, for the open ones to
    /// finish; then stops everything else, closing what is left. Returns how many frontend
    /// connections were still open at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stop_frontends.cancel();
        self.frontends.close();
        let _ = tokio::time::timeout(deadline, self.frontends.wait()).await;
        let left = self.frontends.len();
        // What is left is closed through its connection: the frontend is told, the agent asked to
        // close, and those CLOSE_REQs go out before the agent streams end.
        self.registry.end_tunnels();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.frontends.wait()).await;
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        left
    }

    /// Tasks still running: none after [`Server::drain`], unless one is stuck.
    pub fn tasks_left(&self) -> usize {
        self.frontends.len() + self.tasks.len()
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
