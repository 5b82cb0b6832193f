use std::process::ExitCode;

use clap::Parser;
use tether_runtime::shutdown::Signals;
use tether_server::config::{Args, Command, Config};
use tether_server::{app, probe};

fn main() -> ExitCode {
    let args = Args::parse();
    let process = args.process.clone();
    tether_runtime::main(&process, |signals| run(args, signals))
}

async fn run(args: Args, mut signals: Signals) -> ExitCode {
    if let Some(Command::Probe(probe)) = &args.command {
        return match probe::run(probe).await {
            Ok(outcome) => {
                print!("{outcome}");
                ExitCode::from(outcome.exit_code())
            }
            Err(err) => {
                eprintln!("probe failed: {err:#}");
                ExitCode::from(2)
            }
        };
    }
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
    if let Some(path) = &args.process.listen_addresses_file {
        let frontend = match &server.frontend_addr {
            app::FrontendAddr::Tcp(addr) => addr.to_string(),
            app::FrontendAddr::Uds(path) => path.display().to_string(),
        };
        let addresses = [
            ("agent", server.agent_addr.to_string()),
            ("frontend", frontend),
            ("health", server.health_addr.to_string()),
            ("admin", server.admin_addr.to_string()),
        ];
        if let Err(err) = tether_runtime::listen_addresses::write(path, &addresses) {
            tracing::error!(file = %path.display(), error = %err, "--listen-addresses-file: cannot write it");
            return ExitCode::FAILURE;
        }
    }
    signals.next().await;
    tracing::info!(deadline = ?deadline, "shutting down: no new frontend connections; waiting for open connections");
    tokio::select! {
        left = server.drain(deadline) => {
            let running = server.tasks_left();
            if running > 0 {
                tracing::error!(tasks = running, "tasks still running at exit");
                return ExitCode::FAILURE;
            }
            tracing::info!(closed_early = left, "shutdown complete: every task ended");
            ExitCode::SUCCESS
        }
        _ = signals.next() => {
            tracing::warn!("second signal: stopping now");
            ExitCode::FAILURE
        }
    }
}
