//! `cargo xtask bench ha`: three servers and N real agent processes on loopback, through a
//! rolling restart of the servers, for each way of reaching them:
//!
//! - `tether, addresses`: tether servers on 127.0.0.1, .2 and .3, tether agents given all three
//!   (`--server-addresses=each`);
//! - `tether, balancer`: tether servers with `--server-count=3` behind a round-robin TCP
//!   balancer, tether agents through it;
//! - `upstream, balancer`: the same with upstream's server and agent (with --upstream-bin).
//!
//! Each agent claims its own address (127.0.1.i) and serves it, and a dialler per server sends
//! node-specific dials (destHost) to random agents the whole time, as kube-apiserver's
//! `kubectl logs` would. Reported: the time until every agent holds every server; per restarted
//! server, the time from its start until every agent is back on it; and dials that failed on a
//! restarted server once it was up, and on the servers that stayed up.
//!
//! Command line: `ha_bench [--agents N] [--upstream-bin DIR]`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tether_tests::cluster::{Mode, Transport};
use tether_tests::frontend::{GrpcTunnel, Target, grpc_client};
use tether_tests::peers::{self, Impl, Peer, ServerPorts};
use tether_tests::pki::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, PartialEq)]
enum Reach {
    Addresses,
    Balancer,
}

struct Scenario {
    name: &'static str,
    imp: Impl,
    reach: Reach,
}

/// Dials sent through one server, counted by when they happened.
#[derive(Default)]
struct Dials {
    ok: AtomicUsize,
    /// Failed while the server was up: an agent was missing or the tunnel broke.
    failed_up: AtomicUsize,
    /// Refused because the server itself was down (its socket gone): not an agent's absence.
    server_down: AtomicUsize,
    up: AtomicBool,
}

const SERVERS: usize = 3;

fn agent_address(i: usize) -> String {
    format!("127.0.1.{}", i + 1)
}

async fn echo_listeners(n: usize) -> Result<u16> {
    // One port for all: agent i's destination is 127.0.1.i on it.
    let first = tokio::net::TcpListener::bind((agent_address(0), 0)).await?;
    let port = first.local_addr()?.port();
    let mut listeners = vec![first];
    for i in 1..n {
        listeners.push(tokio::net::TcpListener::bind((agent_address(i), port)).await?);
    }
    for listener in listeners {
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(port)
}

fn server(scenario: &Scenario, pki: &Pki, i: usize, ports: ServerPorts) -> Result<Peer> {
    let mut extra = vec![
        format!("--server-id=server-{i}"),
        "--proxy-strategies=destHost".to_owned(),
    ];
    match scenario.reach {
        Reach::Addresses => extra.push(format!("--agent-bind-address=127.0.0.{}", i + 1)),
        Reach::Balancer => extra.push(format!("--server-count={SERVERS}")),
    }
    peers::server(
        &scenario.imp,
        pki,
        Mode::Grpc,
        Transport::Uds,
        &pki.dir().join(format!("s{i}.sock")),
        ports,
        &extra,
    )
}

fn ready_backends(server: &Peer) -> Option<f64> {
    peers::metric(
        server.health_port,
        "konnectivity_network_proxy_server_ready_backend_connections ",
    )
}

/// Waits until `server` counts `n` agents; the time it took from `since`.
async fn all_back(server: &Peer, n: usize, since: Instant, limit: Duration) -> Option<Duration> {
    while since.elapsed() < limit {
        if ready_backends(server).is_some_and(|v| v >= n as f64) {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn dialler(
    target: Target,
    n: usize,
    echo_port: u16,
    dials: Arc<Dials>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let address = format!("{}:{echo_port}", agent_address(rand::random_range(0..n)));
        let outcome = async {
            let mut client = grpc_client(&target).await?;
            match GrpcTunnel::dial(&mut client, &address).await? {
                Ok(tunnel) => {
                    tunnel.close().await?;
                    Ok::<bool, anyhow::Error>(true)
                }
                Err(_) => Ok(false),
            }
        };
        let up = dials.up.load(Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(10), outcome).await {
            Ok(Ok(true)) => {
                dials.ok.fetch_add(1, Ordering::Relaxed);
            }
            _ if !up || !dials.up.load(Ordering::Relaxed) => {
                dials.server_down.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                dials.failed_up.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Outcome {
    connect_all: Duration,
    back: Vec<Option<Duration>>,
    failed_on_restarted: usize,
    dials_on_restarted: usize,
    failed_on_others: usize,
    dials_on_others: usize,
}

async fn run(scenario: &Scenario, n: usize, echo_port: u16) -> Result<Outcome> {
    let pki = Pki::new(&["127.0.0.2", "127.0.0.3"])?;
    let agent_port = peers::free_port()?;
    let ports: Vec<ServerPorts> = (0..SERVERS)
        .map(|_| -> Result<ServerPorts> {
            Ok(match scenario.reach {
                Reach::Addresses => ServerPorts {
                    agent: agent_port,
                    ..ServerPorts::free()?
                },
                Reach::Balancer => ServerPorts::free()?,
            })
        })
        .collect::<Result<_>>()?;
    let mut servers: Vec<Peer> = (0..SERVERS)
        .map(|i| server(scenario, &pki, i, ports[i]))
        .collect::<Result<_>>()?;
    let (dial_port, hosts) = match scenario.reach {
        Reach::Addresses => (
            agent_port,
            vec![
                "--proxy-server-host=127.0.0.1,127.0.0.2,127.0.0.3".to_owned(),
                "--server-addresses=each".to_owned(),
            ],
        ),
        Reach::Balancer => {
            let lb = peers::balancer(&ports).await;
            (lb.port(), Vec::new())
        }
    };
    let started = Instant::now();
    let mut agents = Vec::new();
    for i in 0..n {
        let mut extra = hosts.clone();
        extra.extend([
            format!("--agent-id=agent-{i}"),
            format!("--agent-identifiers=ipv4={}", agent_address(i)),
            // Upstream's defaults, for both implementations.
            "--sync-interval=1s".to_owned(),
            "--sync-interval-cap=10s".to_owned(),
        ]);
        agents.push(peers::agent(&scenario.imp, &pki, dial_port, &extra)?);
    }
    let mut connect_all = Duration::ZERO;
    for server in &servers {
        connect_all = connect_all.max(
            all_back(server, n, started, Duration::from_secs(300))
                .await
                .context("not every agent reached every server")?,
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let dials: Vec<Arc<Dials>> = (0..SERVERS).map(|_| Arc::new(Dials::default())).collect();
    let mut diallers = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        dials[i].up.store(true, Ordering::Relaxed);
        let target = server.target.clone().context("no frontend")?;
        diallers.push(tokio::spawn(dialler(
            target,
            n,
            echo_port,
            dials[i].clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut back = Vec::new();
    let mut failed_on_restarted = 0;
    let mut dials_on_restarted = 0;
    for i in 0..SERVERS {
        let before: Vec<(usize, usize)> = dials
            .iter()
            .map(|d| {
                (
                    d.failed_up.load(Ordering::Relaxed),
                    d.ok.load(Ordering::Relaxed) + d.failed_up.load(Ordering::Relaxed),
                )
            })
            .collect();
        dials[i].up.store(false, Ordering::Relaxed);
        let old = servers.remove(i);
        old.logged
            .process
            .signal(nix::sys::signal::Signal::SIGTERM)?;
        let mut old = old;
        let _ = old.logged.process.wait_timeout(Duration::from_secs(30));
        drop(old);
        let restarted = Instant::now();
        servers.insert(i, server(scenario, &pki, i, ports[i])?);
        dials[i].up.store(true, Ordering::Relaxed);
        back.push(all_back(&servers[i], n, restarted, Duration::from_secs(60)).await);
        // Let the dialler see the settled server too.
        tokio::time::sleep(Duration::from_secs(3)).await;
        failed_on_restarted += dials[i].failed_up.load(Ordering::Relaxed) - before[i].0;
        dials_on_restarted += dials[i].ok.load(Ordering::Relaxed)
            + dials[i].failed_up.load(Ordering::Relaxed)
            - before[i].1;
    }
    stop.store(true, Ordering::Relaxed);
    for dialler in diallers {
        let _ = dialler.await;
    }
    // Failures on the servers that stayed up, over all restarts: every failure outside the
    // restarted server's own window.
    let total_failed: usize = dials
        .iter()
        .map(|d| d.failed_up.load(Ordering::Relaxed))
        .sum();
    let total: usize = dials
        .iter()
        .map(|d| d.ok.load(Ordering::Relaxed) + d.failed_up.load(Ordering::Relaxed))
        .sum();
    drop(agents);
    drop(servers);
    Ok(Outcome {
        connect_all,
        back,
        failed_on_restarted,
        dials_on_restarted,
        failed_on_others: total_failed - failed_on_restarted,
        dials_on_others: total - dials_on_restarted,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut n = 40;
    let mut upstream: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agents" => n = args.next().context("--agents N")?.parse()?,
            "--upstream-bin" => upstream = Some(args.next().context("--upstream-bin DIR")?.into()),
            other => bail!(
                "unknown argument {other:?}; usage: ha_bench [--agents N] [--upstream-bin DIR]"
            ),
        }
    }
    if n == 0 || n > 250 {
        bail!("--agents takes 1 to 250 (one loopback address each)");
    }
    let echo_port = echo_listeners(n).await?;
    let mut scenarios = vec![
        Scenario {
            name: "tether, addresses",
            imp: Impl::Tether,
            reach: Reach::Addresses,
        },
        Scenario {
            name: "tether, balancer",
            imp: Impl::Tether,
            reach: Reach::Balancer,
        },
    ];
    if let Some(dir) = upstream {
        scenarios.push(Scenario {
            name: "upstream, balancer",
            imp: Impl::Upstream(dir),
            reach: Reach::Balancer,
        });
    }
    println!(
        "ha bench: 3 servers, {n} agents, a rolling restart (SIGTERM, start again) of each server in turn"
    );
    println!(
        "| | all agents on all servers (s) | restarted server back to all agents (s), each restart | dials failed on the restarted server once up | dials failed on servers that stayed up |"
    );
    println!("|---|---|---|---|---|");
    for scenario in &scenarios {
        let outcome = run(scenario, n, echo_port).await?;
        let back: Vec<String> = outcome
            .back
            .iter()
            .map(|b| b.map_or_else(|| "never".to_owned(), |d| format!("{:.2}", d.as_secs_f64())))
            .collect();
        println!(
            "| {} | {:.1} | {} | {} of {} | {} of {} |",
            scenario.name,
            outcome.connect_all.as_secs_f64(),
            back.join(", "),
            outcome.failed_on_restarted,
            outcome.dials_on_restarted,
            outcome.failed_on_others,
            outcome.dials_on_others,
        );
    }
    Ok(())
}
