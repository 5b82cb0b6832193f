//! Wires the agent together and returns what it bound, so `main` only handles signals and tests
//! can run the whole agent on port 0.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tether_runtime::admin::{self, Query, Reply, Routes};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::dial_plane::{DialPlane, DialPlaneError};
use crate::guard::{self, Guard, GuardError};
use crate::metrics::Metrics;
use crate::tunnel::client_set::ClientSet;
use crate::tunnel::lease_count::LeaseCounter;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--{flag}: cannot listen on {address}")]
    Listen {
        flag: &'static str,
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("XDP guard")]
    Guard(#[from] GuardError),
    #[error(transparent)]
    DialPlane(#[from] DialPlaneError),
    #[error("--count-server-leases: cannot set up the Kubernetes client (--kubeconfig)")]
    Leases(#[source] tether_runtime::kube_client::KubeClientError),
}

pub struct Agent {
    pub health_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub clients: Arc<ClientSet>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    guard: Option<Guard>,
    /// The dial policy and its kernel hooks: attached while this lives.
    _dial_plane: Arc<DialPlane>,
    /// Every long-lived task but the guard's, stopped by `shutdown`.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

pub async fn start(config: Config) -> Result<Agent, StartError> {
    let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
    // The guard goes first: a node that cannot be guarded as configured should not come up.
    let mut guard = guard::start(
        &config.guard,
        &config.server_hosts,
        config.server_port,
        &tasks,
        &shutdown,
    )
    .await?;
    let mut metrics = Metrics::new();
    if let Some(counters) = guard.as_mut().and_then(Guard::take_counters) {
        metrics.register_guard(counters);
    }
    // Before the first dial: from here on the kernel refuses what the policy denies.
    let server = (config.server_hosts.as_slice(), config.server_port);
    let dial_plane = Arc::new(DialPlane::start(&config.dial, server, &tasks, &shutdown).await?);
    if let Some(hooks) = dial_plane.hooks() {
        metrics.register_dial_policy(hooks.clone(), &dial_plane.policy);
    }
    let metrics = Arc::new(metrics);
    let bind = |flag: &'static str, host: String, port: u16| async move {
        let listener = tether_runtime::net::bind_tcp(&host, port).await;
        listener
            .and_then(|l| l.local_addr().map(|addr| (l, addr)))
            .map_err(|source| StartError::Listen {
                flag,
                address: format!("{host}:{port}"),
                source,
            })
    };
    let (health, health_addr) = bind(
        "health-server-port",
        config.health_host.clone(),
        config.health_port,
    )
    .await?;
    let (admin_listener, admin_addr) = bind(
        "admin-server-port",
        config.admin_host.clone(),
        config.admin_port,
    )
    .await?;

    let leases = match &config.leases {
        Some(settings) => {
            let client = tether_runtime::kube_client::client(settings.kubeconfig.as_deref())
                .await
                .map_err(StartError::Leases)?;
            let counter = Arc::new(LeaseCounter::default());
            tasks.spawn(
                shutdown
                    .clone()
                    .run_until_cancelled_owned(counter.clone().follow(
                        client,
                        settings.clone(),
                        metrics.clone(),
                    )),
            );
            Some(counter)
        }
        None => None,
    };
    let config = Arc::new(config);
    let clients = ClientSet::new(
        config.clone(),
        metrics.clone(),
        dial_plane.policy.clone(),
        leases,
    );
    let (stop, stop_rx) = watch::channel(false);
    let supervisor = tasks.spawn(clients.clone().run(stop_rx.clone()));
    let mut vital = vec![("server set", supervisor.abort_handle())];
    vital.extend(guard.iter().flat_map(Guard::tasks));
    let open = clients.clone();
    tasks.spawn(
        shutdown
            .clone()
            .run_until_cancelled_owned(tether_runtime::trim_memory_when_idle(move || {
                open.open_connections()
            })),
    );

    let routes: Arc<dyn Routes> = Arc::new(HealthRoutes {
        clients: clients.clone(),
        metrics: metrics.clone(),
        vital,
        stopping: stop_rx,
    });
    tasks.spawn(admin::serve(
        health,
        routes,
        shutdown.clone().cancelled_owned(),
    ));
    let admin_routes: Arc<dyn Routes> = Arc::new(AdminRoutes {
        health_port: health_addr.port(),
        dial_plane: dial_plane.clone(),
    });
    tasks.spawn(admin::serve(
        admin_listener,
        admin_routes,
        shutdown.clone().cancelled_owned(),
    ));
    tracing::info!(
        server = config
            .server_hosts
            .iter()
            .map(|host| crate::tunnel::transport::host_port(host, config.server_port))
            .collect::<Vec<_>>()
            .join(","),
        agent_id = config.agent_id,
        agent_identifiers = config.agent_identifiers,
        health = %health_addr,
        admin = %admin_addr,
        "tether-agent started"
    );
    Ok(Agent {
        health_addr,
        admin_addr,
        clients,
        metrics,
        stop,
        guard,
        _dial_plane: dial_plane,
        tasks,
        shutdown,
    })
}

impl Agent {
    /// Whether a guard is loaded and followed by this agent (not off, not only switched off).
    pub fn guards(&self) -> bool {
        self.guard
            .as_ref()
            .is_some_and(|guard| guard.tasks().next().is_some())
    }

    /// Sends DRAIN to every server, refuses new connections, and waits at most `deadline` for
    /// open ones to finish. Returns how many were still open.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.clients.drain();
        let _ = self.stop.send(true);
        self.clients.drained(deadline).await
    }

    /// After [`Agent::drain`] and leaving: stops every task the agent started and waits for
    /// them. Returns how many did not end within a second (none, unless one is stuck).
    pub async fn stop(self) -> usize {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
        self.tasks.len() + self.clients.tasks_left()
    }
}

struct HealthRoutes {
    clients: Arc<ClientSet>,
    metrics: Arc<Metrics>,
    /// Tasks the agent cannot work without; one that ended fails /healthz.
    vital: Vec<(&'static str, AbortHandle)>,
    /// Set once draining: the server set ends then on purpose.
    stopping: watch::Receiver<bool>,
}

/// /healthz: fails, naming it, when a vital task has ended, so that kubelet restarts an agent
/// that would otherwise sit there without a tunnel or without following interfaces.
fn liveness(vital: &[(&'static str, AbortHandle)], stopping: bool) -> Reply {
    let stopped: Vec<&str> = vital
        .iter()
        .filter(|(_, task)| task.is_finished())
        .map(|(name, _)| *name)
        .collect();
    if stopped.is_empty() || stopping {
        return Reply::text(StatusCode::OK, "ok");
    }
    let mut body = String::from("[+]ping ok\n");
    for name in stopped {
        body.push_str(&format!(
            "[-]{name} failed: the task stopped (see the log)\n"
        ));
    }
    Reply::text(StatusCode::INTERNAL_SERVER_ERROR, body)
}

impl Routes for HealthRoutes {
    fn route(&self, request: &Query<'_>) -> Reply {
        match request.path {
            "/healthz" | "/livez" => liveness(&self.vital, *self.stopping.borrow()),
            "/readyz" | "/ready" => {
                let verbose = request.query.is_some_and(|q| {
                    q.split('&')
                        .any(|kv| kv == "verbose" || kv.starts_with("verbose="))
                });
                if !self.clients.ready() {
                    Reply::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "[+]ping ok\n[-]server-connected failed: no servers connected\n",
                    )
                } else if verbose {
                    Reply::text(
                        StatusCode::OK,
                        "[+]ping ok\n[+]server-connected ok\ncheck passed\n",
                    )
                } else {
                    Reply::text(StatusCode::OK, "ok")
                }
            }
            "/metrics" => Reply::metrics(&self.metrics.registry),
            _ => Reply::not_found(),
        }
    }
}

/// Upstream serves metrics on the health port only; the admin port redirects there. The admin
/// port (loopback by default) also explains the live dial policy for `dial-policy check`.
struct AdminRoutes {
    health_port: u16,
    dial_plane: Arc<DialPlane>,
}

impl AdminRoutes {
    /// `/dial-policy?check=IP:PORT`: the decision, the rule, and where it is enforced.
    fn check(&self, query: Option<&str>) -> Reply {
        let target = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find_map(|(key, value)| (key == "check").then(|| value.into_owned()))
            .unwrap_or_default();
        let Ok(addr) = target.parse::<std::net::SocketAddr>() else {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                format!("{target:?} is not IP:PORT (IPv6 in brackets); resolve names first\n"),
            );
        };
        Reply::text(StatusCode::OK, self.dial_plane.explain(addr))
    }
}

impl Routes for AdminRoutes {
    fn route(&self, request: &Query<'_>) -> Reply {
        match request.path {
            "/dial-policy" => self.check(request.query),
            "/metrics" => {
                let host = request.host.unwrap_or("127.0.0.1");
                let host = match host.rsplit_once(':') {
                    Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                    _ => host,
                };
                Reply::redirect(format!("http://{host}:{}/metrics", self.health_port))
            }
            _ => Reply::not_found(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_fails_naming_a_vital_task_that_ended() {
        let running = tokio::spawn(std::future::pending::<()>());
        let ended = tokio::spawn(async {});
        while !ended.is_finished() {
            tokio::task::yield_now().await;
        }
        let vital = vec![
            ("server set", running.abort_handle()),
            ("guard interface watch", ended.abort_handle()),
        ];
        let reply = liveness(&vital[..1], false);
        assert_eq!(reply.status, StatusCode::OK);
        let reply = liveness(&vital, false);
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            reply.body.contains("[-]guard interface watch failed")
                && !reply.body.contains("[-]server set"),
            "{}",
            reply.body
        );
        assert_eq!(
            liveness(&vital, true).status,
            StatusCode::OK,
            "a draining agent ends its tasks on purpose"
        );
        running.abort();
    }
}
