//! Command line → validated [`Config`]. Flag names, defaults and env fallbacks follow upstream's
//! `proxy-server` so existing manifests work unchanged; upstream flags tether does not implement
//! are refused by name instead of being silently ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use rustls::ServerConfig;
use rustls::server::ProducesTickets;
use tether_runtime::flags::{ConfigError, Process, go_bool, go_duration, refuse_unsupported};
use tether_runtime::tls::{self, Identity, PemFile};

use crate::identity::Binding;
use crate::strategy::Strategy;
use crate::tickets::TicketKeys;

/// tether-server: the control-plane half of the Konnectivity tunnel. kube-apiserver dials
/// through it (gRPC or HTTP CONNECT, over a Unix socket or mTLS TCP); node agents hold TLS
/// streams to it and carry the connections.
#[derive(Parser, Debug)]
#[command(
    name = "tether-server",
    version,
    max_term_width = 100,
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Frontend protocol spoken to kube-apiserver.
    #[arg(
        long,
        value_enum,
        default_value = "grpc",
        help_heading = "Frontend (kube-apiserver)"
    )]
    pub mode: Mode,
    /// Unix socket for the frontend; when set, --server-port must be 0 and no server TLS flags.
    #[arg(long, default_value = "", help_heading = "Frontend (kube-apiserver)")]
    pub uds_name: String,
    /// Remove a stale socket file at --uds-name before listening.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true", help_heading = "Frontend (kube-apiserver)")]
    pub delete_existing_uds_file: bool,
    /// TCP port for the mTLS frontend (0 with --uds-name).
    #[arg(
        long,
        default_value_t = 8090,
        help_heading = "Frontend (kube-apiserver)"
    )]
    pub server_port: u16,
    /// Bind address for the TCP frontend; empty = all interfaces.
    #[arg(long, default_value = "", help_heading = "Frontend (kube-apiserver)")]
    pub server_bind_address: String,
    /// Frontend TLS certificate (TCP mode).
    #[arg(long, default_value = "", help_heading = "Frontend (kube-apiserver)")]
    pub server_cert: String,
    /// Frontend TLS key (TCP mode).
    #[arg(long, default_value = "", help_heading = "Frontend (kube-apiserver)")]
    pub server_key: String,
    /// CA that signs kube-apiserver's client certificate (required in TCP mode).
    #[arg(long, default_value = "", help_heading = "Frontend (kube-apiserver)")]
    pub server_ca_cert: String,
    /// Keepalive ping interval on frontend gRPC connections.
    #[arg(long, value_parser = go_duration, default_value = "1h", help_heading = "Frontend (kube-apiserver)")]
    pub frontend_keepalive_time: Duration,

    /// TCP port agents connect to.
    #[arg(long, default_value_t = 8091, help_heading = "Agents")]
    pub agent_port: u16,
    /// Bind address for the agent port; empty = all interfaces.
    #[arg(long, default_value = "", help_heading = "Agents")]
    pub agent_bind_address: String,
    /// TLS certificate presented to agents (required).
    #[arg(long, default_value = "", help_heading = "Agents")]
    pub cluster_cert: String,
    /// TLS key for --cluster-cert (required).
    #[arg(long, default_value = "", help_heading = "Agents")]
    pub cluster_key: String,
    /// When set, agents must present a client certificate signed by this CA (mTLS).
    #[arg(long, default_value = "", help_heading = "Agents")]
    pub cluster_ca_cert: String,
    /// Keepalive ping interval on agent connections.
    #[arg(long, value_parser = go_duration, default_value = "1h", help_heading = "Agents")]
    pub keepalive_time: Duration,
    /// This server's ID, sent to agents (default: $PROXY_SERVER_ID, else random).
    #[arg(
        long,
        env = "PROXY_SERVER_ID",
        default_value = "",
        help_heading = "Agents"
    )]
    pub server_id: String,
    /// How many server replicas exist; agents keep a stream to each.
    #[arg(long, default_value_t = 1, help_heading = "Agents")]
    pub server_count: u32,
    /// Comma-separated agent selection order: default, destHost, defaultRoute.
    #[arg(long, default_value = "default", help_heading = "Agents")]
    pub proxy_strategies: String,
    /// Fail a dial that has no answer from the agent within this time (0 = never).
    #[arg(long, value_parser = go_duration, default_value = "0", help_heading = "Agents")]
    pub backend_dial_timeout: Duration,
    /// For this long after the server starts, a dial that finds no agent to take it (or
    /// whose node's agent is not back yet) waits for agents to connect instead of failing at
    /// once, at most until this window closes: after a restart, agents need a moment to
    /// return. 0 fails such dials at once, as upstream does.
    #[arg(long, env = "TETHER_HOLD_DIALS_AFTER_START", value_parser = go_duration, default_value = "5s", help_heading = "Agents")]
    pub hold_dials_after_start: Duration,
    /// A file of at least 32 random bytes (mode 0600 or 0400) that seals the agent port's TLS
    /// session tickets, so that agents resume their sessions after this server restarts
    /// instead of each costing a full handshake. Whoever reads it can resume as any agent:
    /// keep it where the cluster CA's key already is. Servers given the same file resume each
    /// other's agents. Without it, tickets only outlive a network blip, not a restart. A
    /// ticket opens only where --cluster-ca-cert is the same file it was issued under, and
    /// its session goes on only while its certificate is valid.
    #[arg(
        long,
        env = "TETHER_SESSION_TICKET_KEY_FILE",
        default_value = "",
        help_heading = "Agents"
    )]
    pub session_ticket_key_file: String,
    /// How long a session ticket stays good: at least this, at most twice this. At most 168h.
    #[arg(long, env = "TETHER_SESSION_TICKET_LIFETIME", value_parser = go_duration, default_value = "1h", help_heading = "Agents")]
    pub session_ticket_lifetime: Duration,
    /// Minimum TLS version on the agent and TCP frontend ports: VersionTLS12 or VersionTLS13.
    #[arg(long, default_value = "", help_heading = "Agents")]
    pub tls_min_version: String,
    /// Packets queued toward one agent before frontends wait (backpressure).
    #[arg(long, default_value_t = 10, help_heading = "Agents")]
    pub xfr_channel_size: usize,

    /// Check each agent's ID and identifiers against its credential: `certificate` (names and
    /// IP addresses of its client certificate; needs --cluster-ca-cert) or `token` (the node its
    /// service-account token is bound to; needs token authentication). A claim the credential
    /// does not back is refused, so one node cannot attract another node's traffic.
    #[arg(
        long,
        env = "TETHER_BIND_AGENT_IDENTITY",
        value_enum,
        default_value = "off",
        help_heading = "Agent identity (tether)"
    )]
    pub bind_agent_identity: Binding,
    /// Agent streams one identity may hold at once (its bound credential, or its agent ID).
    /// An agent keeps one per server; a restart briefly overlaps.
    #[arg(long, env = "TETHER_MAX_AGENT_STREAMS_PER_IDENTITY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Agent identity (tether)")]
    pub max_agent_streams_per_identity: u32,
    /// Run with no agent authentication (neither --cluster-ca-cert nor token authentication):
    /// anyone who reaches the agent port can register as an agent. For tests and demos only.
    #[arg(
        long,
        env = "TETHER_ALLOW_UNAUTHENTICATED_AGENTS",
        help_heading = "Agent identity (tether)"
    )]
    pub allow_unauthenticated_agents: bool,

    /// Close an agent-port connection that has carried no agent stream for this long (an
    /// agent opens its stream right after the TLS handshake).
    #[arg(long, env = "TETHER_AGENT_IDLE_TIMEOUT", value_parser = go_duration, default_value = "60s", help_heading = "Limits (tether)")]
    pub agent_idle_timeout: Duration,
    /// Agent-port connections from one source address that have not yet carried an accepted
    /// agent stream (the TLS handshake and the TokenReview are still to come or under way);
    /// past it, that source's new connections are closed at once. Raise it for many nodes
    /// behind one NAT address.
    #[arg(long, env = "TETHER_MAX_PENDING_AGENT_CONNECTIONS_PER_SOURCE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits (tether)")]
    pub max_pending_agent_connections_per_source: u32,
    /// The same, from all sources together.
    #[arg(long, env = "TETHER_MAX_PENDING_AGENT_CONNECTIONS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits (tether)")]
    pub max_pending_agent_connections: u32,
    /// How often an agent connection's peer is checked: an idle connection sends a TCP
    /// keepalive probe every interval, and one whose agent acknowledges nothing for four
    /// intervals is closed, so an agent whose node died or was cut off stops receiving dials
    /// long before an HTTP/2 keepalive (--keepalive-time) would notice (at least 1s).
    #[arg(long, env = "TETHER_AGENT_PROBE_INTERVAL", value_parser = go_duration, default_value = "5s", help_heading = "Limits (tether)")]
    pub agent_probe_interval: Duration,
    /// Bytes queued toward one frontend connection. Past it, an agent without flow control
    /// (upstream) is not read again until that frontend catches up; a flow-controlled (tether)
    /// agent has broken its window, and that connection alone is closed.
    #[arg(long, env = "TETHER_FRONTEND_QUEUE_BYTES", default_value_t = 1 << 20, help_heading = "Limits (tether)")]
    pub frontend_queue_bytes: usize,
    /// Bytes queued toward all frontends of one agent stream; past it the stream is not read
    /// until they drain. Bounds memory when an agent without flow control sends faster than
    /// frontends read.
    #[arg(long, env = "TETHER_STREAM_BUFFER_BYTES", default_value_t = 16 << 20, help_heading = "Limits (tether)")]
    pub stream_buffer_bytes: usize,
    /// While an agent stream waits for frontends to catch up, one that reads nothing at all
    /// for this long is closed, so the others can move again. A slow reader is never closed.
    #[arg(long, env = "TETHER_STALL_TIMEOUT", value_parser = go_duration, default_value = "5s", help_heading = "Limits (tether)")]
    pub stall_timeout: Duration,
    /// After an HTTP CONNECT client half-closes (tether agents only), the reply keeps flowing
    /// until the destination closes; but when neither the reply nor the upload moves for this
    /// long, the connection ends. A client that closed its socket reads as a half-close, and a
    /// destination that neither reads nor answers would otherwise hold the connection on both
    /// sides for good (as the kernel's FIN_WAIT2 timeout does for orphaned sockets).
    #[arg(long, env = "TETHER_HALF_CLOSE_TIMEOUT", value_parser = go_duration, default_value = "60s", help_heading = "Limits (tether)")]
    pub half_close_timeout: Duration,

    /// Health port: /healthz, /readyz, /metrics.
    #[arg(long, default_value_t = 8092, help_heading = "Operations")]
    pub health_port: u16,
    /// Bind address for the health port; empty = all interfaces.
    #[arg(long, default_value = "", help_heading = "Operations")]
    pub health_bind_address: String,
    /// Admin port: /metrics.
    #[arg(long, default_value_t = 8095, help_heading = "Operations")]
    pub admin_port: u16,
    /// Bind address for the admin port.
    #[arg(long, default_value = "127.0.0.1", help_heading = "Operations")]
    pub admin_bind_address: String,
    /// On SIGTERM, wait this long for open connections before closing them (0 = close at once).
    #[arg(long, value_parser = go_duration, default_value = "0", help_heading = "Operations")]
    pub graceful_shutdown_timeout: Duration,
    /// Deprecated upstream and a no-op there too.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub warn_on_channel_limit: Option<bool>,

    #[command(flatten)]
    pub token_auth: TokenAuthArgs,

    #[command(flatten)]
    pub leases: LeaseArgs,

    #[command(flatten)]
    pub process: Process,

    #[command(flatten)]
    pub unsupported: Unsupported,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Dial HOST:PORT through a running server's frontend as kube-apiserver does and report
    /// whether it is reachable through the tunnel, the agent that served it, the dial time and
    /// the error verbatim. Exit code 0 reachable, 1 not, 2 the server could not be asked.
    Probe(ProbeArgs),
}

/// Agents authenticated by their service-account token: each Connect's bearer token is checked
/// with a TokenReview against kube-apiserver. The alternative to --cluster-ca-cert.
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Agent token authentication")]
pub struct TokenAuthArgs {
    /// Namespace of the agents' service account; setting it turns token authentication on
    /// (with --agent-service-account and --authentication-audience).
    #[arg(long, default_value = "")]
    pub agent_namespace: String,
    /// Name of the agents' service account.
    #[arg(long, default_value = "")]
    pub agent_service_account: String,
    /// Audience the agents' projected tokens are issued for (e.g. system:konnectivity-server).
    #[arg(long, default_value = "")]
    pub authentication_audience: String,
    /// kubeconfig for kube-apiserver, for token authentication (TokenReview create, e.g.
    /// system:auth-delegator; Node get/list/watch with --bind-agent-identity=token) and the
    /// lease controller (Lease get, create, update, list, delete); empty = the pod's
    /// in-cluster service account.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// TokenReviews per second (0 = client-go's default, 5).
    #[arg(long, default_value_t = 0.0)]
    pub kubeconfig_qps: f32,
    /// TokenReviews allowed in a burst (0 = client-go's default, 10).
    #[arg(long, default_value_t = 0)]
    pub kubeconfig_burst: u32,
    /// Accepted for compatibility; tether's client always sends JSON, which every
    /// kube-apiserver accepts.
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,
    /// How long a successful TokenReview is reused for the same token (never past the token's
    /// own expiry): a token revoked (its pod or service account deleted) still opens agent
    /// streams for up to this long, and streams it opened stay until they end. 0 reviews
    /// every stream.
    #[arg(long, env = "TETHER_TOKEN_REVIEW_CACHE_TTL", value_parser = go_duration, default_value = "10m")]
    pub token_review_cache_ttl: Duration,
    /// Keeps the TokenReview answers in this file (token digests, never tokens) so that a
    /// restarted server lets its agents back in without reviewing each again at
    /// --kubeconfig-qps: 5 000 agents at 5 reviews/s would otherwise take over 16 minutes.
    /// Written every 2 s and at shutdown, mode 0600; refused when others may read or write
    /// it, as whoever writes it can pass a token off as any agent's. Empty: answers live and
    /// die with the process.
    #[arg(long, env = "TETHER_TOKEN_REVIEW_CACHE_FILE", default_value = "")]
    pub token_review_cache_file: String,
}

/// A Lease per server in coordination.k8s.io/v1, which agents count (upstream's
/// --count-server-leases) instead of trusting --server-count: adding or removing a server then
/// needs no restart anywhere.
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Server leases")]
pub struct LeaseArgs {
    /// Publish and renew this server's Lease (konnectivity-proxy-server-<server-id>) and
    /// delete other servers' expired ones; the Lease is deleted when the server stops.
    #[arg(long, env = "TETHER_ENABLE_LEASE_CONTROLLER", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub enable_lease_controller: bool,
    /// Namespace of the servers' Leases.
    #[arg(long, env = "TETHER_LEASE_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// Labels of this server's Lease, k=v[,k=v]; expired Leases with these labels are
    /// deleted. Agents select Leases by them.
    #[arg(
        long,
        env = "TETHER_LEASE_LABEL",
        default_value = "k8s-app=konnectivity-server"
    )]
    pub lease_label: String,
    /// How long a Lease stays valid after its last renewal: a server that dies without
    /// deleting its Lease is still counted for this long.
    #[arg(long, env = "TETHER_LEASE_DURATION", value_parser = go_duration, default_value = "30s")]
    pub lease_duration: Duration,
    /// How often the Lease is renewed, and how often expired Leases are looked for.
    #[arg(long, env = "TETHER_LEASE_RENEW_INTERVAL", value_parser = go_duration, default_value = "15s")]
    pub lease_renew_interval: Duration,
}

/// The lease controller's settings, validated.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub duration: Duration,
    pub renew_interval: Duration,
}

impl LeaseArgs {
    fn settings(&self) -> Result<Option<LeaseSettings>, ConfigError> {
        if !self.enable_lease_controller {
            return Ok(None);
        }
        let invalid = |flag: &'static str, value: String, why: &str| ConfigError::Invalid {
            flag,
            value,
            why: why.into(),
        };
        let mut labels = std::collections::BTreeMap::new();
        for pair in self
            .lease_label
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(invalid(
                    "lease-label",
                    self.lease_label.clone(),
                    "expected k=v[,k=v]",
                ));
            };
            if key.trim().is_empty() {
                return Err(invalid(
                    "lease-label",
                    self.lease_label.clone(),
                    "a label needs a key",
                ));
            }
            labels.insert(key.trim().to_owned(), value.trim().to_owned());
        }
        if labels.is_empty() {
            return Err(invalid(
                "lease-label",
                self.lease_label.clone(),
                "name at least one label: agents count the Leases that carry it",
            ));
        }
        if self.lease_namespace.is_empty() {
            return Err(invalid(
                "lease-namespace",
                String::new(),
                "must not be empty",
            ));
        }
        if self.lease_duration.as_secs() < 1 || self.lease_renew_interval >= self.lease_duration {
            return Err(invalid(
                "lease-renew-interval",
                format!("{:?}", self.lease_renew_interval),
                &format!(
                    "must be shorter than --lease-duration ({:?}, at least 1s), or the Lease lapses between renewals",
                    self.lease_duration
                ),
            ));
        }
        Ok(Some(LeaseSettings {
            namespace: self.lease_namespace.clone(),
            labels,
            duration: self.lease_duration,
            renew_interval: self.lease_renew_interval,
        }))
    }
}

/// Upstream flags whose features tether-server does not have. Setting one is an error that
/// names it; they exist so the error is precise rather than "unknown flag".
#[derive(clap::Args, Debug, Default)]
pub struct Unsupported {
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_profiling: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_contention_profiling: Option<String>,
    #[arg(long, hide = true)]
    pub cipher_suites: Option<String>,
    #[arg(long, hide = true)]
    pub frontend_write_channel_size: Option<String>,
}

impl Unsupported {
    fn check(&self) -> Result<(), ConfigError> {
        let set = [
            (
                "enable-profiling",
                &self.enable_profiling,
                "Go pprof endpoints do not exist in tether-server",
            ),
            (
                "enable-contention-profiling",
                &self.enable_contention_profiling,
                "Go pprof endpoints do not exist in tether-server",
            ),
            (
                "cipher-suites",
                &self.cipher_suites,
                "Go cipher-suite names do not apply; tether uses rustls' safe defaults",
            ),
            (
                "frontend-write-channel-size",
                &self.frontend_write_channel_size,
                "tether bounds what waits for each frontend in bytes: set --frontend-queue-bytes",
            ),
        ];
        refuse_unsupported(&set)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Grpc,
    #[value(name = "http-connect")]
    HttpConnect,
}

/// Where kube-apiserver reaches us.
pub enum FrontendTransport {
    Uds {
        path: PathBuf,
        delete_existing: bool,
    },
    Tcp {
        host: String,
        port: u16,
        tls: Arc<ServerConfig>,
    },
}

pub struct Config {
    pub mode: Mode,
    pub frontend: FrontendTransport,
    pub frontend_keepalive: Duration,
    pub agent_host: String,
    pub agent_port: u16,
    pub agent_tls: Arc<ServerConfig>,
    /// Agents present client certificates (`--cluster-ca-cert`).
    pub agent_certificates: bool,
    /// The certificate files the listeners serve (read again when they change), by flag.
    pub served_certificates: Vec<(&'static str, PathBuf)>,
    pub keepalive: Duration,
    pub server_id: String,
    pub server_count: u32,
    pub strategies: Vec<Strategy>,
    pub backend_dial_timeout: Option<Duration>,
    /// `None`: dials without an agent fail at once.
    pub hold_dials_after_start: Option<Duration>,
    pub agent_queue_packets: usize,
    pub frontend_queue_bytes: usize,
    pub stream_buffer_bytes: usize,
    pub stall_timeout: Duration,
    pub half_close_timeout: Duration,
    pub agent_idle_timeout: Duration,
    pub agent_probe_interval: Duration,
    /// Unproven agent-port connections: (per source, in all).
    pub max_pending_agent_connections: (usize, usize),
    pub health_host: String,
    pub health_port: u16,
    pub admin_host: String,
    pub admin_port: u16,
    pub graceful_shutdown_timeout: Duration,
    pub token_auth: Option<TokenAuthSettings>,
    pub leases: Option<LeaseSettings>,
    /// `None`: in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    pub binding: Binding,
    pub max_agent_streams_per_identity: usize,
    /// Set when agents authenticate neither way (--allow-unauthenticated-agents).
    pub agents_unauthenticated: bool,
}

/// Token authentication of agents, validated.
#[derive(Clone, Debug)]
pub struct TokenAuthSettings {
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
    pub qps: f64,
    pub burst: u32,
    pub cache_ttl: Duration,
    /// `--token-review-cache-file`, checked.
    pub cache_file: Option<PathBuf>,
}

/// What seals the agent port's session tickets: keys from `--session-ticket-key-file`, else
/// keys that live and die with this process.
fn session_tickets(args: &Args, anchors: &[u8]) -> Result<Arc<dyn ProducesTickets>, ConfigError> {
    // RFC 8446 lets a server promise a ticket a week at most.
    const WEEK: u32 = 7 * 24 * 3600;
    let lifetime = u32::try_from(args.session_ticket_lifetime.as_secs())
        .ok()
        .filter(|secs| (1..=WEEK).contains(secs))
        .ok_or_else(|| ConfigError::Invalid {
            flag: "session-ticket-lifetime",
            value: format!("{:?}", args.session_ticket_lifetime),
            why: "between 1s and 168h (TLS 1.3 lets a ticket live a week at most)".into(),
        })?;
    if args.session_ticket_key_file.is_empty() {
        let keys = TicketKeys::random(lifetime, anchors).map_err(|_| ConfigError::Invalid {
            flag: "session-ticket-key-file",
            value: String::new(),
            why: "the system's random number generator failed, so no ticket key could be made"
                .into(),
        })?;
        return Ok(Arc::new(keys));
    }
    let keys = TicketKeys::load(Path::new(&args.session_ticket_key_file), lifetime, anchors)
        .map_err(|err| ConfigError::Invalid {
            flag: "session-ticket-key-file",
            value: args.session_ticket_key_file.clone(),
            why: err.to_string(),
        })?;
    Ok(Arc::new(keys))
}

impl Config {
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        args.unsupported.check()?;
        let strategies = args
            .proxy_strategies
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Strategy::parse(s).ok_or_else(|| ConfigError::Invalid {
                    flag: "proxy-strategies",
                    value: args.proxy_strategies.clone(),
                    why: format!("unknown strategy {s:?} (known: default, destHost, defaultRoute)"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if strategies.is_empty() {
            return Err(ConfigError::Invalid {
                flag: "proxy-strategies",
                value: args.proxy_strategies.clone(),
                why: "name at least one strategy".into(),
            });
        }
        let tls13_only = match args.tls_min_version.as_str() {
            "" | "VersionTLS12" => false,
            "VersionTLS13" => true,
            "VersionTLS10" | "VersionTLS11" => {
                tracing::warn!(
                    value = args.tls_min_version,
                    "--tls-min-version below TLS 1.2 is insecure and not offered; using TLS 1.2"
                );
                false
            }
            other => {
                return Err(ConfigError::Invalid {
                    flag: "tls-min-version",
                    value: other.into(),
                    why: "use VersionTLS12 or VersionTLS13".into(),
                });
            }
        };
        let alpn_h2: &[&[u8]] = &[b"h2"];

        if args.cluster_cert.is_empty() {
            return Err(ConfigError::Required {
                flag: "cluster-cert",
                why: " (the certificate agents verify)",
            });
        }
        if args.cluster_key.is_empty() {
            return Err(ConfigError::Required {
                flag: "cluster-key",
                why: " (the key for --cluster-cert)",
            });
        }
        let agent_identity = Identity::load(
            PemFile::new("cluster-cert", &args.cluster_cert),
            PemFile::new("cluster-key", &args.cluster_key),
        )?;
        let cluster_ca = (!args.cluster_ca_cert.is_empty())
            .then(|| PemFile::new("cluster-ca-cert", &args.cluster_ca_cert));
        let token_auth = args.token_auth.settings()?;
        let leases = args.leases.settings()?;
        let kubeconfig = args.token_auth.kubeconfig()?;
        if token_auth.is_some() && cluster_ca.is_some() {
            return Err(ConfigError::Invalid {
                flag: "agent-namespace",
                value: args.token_auth.agent_namespace.clone(),
                why: "token authentication and --cluster-ca-cert (client certificates) exclude each other; choose one".into(),
            });
        }
        match args.bind_agent_identity {
            Binding::Certificate if cluster_ca.is_none() => {
                return Err(ConfigError::Required {
                    flag: "cluster-ca-cert",
                    why: " with --bind-agent-identity=certificate (agents must present certificates)",
                });
            }
            Binding::Token if token_auth.is_none() => {
                return Err(ConfigError::Required {
                    flag: "agent-namespace",
                    why: " with --bind-agent-identity=token (agents must present tokens)",
                });
            }
            _ => {}
        }
        let agents_unauthenticated = cluster_ca.is_none() && token_auth.is_none();
        if agents_unauthenticated && !args.allow_unauthenticated_agents {
            return Err(ConfigError::Required {
                flag: "cluster-ca-cert",
                why: " to authenticate agents by client certificate; or authenticate them by token (--agent-namespace, --agent-service-account, --authentication-audience); or pass --allow-unauthenticated-agents to let anyone who reaches the agent port register as an agent (tests and demos only)",
            });
        }
        let mut agent_tls =
            tls::server_config(&agent_identity, cluster_ca.as_ref(), alpn_h2, tls13_only)?;
        // Tickets open only where the CA file is the same: see `tickets`.
        let anchors = cluster_ca
            .as_ref()
            .map(PemFile::contents)
            .transpose()?
            .unwrap_or_default();
        let agent_tls_config = Arc::make_mut(&mut agent_tls);
        agent_tls_config.ticketer = session_tickets(args, &anchors)?;
        // An agent holds one connection to a server: one ticket is its next reconnect, and
        // every resumed handshake hands it a fresh one.
        agent_tls_config.send_tls13_tickets = 1;

        let frontend = if args.uds_name.is_empty() {
            for (flag, value) in [
                ("server-cert", &args.server_cert),
                ("server-key", &args.server_key),
                ("server-ca-cert", &args.server_ca_cert),
            ] {
                if value.is_empty() {
                    return Err(ConfigError::Required {
                        flag,
                        why: " for the TCP frontend (or use --uds-name)",
                    });
                }
            }
            let identity = Identity::load(
                PemFile::new("server-cert", &args.server_cert),
                PemFile::new("server-key", &args.server_key),
            )?;
            // HTTP CONNECT is HTTP/1.1 only (upstream disables HTTP/2 there).
            let alpn: &[&[u8]] = match args.mode {
                Mode::Grpc => alpn_h2,
                Mode::HttpConnect => &[b"http/1.1"],
            };
            let tls = tls::server_config(
                &identity,
                Some(&PemFile::new("server-ca-cert", &args.server_ca_cert)),
                alpn,
                tls13_only,
            )?;
            FrontendTransport::Tcp {
                host: args.server_bind_address.clone(),
                port: args.server_port,
                tls,
            }
        } else {
            if args.server_port != 0 {
                return Err(ConfigError::Invalid {
                    flag: "server-port",
                    value: args.server_port.to_string(),
                    why: "must be 0 when --uds-name is set".into(),
                });
            }
            for (flag, value) in [
                ("server-cert", &args.server_cert),
                ("server-key", &args.server_key),
                ("server-ca-cert", &args.server_ca_cert),
            ] {
                if !value.is_empty() {
                    return Err(ConfigError::Invalid {
                        flag,
                        value: value.clone(),
                        why: "must be empty when --uds-name is set (the socket is plaintext)"
                            .into(),
                    });
                }
            }
            FrontendTransport::Uds {
                path: PathBuf::from(&args.uds_name),
                delete_existing: args.delete_existing_uds_file,
            }
        };
        if args.xfr_channel_size == 0 {
            return Err(ConfigError::Invalid {
                flag: "xfr-channel-size",
                value: "0".into(),
                why: "must be greater than 0".into(),
            });
        }
        if args.frontend_queue_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid {
                flag: "frontend-queue-bytes",
                value: args.frontend_queue_bytes.to_string(),
                why: "must be at least 65536 (one full DATA packet)".into(),
            });
        }
        if args.stream_buffer_bytes < args.frontend_queue_bytes {
            return Err(ConfigError::Invalid {
                flag: "stream-buffer-bytes",
                value: args.stream_buffer_bytes.to_string(),
                why: format!(
                    "must be at least --frontend-queue-bytes ({})",
                    args.frontend_queue_bytes
                ),
            });
        }
        if args.agent_probe_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                flag: "agent-probe-interval",
                value: format!("{:?}", args.agent_probe_interval),
                why: "must be at least 1s (the kernel counts keepalive time in seconds)".into(),
            });
        }
        if args.stall_timeout < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                flag: "stall-timeout",
                value: format!("{:?}", args.stall_timeout),
                why: "must be at least 100ms".into(),
            });
        }
        let server_id = if args.server_id.is_empty() {
            random_id()
        } else {
            args.server_id.clone()
        };
        Ok(Config {
            mode: args.mode,
            frontend,
            frontend_keepalive: args.frontend_keepalive_time,
            agent_host: args.agent_bind_address.clone(),
            agent_port: args.agent_port,
            agent_tls,
            agent_certificates: cluster_ca.is_some(),
            served_certificates: [
                ("cluster-cert", &args.cluster_cert),
                ("server-cert", &args.server_cert),
            ]
            .into_iter()
            .filter(|(_, path)| !path.is_empty())
            .filter(|(flag, _)| *flag == "cluster-cert" || args.uds_name.is_empty())
            .map(|(flag, path)| (flag, PathBuf::from(path)))
            .collect(),
            keepalive: args.keepalive_time,
            server_id,
            server_count: args.server_count,
            strategies,
            backend_dial_timeout: (!args.backend_dial_timeout.is_zero())
                .then_some(args.backend_dial_timeout),
            hold_dials_after_start: (!args.hold_dials_after_start.is_zero())
                .then_some(args.hold_dials_after_start),
            agent_queue_packets: args.xfr_channel_size,
            frontend_queue_bytes: args.frontend_queue_bytes,
            stream_buffer_bytes: args.stream_buffer_bytes,
            stall_timeout: args.stall_timeout,
            half_close_timeout: args.half_close_timeout,
            agent_idle_timeout: args.agent_idle_timeout,
            agent_probe_interval: args.agent_probe_interval,
            max_pending_agent_connections: (
                args.max_pending_agent_connections_per_source as usize,
                args.max_pending_agent_connections as usize,
            ),
            health_host: args.health_bind_address.clone(),
            health_port: args.health_port,
            admin_host: args.admin_bind_address.clone(),
            admin_port: args.admin_port,
            graceful_shutdown_timeout: args.graceful_shutdown_timeout,
            token_auth,
            leases,
            kubeconfig,
            binding: args.bind_agent_identity,
            max_agent_streams_per_identity: args.max_agent_streams_per_identity as usize,
            agents_unauthenticated,
        })
    }
}

impl TokenAuthArgs {
    fn kubeconfig(&self) -> Result<Option<PathBuf>, ConfigError> {
        let kubeconfig = (!self.kubeconfig.is_empty()).then(|| PathBuf::from(&self.kubeconfig));
        if let Some(path) = &kubeconfig
            && !path.is_file()
        {
            return Err(ConfigError::Invalid {
                flag: "kubeconfig",
                value: self.kubeconfig.clone(),
                why: "no such file".into(),
            });
        }
        Ok(kubeconfig)
    }

    fn cache_file(&self) -> Result<Option<PathBuf>, ConfigError> {
        if self.token_review_cache_file.is_empty() {
            return Ok(None);
        }
        let path = PathBuf::from(&self.token_review_cache_file);
        let invalid = |why: String| ConfigError::Invalid {
            flag: "token-review-cache-file",
            value: self.token_review_cache_file.clone(),
            why,
        };
        if self.token_review_cache_ttl.is_zero() {
            return Err(invalid(
                "nothing to keep: --token-review-cache-ttl=0 reviews every stream".into(),
            ));
        }
        let directory = path.parent().filter(|p| !p.as_os_str().is_empty());
        if directory.is_some_and(|d| !d.is_dir()) {
            return Err(invalid("its directory does not exist".into()));
        }
        crate::review_store::check(&path).map_err(|err| invalid(err.to_string()))?;
        Ok(Some(path))
    }

    fn settings(&self) -> Result<Option<TokenAuthSettings>, ConfigError> {
        if self.agent_namespace.is_empty() {
            if !self.token_review_cache_file.is_empty() {
                return Err(ConfigError::Required {
                    flag: "agent-namespace",
                    why: " with --token-review-cache-file (it keeps token authentication's answers)",
                });
            }
            if !self.agent_service_account.is_empty() || !self.authentication_audience.is_empty() {
                return Err(ConfigError::Required {
                    flag: "agent-namespace",
                    why: " with --agent-service-account and --authentication-audience (token authentication)",
                });
            }
            return Ok(None);
        }
        for (flag, value) in [
            ("agent-service-account", &self.agent_service_account),
            ("authentication-audience", &self.authentication_audience),
        ] {
            if value.is_empty() {
                return Err(ConfigError::Required {
                    flag,
                    why: " with --agent-namespace (token authentication)",
                });
            }
        }
        if !(self.kubeconfig_qps >= 0.0 && self.kubeconfig_qps.is_finite()) {
            return Err(ConfigError::Invalid {
                flag: "kubeconfig-qps",
                value: self.kubeconfig_qps.to_string(),
                why: "must be a non-negative number".into(),
            });
        }
        match self.kube_api_content_type.as_str() {
            "application/vnd.kubernetes.protobuf" | "application/json" => {}
            other => {
                return Err(ConfigError::Invalid {
                    flag: "kube-api-content-type",
                    value: other.to_owned(),
                    why: "expected application/vnd.kubernetes.protobuf or application/json".into(),
                });
            }
        }
        let cache_file = self.cache_file()?;
        // client-go's defaults when the flags are 0, as upstream's client gets them.
        Ok(Some(TokenAuthSettings {
            namespace: self.agent_namespace.clone(),
            service_account: self.agent_service_account.clone(),
            audience: self.authentication_audience.clone(),
            qps: if self.kubeconfig_qps > 0.0 {
                f64::from(self.kubeconfig_qps)
            } else {
                5.0
            },
            burst: if self.kubeconfig_burst > 0 {
                self.kubeconfig_burst
            } else {
                10
            },
            cache_ttl: self.token_review_cache_ttl,
            cache_file,
        }))
    }
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `tether-server probe`: one dial through a running server, as kube-apiserver makes it.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Destination to reach through the tunnel, named as kube-apiserver names it: HOST:PORT,
    /// IPv6 in brackets (e.g. 10.0.3.7:10250 for that node's kubelet).
    pub target: String,
    /// Frontend protocol; the server's --mode.
    #[arg(long, value_enum, default_value = "grpc")]
    pub mode: Mode,
    /// The server's frontend Unix socket (its --uds-name), as kube-apiserver reaches it.
    #[arg(long, conflicts_with = "server")]
    pub uds_name: Option<PathBuf>,
    /// The server's mTLS TCP frontend, HOST:PORT (its --server-port).
    #[arg(long, requires_all = ["ca_cert", "client_cert", "client_key"])]
    pub server: Option<String>,
    /// CA that signed the frontend's certificate (the egress selector's caBundle).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate the frontend accepts (signed by the server's --server-ca-cert).
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// Key of --client-cert.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// Name to check in the frontend's certificate; default: the host of --server.
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Give up after this long: reaching the server, the dial, and --http-get each.
    #[arg(long, value_parser = go_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Once connected, send `GET PATH` in plain HTTP/1.1 through the tunnel and print the
    /// reply's status line (for destinations that speak plain HTTP).
    #[arg(long, value_name = "PATH")]
    pub http_get: Option<String>,
}
