//! Server metrics. Names, types and labels follow upstream's `konnectivity_network_proxy_server_*`
//! (dashboards and e2e tests scrape them); tether's own additions are `tether_server_*`.
//! Upstream's counters whose names do not end in `_total` (`dial_failure_count`) are
//! [`NamedCounter`]s, so a scrape shows them under upstream's names.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tether_runtime::exposition::NamedCounter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpCallLabels {
    http_status_code: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpStatusLabel {
    http_status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StrategyLabel {
    proxy_strategy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    service_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeKindLabels {
    listener: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    segment: &'static str,
    packet_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamErrorLabels {
    segment: &'static str,
    code: &'static str,
    packet_type: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub dial_duration: Histogram,
    pub frontend_write_duration: Histogram,
    connection_duration: Histogram,
    stream_errors: Family<StreamErrorLabels, Counter>,
    pub pending_dials: Gauge,
    pub established: Gauge,
    pub http_connections: Gauge,
    pub ready_backend_connections: Gauge,
    pub frontend_queue_full: Counter,
    pub stream_pauses: Counter,
    pub stream_paused_seconds: Counter<f64, AtomicU64>,
    pub stalled_closes: Counter,
    full_receive_channels: Family<MethodLabel, Gauge>,
    accept_errors: Family<ListenerLabel, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    handshakes: Family<HandshakeKindLabels, Counter>,
    grpc_connections: Family<MethodLabel, Gauge>,
    ready_backends: Family<StrategyLabel, Gauge>,
    dial_failures: Family<ReasonLabel, NamedCounter>,
    packets: Family<PacketLabels, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    token_reviews: Family<OutcomeLabel, Counter>,
    dials_withheld: Family<ReasonLabel, Counter>,
    dials_held: Family<OutcomeLabel, Counter>,
    address_conflicts: Family<ReasonLabel, Counter>,
    pub culled_leases: NamedCounter,
    lease_calls: [Family<HttpCallLabels, Counter>; 2],
    lease_latencies: [Family<HttpStatusLabel, Histogram>; 2],
}

/// The lease controller's two kinds of call, as upstream's metrics name them.
#[derive(Clone, Copy, Debug)]
pub enum LeaseCall {
    List = 0,
    Delete = 1,
}

fn default_buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let latency = [1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5];
        let metrics = Metrics {
            dial_duration: Histogram::new(latency),
            frontend_write_duration: Histogram::new(latency),
            connection_duration: Histogram::new([
                1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
            ]),
            stream_errors: Family::default(),
            pending_dials: Gauge::default(),
            established: Gauge::default(),
            http_connections: Gauge::default(),
            ready_backend_connections: Gauge::default(),
            frontend_queue_full: Counter::default(),
            stream_pauses: Counter::default(),
            stream_paused_seconds: Counter::default(),
            stalled_closes: Counter::default(),
            full_receive_channels: Family::default(),
            accept_errors: Family::default(),
            handshake_failures: Family::default(),
            handshakes: Family::default(),
            grpc_connections: Family::default(),
            ready_backends: Family::default(),
            dial_failures: Family::default(),
            packets: Family::default(),
            rejected: Family::default(),
            token_reviews: Family::default(),
            dials_withheld: Family::default(),
            dials_held: Family::default(),
            address_conflicts: Family::default(),
            culled_leases: NamedCounter::default(),
            lease_calls: [Family::default(), Family::default()],
            lease_latencies: [
                Family::new_with_constructor(default_buckets),
                Family::new_with_constructor(default_buckets),
            ],
            registry: Registry::default(),
        };
        // Registered clones share their values with the fields above.
        {
            let upstream = registry.sub_registry_with_prefix("konnectivity_network_proxy_server");
            upstream.register(
                "dial_duration_seconds",
                "Latency of successful dials (DIAL_REQ to DIAL_RSP)",
                metrics.dial_duration.clone(),
            );
            upstream.register(
                "frontend_write_duration_seconds",
                "Time to hand one packet to a frontend",
                metrics.frontend_write_duration.clone(),
            );
            upstream.register(
                "connection_duration_seconds",
                "Lifetime of tunnelled connections, from the agent's dial to the close",
                metrics.connection_duration.clone(),
            );
            upstream.register(
                "stream_errors",
                "gRPC stream errors by segment, status code and packet type",
                metrics.stream_errors.clone(),
            );
            upstream.register(
                "pending_backend_dials",
                "Dials waiting for an agent's answer",
                metrics.pending_dials.clone(),
            );
            upstream.register(
                "established_connections",
                "Tunnelled connections open",
                metrics.established.clone(),
            );
            upstream.register(
                "http_connections",
                "Open HTTP CONNECT requests",
                metrics.http_connections.clone(),
            );
            upstream.register(
                "ready_backend_connections",
                "Agent streams usable by the first strategy (deprecated upstream)",
                metrics.ready_backend_connections.clone(),
            );
            upstream.register(
                "grpc_connections",
                "Open gRPC streams by method",
                metrics.grpc_connections.clone(),
            );
            upstream.register(
                "ready_backends",
                "Agent streams usable per strategy",
                metrics.ready_backends.clone(),
            );
            upstream.register(
                "dial_failure_count",
                "Failed dials by reason",
                metrics.dial_failures.clone(),
            );
            upstream.register(
                "culled_leases_count",
                "Expired server Leases the lease controller deleted",
                metrics.culled_leases.clone(),
            );
            for (call, name) in [(LeaseCall::List, "list"), (LeaseCall::Delete, "delete")] {
                upstream.register(
                    format!("lease_{name}"),
                    format!(
                        "Lease {name} calls by the lease controller, by HTTP status and reason"
                    ),
                    metrics.lease_calls[call as usize].clone(),
                );
                upstream.register(
                    format!("lease_{name}_latency_seconds"),
                    format!("Latency of the lease controller's Lease {name} calls"),
                    metrics.lease_latencies[call as usize].clone(),
                );
            }
            upstream.register(
                "full_receive_channels",
                "Agent streams not being read because a frontend queue is full",
                metrics.full_receive_channels.clone(),
            );
            upstream.register(
                "stream_packets",
                "Packets by direction and type",
                metrics.packets.clone(),
            );
        }
        {
            let ours = registry.sub_registry_with_prefix("tether_server");
            ours.register(
                "frontend_queue_full",
                "Connections closed because a flow-controlled agent sent past their window",
                metrics.frontend_queue_full.clone(),
            );
            ours.register(
                "stream_pauses",
                "Times an agent stream without flow control was held because frontends fell behind",
                metrics.stream_pauses.clone(),
            );
            ours.register(
                "stream_paused_seconds",
                "Time agent streams without flow control spent held for slow frontends",
                metrics.stream_paused_seconds.clone(),
            );
            ours.register(
                "stalled_closes",
                "Connections closed because their frontend read nothing for --stall-timeout while its agent stream was held",
                metrics.stalled_closes.clone(),
            );
            ours.register(
                "accept_errors",
                "Failed accepts (such as running out of file descriptors), by listener (agent, frontend); each backs off",
                metrics.accept_errors.clone(),
            );
            ours.register(
                "tls_handshake_failures",
                "Failed TLS handshakes, by listener (agent, frontend, frontend_uds for a TLS client on the plaintext Unix socket) and reason (peer_certificate_expired, peer_certificate_not_yet_valid, peer_certificate_unknown_ca, peer_sent_no_certificate, our_certificate_expired, our_certificate_unknown_ca, our_certificate_refused, plaintext_peer, tls_on_plaintext_socket, timeout, resumed_certificate_refused for a resumed session whose certificate expired since its ticket was issued, other)",
                metrics.handshake_failures.clone(),
            );
            ours.register(
                "tls_handshakes",
                "Completed TLS handshakes, by listener (agent, frontend) and kind: full, or resumed from a session ticket (no certificate signatures; see --session-ticket-key-file)",
                metrics.handshakes.clone(),
            );
            ours.register(
                "token_reviews",
                "Agent token checks, by outcome: reviewed (kube-apiserver asked), cached (a review reused until the token expires), refused_busy (over the review rate, deadline, per-address share or failure allowance), refused_again (a token refused moments ago), failed",
                metrics.token_reviews.clone(),
            );
            ours.register(
                "rejected",
                "Bad input refused or ignored, by reason",
                metrics.rejected.clone(),
            );
            ours.register(
                "dials_withheld",
                "Dials refused rather than sent to an agent, by reason: ambiguous_address (two Nodes list the address, or agents of two bound identities claim it), node_agent_absent (the host belongs to a node whose own agent is not connected)",
                metrics.dials_withheld.clone(),
            );
            ours.register(
                "dials_held",
                "Dials that found no agent while the server was fresh (--hold-dials-after-start) and waited, by outcome: served (an agent came) or failed (the window closed)",
                metrics.dials_held.clone(),
            );
            ours.register(
                "address_conflicts",
                "Agent streams that claimed an address someone else claims too, by who: nodes (another Node's status lists it), identities (an agent of another bound identity claims it); such an address is served by neither",
                metrics.address_conflicts.clone(),
            );
        }
        registry.register_collector(Box::new(tether_runtime::process_metrics::ProcessCollector));
        // Present from the start, so a dashboard sees 0 rather than nothing.
        metrics.full_receive_channels("Connect");
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn dial_held(&self, outcome: &'static str) {
        self.dials_held
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn dial_withheld(&self, reason: &'static str) {
        self.dials_withheld
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// One Lease list or delete: its HTTP status (0 when none came back), the API's reason,
    /// and how long it took.
    pub fn lease_call(
        &self,
        call: LeaseCall,
        status: u16,
        reason: &str,
        took: std::time::Duration,
    ) {
        let code = status.to_string();
        self.lease_calls[call as usize]
            .get_or_create(&HttpCallLabels {
                http_status_code: code.clone(),
                reason: reason.to_owned(),
            })
            .inc();
        self.lease_latencies[call as usize]
            .get_or_create(&HttpStatusLabel {
                http_status_code: code,
            })
            .observe(took.as_secs_f64());
    }

    pub fn address_conflict(&self, reason: &'static str) {
        self.address_conflicts
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn dial_failure(&self, reason: &'static str) {
        self.dial_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A tunnelled connection left the established table.
    pub fn connection_ended(&self, established_at: Option<std::time::Instant>) {
        self.established.dec();
        if let Some(at) = established_at {
            self.connection_duration.observe(at.elapsed().as_secs_f64());
        }
    }

    /// A gRPC stream failed while receiving (`packet_type` is `Unknown`, as upstream's).
    pub fn stream_error(&self, segment: &'static str, code: tonic::Code) {
        self.stream_errors
            .get_or_create(&StreamErrorLabels {
                segment,
                code: tether_proto::grpc_code_name(code),
                packet_type: "Unknown",
            })
            .inc();
    }

    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    pub fn handshake_failure(&self, listener: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { listener, reason })
            .inc();
    }

    pub fn handshake(&self, listener: &'static str, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.handshakes
            .get_or_create(&HandshakeKindLabels { listener, kind })
            .inc();
    }

    pub fn token_review(&self, outcome: &'static str) {
        self.token_reviews
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn packet(&self, segment: &'static str, packet_type: &'static str) {
        self.packets
            .get_or_create(&PacketLabels {
                segment,
                packet_type,
            })
            .inc();
    }

    /// Streams of one gRPC method held because a queue they feed is full (clones share the
    /// value).
    pub fn full_receive_channels(&self, service_method: &'static str) -> Gauge {
        self.full_receive_channels
            .get_or_create(&MethodLabel { service_method })
            .clone()
    }

    /// The open-streams gauge for one gRPC method (clones share the same value).
    pub fn grpc_connections(&self, service_method: &'static str) -> Gauge {
        self.grpc_connections
            .get_or_create(&MethodLabel { service_method })
            .clone()
    }

    pub fn ready_backends(&self, strategy: &'static str, count: usize) {
        self.ready_backends
            .get_or_create(&StrategyLabel {
                proxy_strategy: strategy,
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// When each certificate the listeners serve expires, read from its file at scrape time (the
/// listeners serve a changed file within seconds).
#[derive(Debug)]
pub struct CertificateExpiry(pub Vec<(&'static str, std::path::PathBuf)>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    certificate: &'static str,
}

impl prometheus_client::collector::Collector for CertificateExpiry {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "tether_server_certificate_expiry_timestamp_seconds",
            "When the certificate a listener serves expires (Unix time), by its flag: cluster-cert (the agent port), server-cert (the TCP frontend)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (flag, path) in &self.0 {
            let Some(not_after) = not_after(path) else {
                continue;
            };
            let labels = CertificateLabel { certificate: flag };
            prometheus_client::encoding::EncodeMetric::encode(
                &prometheus_client::metrics::gauge::ConstGauge::new(not_after),
                family.encode_family(&labels)?,
            )?;
        }
        Ok(())
    }
}

/// The first certificate's notAfter in a PEM file.
fn not_after(path: &std::path::Path) -> Option<i64> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .ok()?
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}
