//! `cargo xtask bench soak --minutes N`: tether-server and tether-agent (release builds) under
//! mixed traffic for N minutes, printing once a minute what would show a leak or a slowdown:
//! throughput, round-trip p99, and each process's RSS, open descriptors and async tasks.
//!
//! The traffic, all through one agent stream over the CONNECT frontend: a bulk download and a
//! bulk upload that start over every 64 MiB, round trips of 64 bytes, dial churn (connect,
//! one exchange, close), a slow reader (64 KiB/s) and a stalled reader (reads nothing, held
//! for a minute, then replaced).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::{Target, http_connect};
use tether_tests::peers::metric;
use tether_tests::process::{open_fds, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

const BULK: u64 = 64 << 20;
const CHUNK: usize = 256 * 1024;

#[derive(Default)]
struct Counts {
    bytes: AtomicU64,
    dials: AtomicU64,
    failures: AtomicU64,
    rtts: Mutex<Vec<Duration>>,
}

async fn connect(target: &Target, to: SocketAddr) -> Result<Box<dyn tether_tests::frontend::Io>> {
    match http_connect(target, &to.to_string()).await? {
        Ok(stream) => Ok(stream),
        Err(response) => bail!("CONNECT {to}: {response}"),
    }
}

/// Downloads BULK bytes from a pattern source, over and over.
async fn download(target: Target, counts: Arc<Counts>) -> Result<()> {
    let source = destination::pattern_source(BULK).await;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut stream = connect(&target, source).await?;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            counts.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Uploads BULK bytes to a sink, over and over.
async fn upload(target: Target, counts: Arc<Counts>) -> Result<()> {
    let sink = destination::discard().await;
    let chunk = vec![0x33u8; CHUNK];
    loop {
        let mut stream = connect(&target, sink).await?;
        let mut sent = 0;
        while sent < BULK {
            stream.write_all(&chunk).await?;
            sent += CHUNK as u64;
            counts.bytes.fetch_add(CHUNK as u64, Ordering::Relaxed);
        }
        stream.shutdown().await?;
    }
}

/// 64-byte round trips on one connection, ten a second.
async fn round_trips(target: Target, echo: SocketAddr, counts: Arc<Counts>) -> Result<()> {
    let mut stream = connect(&target, echo).await?;
    let mut back = [0u8; 64];
    loop {
        let started = Instant::now();
        stream.write_all(&[7u8; 64]).await?;
        stream.read_exact(&mut back).await?;
        counts.rtts.lock().await.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connections that exchange one message and close, twenty a second.
async fn churn(target: Target, echo: SocketAddr, counts: Arc<Counts>) -> Result<()> {
    loop {
        let result = async {
            let mut stream = connect(&target, echo).await?;
            stream.write_all(b"hello").await?;
            let mut back = [0u8; 5];
            stream.read_exact(&mut back).await?;
            stream.shutdown().await?;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => counts.dials.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.failures.fetch_add(1, Ordering::Relaxed),
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that reads a download at 64 KiB/s.
async fn slow_reader(target: Target) -> Result<()> {
    let source = destination::pattern_source(u64::MAX).await;
    let mut stream = connect(&target, source).await?;
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        stream.read_exact(&mut buf).await?;
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
}

/// A client that reads nothing of a download, replaced every minute.
async fn stalled_reader(target: Target) -> Result<()> {
    let source = destination::pattern_source(u64::MAX).await;
    loop {
        let stream = connect(&target, source).await?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stream);
    }
}

fn p99(rtts: &mut [Duration]) -> Duration {
    rtts.sort();
    rtts.get(rtts.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default()
}

fn tasks(port: u16) -> String {
    metric(port, "tether_tasks ").map_or("?".to_owned(), |t| format!("{t:.0}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut minutes = 30u64;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => {
                minutes = args
                    .next()
                    .and_then(|m| m.parse().ok())
                    .context("--minutes needs a number")?;
            }
            other => bail!("unknown argument {other:?} (soak takes --minutes N)"),
        }
    }
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[])?;
    let server = (
        cluster.server.logged.process.pid(),
        cluster.server.health_port,
    );
    let agent = cluster.agent.as_ref().context("no agent")?;
    let agent = (agent.logged.process.pid(), agent.health_port);
    let echo = destination::echo().await;
    let counts = Arc::new(Counts::default());
    let target = cluster.target.clone();
    let mut workers = tokio::task::JoinSet::new();
    workers.spawn(download(target.clone(), counts.clone()));
    workers.spawn(upload(target.clone(), counts.clone()));
    workers.spawn(round_trips(target.clone(), echo, counts.clone()));
    workers.spawn(churn(target.clone(), echo, counts.clone()));
    workers.spawn(slow_reader(target.clone()));
    workers.spawn(stalled_reader(target.clone()));

    println!(
        "| minute | MB/s | dials | failed | rtt p99 (µs) | server RSS (MiB) | fds | tasks | agent RSS (MiB) | fds | tasks |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let started = Instant::now();
    for minute in 1..=minutes {
        let until = started + Duration::from_secs(60 * minute);
        tokio::select! {
            ended = workers.join_next() => {
                bail!("a traffic worker stopped: {ended:?}");
            }
            () = tokio::time::sleep_until(until.into()) => {}
        }
        let bytes = counts.bytes.swap(0, Ordering::Relaxed);
        let dials = counts.dials.swap(0, Ordering::Relaxed);
        let failures = counts.failures.swap(0, Ordering::Relaxed);
        let rtt = p99(&mut std::mem::take(&mut *counts.rtts.lock().await));
        let mib = |pid| rss_kib(pid) as f64 / 1024.0;
        println!(
            "| {minute} | {:.0} | {dials} | {failures} | {} | {:.1} | {} | {} | {:.1} | {} | {} |",
            bytes as f64 / 60.0 / 1e6,
            rtt.as_micros(),
            mib(server.0),
            open_fds(server.0),
            tasks(server.1),
            mib(agent.0),
            open_fds(agent.0),
            tasks(agent.1),
        );
    }
    Ok(())
}
