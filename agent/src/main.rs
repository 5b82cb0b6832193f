use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tether_agent::dataplane::Dataplane;
use tether_runtime::telemetry::{self, LogFormat};
use tokio::signal::unix::{SignalKind, signal};

/// tether-agent: guards a Kubernetes node so that the control plane reaches it only through
/// the Konnectivity tunnel.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Interface to attach the XDP guard to (repeatable).
    #[arg(
        long = "guard-interface",
        env = "TETHER_GUARD_INTERFACE",
        value_delimiter = ',',
        required = true
    )]
    guard_interfaces: Vec<String>,

    /// Log output format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (mut dataplane, logs) = Dataplane::load()?;
    for interface in &args.guard_interfaces {
        let mode = dataplane.attach(interface)?;
        tracing::info!(interface, mode = mode.label(), "XDP guard attached");
    }
    let log_task = tokio::spawn(logs.forward());

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    for (reason, counter) in dataplane.counters()? {
        tracing::info!(
            reason = reason.label(),
            packets = counter.packets,
            bytes = counter.bytes,
            "guard counters at shutdown"
        );
    }
    log_task.abort();
    Ok(())
}
