//! Command line → validated [`Config`]. Flag names, defaults and env fallbacks follow upstream's
//! `proxy-agent`, so existing DaemonSets work unchanged; upstream flags tether does not
//! implement are refused by name.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use tether_proto::identifiers::Identifiers;
use tether_runtime::flags::{ConfigError, Process, go_bool, go_duration, refuse_unsupported};
use tether_runtime::tls::{Identity, PemFile};

use crate::dial_plane::policy::Target as DialTarget;
use crate::dial_plane::{DialCgroup, DialSettings};
use crate::guard::GuardSettings;
use crate::guard_program::Cidr;

/// tether-agent: the node half of the Konnectivity tunnel. It dials out to the proxy server over
/// TLS, holds one stream per server replica, and carries the control plane's connections
/// (kubelet logs/exec/attach/port-forward, apiserver proxy) to local destinations.
#[derive(Parser, Debug)]
#[command(
    name = "tether-agent",
    version,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Inspect or remove the XDP guard an agent pinned (works while no agent runs).
    #[command(subcommand)]
    Guard(GuardCommand),
    /// Ask the running agent about its dial policy.
    #[command(subcommand, name = "dial-policy")]
    DialPolicy(DialPolicyCommand),
}

#[derive(Subcommand, Debug)]
pub enum DialPolicyCommand {
    /// Print whether the running agent may dial IP:PORT, the rule that decides, and where it
    /// is enforced (asks the agent's admin port on 127.0.0.1).
    Check(CheckArgs),
}

#[derive(ClapArgs, Debug)]
pub struct CheckArgs {
    /// The destination, IP:PORT (IPv6 in brackets).
    pub target: String,
    /// The running agent's --admin-server-port.
    #[arg(long, env = "TETHER_ADMIN_SERVER_PORT", default_value_t = 8094)]
    pub admin_server_port: u16,
}

#[derive(Subcommand, Debug)]
pub enum GuardCommand {
    /// Print the pinned guard's mode, interfaces, policy and counters.
    Status(PinArgs),
    /// Detach the guard from every interface and remove its pins (after the DaemonSet is gone).
    Detach(DetachArgs),
}

#[derive(ClapArgs, Debug)]
pub struct DetachArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// After detaching, stay running until SIGTERM: an uninstall DaemonSet's pod then shows,
    /// by running, that its node is done (instead of restarting a container that exited).
    #[arg(long)]
    pub wait: bool,
}

#[derive(ClapArgs, Debug)]
pub struct PinArgs {
    /// Directory on a BPF filesystem holding the guard's pins.
    #[arg(long, env = "TETHER_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
}

const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/tether";

/// What the agent may dial for the control plane. Built in: link-local (169.254.0.0/16,
/// fe80::/10, where cloud metadata endpoints live), loopback (127.0.0.0/8, ::1), the
/// unspecified addresses Linux connects to the node itself (0.0.0.0/8, ::/96) and the cloud
/// metadata endpoints outside link-local (fd00:ec2::254, 100.100.100.200, 168.63.129.16, …;
/// docs/threat-model.md lists them) are denied;
/// everything else is allowed unless --dial-allow is given. The most specific rule decides
/// (longer prefix, then narrower ports; deny wins a tie). The proxy server and the nameservers
/// in /etc/resolv.conf are always allowed on their ports.
#[derive(ClapArgs, Debug)]
#[command(next_help_heading = "Dial policy")]
pub struct DialArgs {
    /// Destination the agent may dial: PREFIX[:PORT[-LAST]] (IPv6 with ports in brackets, e.g.
    /// [fd00::/8]:443). Once any is given, only these are allowed. Repeatable, or
    /// comma-separated; e.g. 127.0.0.1:10250 for a kubelet dialled on loopback.
    #[arg(long = "dial-allow", env = "TETHER_DIAL_ALLOW", value_delimiter = ',')]
    pub allow: Vec<DialTarget>,
    /// Destination the agent must not dial: PREFIX[:PORT[-LAST]]. Repeatable, or
    /// comma-separated.
    #[arg(long = "dial-deny", env = "TETHER_DIAL_DENY", value_delimiter = ',')]
    pub deny: Vec<DialTarget>,
    /// Where the kernel enforces the policy on the agent's own connect() and sendmsg() calls:
    /// auto (the agent's cgroup when it is alone there, as in a container; otherwise a child
    /// cgroup "tether-agent" it creates and joins), off (userspace checks only), or a cgroup v2
    /// directory.
    #[arg(
        long = "dial-policy-cgroup",
        env = "TETHER_DIAL_POLICY_CGROUP",
        default_value = "auto"
    )]
    pub cgroup: String,
    /// Services to steer in the kernel, so dials to them work without kube-proxy: one per
    /// line, `CLUSTER_IP:PORT/tcp BACKEND_IP:PORT ...` (IPv6 in brackets, `#` comments). Read
    /// again within half a second of a change; needs the kernel hooks (--dial-policy-cgroup).
    #[arg(
        long = "service-map-file",
        env = "TETHER_SERVICE_MAP_FILE",
        conflicts_with = "services_from_kubernetes"
    )]
    pub service_map_file: Option<PathBuf>,
    /// Steer Services as the cluster has them: list and watch Services and EndpointSlices in
    /// every namespace (RBAC: get, list, watch on both) through the pod's service account, or
    /// --services-kubeconfig. Needs the kernel hooks (--dial-policy-cgroup).
    #[arg(long, env = "TETHER_SERVICES_FROM_KUBERNETES")]
    pub services_from_kubernetes: bool,
    /// kubeconfig for --services-from-kubernetes (default: the in-cluster service account).
    #[arg(
        long,
        env = "TETHER_SERVICES_KUBECONFIG",
        requires = "services_from_kubernetes"
    )]
    pub services_kubeconfig: Option<PathBuf>,
}

/// The XDP guard: drops what would reach the node around the tunnel. It stays in place, pinned,
/// across agent restarts and upgrades.
#[derive(ClapArgs, Debug)]
#[command(next_help_heading = "Guard (XDP)")]
pub struct GuardArgs {
    /// enforce drops what the policy says; monitor passes it and counts (and logs) what it
    /// would drop; off loads nothing, and switches off a guard an earlier agent left pinned.
    #[arg(long, env = "TETHER_GUARD_MODE", value_enum, default_value = "enforce")]
    pub guard_mode: GuardMode,
    /// Interface to guard besides the ones found by their routes (repeatable, or
    /// comma-separated). Every interface with a route to the control plane (the default route
    /// included) is guarded, and followed as interfaces and routes change. For a bridge (or an
    /// Open vSwitch internal port), a macvlan, ipvlan or VLAN the guard goes where its frames
    /// enter instead: the bridge's ports other than pods' veths and VMs' taps, the device the
    /// macvlan sits on. A bridge whose uplink is a veth into another namespace needs that veth
    /// named here.
    #[arg(
        long = "guard-interface",
        env = "TETHER_GUARD_INTERFACE",
        value_delimiter = ','
    )]
    pub interfaces: Vec<String>,
    /// Source prefix of the control plane, whose new connections are dropped (repeatable)
    /// [default: the addresses --proxy-server-host resolves to]. Set it: in production
    /// kube-apiserver usually connects from a range other than the proxy server's address.
    #[arg(
        long = "control-plane-cidr",
        env = "TETHER_CONTROL_PLANE_CIDR",
        value_delimiter = ','
    )]
    pub control_plane: Vec<Cidr>,
    /// Node port reachable only through the tunnel (repeatable).
    #[arg(long = "protected-port", env = "TETHER_PROTECTED_PORT", value_delimiter = ',', default_values_t = [10250u16, 10255])]
    pub protected_ports: Vec<u16>,
    /// Source prefix still allowed to reach protected ports directly, e.g. the pod range
    /// metrics-server and Prometheus scrape the kubelet from (repeatable).
    #[arg(
        long = "protected-port-allow-cidr",
        env = "TETHER_PROTECTED_PORT_ALLOW_CIDR",
        value_delimiter = ','
    )]
    pub allowed: Vec<Cidr>,
    /// UDP port that carries a tunnel (VXLAN 4789 and 8472, Geneve 6081, WireGuard 51820 and
    /// 51871, L2TP 1701, IPsec NAT traversal 4500, MPLS in UDP 6635); from the control plane it
    /// is dropped, since the packets inside would reach the node unguarded (repeatable). The
    /// ports of the node's VXLAN, Geneve and bare UDP devices are added as the devices come and
    /// go; name FOU and GUE ports (`ip fou add`) here.
    #[arg(long = "guard-tunnel-port", env = "TETHER_GUARD_TUNNEL_PORT", value_delimiter = ',', default_values_t = [4789u16, 6081, 8472, 51820, 51871, 1701, 4500, 6635])]
    pub tunnel_ports: Vec<u16>,
    /// Tunnel the control plane may still send: ipip, ipv6 (IPv6 in IP), gre, esp, l2tp
    /// (L2TPv3 over IP), mpls (MPLS in IP), or udp:PORT. Only for control-plane nodes that are members of the pod overlay: what
    /// arrives inside it is not guarded (repeatable).
    #[arg(
        long = "guard-allow-tunnel",
        env = "TETHER_GUARD_ALLOW_TUNNEL",
        value_delimiter = ','
    )]
    pub allow_tunnels: Vec<AllowedTunnel>,
    /// Directory on a BPF filesystem for the guard's pins and the dial policy's hooks (in a
    /// pod, mount the host's directory of that name, and only it, at the same path).
    #[arg(long, env = "TETHER_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
}

/// A tunnel named in `--guard-allow-tunnel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowedTunnel {
    /// An IP protocol of `TUNNEL_PROTOCOLS`.
    Protocol(u8),
    Udp(u16),
}

impl std::str::FromStr for AllowedTunnel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(port) = text.strip_prefix("udp:") {
            return match port.parse::<u16>() {
                Ok(port) if port != 0 => Ok(AllowedTunnel::Udp(port)),
                _ => Err(format!("{port:?} is not a UDP port (1-65535)")),
            };
        }
        tether_agent_common::TUNNEL_PROTOCOLS
            .iter()
            .find(|(_, name)| *name == text)
            .map(|(protocol, _)| AllowedTunnel::Protocol(*protocol))
            .ok_or_else(|| format!("{text:?} is not ipip, ipv6, gre, esp, l2tp, mpls or udp:PORT"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuardMode {
    Enforce,
    Monitor,
    Off,
}

impl From<GuardMode> for tether_agent_common::Mode {
    fn from(mode: GuardMode) -> Self {
        match mode {
            GuardMode::Enforce => tether_agent_common::Mode::Enforce,
            GuardMode::Monitor => tether_agent_common::Mode::Monitor,
            GuardMode::Off => tether_agent_common::Mode::Off,
        }
    }
}

#[derive(ClapArgs, Debug)]
pub struct RunArgs {
    /// Proxy server host name or IP; also the name its certificate must carry. Several,
    /// comma-separated, are dialled in turn (see --server-addresses).
    #[arg(long, default_value = "127.0.0.1", help_heading = "Proxy server")]
    pub proxy_server_host: String,
    /// How --proxy-server-host leads to the servers. balancer: through a load balancer (or
    /// DNS that hands out one server at a time): the agent dials until it holds as many
    /// distinct servers as it counts (servercount or Leases). each: every address the hosts
    /// resolve to is a server (a list of servers, or a headless Service's name): the agent
    /// holds one stream to each address directly, re-resolves every --resolve-interval,
    /// follows added and removed addresses, and redials a lost one within about a second.
    #[arg(
        long,
        env = "TETHER_SERVER_ADDRESSES",
        value_enum,
        default_value = "balancer",
        help_heading = "Proxy server"
    )]
    pub server_addresses: ServerAddresses,
    /// With --server-addresses=each: how often the hosts are resolved again.
    #[arg(long, env = "TETHER_RESOLVE_INTERVAL", value_parser = go_duration, default_value = "5s", help_heading = "Proxy server")]
    pub resolve_interval: Duration,
    /// Proxy server agent port.
    #[arg(long, default_value_t = 8091, help_heading = "Proxy server")]
    pub proxy_server_port: u16,
    /// CA bundle that signs the proxy server's certificate (required; never skipped).
    #[arg(long, default_value = "", help_heading = "Proxy server")]
    pub ca_cert: String,
    /// Client certificate for mTLS (with --agent-key).
    #[arg(long, default_value = "", help_heading = "Proxy server")]
    pub agent_cert: String,
    /// Client key for mTLS (with --agent-cert).
    #[arg(long, default_value = "", help_heading = "Proxy server")]
    pub agent_key: String,
    /// Extra ALPN protocols to offer before h2 (for an ALPN-routing load balancer).
    #[arg(long, value_delimiter = ',', help_heading = "Proxy server")]
    pub alpn_proto: Vec<String>,
    /// Service-account token sent as a bearer token; re-read on every connection.
    #[arg(long, default_value = "", help_heading = "Proxy server")]
    pub service_account_token_path: String,
    /// HTTP/2 keepalive ping interval (at least 30s: servers punish faster pings).
    #[arg(long, value_parser = go_duration, default_value = "1h", help_heading = "Proxy server")]
    pub keepalive_time: Duration,

    /// This agent's ID (default: $PROXY_AGENT_ID, else random).
    #[arg(
        long,
        env = "PROXY_AGENT_ID",
        default_value = "",
        help_heading = "Identity"
    )]
    pub agent_id: String,
    /// What this agent serves, as a URL query: host=…&ipv4=…&ipv6=…&cidr=…&default-route=true
    /// [default: ipv4=/ipv6= for the addresses of this node's default-route interfaces, so a
    /// server with --proxy-strategies=destHost,default sends dials to this node's own
    /// addresses here, where the guard lets them in; "none" advertises nothing].
    #[arg(
        long,
        env = "TETHER_AGENT_IDENTIFIERS",
        default_value = "",
        help_heading = "Identity"
    )]
    pub agent_identifiers: String,

    /// First reconnect delay; grows 1.5x (10% jitter) up to --sync-interval-cap.
    #[arg(long, value_parser = go_duration, default_value = "1s", help_heading = "Server set")]
    pub sync_interval: Duration,
    /// Longest reconnect delay.
    #[arg(long, value_parser = go_duration, default_value = "10s", help_heading = "Server set")]
    pub sync_interval_cap: Duration,
    /// How often each server stream's peer is checked: an idle stream sends a TCP keepalive
    /// probe every interval (at least 1s). How long the server may stay silent before the
    /// stream is given up is --peer-timeout.
    #[arg(long, value_parser = go_duration, default_value = "1s", help_heading = "Server set")]
    pub probe_interval: Duration,
    /// A server stream whose server acknowledges nothing, neither data nor keepalive probe,
    /// for this long is closed and dialled again. Long enough that an ordinary network blip
    /// (a few seconds of dropped packets) costs no tunnelled connection; shorter moves off a dead
    /// server sooner.
    #[arg(long, env = "TETHER_PEER_TIMEOUT", value_parser = go_duration, default_value = "30s", help_heading = "Server set")]
    pub peer_timeout: Duration,
    /// Keep dialling after reaching the server count, to discover new replicas.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false", help_heading = "Server set")]
    pub sync_forever: bool,

    /// Offer tether's per-connection flow control to tether servers (upstream servers ignore
    /// the offer). With it, each connection's sender waits for its own destination; without
    /// it (or with an upstream server), a slow destination makes the whole server stream wait
    /// (see --conn-queue-bytes and --stall-timeout).
    #[arg(long, env = "TETHER_FLOW_CONTROL", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true", help_heading = "Limits")]
    pub flow_control: bool,
    /// Bytes queued toward one local destination. Past it, a server without flow control
    /// (upstream) is not read again until that destination catches up; a flow-controlled
    /// server has broken its window, and that connection alone is closed.
    #[arg(long, env = "TETHER_CONN_QUEUE_BYTES", default_value_t = 4 << 20, help_heading = "Limits")]
    pub conn_queue_bytes: usize,
    /// Bytes queued toward all local destinations of one server stream; past it the stream
    /// is not read until they drain. Bounds memory when a server without flow control sends
    /// faster than destinations read.
    #[arg(long, env = "TETHER_STREAM_BUFFER_BYTES", default_value_t = 64 << 20, help_heading = "Limits")]
    pub stream_buffer_bytes: usize,
    /// While a server stream waits for destinations to catch up, one that reads nothing at all
    /// for this long is closed, so the others can move again. A slow reader is never closed.
    #[arg(long, env = "TETHER_STALL_TIMEOUT", value_parser = go_duration, default_value = "5s", help_heading = "Limits")]
    pub stall_timeout: Duration,
    /// Per-connection queue length in upstream's units (150 chunks); sets --conn-queue-bytes to
    /// that many 4 KiB chunks when given.
    #[arg(long, help_heading = "Limits")]
    pub xfr_channel_size: Option<usize>,
    /// Time allowed for one destination dial (DNS + TCP connect).
    #[arg(long, env = "TETHER_DIAL_TIMEOUT", value_parser = go_duration, default_value = "5s", help_heading = "Limits")]
    pub dial_timeout: Duration,
    /// Dials allowed in flight at once per server stream; more are refused at once.
    #[arg(
        long,
        env = "TETHER_MAX_PENDING_DIALS",
        default_value_t = 512,
        help_heading = "Limits"
    )]
    pub max_pending_dials: usize,
    /// Tunnelled connections allowed open at once per server stream.
    #[arg(
        long,
        env = "TETHER_MAX_CONNECTIONS",
        default_value_t = 16384,
        help_heading = "Limits"
    )]
    pub max_connections: usize,

    /// Health server host (/healthz, /readyz, /metrics); empty = all interfaces.
    #[arg(long, default_value = "", help_heading = "Operations")]
    pub health_server_host: String,
    /// Health server port.
    #[arg(long, default_value_t = 8093, help_heading = "Operations")]
    pub health_server_port: u16,
    /// Admin server port (/metrics redirects to the health port).
    #[arg(long, default_value_t = 8094, help_heading = "Operations")]
    pub admin_server_port: u16,
    /// Admin server bind address; empty = all interfaces.
    #[arg(long, default_value = "127.0.0.1", help_heading = "Operations")]
    pub admin_bind_address: String,
    /// After the first SIGTERM, open connections get this long before they are closed.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", value_parser = go_duration, default_value = "25s", help_heading = "Operations")]
    pub drain_timeout: Duration,
    /// Accepted for compatibility: tether always counts full queues in metrics and logs them.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub warn_on_channel_limit: Option<bool>,

    #[command(flatten)]
    pub guard: GuardArgs,

    #[command(flatten)]
    pub dial: DialArgs,

    #[command(flatten)]
    pub leases: LeaseArgs,

    #[command(flatten)]
    pub process: Process,

    #[command(flatten)]
    pub unsupported: Unsupported,
}

/// How the agent finds the servers behind --proxy-server-host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerAddresses {
    Balancer,
    Each,
}

/// How many servers to hold a stream to, from the servers' Leases (coordination.k8s.io/v1)
/// rather than from the servercount each server announces: servers added or removed are
/// followed with no restart. Needs Lease get/list/watch in --lease-namespace.
#[derive(ClapArgs, Debug)]
#[command(next_help_heading = "Server leases")]
pub struct LeaseArgs {
    /// Count the servers' valid Leases (see --server-count-source).
    #[arg(long, env = "TETHER_COUNT_SERVER_LEASES", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub count_server_leases: bool,
    /// Namespace of the servers' Leases.
    #[arg(long, env = "TETHER_LEASE_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// Which Leases are servers', as a Kubernetes label selector.
    #[arg(
        long,
        alias = "lease-label",
        env = "TETHER_LEASE_LABEL_SELECTOR",
        default_value = "k8s-app=konnectivity-server"
    )]
    pub lease_label_selector: String,
    /// default: the Lease count alone; max: the larger of the Lease count and the servercount
    /// servers announce. Until the Leases are first listed, the announced count is used.
    #[arg(long, env = "TETHER_SERVER_COUNT_SOURCE", default_value = "default")]
    pub server_count_source: String,
    /// kubeconfig for the Lease watch; empty = the pod's in-cluster service account.
    #[arg(long, env = "TETHER_KUBECONFIG", default_value = "")]
    pub kubeconfig: String,
    /// Accepted for compatibility: tether's client always sends JSON, which every
    /// kube-apiserver accepts.
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,
}

/// Whether and how servers are counted by their Leases.
#[derive(Clone, Debug)]
pub struct LeaseCount {
    pub namespace: String,
    pub selector: String,
    /// The larger of the Lease count and the announced count (`--server-count-source=max`).
    pub max_with_announced: bool,
    pub kubeconfig: Option<PathBuf>,
}

impl LeaseArgs {
    fn settings(&self) -> Result<Option<LeaseCount>, ConfigError> {
        let invalid = |flag, value: &str, why: &str| ConfigError::Invalid {
            flag,
            value: value.to_owned(),
            why: why.to_owned(),
        };
        let max_with_announced = match self.server_count_source.as_str() {
            "" | "default" => false,
            "max" => true,
            other => {
                return Err(invalid(
                    "server-count-source",
                    other,
                    "expected default or max",
                ));
            }
        };
        match self.kube_api_content_type.as_str() {
            "application/vnd.kubernetes.protobuf" | "application/json" => {}
            other => {
                return Err(invalid(
                    "kube-api-content-type",
                    other,
                    "expected application/vnd.kubernetes.protobuf or application/json",
                ));
            }
        }
        let kubeconfig = (!self.kubeconfig.is_empty()).then(|| PathBuf::from(&self.kubeconfig));
        if let Some(path) = &kubeconfig
            && !path.is_file()
        {
            return Err(invalid("kubeconfig", &self.kubeconfig, "no such file"));
        }
        if !self.count_server_leases {
            return Ok(None);
        }
        if self.lease_namespace.is_empty() {
            return Err(invalid("lease-namespace", "", "must not be empty"));
        }
        Ok(Some(LeaseCount {
            namespace: self.lease_namespace.clone(),
            selector: self.lease_label_selector.clone(),
            max_with_announced,
            kubeconfig,
        }))
    }
}

/// Upstream flags for features tether-agent does not have: setting one is an error naming it.
#[derive(ClapArgs, Debug, Default)]
pub struct Unsupported {
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_profiling: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_contention_profiling: Option<String>,
}

impl Unsupported {
    fn check(&self) -> Result<(), ConfigError> {
        let set = [
            (
                "enable-profiling",
                &self.enable_profiling,
                "Go pprof endpoints do not exist in tether-agent",
            ),
            (
                "enable-contention-profiling",
                &self.enable_contention_profiling,
                "Go pprof endpoints do not exist in tether-agent",
            ),
        ];
        refuse_unsupported(&set)
    }
}

pub struct Config {
    /// --proxy-server-host, split at commas.
    pub server_hosts: Vec<String>,
    pub server_port: u16,
    pub server_addresses: ServerAddresses,
    pub resolve_interval: Duration,
    pub ca: PemFile,
    pub client_identity: Option<(PemFile, PemFile)>,
    pub alpn: Vec<String>,
    pub token_path: Option<PathBuf>,
    pub keepalive: Duration,
    pub agent_id: String,
    pub agent_identifiers: String,
    pub sync_interval: Duration,
    pub sync_interval_cap: Duration,
    pub probe_interval: Duration,
    pub peer_timeout: Duration,
    pub sync_forever: bool,
    pub leases: Option<LeaseCount>,
    pub flow_control: bool,
    pub conn_queue_bytes: usize,
    pub stream_buffer_bytes: usize,
    pub stall_timeout: Duration,
    pub dial_timeout: Duration,
    pub max_pending_dials: usize,
    pub max_connections: usize,
    pub health_host: String,
    pub health_port: u16,
    pub admin_host: String,
    pub admin_port: u16,
    pub drain_timeout: Duration,
    pub guard: GuardSettings,
    pub dial: DialSettings,
}

const MIN_KEEPALIVE: Duration = Duration::from_secs(30);

impl Config {
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        args.unsupported.check()?;
        let invalid = |flag, value: String, why: String| ConfigError::Invalid { flag, value, why };
        if args.ca_cert.is_empty() {
            return Err(ConfigError::Required {
                flag: "ca-cert",
                why: " (the CA bundle that signs the proxy server's certificate)",
            });
        }
        let ca = PemFile::new("ca-cert", &args.ca_cert);
        tether_runtime::tls::root_store(&ca)?;
        let client_identity = match (args.agent_cert.is_empty(), args.agent_key.is_empty()) {
            (true, true) => None,
            (false, false) => {
                let pair = (
                    PemFile::new("agent-cert", &args.agent_cert),
                    PemFile::new("agent-key", &args.agent_key),
                );
                Identity::load(pair.0.clone(), pair.1.clone())?;
                Some(pair)
            }
            (false, true) => {
                return Err(ConfigError::Required {
                    flag: "agent-key",
                    why: " with --agent-cert",
                });
            }
            (true, false) => {
                return Err(ConfigError::Required {
                    flag: "agent-cert",
                    why: " with --agent-key",
                });
            }
        };
        if args.proxy_server_port == 0 {
            return Err(invalid(
                "proxy-server-port",
                "0".into(),
                "must be greater than 0".into(),
            ));
        }
        let server_hosts: Vec<String> = args
            .proxy_server_host
            .split(',')
            .map(|host| host.trim().trim_start_matches('[').trim_end_matches(']'))
            .filter(|host| !host.is_empty())
            .map(str::to_owned)
            .collect();
        if server_hosts.is_empty() {
            return Err(ConfigError::Required {
                flag: "proxy-server-host",
                why: "",
            });
        }
        if args.resolve_interval < Duration::from_millis(100) {
            return Err(invalid(
                "resolve-interval",
                format!("{:?}", args.resolve_interval),
                "must be at least 100ms".into(),
            ));
        }
        let token_path = (!args.service_account_token_path.is_empty())
            .then(|| PathBuf::from(&args.service_account_token_path));
        if let Some(path) = &token_path {
            read_token(path).map_err(|why| {
                invalid(
                    "service-account-token-path",
                    path.display().to_string(),
                    why,
                )
            })?;
        }
        if args.keepalive_time < MIN_KEEPALIVE {
            return Err(invalid(
                "keepalive-time",
                format!("{:?}", args.keepalive_time),
                "must be at least 30s: grpc-go servers answer faster pings with GOAWAY too_many_pings".into(),
            ));
        }
        if args.peer_timeout < args.probe_interval.max(Duration::from_secs(1)) * 2 {
            return Err(invalid(
                "peer-timeout",
                format!("{:?}", args.peer_timeout),
                "must be at least twice --probe-interval: a probe or two must be able to go unanswered".into(),
            ));
        }
        if args.agent_identifiers != "none"
            && let Err(err) = Identifiers::parse_strict(&args.agent_identifiers)
        {
            return Err(invalid(
                "agent-identifiers",
                args.agent_identifiers.clone(),
                err.to_string(),
            ));
        }
        if args.sync_interval > args.sync_interval_cap {
            return Err(invalid(
                "sync-interval",
                format!("{:?}", args.sync_interval),
                format!(
                    "must not exceed --sync-interval-cap ({:?})",
                    args.sync_interval_cap
                ),
            ));
        }
        let conn_queue_bytes = match args.xfr_channel_size {
            Some(0) => {
                return Err(invalid(
                    "xfr-channel-size",
                    "0".into(),
                    "must be greater than 0".into(),
                ));
            }
            Some(chunks) => chunks.saturating_mul(4096).max(64 * 1024),
            None => args.conn_queue_bytes,
        };
        if conn_queue_bytes < 64 * 1024 {
            return Err(invalid(
                "conn-queue-bytes",
                conn_queue_bytes.to_string(),
                "must be at least 65536".into(),
            ));
        }
        if args.stream_buffer_bytes < conn_queue_bytes {
            return Err(invalid(
                "stream-buffer-bytes",
                args.stream_buffer_bytes.to_string(),
                format!("must be at least --conn-queue-bytes ({conn_queue_bytes})"),
            ));
        }
        if args.stall_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "stall-timeout",
                format!("{:?}", args.stall_timeout),
                "must be at least 100ms".into(),
            ));
        }
        for (flag, value) in [
            ("max-pending-dials", args.max_pending_dials),
            ("max-connections", args.max_connections),
        ] {
            if value == 0 {
                return Err(invalid(flag, "0".into(), "must be greater than 0".into()));
            }
        }
        for (flag, ports) in [
            ("protected-port", &args.guard.protected_ports),
            ("guard-tunnel-port", &args.guard.tunnel_ports),
        ] {
            if ports.contains(&0) {
                return Err(invalid(
                    flag,
                    "0".into(),
                    "must be a port number from 1 to 65535".into(),
                ));
            }
        }
        let allowed_tunnels = &args.guard.allow_tunnels;
        let agent_id = if args.agent_id.is_empty() {
            random_id()
        } else {
            args.agent_id.clone()
        };
        Ok(Config {
            server_hosts,
            server_port: args.proxy_server_port,
            server_addresses: args.server_addresses,
            resolve_interval: args.resolve_interval,
            ca,
            client_identity,
            alpn: args
                .alpn_proto
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            token_path,
            keepalive: args.keepalive_time,
            agent_id,
            agent_identifiers: match args.agent_identifiers.as_str() {
                "" => node_identifiers(&crate::interfaces::node_addresses()),
                "none" => String::new(),
                given => given.to_owned(),
            },
            sync_interval: args.sync_interval,
            sync_interval_cap: args.sync_interval_cap,
            probe_interval: args.probe_interval,
            peer_timeout: args.peer_timeout,
            sync_forever: args.sync_forever,
            leases: args.leases.settings()?,
            flow_control: args.flow_control,
            conn_queue_bytes,
            stream_buffer_bytes: args.stream_buffer_bytes,
            stall_timeout: args.stall_timeout,
            dial_timeout: args.dial_timeout,
            max_pending_dials: args.max_pending_dials,
            max_connections: args.max_connections,
            health_host: args.health_server_host.clone(),
            health_port: args.health_server_port,
            admin_host: args.admin_bind_address.clone(),
            admin_port: args.admin_server_port,
            drain_timeout: args.drain_timeout,
            dial: DialSettings {
                allow: args.dial.allow.clone(),
                deny: args.dial.deny.clone(),
                service_map_file: args.dial.service_map_file.clone(),
                services_from_kubernetes: args.dial.services_from_kubernetes,
                services_kubeconfig: args.dial.services_kubeconfig.clone(),
                cgroup: match args.dial.cgroup.as_str() {
                    "auto" => DialCgroup::Auto,
                    "off" => DialCgroup::Off,
                    path if path.starts_with('/') => DialCgroup::Path(PathBuf::from(path)),
                    other => {
                        return Err(invalid(
                            "dial-policy-cgroup",
                            other.to_owned(),
                            "expected auto, off, or an absolute cgroup v2 directory".into(),
                        ));
                    }
                },
                bpffs_root: args.guard.bpffs_root.clone(),
            },
            guard: GuardSettings {
                mode: args.guard.guard_mode.into(),
                interfaces: args.guard.interfaces.clone(),
                control_plane: args.guard.control_plane.clone(),
                protected_ports: args.guard.protected_ports.clone(),
                allowed: args.guard.allowed.clone(),
                tunnel_protocols: tether_agent_common::TUNNEL_PROTOCOLS
                    .iter()
                    .map(|(protocol, _)| *protocol)
                    .filter(|p| !allowed_tunnels.contains(&AllowedTunnel::Protocol(*p)))
                    .collect(),
                tunnel_ports: args
                    .guard
                    .tunnel_ports
                    .iter()
                    .copied()
                    .filter(|p| !allowed_tunnels.contains(&AllowedTunnel::Udp(*p)))
                    .collect(),
                allowed_tunnel_ports: allowed_tunnels
                    .iter()
                    .filter_map(|allowed| match allowed {
                        AllowedTunnel::Udp(port) => Some(*port),
                        AllowedTunnel::Protocol(_) => None,
                    })
                    .collect(),
                bpffs_root: args.guard.bpffs_root.clone(),
            },
        })
    }
}

/// `ipv4=…&ipv6=…` for `addresses`, in upstream's identifier syntax.
fn node_identifiers(addresses: &[std::net::IpAddr]) -> String {
    addresses
        .iter()
        .map(|address| match address {
            std::net::IpAddr::V4(a) => format!("ipv4={a}"),
            std::net::IpAddr::V6(a) => format!("ipv6={a}"),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The bearer token, without surrounding whitespace (a trailing newline would break the header).
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read: {err}"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err("file is empty".into());
    }
    if !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("token contains characters not allowed in an HTTP header".into());
    }
    Ok(token.to_owned())
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let (a, rest) = hex.split_at(8);
    let (b, rest) = rest.split_at(4);
    let (c, rest) = rest.split_at(4);
    let (d, e) = rest.split_at(4);
    format!("{a}-{b}-{c}-{d}-{e}")
}
