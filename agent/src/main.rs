use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tether_agent::app;
use tether_agent::capabilities::{self, Needed};
use tether_agent::config::{Args, CheckArgs, Command, Config, DialPolicyCommand, GuardCommand};
use tether_agent::guard_program::{PinnedGuard, Pins, Status};
use tether_agent::kernel;
use tether_runtime::shutdown::Signals;

fn main() -> ExitCode {
    let args = Args::parse();
    let process = args.run.process.clone();
    tether_runtime::main(&process, |signals| run(args, signals))
}

async fn run(args: Args, mut signals: Signals) -> ExitCode {
    if let Some(Command::DialPolicy(DialPolicyCommand::Check(check))) = &args.command {
        return match dial_policy_check(check).await {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("dial-policy check: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Guard(command)) = args.command {
        let wait = matches!(&command, GuardCommand::Detach(detach) if detach.wait);
        if let Err(err) = guard_command(command) {
            tracing::error!("{}", tether_runtime::error_chain(err.as_ref()));
            return ExitCode::FAILURE;
        }
        if wait {
            signals.next().await;
        }
        return ExitCode::SUCCESS;
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
    // The guard is attached: from here on the agent parses what the network sends, and keeps
    // only what following interfaces needs.
    let keep: Vec<Needed> = if agent.guards() {
        capabilities::after_attach(kernel::running())
    } else {
        Vec::new()
    };
    if let Err(err) = capabilities::keep_only(&keep) {
        tracing::error!(
            "cannot give up capabilities: {}",
            tether_runtime::error_chain(&err)
        );
        return ExitCode::FAILURE;
    }
    tracing::info!(
        kept = ?keep.iter().map(|c| c.name).collect::<Vec<_>>(),
        "dropped every other capability on every thread; no_new_privs set"
    );
    if let Some(path) = &args.run.process.listen_addresses_file {
        let addresses = [
            ("health", agent.health_addr.to_string()),
            ("admin", agent.admin_addr.to_string()),
        ];
        if let Err(err) = tether_runtime::listen_addresses::write(path, &addresses) {
            tracing::error!(file = %path.display(), error = %err, "--listen-addresses-file: cannot write it");
            return ExitCode::FAILURE;
        }
    }
    signals.next().await;
    tracing::info!(deadline = ?deadline, open = agent.clients.open_connections(), "draining: DRAIN sent, new connections refused");
    tokio::select! {
        left = agent.drain(deadline) => {
            if left > 0 {
                tracing::warn!(closed = left, "drain deadline reached; closing the remaining connections");
            }
            agent.clients.leave(Duration::from_secs(1)).await;
            let left = agent.stop().await;
            if left > 0 {
                tracing::error!(tasks = left, "tasks still running at exit");
                return ExitCode::FAILURE;
            }
            tracing::info!("stopped: every task ended");
            ExitCode::SUCCESS
        }
        _ = signals.next() => {
            tracing::warn!("second signal: stopping now");
            ExitCode::FAILURE
        }
    }
}

/// Asks the running agent's admin port, so the answer is the live policy's.
async fn dial_policy_check(check: &CheckArgs) -> anyhow::Result<String> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = check.admin_server_port;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| {
            format!("no agent's admin port on 127.0.0.1:{port} (--admin-server-port)")
        })?;
    let target: String = form_urlencoded::byte_serialize(check.target.as_bytes()).collect();
    stream
        .write_all(
            format!("GET /dial-policy?check={target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the admin port's answer is not HTTP")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{}", body.trim());
    Ok(body.to_owned())
}

/// `guard status|detach`: works on the pins alone, so it runs beside an agent or without one.
fn guard_command(command: GuardCommand) -> anyhow::Result<()> {
    match command {
        GuardCommand::Status(args) => {
            let status = PinnedGuard::open(Pins::new(&args.bpffs_root))?.status()?;
            print!("{}", status_text(&args.bpffs_root, &status));
        }
        GuardCommand::Detach(args) => {
            let args = args.pins;
            let Some(interfaces) = Pins::new(&args.bpffs_root).detach()? else {
                println!(
                    "nothing pinned under {}: no guard to detach",
                    args.bpffs_root.display()
                );
                return Ok(());
            };
            println!(
                "guard detached from {} and its pins under {} removed",
                if interfaces.is_empty() {
                    "no interface".to_owned()
                } else {
                    interfaces.join(", ")
                },
                args.bpffs_root.display()
            );
        }
    }
    Ok(())
}

fn status_text(root: &std::path::Path, status: &Status) -> String {
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    fn strings<T: ToString>(items: &[T]) -> Vec<String> {
        items.iter().map(ToString::to_string).collect()
    }
    let interfaces = status
        .interfaces
        .iter()
        .map(|(name, program)| match program {
            Some(id) => format!("{name} (program {id})"),
            None => format!("{name} (link unreadable)"),
        })
        .collect();
    let fields = [
        ("bpffs root", root.display().to_string()),
        (
            "mode",
            status.mode.map_or("unknown", |m| m.label()).to_owned(),
        ),
        ("interfaces", list(interfaces)),
        (
            "control-plane CIDRs",
            list(strings(&status.policy.control_plane)),
        ),
        (
            "protected ports",
            list(strings(&status.policy.protected_ports)),
        ),
        ("allowed CIDRs", list(strings(&status.policy.allowed))),
        (
            "tunnels dropped",
            list(
                tether_agent_common::TUNNEL_PROTOCOLS
                    .iter()
                    .filter(|(p, _)| status.policy.tunnel_protocols.contains(p))
                    .map(|(_, name)| (*name).to_owned())
                    .chain(
                        status
                            .policy
                            .tunnel_ports
                            .iter()
                            .map(|port| format!("udp:{port}")),
                    )
                    .collect(),
            ),
        ),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&format!("{:<21}{value}\n", format!("{name}:")));
    }
    let mut row = |cells: [String; 5]| {
        let [reason, rest @ ..] = cells;
        out.push_str(&format!("{reason:<28}"));
        for cell in rest {
            out.push_str(&format!("{cell:>16}"));
        }
        out.push('\n');
    };
    row([
        "reason",
        "passed packets",
        "passed bytes",
        "dropped packets",
        "dropped bytes",
    ]
    .map(String::from));
    for count in &status.counters {
        row([
            count.reason.label().to_owned(),
            count.passed.packets.to_string(),
            count.passed.bytes.to_string(),
            count.dropped.packets.to_string(),
            count.dropped.bytes.to_string(),
        ]);
    }
    for interface in &status.per_interface {
        row([
            format!("on {}:", interface.interface),
            "would drop".into(),
            String::new(),
            "dropped".into(),
            String::new(),
        ]);
        for count in &interface.counts {
            row([
                format!("  {}", count.reason.label()),
                count.passed.packets.to_string(),
                count.passed.bytes.to_string(),
                count.dropped.packets.to_string(),
                count.dropped.bytes.to_string(),
            ]);
        }
    }
    out
}
