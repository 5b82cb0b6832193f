//! The dial plane: which destinations the agent may dial, and where dials to a Service go.
//!
//! ```text
//! a dial from the server ──▶ policy (userspace: refuses a denied destination before dialling)
//!                              │
//!                              ▼  connect()/sendmsg() of every process in the agent's cgroup
//!                            hooks (cgroup programs: the same rules in the kernel, and a
//!                              │     connect to a Service address steered to a backend)
//!                              ▼
//!                            destination
//! ```
//!
//! `policy` holds the rules (`--dial-allow`, `--dial-deny`, the defaults and what the agent
//! itself must reach); `hooks` loads them into the kernel and attaches them to a cgroup that
//! `cgroup` finds; `services` reads the Service map from a file or follows it in the Kubernetes
//! API. [`DialPlane::start`] brings all of it up before the first dial and runs its followers
//! under the agent's task tracker until the agent stops.

pub mod cgroup;
pub mod hooks;
pub mod policy;
pub mod services;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hooks::{DialHooks, DialHooksError as HooksError};
use policy::DialPolicy;
use services::{FileWatch, ServiceMap};

#[derive(Debug, thiserror::Error)]
pub enum DialPlaneError {
    #[error("dial policy: cannot choose the cgroup to enforce it on (--dial-policy-cgroup)")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(
        "dial policy: cannot enforce it in the kernel (--dial-policy-cgroup=off enforces it in userspace only)"
    )]
    Hooks(#[from] HooksError),
    #[error(
        "--service-map-file and --services-from-kubernetes: Services are steered by the kernel hooks, which --dial-policy-cgroup=off turns off"
    )]
    ServicesWithoutHooks,
    #[error(
        "--services-from-kubernetes: cannot set up the Kubernetes client (--services-kubeconfig)"
    )]
    Kubernetes(#[source] tether_runtime::kube_client::KubeClientError),
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
        source: services::BadServiceMap,
    },
}

/// What the dial plane is asked to do (the `--dial-*` and `--service*` flags).
#[derive(Clone, Debug)]
pub struct DialSettings {
    /// `--dial-allow`, `--dial-deny`: the policy itself is built at start, with the addresses
    /// the agent needs (see [`policy::needed`]).
    pub allow: Vec<policy::Target>,
    pub deny: Vec<policy::Target>,
    pub cgroup: DialCgroup,
    pub service_map_file: Option<std::path::PathBuf>,
    pub services_from_kubernetes: bool,
    pub services_kubeconfig: Option<std::path::PathBuf>,
    /// The guard's `--bpffs-root`: the hooks are pinned beside it.
    pub bpffs_root: std::path::PathBuf,
}

/// `--dial-policy-cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialCgroup {
    Auto,
    Off,
    Path(std::path::PathBuf),
}

pub struct DialPlane {
    pub policy: Arc<DialPolicy>,
    /// The kernel hooks and the cgroup they police: attached while this lives (and after,
    /// where pinned).
    enforced: Option<(Arc<Mutex<DialHooks>>, std::path::PathBuf)>,
    /// The Service map the hooks hold now.
    services: Arc<Mutex<ServiceMap>>,
}

impl DialPlane {
    /// Builds the policy, loads the hooks with their Service map and only then attaches them
    /// (an agent that replaces pinned hooks never leaves its cgroup with an empty map), and
    /// starts following the map on `tasks` until `stop`. From its return on the kernel
    /// refuses what the policy denies. `server` is the proxy server the agent must reach.
    pub async fn start(
        config: &DialSettings,
        server: (&[String], u16),
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Self, DialPlaneError> {
        let policy = Arc::new(dial_policy(config, server).await);
        let hooks = match &config.cgroup {
            DialCgroup::Off => None,
            _ => Some(Arc::new(Mutex::new(DialHooks::load(&policy)?))),
        };
        let services = Arc::new(Mutex::new(ServiceMap::new()));
        if config.services_from_kubernetes {
            let Some(hooks) = &hooks else {
                return Err(DialPlaneError::ServicesWithoutHooks);
            };
            let client = tether_runtime::kube_client::client(config.services_kubeconfig.as_deref())
                .await
                .map_err(DialPlaneError::Kubernetes)?;
            let first = Arc::new(tokio::sync::Notify::new());
            let following =
                follow_kubernetes(client, hooks.clone(), services.clone(), first.clone());
            let stop = stop.clone();
            tasks.spawn(async move { stop.run_until_cancelled(following).await });
            if tokio::time::timeout(FIRST_SERVICES, first.notified())
                .await
                .is_err()
            {
                tracing::warn!(waited = ?FIRST_SERVICES, "no Services from the API yet; the hooks go on without them and are filled when the list arrives");
            }
        }
        match (&config.service_map_file, &hooks) {
            (None, _) => {}
            (Some(_), None) => return Err(DialPlaneError::ServicesWithoutHooks),
            (Some(path), Some(hooks)) => {
                let mut watch = FileWatch::new(path);
                // The first reading is part of starting: a Service dial works from the first one.
                reload_services(&mut watch, hooks, &services)?;
                let (hooks, current, stop) = (hooks.clone(), services.clone(), stop.clone());
                tasks.spawn(async move {
                    let following = async {
                        loop {
                            tokio::time::sleep(services::RELOAD_EVERY).await;
                            if let Err(err) = reload_services(&mut watch, &hooks, &current) {
                                tracing::error!(file = %watch.path().display(), error = %tether_runtime::error_chain(&err), "cannot apply the service map; the previous one stays");
                            }
                        }
                    };
                    stop.run_until_cancelled(following).await
                });
            }
        }
        let mut enforced = None;
        if let Some(hooks) = hooks {
            let cgroup = match &config.cgroup {
                DialCgroup::Path(path) => path.clone(),
                _ => cgroup::for_hooks()?,
            };
            // Pinned where the guard is, when that is a BPF filesystem the agent can use.
            let pins = crate::guard_program::Pins::new(&config.bpffs_root).dial_links();
            let pinnable = config.bpffs_root.parent().is_some_and(Path::exists);
            let replaced = hooks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .attach(&cgroup, pinnable.then_some(pins.as_path()))?;
            if !pinnable {
                tracing::warn!(bpffs_root = %config.bpffs_root.display(), "dial hooks not pinned (no BPF filesystem there): they end with this process");
            }
            tracing::info!(cgroup = %cgroup.display(), replaced, "dial policy enforced in the kernel on this cgroup's connect() and sendmsg()");
            enforced = Some((hooks, cgroup));
        }
        Ok(DialPlane {
            policy,
            enforced,
            services,
        })
    }

    /// The kernel hooks, when the policy is enforced there.
    pub fn hooks(&self) -> Option<&Arc<Mutex<DialHooks>>> {
        self.enforced.as_ref().map(|(hooks, _)| hooks)
    }

    /// What `dial-policy check` prints for `addr`: the decision, the rule, where it is
    /// enforced, and where a Service at that address is steered.
    pub fn explain(&self, addr: SocketAddr) -> String {
        let verdict = self.policy.decide(addr);
        let mut body = format!(
            "{addr}: {}\nrule: {}\n",
            if verdict.allowed { "allow" } else { "deny" },
            self.policy.explain(verdict)
        );
        match &self.enforced {
            Some((hooks, cgroup)) => {
                let slot = verdict
                    .rule
                    .unwrap_or(tether_agent_common::MAX_DIAL_RULES as usize);
                let hits = hooks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .hits()
                    .ok()
                    .and_then(|hits| hits.get(slot).copied());
                body.push_str(&format!(
                    "enforced: by the agent and in the kernel on the connect() and sendmsg() of cgroup {}\n",
                    cgroup.display()
                ));
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
                    let verdict = self.policy.decide(*b);
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
        body
    }
}

/// How long starting waits for the first list of Services before attaching the hooks.
const FIRST_SERVICES: Duration = Duration::from_secs(10);

/// Keeps the hooks' Service map equal to the cluster's, re-listing after any error; `first`
/// is told when a map was applied.
async fn follow_kubernetes(
    client: kube::Client,
    hooks: Arc<Mutex<DialHooks>>,
    current: Arc<Mutex<ServiceMap>>,
    first: Arc<tokio::sync::Notify>,
) {
    loop {
        let apply = |map: ServiceMap| match apply_services(&hooks, &current, map, "kubernetes") {
            Ok(()) => first.notify_one(),
            Err(err) => {
                tracing::error!(error = %tether_runtime::error_chain(&err), "cannot apply the cluster's Services; the previous map stays");
            }
        };
        if let Err(err) = services::kubernetes::follow(client.clone(), apply).await {
            tracing::warn!(error = %err, "lost the Services watch; listing again in 2s");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Reads the service map when it changed and hands it to the hooks.
fn reload_services(
    watch: &mut FileWatch,
    hooks: &Mutex<DialHooks>,
    current: &Mutex<ServiceMap>,
) -> Result<(), DialPlaneError> {
    let Some(read) = watch.changed() else {
        return Ok(());
    };
    let file = watch.path().display().to_string();
    let text = read.map_err(|source| DialPlaneError::ServiceMapRead {
        file: file.clone(),
        source,
    })?;
    let map = services::parse(&text).map_err(|source| DialPlaneError::ServiceMap {
        file: file.clone(),
        source,
    })?;
    Ok(apply_services(hooks, current, map, &file)?)
}

/// Hands `map` to the hooks and, once they have it, makes it the one `dial-policy check`
/// shows; `source` (the file, or "kubernetes") goes into the log line.
fn apply_services(
    hooks: &Mutex<DialHooks>,
    current: &Mutex<ServiceMap>,
    map: ServiceMap,
    source: &str,
) -> Result<(), HooksError> {
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
async fn dial_policy(config: &DialSettings, (hosts, port): (&[String], u16)) -> DialPolicy {
    let mut server: Vec<std::net::SocketAddr> = Vec::new();
    for host in hosts {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => server.extend(addrs),
            Err(err) => {
                tracing::warn!(server = host, error = %err, "cannot resolve the proxy server now; its address is not exempt from --dial-allow");
            }
        }
    }
    let nameservers = std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| policy::nameservers(&text))
        .unwrap_or_default();
    let policy = DialPolicy::new(
        &config.allow,
        &config.deny,
        policy::needed(&server, &nameservers),
    );
    tracing::info!(
        rules = ?policy.rules().iter().map(ToString::to_string).collect::<Vec<_>>(),
        otherwise = if policy.denies_by_default() { "deny" } else { "allow" },
        "dial policy"
    );
    policy
}
