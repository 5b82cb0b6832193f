//! Logging: one `tracing` stack; the `log` records aya-log emits are bridged into it. Where
//! lines go follows klog's flags (stderr by default, or an appended `--log-file`).

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::flags::{ConfigError, LogOutput, Process};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Maps klog's `--v` verbosity onto a filter: 0–1 info, 2–4 debug, 5+ trace.
pub fn level_for_verbosity(v: u8) -> &'static str {
    match v {
        0 | 1 => "info",
        2..=4 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber as the process flags ask. `RUST_LOG` overrides `--v`.
pub fn init(process: &Process) -> Result<(), ConfigError> {
    let output = process.klog.output()?;
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(process.klog.filter("info")))
    };
    let _ = tracing_log::LogTracer::init();
    match output {
        LogOutput::Stderr { ignored_file } => {
            install(
                process.log_format,
                filter(),
                std::io::stderr,
                std::io::stderr().is_terminal(),
            );
            if let Some(file) = ignored_file {
                tracing::warn!(
                    log_file = file,
                    "--log-file has no effect while --logtostderr is true (as in klog); logging to stderr"
                );
            }
        }
        LogOutput::File {
            path,
            max_bytes,
            stderr_from,
        } => {
            let file = LogFile::open(&path, max_bytes).map_err(|err| ConfigError::Invalid {
                flag: "log-file",
                value: path.clone(),
                why: format!("cannot open it for appending: {err}"),
            })?;
            let writer = Arc::new(file).and(std::io::stderr.with_max_level(stderr_from));
            install(process.log_format, filter(), writer, false);
        }
    }
    Ok(())
}

fn install<W>(format: LogFormat, filter: EnvFilter, writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A log file opened for appending, started afresh once it would pass its size limit (what
/// klog does with a named `--log-file`).
pub struct LogFile {
    state: Mutex<(File, u64)>,
    max_bytes: Option<u64>,
}

impl LogFile {
    pub fn open(path: &str, max_bytes: Option<u64>) -> std::io::Result<Self> {
        let file = File::options().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            state: Mutex::new((file, size)),
            max_bytes,
        })
    }
}

impl Write for &LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (file, size) = &mut *state;
        if let Some(max) = self.max_bytes
            && *size > 0
            && *size + buf.len() as u64 > max
        {
            file.set_len(0)?;
            *size = 0;
        }
        let n = file.write(buf)?;
        *size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_file_is_appended_to_and_started_afresh_at_its_limit() {
        let dir = std::env::temp_dir().join(format!("tether-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.log");
        std::fs::write(&path, "earlier run\n").unwrap();
        let log = LogFile::open(path.to_str().unwrap(), Some(30)).unwrap();
        (&log).write_all(b"first line\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "earlier run\nfirst line\n"
        );
        (&log).write_all(b"second, past the limit\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "second, past the limit\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
