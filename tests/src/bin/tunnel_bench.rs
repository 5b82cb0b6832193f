//! `cargo xtask bench tunnel`: tether-server + tether-agent (release builds) against a direct
//! TCP baseline measured in the same run. Wall-clock figures on shared 2-core machines swing a
//! lot; CPU time per unit of work (utime+stime from /proc) and ratios are what to compare.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::frontend::{Io, Target, http_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 256 * 1024;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sends N bytes (N = the u64 the client writes first).
async fn source() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(n) = s.read_u64().await else { return };
                let chunk = vec![0x5au8; CHUNK];
                let mut left = n;
                while left > 0 {
                    let take = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                    if s.write_all(&chunk[..take]).await.is_err() {
                        return;
                    }
                    left -= take as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Reads until EOF, then answers with the byte count.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_u64(total).await;
            });
        }
    });
    addr
}

struct Side {
    name: &'static str,
    target: Option<Target>,
}

impl Side {
    async fn open(&self, addr: SocketAddr) -> Result<Box<dyn Io>> {
        match &self.target {
            None => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Some(target) => http_connect(target, &addr.to_string())
                .await?
                .map_err(|e| anyhow::anyhow!("dial failed: {e}")),
        }
    }
}

struct Pids {
    agent: u32,
    server: u32,
}

impl Pids {
    fn cpu(&self) -> (f64, f64) {
        (cpu_seconds(self.agent), cpu_seconds(self.server))
    }
}

async fn download(side: &Side, src: SocketAddr, bytes: u64) -> Result<Duration> {
    let mut s = side.open(src).await?;
    let start = Instant::now();
    s.write_u64(bytes).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "download ended at {got}");
        got += n as u64;
    }
    Ok(start.elapsed())
}

async fn upload(side: &Side, dst: SocketAddr, bytes: u64) -> Result<Duration> {
    let mut s = side.open(dst).await?;
    let start = Instant::now();
    let chunk = vec![0x33u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await?;
        sent += CHUNK as u64;
    }
    // Half-close where the path supports it; otherwise the count still arrives before EOF.
    let _ = s.flush().await;
    let elapsed = start.elapsed();
    Ok(elapsed)
}

async fn rtts(
    side: &Side,
    echo: SocketAddr,
    n: usize,
    concurrency: usize,
) -> Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut s = side.open(echo).await?;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            let mut buf = [0u8; 64];
            for _ in 0..n {
                let start = Instant::now();
                s.write_all(&[1u8; 64]).await?;
                s.read_exact(&mut buf).await?;
                out.push(start.elapsed());
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    Ok(all)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let bulk = if quick { GIB / 8 } else { GIB };
    let (rtt_n, idle_n, dial_n) = if quick {
        (500, 500, 300)
    } else {
        (2000, 2000, 2000)
    };

    let cluster = Cluster::start(Mode::HttpConnect, Transport::Uds, &[], &[])
        .context("starting server and agent")?;
    let pids = Pids {
        agent: cluster
            .agent
            .as_ref()
            .map(|a| a.logged.process.pid())
            .unwrap_or(0),
        server: cluster.server.logged.process.pid(),
    };
    let direct = Side {
        name: "direct TCP",
        target: None,
    };
    let tunnel = Side {
        name: "tether tunnel",
        target: Some(cluster.target.clone()),
    };
    let (src, dst) = (source().await, sink().await);
    let echo = tether_tests::backend::echo().await;

    println!("| measure | direct TCP | tether tunnel | ratio | agent CPU | server CPU |");
    println!("|---|---|---|---|---|---|");

    // Warm up both paths.
    download(&direct, src, 16 << 20).await?;
    download(&tunnel, src, 16 << 20).await?;

    let base = download(&direct, src, bulk).await?;
    let (a0, s0) = pids.cpu();
    let through = download(&tunnel, src, bulk).await?;
    let (a1, s1) = pids.cpu();
    let gib = bulk as f64 / GIB as f64;
    let mibs = |d: Duration| bulk as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "| download {} MiB (MiB/s) | {:.0} | {:.0} | {:.2} | {:.2} CPU-s/GiB | {:.2} CPU-s/GiB |",
        bulk >> 20,
        mibs(base),
        mibs(through),
        mibs(through) / mibs(base),
        (a1 - a0) / gib,
        (s1 - s0) / gib
    );

    let base = upload(&direct, dst, bulk).await?;
    let (a0, s0) = pids.cpu();
    let through = upload(&tunnel, dst, bulk).await?;
    // Let the last bytes drain through before reading CPU.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a1, s1) = pids.cpu();
    println!(
        "| upload {} MiB (MiB/s) | {:.0} | {:.0} | {:.2} | {:.2} CPU-s/GiB | {:.2} CPU-s/GiB |",
        bulk >> 20,
        mibs(base),
        mibs(through),
        mibs(through) / mibs(base),
        (a1 - a0) / gib,
        (s1 - s0) / gib
    );

    for concurrency in [1usize, 64] {
        let per = if concurrency == 1 { rtt_n } else { rtt_n / 16 };
        let base = rtts(&direct, echo, per, concurrency).await?;
        let (a0, s0) = pids.cpu();
        let through = rtts(&tunnel, echo, per, concurrency).await?;
        let (a1, s1) = pids.cpu();
        let count = through.len() as f64;
        println!(
            "| 64 B round trip x{concurrency} p50 / p99 (µs) | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.1} CPU-µs/rtt | {:.1} CPU-µs/rtt |",
            us(pct(&base, 0.5)),
            us(pct(&base, 0.99)),
            us(pct(&through, 0.5)),
            us(pct(&through, 0.99)),
            us(pct(&through, 0.5)) / us(pct(&base, 0.5)).max(1.0),
            (a1 - a0) / count * 1e6,
            (s1 - s0) / count * 1e6
        );
    }

    let dial_rate = |side: &'static Side| async move {
        let start = Instant::now();
        for _ in 0..dial_n {
            let s = side.open(echo).await?;
            drop(s);
        }
        anyhow::Ok(dial_n as f64 / start.elapsed().as_secs_f64())
    };
    let direct_ref: &'static Side = Box::leak(Box::new(direct));
    let tunnel_ref: &'static Side = Box::leak(Box::new(tunnel));
    let base = dial_rate(direct_ref).await?;
    let (a0, s0) = pids.cpu();
    let through = dial_rate(tunnel_ref).await?;
    let (a1, s1) = pids.cpu();
    println!(
        "| dials per second | {:.0} | {:.0} | {:.2} | {:.0} CPU-µs/dial | {:.0} CPU-µs/dial |",
        base,
        through,
        through / base,
        (a1 - a0) / dial_n as f64 * 1e6,
        (s1 - s0) / dial_n as f64 * 1e6
    );

    // Idle connections: memory per connection, and memory given back after they close.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ra0, rs0) = (rss_kib(pids.agent), rss_kib(pids.server));
    let mut held = Vec::with_capacity(idle_n);
    for _ in 0..idle_n {
        held.push(tunnel_ref.open(echo).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ra1, rs1) = (rss_kib(pids.agent), rss_kib(pids.server));
    drop(held);
    // Both processes trim freed heap within a second of connection counts falling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ra2, rs2) = (rss_kib(pids.agent), rss_kib(pids.server));
    println!(
        "| RSS per idle connection ({idle_n} held) | — | — | — | {:.2} KiB (after close: {:+.0} KiB vs before) | {:.2} KiB (after close: {:+.0} KiB) |",
        (ra1 - ra0) / idle_n as f64,
        ra2 - ra0,
        (rs1 - rs0) / idle_n as f64,
        rs2 - rs0
    );

    // Head-of-line: interactive round trips while a bulk download runs on the same tunnel.
    let quiet = rtts(tunnel_ref, echo, 200, 1).await?;
    let bulk_task = tokio::spawn(async move { download(tunnel_ref, src, bulk).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = rtts(tunnel_ref, echo, 200, 1).await?;
    bulk_task.abort();
    println!(
        "| round trip p50 / p99 during a bulk download (µs) | — | {:.0} / {:.0} quiet | {:.0} / {:.0} busy | {:+.0} µs p50 | — |",
        us(pct(&quiet, 0.5)),
        us(pct(&quiet, 0.99)),
        us(pct(&busy, 0.5)),
        us(pct(&busy, 0.99)),
        us(pct(&busy, 0.5)) - us(pct(&quiet, 0.5))
    );
    println!("\nside labels: {} vs {}", direct_ref.name, tunnel_ref.name);
    Ok(())
}
