//! What tens of thousands of tunnelled connections leave behind: after 20 000 of them, opened
//! and closed every way a destination can end one (clean closes, resets, and destinations that
//! never read and never close, which still hold their sockets when the counts are taken), the
//! agent and the server hold the file descriptors and async tasks they held before, and their
//! memory stays within a bound.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::{Target, http_connect};
use tether_tests::peers::metric;
use tether_tests::process::{open_fds, rss_kib, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 20_000;
const WARM_UP: usize = 1_000;
const WORKERS: usize = 64;
/// Growth of either process's resident memory the run may cause, past the warmed-up baseline
/// (allocator pools and caches that grew under 64 concurrent connections; a leak of even one
/// 4 KiB buffer per connection would pass 78 MiB).
const RSS_GROWTH_KIB: u64 = 24 * 1024;
/// Bytes written toward a destination that never reads; every [`BIG_EVERY`]th such client
/// writes [`BIG_UNREAD_BYTES`], more than the socket buffers between the agent and the
/// destination take (tcp_wmem allows 4 MiB), so that the agent's writer is still blocked when
/// the server closes the connection.
const UNREAD_BYTES: usize = 64 * 1024;
const BIG_UNREAD_BYTES: usize = 6 << 20;
const BIG_EVERY: usize = 256;

struct Destinations {
    echo: SocketAddr,
    reset: SocketAddr,
    never_reads: SocketAddr,
}

/// The connection `i`: a clean echo, a destination that resets at once, or one that never
/// reads while the client writes and then leaves.
async fn connection(target: &Target, to: &Destinations, i: usize) -> Result<()> {
    match i % 3 {
        0 => {
            let mut stream = match http_connect(target, &to.echo.to_string()).await? {
                Ok(stream) => stream,
                Err(response) => bail!("CONNECT to the echo server failed: {response}"),
            };
            let sent = [i as u8; 1024];
            stream.write_all(&sent).await?;
            let mut back = [0u8; 1024];
            stream.read_exact(&mut back).await?;
            if back != sent {
                bail!("echo returned other bytes");
            }
            stream.shutdown().await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
            if !rest.is_empty() {
                bail!("echo sent {} bytes after the half-close", rest.len());
            }
        }
        1 => {
            if let Ok(mut stream) = http_connect(target, &to.reset.to_string()).await? {
                let mut buf = [0u8; 64];
                // The reset reaches the client as EOF or an error; either ends it.
                let _ = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                    .await
                    .context("a reset destination's connection never ended")?;
            }
        }
        _ => {
            let mut stream = match http_connect(target, &to.never_reads.to_string()).await? {
                Ok(stream) => stream,
                Err(response) => bail!("CONNECT to the silent server failed: {response}"),
            };
            let len = if (i / 3).is_multiple_of(BIG_EVERY) {
                BIG_UNREAD_BYTES
            } else {
                UNREAD_BYTES
            };
            let unread = vec![0x5a; len];
            let _ =
                tokio::time::timeout(Duration::from_millis(500), stream.write_all(&unread)).await;
        }
    }
    Ok(())
}

async fn run(target: &Arc<Target>, to: &Arc<Destinations>, range: std::ops::Range<usize>) {
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (target, to) = (target.clone(), to.clone());
            let range = range.clone();
            tokio::spawn(async move {
                for i in range.skip(w).step_by(WORKERS) {
                    connection(&target, &to, i)
                        .await
                        .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    fds: usize,
    tasks: u64,
}

fn held(pid: u32, metrics_port: u16) -> Held {
    Held {
        fds: open_fds(pid),
        tasks: metric(metrics_port, "tether_tasks ").expect("tether_tasks on /metrics") as u64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_connections_leave_nothing_behind() {
    // The clients of never-reading destinations leave after writing; their half-closed
    // connections end once idle for the half-close timeout, then the agent's writers give up
    // after its stall timeout.
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--half-close-timeout=1s"],
        &["--stall-timeout=1s"],
    )
    .unwrap();
    let to = Arc::new(Destinations {
        echo: destination::echo().await,
        reset: destination::resetting().await,
        never_reads: destination::never_reads().await,
    });
    let target = Arc::new(cluster.target.clone());
    let server = (
        cluster.server.logged.process.pid(),
        cluster.server.health_port,
    );
    let agent = cluster.agent.as_ref().unwrap();
    let agent = (agent.logged.process.pid(), agent.health_port);

    run(&target, &to, 0..WARM_UP).await;
    // Settled: the warm-up's half-closed connections have timed out (checked once a second),
    // the agent's writers given up, and the last closes gone through both processes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let settle = |who: (u32, u16)| {
        let mut last = held(who.0, who.1);
        wait_until(Duration::from_secs(20), || {
            std::thread::sleep(Duration::from_millis(300));
            let now = held(who.0, who.1);
            std::mem::replace(&mut last, now) == now
        });
        last
    };
    let base = (settle(server), settle(agent));
    let rss = (rss_kib(server.0), rss_kib(agent.0));

    run(&target, &to, WARM_UP..WARM_UP + CONNECTIONS).await;

    for ((pid, port), before, name) in [(server, base.0, "server"), (agent, base.1, "agent")] {
        let back = wait_until(Duration::from_secs(30), || held(pid, port) == before);
        let after = held(pid, port);
        assert!(
            back,
            "the {name} holds {after:?} after {CONNECTIONS} connections, {before:?} before"
        );
    }
    for (pid, before, name) in [(server.0, rss.0, "server"), (agent.0, rss.1, "agent")] {
        let after = rss_kib(pid);
        println!("{name}: RSS {before} KiB before, {after} KiB after");
        assert!(
            after <= before + RSS_GROWTH_KIB,
            "the {name}'s RSS grew from {before} KiB to {after} KiB"
        );
    }
}
