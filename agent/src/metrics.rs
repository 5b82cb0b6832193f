//! Agent metrics: upstream's `konnectivity_network_proxy_agent_*` names and labels (dashboards
//! and e2e suites scrape them) plus tether's `tether_agent_*`.
//!
//! Upstream's counters whose names do not end in `_total` (`server_connection_failure_count`)
//! are [`NamedCounter`]s, so a scrape shows them under upstream's names.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tether_agent_common::Counter as KernelCounter;
use tether_runtime::exposition::NamedCounter;

use crate::dial_plane::hooks::DialHooks;
use crate::dial_plane::policy::{Action, DialPolicy};
use crate::guard_program::Counters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpCallLabels {
    http_response_code: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpCodeLabel {
    http_response_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabels {
    reason: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceGuardLabels {
    interface: String,
    reason: &'static str,
    action: &'static str,
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
    pub open_server_connections: Gauge,
    pub known_server_count: Gauge,
    pub open_endpoint_connections: Gauge,
    pub queue_full: Counter,
    pub stream_pauses: Counter,
    pub stream_paused_seconds: Counter<f64, AtomicU64>,
    pub stalled_closes: Counter,
    dial_failures: Family<ReasonLabel, Counter>,
    dial_refused: Family<ReasonLabel, Counter>,
    connect_failures: Family<ReasonLabel, Counter>,
    server_failures: Family<DirectionLabel, NamedCounter>,
    packets: Family<PacketLabels, Counter>,
    stream_errors: Family<StreamErrorLabels, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    lease_lists: Family<HttpCallLabels, Counter>,
    lease_watches: Family<HttpCallLabels, Counter>,
    lease_list_latency: Family<HttpCodeLabel, Histogram>,
    hot: HotSeries,
}

/// The series every DATA packet touches, looked up once: a family lookup hashes its labels and
/// takes a lock, about 1.5% of a round trip's CPU.
struct HotSeries {
    data_to_agent: Counter,
    data_from_agent: Counter,
    bytes_to_endpoint: Counter,
    bytes_from_endpoint: Counter,
}

impl HotSeries {
    fn new(
        packets: &Family<PacketLabels, Counter>,
        bytes: &Family<DirectionLabel, Counter>,
    ) -> Self {
        let data = |segment| {
            packets
                .get_or_create(&PacketLabels {
                    segment,
                    packet_type: "DATA",
                })
                .clone()
        };
        let direction = |direction| bytes.get_or_create(&DirectionLabel { direction }).clone();
        HotSeries {
            data_to_agent: data("to_agent"),
            data_from_agent: data("from_agent"),
            bytes_to_endpoint: direction("to_endpoint"),
            bytes_from_endpoint: direction("from_endpoint"),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let packets = Family::default();
        let bytes = Family::default();
        let metrics = Metrics {
            registry: Registry::default(),
            dial_duration: Histogram::new([0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0]),
            open_server_connections: Gauge::default(),
            known_server_count: Gauge::default(),
            open_endpoint_connections: Gauge::default(),
            queue_full: Counter::default(),
            stream_pauses: Counter::default(),
            stream_paused_seconds: Counter::default(),
            stalled_closes: Counter::default(),
            dial_failures: Family::default(),
            dial_refused: Family::default(),
            connect_failures: Family::default(),
            server_failures: Family::default(),
            rejected: Family::default(),
            stream_errors: Family::default(),
            lease_lists: Family::default(),
            lease_watches: Family::default(),
            lease_list_latency: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0])
            }),
            hot: HotSeries::new(&packets, &bytes),
            packets,
            bytes,
        };
        // Registered clones share their values with the fields.
        let mut registry = Registry::default();
        {
            let upstream = registry.sub_registry_with_prefix("konnectivity_network_proxy_agent");
            upstream.register(
                "dial_duration_seconds",
                "Latency of successful endpoint dials",
                metrics.dial_duration.clone(),
            );
            upstream.register(
                "endpoint_dial_failure",
                "Endpoint dial failures by reason",
                metrics.dial_failures.clone(),
            );
            upstream.register(
                "server_connection_failure_count",
                "Server stream failures by direction",
                metrics.server_failures.clone(),
            );
            upstream.register(
                "open_server_connections",
                "Server streams held",
                metrics.open_server_connections.clone(),
            );
            upstream.register(
                "lease_lists",
                "Server Lease lists by HTTP status and reason",
                metrics.lease_lists.clone(),
            );
            upstream.register(
                "lease_watches",
                "Server Lease watches started, by HTTP status and reason",
                metrics.lease_watches.clone(),
            );
            upstream.register(
                "lease_list_latency_seconds",
                "Latency of server Lease lists",
                metrics.lease_list_latency.clone(),
            );
            upstream.register(
                "known_server_count",
                "Server replicas the agent aims to hold streams to",
                metrics.known_server_count.clone(),
            );
            upstream.register(
                "open_endpoint_connections",
                "Tunnelled connections open to local destinations",
                metrics.open_endpoint_connections.clone(),
            );
            upstream.register(
                "stream_packets",
                "Packets by direction and type",
                metrics.packets.clone(),
            );
            upstream.register(
                "stream_errors",
                "gRPC stream errors by segment, status code and packet type",
                metrics.stream_errors.clone(),
            );
        }
        {
            let ours = registry.sub_registry_with_prefix("tether_agent");
            ours.register(
                "queue_full",
                "Connections closed because a flow-controlled server sent past their window",
                metrics.queue_full.clone(),
            );
            ours.register(
                "stream_pauses",
                "Times a server stream without flow control was held because destinations fell behind",
                metrics.stream_pauses.clone(),
            );
            ours.register(
                "stream_paused_seconds",
                "Time server streams without flow control spent held for slow destinations",
                metrics.stream_paused_seconds.clone(),
            );
            ours.register(
                "stalled_closes",
                "Connections closed because their destination read nothing for --stall-timeout while its stream was held, or after the server had closed them",
                metrics.stalled_closes.clone(),
            );
            ours.register(
                "server_connect_failures",
                "Failed attempts to open a proxy-server stream, by reason: unreachable, a TLS failure (peer_certificate_expired, peer_certificate_not_yet_valid, peer_certificate_unknown_ca, peer_certificate_wrong_name, our_certificate_expired, our_certificate_unknown_ca, our_certificate_refused, peer_requires_certificate, plaintext_peer, other), unauthenticated, permission_denied, refused, headers_timeout, bad_headers, tls_material, token_file, bad_request",
                metrics.connect_failures.clone(),
            );
            ours.register(
                "dial_refused",
                "Dials refused before dialling, by reason (draining, limit, protocol)",
                metrics.dial_refused.clone(),
            );
            ours.register(
                "bytes",
                "Bytes relayed, by direction (to_endpoint, from_endpoint)",
                metrics.bytes.clone(),
            );
            ours.register(
                "rejected",
                "Anomalous packets from servers, by reason",
                metrics.rejected.clone(),
            );
        }
        registry.register_collector(Box::new(tether_runtime::process_metrics::ProcessCollector));
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Exports the XDP guard's counters, read from the kernel at each scrape.
    pub fn register_dial_policy(&mut self, hooks: Arc<Mutex<DialHooks>>, policy: &DialPolicy) {
        let decision = |allow: bool| if allow { "allow" } else { "deny" };
        let mut rules: Vec<(String, &'static str)> = policy
            .rules()
            .iter()
            .map(|r| (r.to_string(), decision(r.action == Action::Allow)))
            .collect();
        rules.push((
            "no rule matched".to_owned(),
            decision(!policy.denies_by_default()),
        ));
        self.registry
            .register_collector(Box::new(DialPolicyCollector { hooks, rules }));
    }

    pub fn register_guard(&mut self, counters: Counters) {
        self.registry
            .register_collector(Box::new(GuardCollector { counters }));
    }

    pub fn dial_failure(&self, reason: &'static str) {
        self.dial_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn dial_refused(&self, reason: &'static str) {
        self.dial_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// One Lease list: its HTTP status (0 when none came back), reason and latency.
    pub fn lease_list(&self, status: u16, reason: &str, took: std::time::Duration) {
        self.lease_lists
            .get_or_create(&HttpCallLabels {
                http_response_code: status.to_string(),
                reason: reason.to_owned(),
            })
            .inc();
        self.lease_list_latency
            .get_or_create(&HttpCodeLabel {
                http_response_code: status.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn lease_watch(&self, status: u16, reason: &str) {
        self.lease_watches
            .get_or_create(&HttpCallLabels {
                http_response_code: status.to_string(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn connect_failure(&self, reason: &'static str) {
        self.connect_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn server_failure(&self, direction: &'static str) {
        self.server_failures
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    /// The server stream failed while receiving (`packet_type` is `Unknown`, as upstream's).
    pub fn stream_error(&self, segment: &'static str, code: tonic::Code) {
        self.stream_errors
            .get_or_create(&StreamErrorLabels {
                segment,
                code: tether_proto::grpc_code_name(code),
                packet_type: "Unknown",
            })
            .inc();
    }

    pub fn packet(&self, segment: &'static str, packet_type: &'static str) {
        match (segment, packet_type) {
            ("to_agent", "DATA") => self.hot.data_to_agent.inc(),
            ("from_agent", "DATA") => self.hot.data_from_agent.inc(),
            _ => self
                .packets
                .get_or_create(&PacketLabels {
                    segment,
                    packet_type,
                })
                .inc(),
        };
    }

    /// Bytes the agent wrote to destinations.
    pub fn bytes_to_endpoint(&self, n: usize) {
        self.hot
            .bytes_to_endpoint
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Bytes the agent read from destinations.
    pub fn bytes_from_endpoint(&self, n: usize) {
        self.hot
            .bytes_from_endpoint
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

type CounterField = fn(&KernelCounter) -> u64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DialRuleLabels {
    rule: String,
    decision: &'static str,
}

/// The dial hooks count per rule in a per-CPU kernel map; summed at scrape time.
struct DialPolicyCollector {
    hooks: Arc<Mutex<DialHooks>>,
    /// Each rule's text and decision, in the hooks' order, then the fallback's.
    rules: Vec<(String, &'static str)>,
}

impl std::fmt::Debug for DialPolicyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialPolicyCollector")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Collector for DialPolicyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hits = match self
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .hits()
        {
            Ok(hits) => hits,
            Err(err) => {
                tracing::warn!(error = %tether_runtime::error_chain(&err), "cannot read the dial policy's counters");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "tether_agent_dial_policy_decisions",
            "connect() and sendmsg() calls of the agent's cgroup judged in the kernel, by the rule that decided",
            None,
            MetricType::Counter,
        )?;
        let fallback = hits.last().copied().unwrap_or(0);
        let per_rule = hits
            .iter()
            .take(self.rules.len().saturating_sub(1))
            .copied();
        for ((rule, decision), count) in self.rules.iter().zip(per_rule.chain([fallback])) {
            let labels = DialRuleLabels {
                rule: rule.clone(),
                decision,
            };
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        let services = self
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .service_hits();
        let services = match services {
            Ok(services) => services,
            Err(err) => {
                tracing::warn!(error = %tether_runtime::error_chain(&err), "cannot read the Services' counters");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "tether_agent_service_connects",
            "connect() calls to a Service address steered to one of its backends in the kernel",
            None,
            MetricType::Counter,
        )?;
        for (service, count) in services {
            let labels = ServiceLabels {
                service: service.to_string(),
            };
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        let not_steered = self
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .not_steered();
        ConstGauge::new(i64::try_from(not_steered).unwrap_or(i64::MAX)).encode(
            encoder.encode_descriptor(
                "tether_agent_services_not_steered",
                "Services of the current service map that the kernel hooks cannot hold (more than 4096 Services or 8192 backends), so are not steered",
                None,
                MetricType::Gauge,
            )?,
        )?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// The guard counts in per-CPU kernel maps; summing them at scrape time costs nothing per packet.
#[derive(Debug)]
struct GuardCollector {
    counters: Counters,
}

impl Collector for GuardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = match self.counters.read() {
            Ok(counts) => counts,
            Err(err) => {
                tracing::warn!(error = %tether_runtime::error_chain(&err), "cannot read the guard's counters");
                return Ok(());
            }
        };
        let crate::guard_program::Counts {
            totals,
            per_interface,
        } = counts;
        let metrics: [(&str, &str, CounterField); 2] = [
            (
                "tether_agent_guard_packets",
                "Packets the XDP guard judged, by reason and action (in monitor mode, what it would drop is counted as pass)",
                |c| c.packets,
            ),
            (
                "tether_agent_guard_bytes",
                "Bytes the XDP guard judged, by reason and action",
                |c| c.bytes,
            ),
        ];
        for (name, help, value) in metrics {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for count in &totals {
                for (action, counter) in [("pass", &count.passed), ("drop", &count.dropped)] {
                    let labels = GuardLabels {
                        reason: count.reason.label(),
                        action,
                    };
                    ConstCounter::new(value(counter)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "tether_agent_guard_interface_packets",
            "Packets the XDP guard dropped, or in monitor mode would drop (action pass), by interface and reason",
            None,
            MetricType::Counter,
        )?;
        for interface in &per_interface {
            for count in &interface.counts {
                for (action, counter) in [("pass", &count.passed), ("drop", &count.dropped)] {
                    let labels = InterfaceGuardLabels {
                        interface: interface.interface.clone(),
                        reason: count.reason.label(),
                        action,
                    };
                    ConstCounter::new(counter.packets).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
