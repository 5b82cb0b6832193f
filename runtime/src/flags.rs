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
    /// Once the process is up (every port bound; for the agent, the guard and dial policy in
    /// place too), write the address each listener is bound to in this file, as one JSON
    /// object such as {"health":"127.0.0.1:8093",...}. With a port of 0 the kernel picks one,
    /// and this is how a supervisor or a test learns which. The file appears whole, never
    /// half-written.
    #[arg(
        long,
        env = "TETHER_LISTEN_ADDRESSES_FILE",
        value_name = "PATH",
        help_heading = "Operations"
    )]
    pub listen_addresses_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub klog: Klog,
}

/// klog's flags. Manifests written for upstream pass them, so they are accepted and do what
/// klog does with them: `--v`, and where logs go (`--logtostderr`, `--log-file`,
/// `--log-file-max-size`, `--alsologtostderr`, `--stderrthreshold`). The rest only shape klog's
/// own line format and are accepted without effect.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "klog compatibility")]
pub struct Klog {
    /// Log verbosity: 0-1 info, 2-4 debug, 5+ trace (RUST_LOG overrides). `-v=4` works too,
    /// as pflag gives one-letter klog flags a short form.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub v: Option<u8>,
    /// Log to stderr (the default) instead of --log-file.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub logtostderr: Option<bool>,
    /// With --logtostderr=false: also copy every line to stderr.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub alsologtostderr: Option<bool>,
    /// Not supported (klog's per-severity file names); use --log-file.
    #[arg(long, hide = true)]
    pub log_dir: Option<String>,
    /// With --logtostderr=false: append logs to this file (no effect otherwise, as in klog).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<String>,
    /// Megabytes --log-file may grow to before it is started afresh; 0 = unlimited.
    #[arg(long, value_name = "MB")]
    pub log_file_max_size: Option<u64>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub skip_headers: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub skip_log_headers: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub add_dir_header: Option<bool>,
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub one_output: Option<bool>,
    /// With --logtostderr=false: lines at or above this severity (INFO, WARNING, ERROR, FATAL
    /// or 0-3) also go to stderr; default ERROR.
    #[arg(long, value_name = "SEVERITY")]
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

/// Where log lines go, as klog's flags ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOutput {
    /// Everything to stderr. `ignored_file` is a --log-file that klog, too, would not use.
    Stderr { ignored_file: Option<String> },
    /// Appended to `path`; lines at `stderr_from` or more severe are copied to stderr.
    File {
        path: String,
        /// Bytes the file may hold before it is started afresh (klog's rotation of a named
        /// file); `None` = unlimited.
        max_bytes: Option<u64>,
        stderr_from: tracing::Level,
    },
}

/// klog's default --log-file-max-size, in megabytes.
const KLOG_MAX_SIZE_MB: u64 = 1800;

impl Klog {
    /// The tracing filter `--v` asks for, or `fallback`.
    pub fn filter(&self, fallback: &'static str) -> &'static str {
        self.v
            .map(crate::telemetry::level_for_verbosity)
            .unwrap_or(fallback)
    }

    /// Where logs go. Combinations klog would act on that tether cannot honour are refused.
    pub fn output(&self) -> Result<LogOutput, ConfigError> {
        if self.logtostderr.unwrap_or(true) {
            return Ok(LogOutput::Stderr {
                ignored_file: self.log_file.clone().filter(|f| !f.is_empty()),
            });
        }
        if self.log_dir.as_deref().is_some_and(|d| !d.is_empty()) {
            return Err(ConfigError::Unsupported {
                flag: "log-dir",
                why: "klog's per-severity files are not written; use --log-file",
            });
        }
        let Some(path) = self.log_file.clone().filter(|f| !f.is_empty()) else {
            return Err(ConfigError::Required {
                flag: "log-file",
                why: " with --logtostderr=false (or leave --logtostderr at true)",
            });
        };
        let stderr_from = if self.alsologtostderr.unwrap_or(false) {
            tracing::Level::TRACE
        } else {
            match self.stderrthreshold.as_deref().unwrap_or("ERROR") {
                "INFO" | "info" | "0" => tracing::Level::INFO,
                "WARNING" | "warning" | "1" => tracing::Level::WARN,
                "ERROR" | "error" | "2" | "FATAL" | "fatal" | "3" => tracing::Level::ERROR,
                other => {
                    return Err(ConfigError::Invalid {
                        flag: "stderrthreshold",
                        value: other.to_owned(),
                        why: "use INFO, WARNING, ERROR or FATAL (or 0-3)".into(),
                    });
                }
            }
        };
        let megabytes = self.log_file_max_size.unwrap_or(KLOG_MAX_SIZE_MB);
        Ok(LogOutput::File {
            path,
            max_bytes: (megabytes > 0).then(|| megabytes.saturating_mul(1 << 20)),
            stderr_from,
        })
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

    fn klog(args: &[&str]) -> Klog {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            klog: Klog,
        }
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        <Cli as clap::Parser>::parse_from(argv).klog
    }

    #[test]
    fn klog_flags_choose_the_output_as_klog_does() {
        assert_eq!(klog(&["-v=4"]).v, Some(4));
        assert_eq!(klog(&["-v", "2"]).v, Some(2));
        assert_eq!(
            klog(&["--log-file=/var/log/x.log"]).output().unwrap(),
            LogOutput::Stderr {
                ignored_file: Some("/var/log/x.log".into())
            }
        );
        assert_eq!(
            klog(&[
                "--logtostderr=false",
                "--log-file=/l",
                "--log-file-max-size=0"
            ])
            .output()
            .unwrap(),
            LogOutput::File {
                path: "/l".into(),
                max_bytes: None,
                stderr_from: tracing::Level::ERROR
            }
        );
        assert_eq!(
            klog(&["--logtostderr=false", "--log-file=/l", "--alsologtostderr"])
                .output()
                .unwrap(),
            LogOutput::File {
                path: "/l".into(),
                max_bytes: Some(1800 << 20),
                stderr_from: tracing::Level::TRACE
            }
        );
        assert!(matches!(
            klog(&["--logtostderr=false"]).output(),
            Err(ConfigError::Required {
                flag: "log-file",
                ..
            })
        ));
        assert!(matches!(
            klog(&["--logtostderr=false", "--log-dir=/var/log"]).output(),
            Err(ConfigError::Unsupported {
                flag: "log-dir",
                ..
            })
        ));
    }

    #[test]
    fn parses_go_booleans() {
        assert_eq!(go_bool("True"), Ok(true));
        assert_eq!(go_bool("0"), Ok(false));
        assert!(go_bool("yes").is_err());
    }
}
