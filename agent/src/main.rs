use std::process::ExitCode;

use clap::Parser;
use tether_agent::app;
use tether_agent::config::{Args, Command, Config, GuardArgs};
use tether_agent::dataplane::{Dataplane, Policy};
use tether_runtime::shutdown::Signals;

fn main() -> ExitCode {
    let args = Args::parse();
    let process = args.run.process.clone();
    tether_runtime::main(&process, |signals| run(args, signals))
}

async fn run(args: Args, mut signals: Signals) -> ExitCode {
    if let Some(Command::Guard(guard)) = args.command {
        return match run_guard(guard, &mut signals).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!("{err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::from_args(&args.run) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(
                "invalid configuration: {}",
                tether_runtime::error_chain(&err)
            );
            return ExitCode::from(2);
        }
    };
    let deadline = config.drain_timeout;
    let agent = match app::start(config).await {
        Ok(agent) => agent,
        Err(err) => {
            tracing::error!("cannot start: {}", tether_runtime::error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    signals.next().await;
    tracing::info!(deadline = ?deadline, open = agent.clients.open_connections(), "draining: DRAIN sent, new connections refused");
    tokio::select! {
        left = agent.drain(deadline) => {
            if left > 0 {
                tracing::warn!(closed = left, "drain deadline reached; closing the remaining connections");
            }
            ExitCode::SUCCESS
        }
        _ = signals.next() => {
            tracing::warn!("second signal: stopping now");
            ExitCode::FAILURE
        }
    }
}

async fn run_guard(args: GuardArgs, signals: &mut Signals) -> anyhow::Result<()> {
    let (mut dataplane, logs) = Dataplane::load()?;
    dataplane.set_policy(&Policy {
        control_plane: args.control_plane.clone(),
        protected_ports: args.protected_ports.clone(),
        allowed: args.allowed.clone(),
    })?;
    let mode = tether_agent_common::Mode::from(args.guard_mode);
    dataplane.set_mode(mode)?;
    for interface in &args.interfaces {
        let attach = dataplane.attach(interface)?;
        tracing::info!(
            interface,
            attach = attach.label(),
            mode = mode.label(),
            control_plane = ?args.control_plane.iter().map(ToString::to_string).collect::<Vec<_>>(),
            protected_ports = ?args.protected_ports,
            allowed = ?args.allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "XDP guard attached"
        );
    }
    let log_task = tokio::spawn(logs.forward());
    signals.next().await;
    for counts in dataplane.counters()? {
        tracing::info!(
            reason = counts.reason.label(),
            passed = counts.passed.packets,
            dropped = counts.dropped.packets,
            "guard counters at shutdown"
        );
    }
    log_task.abort();
    Ok(())
}
