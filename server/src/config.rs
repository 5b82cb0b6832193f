//! Command line → validated [`Config`]. Flag names, defaults and env fallbacks follow upstream's
//! `proxy-server` so existing manifests work unchanged; upstream flags tether does not implement
//! are refused by name instead of being silently ignored.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use rustls::ServerConfig;
use tether_runtime::flags::{ConfigError, Process, go_bool, go_duration, refuse_unsupported};
use tether_runtime::tls::{self, Identity, PemFile};

use crate::backends::Strategy;

/// tether-server: the control-plane half of the Konnectivity tunnel. kube-apiserver dials
/// through it (gRPC or HTTP CONNECT, over a Unix socket or mTLS TCP); node agents hold TLS
/// streams to it and carry the connections.
#[derive(Parser, Debug)]
#[command(
    name = "tether-server",
    version,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Args {
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
    /// Minimum TLS version on the agent and TCP frontend ports: VersionTLS12 or VersionTLS13.
    #[arg(long, default_value = "", help_heading = "Agents")]
    pub tls_min_version: String,
    /// Packets queued toward one agent before frontends wait (backpressure).
    #[arg(long, default_value_t = 10, help_heading = "Agents")]
    pub xfr_channel_size: usize,

    /// Bytes queued toward one frontend connection before that connection alone is closed.
    #[arg(long, env = "TETHER_FRONTEND_QUEUE_BYTES", default_value_t = 1 << 20, help_heading = "Limits (tether)")]
    pub frontend_queue_bytes: usize,

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
    pub process: Process,

    #[command(flatten)]
    pub unsupported: Unsupported,
}

/// Upstream flags whose features tether-server does not have. Setting one is an error that
/// names it; they exist so the error is precise rather than "unknown flag".
#[derive(clap::Args, Debug, Default)]
pub struct Unsupported {
    #[arg(long, hide = true)]
    pub agent_namespace: Option<String>,
    #[arg(long, hide = true)]
    pub agent_service_account: Option<String>,
    #[arg(long, hide = true)]
    pub authentication_audience: Option<String>,
    #[arg(long, hide = true)]
    pub kubeconfig: Option<String>,
    #[arg(long, hide = true)]
    pub kubeconfig_qps: Option<String>,
    #[arg(long, hide = true)]
    pub kubeconfig_burst: Option<String>,
    #[arg(long, hide = true)]
    pub kube_api_content_type: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_lease_controller: Option<String>,
    #[arg(long, hide = true)]
    pub lease_namespace: Option<String>,
    #[arg(long, hide = true)]
    pub lease_label: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_profiling: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub enable_contention_profiling: Option<String>,
    #[arg(long, hide = true)]
    pub cipher_suites: Option<String>,
}

impl Unsupported {
    fn check(&self) -> Result<(), ConfigError> {
        let set = [
            (
                "agent-namespace",
                &self.agent_namespace,
                "token authentication (TokenReview) is not implemented; authenticate agents with --cluster-ca-cert (mTLS)",
            ),
            (
                "agent-service-account",
                &self.agent_service_account,
                "token authentication (TokenReview) is not implemented; authenticate agents with --cluster-ca-cert (mTLS)",
            ),
            (
                "authentication-audience",
                &self.authentication_audience,
                "token authentication (TokenReview) is not implemented; authenticate agents with --cluster-ca-cert (mTLS)",
            ),
            (
                "kubeconfig",
                &self.kubeconfig,
                "tether-server does not talk to the Kubernetes API",
            ),
            (
                "kubeconfig-qps",
                &self.kubeconfig_qps,
                "tether-server does not talk to the Kubernetes API",
            ),
            (
                "kubeconfig-burst",
                &self.kubeconfig_burst,
                "tether-server does not talk to the Kubernetes API",
            ),
            (
                "kube-api-content-type",
                &self.kube_api_content_type,
                "tether-server does not talk to the Kubernetes API",
            ),
            (
                "enable-lease-controller",
                &self.enable_lease_controller,
                "server leases are not implemented; set --server-count",
            ),
            (
                "lease-namespace",
                &self.lease_namespace,
                "server leases are not implemented; set --server-count",
            ),
            (
                "lease-label",
                &self.lease_label,
                "server leases are not implemented; set --server-count",
            ),
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
    pub keepalive: Duration,
    pub server_id: String,
    pub server_count: u32,
    pub strategies: Vec<Strategy>,
    pub backend_dial_timeout: Option<Duration>,
    pub agent_queue_packets: usize,
    pub frontend_queue_bytes: usize,
    pub health_host: String,
    pub health_port: u16,
    pub admin_host: String,
    pub admin_port: u16,
    pub graceful_shutdown_timeout: Duration,
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
        let agent_tls =
            tls::server_config(&agent_identity, cluster_ca.as_ref(), alpn_h2, tls13_only)?;

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
            keepalive: args.keepalive_time,
            server_id,
            server_count: args.server_count,
            strategies,
            backend_dial_timeout: (!args.backend_dial_timeout.is_zero())
                .then_some(args.backend_dial_timeout),
            agent_queue_packets: args.xfr_channel_size,
            frontend_queue_bytes: args.frontend_queue_bytes,
            health_host: args.health_bind_address.clone(),
            health_port: args.health_port,
            admin_host: args.admin_bind_address.clone(),
            admin_port: args.admin_port,
            graceful_shutdown_timeout: args.graceful_shutdown_timeout,
        })
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
