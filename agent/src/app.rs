//! Wires the agent together and returns what it bound, so `main` only handles signals and tests
//! can run the whole agent on port 0.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use tether_runtime::admin::{self, Query, Reply, Routes};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::config::{Config, DialCgroup};
use crate::dataplane::DialHooks;
use crate::dial_policy::{self, DialPolicy};
use crate::guard::{self, Guard, GuardError};
use crate::metrics::Metrics;
use crate::services::{FileWatch, ServiceMap};
use crate::tunnel::client_set::ClientSet;

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
    #[error("dial policy: cannot choose the cgroup to enforce it on (--dial-policy-cgroup)")]
    DialCgroup(#[from] crate::cgroup::CgroupError),
    #[error(
        "dial policy: cannot enforce it in the kernel (--dial-policy-cgroup=off enforces it in userspace only)"
    )]
    DialHooks(#[from] crate::dataplane::DialHooksError),
    #[error(
        "--service-map-file and --services-from-kubernetes: Services are steered by the kernel hooks, which --dial-policy-cgroup=off turns off"
    )]
    ServicesWithoutHooks,
    #[error("--services-from-kubernetes: cannot set up the Kubernetes client: {0}")]
    Kubernetes(String),
    #[error("--service-map-file: cannot read {file}")]
    ServiceMapRead {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("--service-map-file: {file}")]
    ServiceMap {
        file: String,
        #[source]
        source: crate::services::BadServiceMap,
    },
}

pub struct Agent {
    pub health_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub clients: Arc<ClientSet>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    guard: Option<Guard>,
    /// The dial policy's kernel hooks: attached while this lives.
    _dial_hooks: Option<Arc<std::sync::Mutex<DialHooks>>>,
}

pub async fn start(config: Config) -> Result<Agent, StartError> {
    // The guard goes first: a node that cannot be guarded as configured should not come up.
    let mut guard = guard::start(&config.guard, &config.server_host, config.server_port).await?;
    let mut metrics = Metrics::new();
    if let Some(counters) = guard.as_mut().and_then(Guard::take_counters) {
        metrics.register_guard(counters);
    }
    let dial_policy = Arc::new(dial_policy(&config).await);
    // Before the first dial: from here on the kernel refuses what the policy denies.
    // Loaded, given their Services, and only then attached: an agent that replaces pinned
    // hooks never leaves its cgroup with an empty Service map.
    let dial_hooks = match &config.dial_cgroup {
        DialCgroup::Off => None,
        _ => Some(Arc::new(std::sync::Mutex::new(DialHooks::load(
            &dial_policy,
        )?))),
    };
    let services = Arc::new(std::sync::Mutex::new(ServiceMap::new()));
    if config.services_from_kubernetes {
        let Some(hooks) = &dial_hooks else {
            return Err(StartError::ServicesWithoutHooks);
        };
        let client = kubernetes_client(config.services_kubeconfig.as_deref()).await?;
        let first = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(follow_kubernetes(
            client,
            hooks.clone(),
            services.clone(),
            first.clone(),
        ));
        if tokio::time::timeout(FIRST_SERVICES, first.notified())
            .await
            .is_err()
        {
            tracing::warn!(waited = ?FIRST_SERVICES, "no Services from the API yet; the hooks go on without them and are filled when the list arrives");
        }
    }
    match (&config.service_map_file, &dial_hooks) {
        (None, _) => {}
        (Some(_), None) => return Err(StartError::ServicesWithoutHooks),
        (Some(path), Some(hooks)) => {
            let mut watch = FileWatch::new(path);
            // The first reading is part of starting: a Service dial works from the first one.
            reload_services(&mut watch, hooks, &services)?;
            let (hooks, services) = (hooks.clone(), services.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(crate::services::RELOAD_EVERY).await;
                    if let Err(err) = reload_services(&mut watch, &hooks, &services) {
                        tracing::error!(file = %watch.path().display(), error = %tether_runtime::error_chain(&err), "cannot apply the service map; the previous one stays");
                    }
                }
            });
        }
    }
    if let Some(hooks) = &dial_hooks {
        let cgroup = match &config.dial_cgroup {
            DialCgroup::Path(path) => path.clone(),
            _ => crate::cgroup::for_hooks()?,
        };
        // Pinned where the guard is, when that is a BPF filesystem the agent can use.
        let pins = crate::dataplane::Pins::new(&config.guard.bpffs_root).dial_links();
        let pinnable = config.guard.bpffs_root.parent().is_some_and(Path::exists);
        let replaced = hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .attach(&cgroup, pinnable.then_some(pins.as_path()))?;
        if !pinnable {
            tracing::warn!(bpffs_root = %config.guard.bpffs_root.display(), "dial hooks not pinned (no BPF filesystem there): they end with this process");
        }
        tracing::info!(cgroup = %cgroup.display(), replaced, "dial policy enforced in the kernel on this cgroup's connect() and sendmsg()");
        metrics.register_dial_policy(hooks.clone(), &dial_policy);
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

    let config = Arc::new(config);
    let clients = ClientSet::new(config.clone(), metrics.clone(), dial_policy.clone());
    let (stop, stop_rx) = watch::channel(false);
    let supervisor = tokio::spawn(clients.clone().run(stop_rx.clone()));
    let mut vital = vec![("server set", supervisor.abort_handle())];
    vital.extend(guard.iter().flat_map(Guard::tasks));
    let open = clients.clone();
    tokio::spawn(tether_runtime::trim_memory_when_idle(move || {
        open.open_connections()
    }));

    let routes: Arc<dyn Routes> = Arc::new(HealthRoutes {
        clients: clients.clone(),
        metrics: metrics.clone(),
        vital,
        stopping: stop_rx,
    });
    tokio::spawn(admin::serve(health, routes, std::future::pending()));
    let admin_routes: Arc<dyn Routes> = Arc::new(AdminRoutes {
        health_port: health_addr.port(),
        dial_policy: dial_policy.clone(),
        dial_hooks: dial_hooks.clone(),
        services: services.clone(),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        admin_routes,
        std::future::pending(),
    ));
    tracing::info!(
        server = format!("{}:{}", config.server_host, config.server_port),
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
        _dial_hooks: dial_hooks,
    })
}

async fn kubernetes_client(path: Option<&std::path::Path>) -> Result<kube::Client, StartError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let config = match path {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|e| StartError::Kubernetes(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| StartError::Kubernetes(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| StartError::Kubernetes(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| StartError::Kubernetes(e.to_string()))
}

/// How long starting waits for the first list of Services before attaching the hooks.
const FIRST_SERVICES: Duration = Duration::from_secs(10);

/// Keeps the hooks' Service map equal to the cluster's, re-listing after any error; `first`
/// is told when a map was applied.
async fn follow_kubernetes(
    client: kube::Client,
    hooks: Arc<std::sync::Mutex<DialHooks>>,
    current: Arc<std::sync::Mutex<ServiceMap>>,
    first: Arc<tokio::sync::Notify>,
) {
    loop {
        let apply = |map: ServiceMap| match apply_services(&hooks, &current, map, "kubernetes") {
            Ok(()) => first.notify_one(),
            Err(err) => {
                tracing::error!(error = %tether_runtime::error_chain(&err), "cannot apply the cluster's Services; the previous map stays");
            }
        };
        if let Err(err) = crate::services::kubernetes::follow(client.clone(), apply).await {
            tracing::warn!(error = %err, "lost the Services watch; listing again in 2s");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Reads the service map when it changed and hands it to the hooks.
fn reload_services(
    watch: &mut FileWatch,
    hooks: &std::sync::Mutex<DialHooks>,
    current: &std::sync::Mutex<ServiceMap>,
) -> Result<(), StartError> {
    let Some(read) = watch.changed() else {
        return Ok(());
    };
    let file = watch.path().display().to_string();
    let text = read.map_err(|source| StartError::ServiceMapRead {
        file: file.clone(),
        source,
    })?;
    let map = crate::services::parse(&text).map_err(|source| StartError::ServiceMap {
        file: file.clone(),
        source,
    })?;
    Ok(apply_services(hooks, current, map, &file)?)
}

/// Hands `map` to the hooks and, once they have it, makes it the one `dial-policy check`
/// shows; `source` (the file, or "kubernetes") goes into the log line.
fn apply_services(
    hooks: &std::sync::Mutex<DialHooks>,
    current: &std::sync::Mutex<ServiceMap>,
    map: ServiceMap,
    source: &str,
) -> Result<(), crate::dataplane::DialHooksError> {
    let steered = hooks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .set_services(&map)?;
    tracing::info!(
        source,
        services = steered.len(),
        backends = steered.values().map(Vec::len).sum::<usize>(),
        "service map applied"
    );
    if steered.len() < map.len() {
        let left_out: Vec<String> = map
            .keys()
            .filter(|s| !steered.contains_key(s))
            .take(10)
            .map(ToString::to_string)
            .collect();
        tracing::error!(
            source,
            not_steered = map.len() - steered.len(),
            first = ?left_out,
            max_services = tether_agent_common::MAX_SERVICES,
            max_backends = tether_agent_common::MAX_BACKENDS / 2,
            "the service map holds more than the kernel hooks can: these Services are not \
             steered, and their dials go to the Service address as the node routes it \
             (kube-proxy's rules, if any), judged by the dial policy on that address only"
        );
    }
    *current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = steered;
    Ok(())
}

/// The operator's rules, the defaults, and what the agent itself must reach: the proxy server
/// (as it resolves now) and the nameservers its lookups use.
async fn dial_policy(config: &Config) -> DialPolicy {
    let server: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((
        config.server_host.as_str(),
        config.server_port,
    ))
    .await
    {
        Ok(addrs) => addrs.collect(),
        Err(err) => {
            tracing::warn!(server = config.server_host, error = %err, "cannot resolve the proxy server now; its address is not exempt from --dial-allow");
            Vec::new()
        }
    };
    let nameservers = std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| dial_policy::nameservers(&text))
        .unwrap_or_default();
    let policy = DialPolicy::new(
        &config.dial_allow,
        &config.dial_deny,
        dial_policy::needed(&server, &nameservers),
    );
    tracing::info!(
        rules = ?policy.rules().iter().map(ToString::to_string).collect::<Vec<_>>(),
        otherwise = if policy.denies_by_default() { "deny" } else { "allow" },
        "dial policy"
    );
    policy
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
        let start = Instant::now();
        loop {
            let open = self.clients.open_connections();
            if open == 0 || start.elapsed() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
    dial_policy: Arc<DialPolicy>,
    dial_hooks: Option<Arc<std::sync::Mutex<DialHooks>>>,
    services: Arc<std::sync::Mutex<ServiceMap>>,
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
        let verdict = self.dial_policy.decide(addr);
        let mut body = format!(
            "{addr}: {}\nrule: {}\n",
            if verdict.allowed { "allow" } else { "deny" },
            self.dial_policy.explain(verdict)
        );
        match &self.dial_hooks {
            Some(hooks) => {
                let slot = verdict
                    .rule
                    .unwrap_or(tether_agent_common::MAX_DIAL_RULES as usize);
                let hits = hooks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .hits()
                    .ok()
                    .and_then(|hits| hits.get(slot).copied());
                body.push_str("enforced: by the agent and in the kernel on its cgroup's connect() and sendmsg()\n");
                if let Some(hits) = hits {
                    body.push_str(&format!("kernel decisions by this rule so far: {hits}\n"));
                }
            }
            None => body.push_str("enforced: by the agent only (--dial-policy-cgroup=off)\n"),
        }
        let services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (service, backends) in services.iter().filter(|(s, _)| s.addr == addr) {
            let list: Vec<String> = backends
                .iter()
                .map(|b| {
                    let verdict = self.dial_policy.decide(*b);
                    format!(
                        "{b}{}",
                        if verdict.allowed {
                            ""
                        } else {
                            " (denied by the policy)"
                        }
                    )
                })
                .collect();
            body.push_str(&format!(
                "service {service}: steered in turn to {}\n",
                if list.is_empty() {
                    "no backend (dials are refused)".to_owned()
                } else {
                    list.join(", ")
                }
            ));
        }
        Reply::text(StatusCode::OK, body)
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
