//! What a scrape of `/metrics` returns: the Prometheus text format (version 0.0.4), as
//! upstream's binaries serve it, and the counter type upstream's unsuffixed counters need.
//!
//! prometheus-client writes OpenMetrics, where a counter family `x` shows samples `x_total`.
//! Upstream names some counters without that suffix (`dial_failure_count`) and serves the
//! older text format, in which the sample keeps the counter's name: dashboards and alerts
//! query those names. So the registry is written as OpenMetrics and then restated in the text
//! format: each counter's family takes its samples' name, and the OpenMetrics-only lines
//! (`# UNIT`, `# EOF`, `_created`) go.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// The media type of [`text`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A counter exported under its own name, with no `_total` added: for upstream's counters
/// whose names do not end in it.
#[derive(Clone, Debug, Default)]
pub struct NamedCounter(Arc<AtomicU64>);

impl NamedCounter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for NamedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for NamedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // A gauge's sample line is the bare name and value, which is what the text format
        // shows for a counter.
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The registry in the Prometheus text format. Families without samples (a labelled family
/// nothing has touched yet) are left out, as Go's client leaves them out.
pub fn text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode(&mut openmetrics, registry)?;
    Ok(restate(&openmetrics))
}

/// One family as OpenMetrics wrote it.
#[derive(Default)]
struct Family<'a> {
    name: &'a str,
    help: Option<&'a str>,
    kind: &'a str,
    samples: Vec<&'a str>,
}

fn sample_name(line: &str) -> &str {
    line.split(['{', ' ']).next().unwrap_or(line)
}

fn restate(openmetrics: &str) -> String {
    let mut families: Vec<Family> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name,
                help: Some(help),
                kind: "untyped",
                ..Family::default()
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            match families.last_mut() {
                Some(family) if family.name == name && family.samples.is_empty() => {
                    family.kind = kind;
                }
                _ => families.push(Family {
                    name,
                    kind,
                    ..Family::default()
                }),
            }
        } else if line.starts_with('#') {
            // `# UNIT` and `# EOF`: OpenMetrics only.
        } else if let Some(family) = families.last_mut() {
            family.samples.push(line);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for family in families {
        let created = format!("{}_created", family.name);
        let samples: Vec<&str> = family
            .samples
            .iter()
            .copied()
            .filter(|s| sample_name(s) != created)
            .collect();
        let Some(first) = samples.first() else {
            continue;
        };
        let (name, kind) = match family.kind {
            // A counter's samples carry `_total` unless it is a [`NamedCounter`].
            "counter" => (sample_name(first), "counter"),
            // The text format has no info type: the sample is a gauge of value 1.
            "info" => (sample_name(first), "gauge"),
            "unknown" => (family.name, "untyped"),
            kind => (family.name, kind),
        };
        if let Some(help) = family.help {
            out.push_str(&format!("# HELP {name} {help}\n"));
        }
        out.push_str(&format!("# TYPE {name} {kind}\n"));
        for sample in samples {
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is how a failed check reports"
    )]

    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Reason {
        reason: &'static str,
    }

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_lines_go() {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("konnectivity_network_proxy_server");
        let failures = Family::<Reason, NamedCounter>::default();
        failures.get_or_create(&Reason { reason: "timeout" }).inc();
        failures.get_or_create(&Reason { reason: "timeout" }).inc();
        sub.register("dial_failure_count", "Failed dials", failures);
        let dials = Counter::<u64>::default();
        dials.inc();
        sub.register("dials", "Dials", dials);
        let open = Gauge::<i64>::default();
        open.set(3);
        sub.register("open", "Open", open);
        let untouched = Family::<Reason, Counter>::default();
        sub.register("untouched", "Nothing yet", untouched);
        let latency = Histogram::new([0.5]);
        latency.observe(0.1);
        sub.register("seconds", "Latency", latency);

        let page = text(&registry).unwrap();
        let p = "konnectivity_network_proxy_server";
        assert_eq!(
            page,
            format!(
                "# HELP {p}_dial_failure_count Failed dials.\n\
                 # TYPE {p}_dial_failure_count counter\n\
                 {p}_dial_failure_count{{reason=\"timeout\"}} 2\n\
                 # HELP {p}_dials_total Dials.\n\
                 # TYPE {p}_dials_total counter\n\
                 {p}_dials_total 1\n\
                 # HELP {p}_open Open.\n\
                 # TYPE {p}_open gauge\n\
                 {p}_open 3\n\
                 # HELP {p}_seconds Latency.\n\
                 # TYPE {p}_seconds histogram\n\
                 {p}_seconds_sum 0.1\n\
                 {p}_seconds_count 1\n\
                 {p}_seconds_bucket{{le=\"0.5\"}} 1\n\
                 {p}_seconds_bucket{{le=\"+Inf\"}} 1\n"
            )
        );
    }
}
