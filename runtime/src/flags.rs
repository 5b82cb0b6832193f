//! Command-line compatibility with upstream's Go binaries: pflag booleans and durations, and the
//! klog flags that existing manifests pass.

use std::time::Duration;

/// Go's `strconv.ParseBool`.
pub fn go_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{value:?} is not a boolean (use true or false)")),
    }
}

/// Go's `time.ParseDuration` (`300ms`, `1.5h`, `1h2m3s`; `0` alone is allowed).
pub fn go_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("{value:?} is not a duration (examples: 500ms, 5s, 1m30s, 1h)");
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = value;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(number_len);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// A command line that cannot run, with the flag it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} is not supported: {why}")]
    Unsupported {
        flag: &'static str,
        why: &'static str,
    },
    #[error("--{flag} is required{why}")]
    Required {
        flag: &'static str,
        why: &'static str,
    },
    #[error("--{flag}={value:?}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Upstream flags for features a binary does not have: the first one set to anything but an
/// "off" value is refused, naming the flag and why, instead of being silently ignored.
pub fn refuse_unsupported(
    flags: &[(&'static str, &Option<String>, &'static str)],
) -> Result<(), ConfigError> {
    for (flag, value, why) in flags {
        if value
            .as_deref()
            .is_some_and(|v| !matches!(v, "" | "false" | "False" | "FALSE" | "0" | "f" | "F"))
        {
            return Err(ConfigError::Unsupported { flag, why });
        }
    }
    Ok(())
}

/// How the process runs: flags both binaries share.
#[derive(clap::Args, Debug, Clone)]
pub struct Process {
    /// Log output format.
    #[arg(
        long,
        env = "TETHER_LOG_FORMAT",
        value_enum,
        default_value_t,
        help_heading = "Operations"
    )]
    pub log_format: crate::telemetry::LogFormat,
    /// Threads that move packets. One moves about 500 MiB/s through TLS on a modest core and
    /// keeps the process's CPU cost lowest; raise it only for unusually heavy traffic.
    #[arg(
        long,
        env = "TETHER_WORKER_THREADS",
        default_value_t = 1,
        help_heading = "Operations"
    )]
    pub worker_threads: usize,
    #[command(flatten)]
    pub klog: Klog,
}

/// klog's flags. Manifests written for upstream pass them, so they are accepted; only `--v`
/// changes anything (the log level). Output always goes to stderr, as `--logtostderr` asks.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "klog compatibility (accepted; only --v has an effect)")]
pub struct Klog {
    /// Log verbosity: 0-1 info, 2-4 debug, 5+ trace (RUST_LOG overrides).
    #[arg(long = "v", value_name = "LEVEL")]
    pub v: Option<u8>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub logtostderr: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub alsologtostderr: Option<bool>,
    #[arg(long, hide = true)]
    pub log_dir: Option<String>,
    #[arg(long, hide = true)]
    pub log_file: Option<String>,
    #[arg(long, hide = true)]
    pub log_file_max_size: Option<u64>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub skip_headers: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub skip_log_headers: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub add_dir_header: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub one_output: Option<bool>,
    #[arg(long, hide = true)]
    pub stderrthreshold: Option<String>,
    #[arg(long, hide = true)]
    pub alsologtostderrthreshold: Option<String>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub legacy_stderr_threshold_behavior: Option<bool>,
    #[arg(long, hide = true)]
    pub vmodule: Option<String>,
    #[arg(long, hide = true)]
    pub log_backtrace_at: Option<String>,
}

impl Klog {
    /// The tracing filter `--v` asks for, or `fallback`.
    pub fn filter(&self, fallback: &'static str) -> &'static str {
        self.v
            .map(crate::telemetry::level_for_verbosity)
            .unwrap_or(fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(go_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(go_duration("0"), Ok(Duration::ZERO));
        assert!(go_duration("5").is_err());
        assert!(go_duration("5x").is_err());
        assert!(go_duration("").is_err());
    }

    #[test]
    fn parses_go_booleans() {
        assert_eq!(go_bool("True"), Ok(true));
        assert_eq!(go_bool("0"), Ok(false));
        assert!(go_bool("yes").is_err());
    }
}
