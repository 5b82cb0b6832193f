//! The `process_*` metrics every Prometheus client library exports (Go's registry does for
//! upstream's binaries, and node dashboards chart them): CPU seconds, resident and virtual
//! memory and its limit, open and maximum file descriptors, start time, and the bytes the
//! process's network namespace moved. Read from `/proc` at scrape time, with `tether_tasks`, the
//! async runtime's live tasks, which is what a leak of connections shows first.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self/stat` and friends say about this process.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: f64,
    max_virtual_bytes: f64,
    network_receive_bytes: f64,
    network_transmit_bytes: f64,
}

/// Fields of `/proc/<pid>/stat` after the command name, numbered from 3 as in proc(5).
fn stat_field(after_comm: &[&str], number: usize) -> Option<f64> {
    after_comm.get(number.checked_sub(3)?)?.parse().ok()
}

fn parse(stat: &str, boot_time: f64, ticks: f64, page: f64) -> Option<Sample> {
    // The command name may hold spaces and parentheses; it ends at the last ')'.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(Sample {
        cpu_seconds: (stat_field(&fields, 14)? + stat_field(&fields, 15)?) / ticks,
        start_time_seconds: boot_time + stat_field(&fields, 22)? / ticks,
        virtual_bytes: stat_field(&fields, 23)?,
        resident_bytes: stat_field(&fields, 24)? * page,
        ..Sample::default()
    })
}

/// Bytes received and sent by every interface of `/proc/<pid>/net/dev` (the process's network
/// namespace), as Go's collector sums them.
fn parse_net_dev(text: &str) -> (f64, f64) {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_once(':')?.1.split_whitespace().collect();
            Some((
                fields.first()?.parse::<f64>().ok()?,
                fields.get(8)?.parse::<f64>().ok()?,
            ))
        })
        .fold((0.0, 0.0), |(rx, tx), (r, t)| (rx + r, tx + t))
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn sample() -> Option<Sample> {
    // SAFETY: sysconf only reads system configuration.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut sample = parse(&stat, boot_time()?, ticks as f64, page as f64)?;
    sample.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    use nix::sys::resource::{Resource, getrlimit};
    sample.max_fds = getrlimit(Resource::RLIMIT_NOFILE).ok()?.0 as f64;
    // Unlimited reads as the largest u64, as Go's collector reports it.
    sample.max_virtual_bytes = getrlimit(Resource::RLIMIT_AS).ok()?.0 as f64;
    (sample.network_receive_bytes, sample.network_transmit_bytes) =
        parse_net_dev(&std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default());
    Some(sample)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sample) = sample() else {
            return Ok(());
        };
        let counters = [
            (
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                sample.cpu_seconds,
            ),
            (
                "process_network_receive_bytes",
                "Number of bytes received by the process over the network",
                sample.network_receive_bytes,
            ),
            (
                "process_network_transmit_bytes",
                "Number of bytes sent by the process over the network",
                sample.network_transmit_bytes,
            ),
        ];
        for (name, help, value) in counters {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                sample.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                sample.virtual_bytes,
            ),
            (
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes",
                sample.max_virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                sample.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                sample.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                sample.max_fds,
            ),
        ];
        let tasks = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_alive_tasks() as f64)
            .unwrap_or(0.0);
        let gauges = gauges.into_iter().chain([(
            "tether_tasks",
            "Tasks alive in the process's async runtime",
            tasks,
        )]);
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_stat_past_a_command_name_with_spaces() {
        let stat = "42 (tether (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 \
                    1000 1048576 300 18446744073709551615";
        let sample = parse(stat, 1_700_000_000.0, 100.0, 4096.0).unwrap();
        assert_eq!(sample.cpu_seconds, 3.0);
        assert_eq!(sample.start_time_seconds, 1_700_000_010.0);
        assert_eq!(sample.virtual_bytes, 1_048_576.0);
        assert_eq!(sample.resident_bytes, 300.0 * 4096.0);
    }

    #[test]
    fn sums_every_interface_of_net_dev() {
        let text = "Inter-|   Receive                            |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0:     500       5    0    0    0     0          0         0      200       2    0    0    0     0       0          0
";
        assert_eq!(parse_net_dev(text), (1500.0, 1200.0));
    }

    #[test]
    fn this_process_has_a_plausible_sample() {
        let sample = sample().unwrap();
        assert!(sample.resident_bytes > 0.0);
        assert!(sample.open_fds >= 3.0 && sample.open_fds <= sample.max_fds);
        assert!(sample.start_time_seconds > 1_600_000_000.0);
    }
}
