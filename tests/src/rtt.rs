//! Round-trip timing over a tunnel to an echo server, for head-of-line checks. Bounded waits
//! only: a stalled tunnel fails the check instead of hanging the test.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::frontend::{Event, GrpcTunnel, Io};

const LIMIT: Duration = Duration::from_secs(5);

/// Median of `n` 64-byte round trips over a CONNECT stream.
pub async fn connect_rtt(stream: &mut Box<dyn Io>, n: usize) -> Result<Duration> {
    let mut samples = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let start = Instant::now();
        stream.write_all(&[7u8; 64]).await?;
        tokio::time::timeout(LIMIT, stream.read_exact(&mut buf)).await??;
        samples.push(start.elapsed());
    }
    Ok(median(samples))
}

/// Median of `n` 64-byte round trips over a gRPC tunnel.
pub async fn grpc_rtt(tunnel: &mut GrpcTunnel, n: usize) -> Result<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        tunnel.send(&[7u8; 64]).await?;
        let mut got = 0;
        while got < 64 {
            match tokio::time::timeout(LIMIT, tunnel.next()).await?? {
                Some(Event::Data(d)) => got += d.len(),
                other => bail!("echo tunnel ended: {other:?}"),
            }
        }
        samples.push(start.elapsed());
    }
    Ok(median(samples))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}
