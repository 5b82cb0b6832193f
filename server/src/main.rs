use std::process::ExitCode;

use clap::Parser;
use tether_runtime::shutdown::{Signals, Step};
use tether_runtime::telemetry;
use tether_server::app;
use tether_server::config::{Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    let workers = args.process.worker_threads;
    match tether_runtime::runtime(workers) {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> ExitCode {
    telemetry::init(args.process.log_format, args.process.klog.filter("info"));
    tether_runtime::raise_fd_limit();
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(err) => {
            tracing::error!(error = %err, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::from_args(&args) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(
                "invalid configuration: {}",
                tether_runtime::error_chain(&err)
            );
            return ExitCode::from(2);
        }
    };
    let deadline = config.graceful_shutdown_timeout;
    let server = match app::start(config).await {
        Ok(server) => server,
        Err(err) => {
            tracing::error!("cannot start: {}", tether_runtime::error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    signals.next().await;
    tracing::info!(deadline = ?deadline, "shutting down: no new frontend connections; waiting for open tunnels");
    tokio::select! {
        left = server.drain(deadline) => {
            tracing::info!(closed_early = left, "shutdown complete");
            ExitCode::SUCCESS
        }
        Step::Stop | Step::Drain = signals.next() => {
            tracing::warn!("second signal: stopping now");
            ExitCode::FAILURE
        }
    }
}
