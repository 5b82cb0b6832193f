//! `cargo xtask bench tunnel`: tether-server + tether-agent (release builds) against a direct
//! TCP baseline measured in the same run. Wall-clock figures on shared 2-core machines swing a
//! lot; CPU time per unit of work (utime+stime from /proc) and ratios are what to compare.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::frontend::{Io, Target, http_connect};
use tether_tests::peers::{self, Impl};
use tether_tests::pki::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 256 * 1024;

/// The machine's (all CPUs') time so far and the part of it the hypervisor took for other
/// guests ("steal", /proc/stat), in ticks. Steal marks a run whose CPU figures are inflated.
fn machine_steal() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total = fields.iter().take(8).sum();
    (total, fields.get(7).copied().unwrap_or(0))
}

/// CPU time each thread of `pid` has used, in nanoseconds (the first field of
/// `/proc/<pid>/task/<tid>/schedstat`: utime+stime as the scheduler counts it, without
/// `/proc/<pid>/stat`'s 10 ms ticks, which are too coarse for a few thousand round trips).
fn thread_cpu(pid: u32) -> HashMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            Some((tid, stat.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// CPU seconds `pid` used between two [`thread_cpu`] readings. Per thread, so a thread that
/// starts or ends in between counts only for the time it ran in between.
fn cpu_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

fn rss_kib(pid: u32) -> f64 {
    tether_tests::process::rss_kib(pid) as f64
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

/// CPU readings of both processes at one moment.
struct Cpu {
    agent: HashMap<u32, u64>,
    server: HashMap<u32, u64>,
}

impl Pids {
    fn cpu(&self) -> Cpu {
        Cpu {
            agent: thread_cpu(self.agent),
            server: thread_cpu(self.server),
        }
    }

    /// Agent and server CPU seconds since `before`.
    fn since(&self, before: &Cpu) -> (f64, f64) {
        let now = self.cpu();
        (
            cpu_between(&before.agent, &now.agent),
            cpu_between(&before.server, &now.server),
        )
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

/// Opens and closes `n` tunnels to `echo`, `parallel` at a time; returns how many and the
/// rate (dials over the batch's wall time).
async fn dials(
    side: &'static Side,
    echo: SocketAddr,
    n: usize,
    parallel: usize,
) -> Result<(usize, f64)> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(parallel);
    for _ in 0..parallel {
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / parallel {
                drop(side.open(echo).await?);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let done = n / parallel * parallel;
    Ok((done, done as f64 / start.elapsed().as_secs_f64()))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Command line: `[--quick] [--rounds N] [--upstream-bin DIR] [PHASE...]`; phases are
/// download, upload, rtt, dial, idle, hol and hooks, all of them when none is named.
struct Args {
    quick: bool,
    rounds: usize,
    phases: Vec<String>,
    /// Upstream's binaries, for the rows behind upstream's server.
    upstream: Option<std::path::PathBuf>,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Args {
            quick: false,
            rounds: 3,
            phases: Vec::new(),
            upstream: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => args.quick = true,
                "--rounds" => {
                    args.rounds = it
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .context("--rounds takes a whole number above 0")?;
                }
                "--upstream-bin" => {
                    args.upstream = Some(
                        it.next()
                            .context("--upstream-bin takes a directory")?
                            .into(),
                    );
                }
                "download" | "upload" | "rtt" | "dial" | "idle" | "hol" | "hooks" => {
                    args.phases.push(arg)
                }
                other => anyhow::bail!(
                    "unknown argument {other:?}; usage: tunnel_bench [--quick] [--rounds N] [--upstream-bin DIR] [download|upload|rtt|dial|idle|hol|hooks ...]"
                ),
            }
        }
        Ok(args)
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.is_empty() || self.phases.iter().any(|p| p == phase)
    }
}

/// One row's CPU cost per unit over several rounds: the median, and the range.
#[derive(Default, Clone)]
struct Spread(Vec<f64>);

impl Spread {
    fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    fn show(&self, decimals: usize) -> String {
        let low = self.0.iter().copied().reduce(f64::min);
        let high = self.0.iter().copied().reduce(f64::max);
        let (Some(low), Some(high)) = (low, high) else {
            return "—".into();
        };
        let median = median(self.0.clone());
        if self.0.len() == 1 {
            format!("{median:.decimals$}")
        } else {
            format!("{median:.decimals$} ({low:.decimals$}–{high:.decimals$})")
        }
    }
}

/// Agent and server cost per unit of one measure, over the rounds.
#[derive(Default, Clone)]
struct Costs {
    agent: Spread,
    server: Spread,
}

impl Costs {
    fn push(&mut self, (agent, server): (f64, f64), per: f64) {
        self.agent.push(agent / per);
        self.server.push(server / per);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs `measure` over the direct path, then over the tunnel, `--rounds` times, and returns
/// each side's results with the tunnel's CPU per unit (`units` says how many units a result
/// holds). CPU is read `settle` after each tunnel round, so its last packets count too.
async fn rounds<T, F, Fut>(
    args: &Args,
    pids: &Pids,
    direct: &'static Side,
    tunnel: &'static Side,
    measure: F,
    units: impl Fn(&T) -> f64,
    settle: Duration,
) -> Result<(Vec<T>, Vec<T>, Costs)>
where
    F: Fn(&'static Side) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (mut base, mut through, mut costs) = (vec![], vec![], Costs::default());
    for _ in 0..args.rounds {
        base.push(measure(direct).await?);
        let before = pids.cpu();
        let result = measure(tunnel).await?;
        tokio::time::sleep(settle).await;
        costs.push(pids.since(&before), units(&result));
        through.push(result);
    }
    Ok((base, through, costs))
}

/// p50 / p99 of sorted round-trip times, in µs.
fn p50_p99(sorted: &[Duration]) -> String {
    format!("{:.0} / {:.0}", us(pct(sorted, 0.5)), us(pct(sorted, 0.99)))
}

/// Times `transfer` over the direct path and the tunnel, `rounds` times each, and prints the
/// row: median throughput of each and the tunnel's CPU per GiB.
async fn bulk_row<F, Fut>(
    label: &str,
    args: &Args,
    bytes: u64,
    pids: &Pids,
    direct: &'static Side,
    tunnel: &'static Side,
    transfer: F,
) -> Result<()>
where
    F: Fn(&'static Side) -> Fut,
    Fut: std::future::Future<Output = Result<Duration>>,
{
    let mibs = |d: &Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    // The pause lets the last bytes drain through before CPU is read.
    let per_round = |_: &Duration| bytes as f64 / GIB as f64;
    let settle = Duration::from_millis(300);
    let (base, through, costs) =
        rounds(args, pids, direct, tunnel, transfer, per_round, settle).await?;
    let (base, through) = (
        median(base.iter().map(mibs).collect()),
        median(through.iter().map(mibs).collect()),
    );
    println!(
        "| {label} {} MiB (MiB/s) | {base:.0} | {through:.0} | {:.2} | {} CPU-s/GiB | {} CPU-s/GiB |",
        bytes >> 20,
        through / base,
        costs.agent.show(2),
        costs.server.show(2)
    );
    Ok(())
}

/// One agent behind upstream's server, for the rows that compare the two agents.
struct Behind {
    side: &'static Side,
    pids: Pids,
    _server: peers::Peer,
    _agent: peers::Peer,
}

/// `measure` through each of `sides` in turn, `--rounds` times (interleaved, so a change in the
/// machine's phase lands on both), with each side's CPU per unit.
async fn interleaved<T, F, Fut>(
    args: &Args,
    sides: &[&Behind],
    measure: F,
    units: impl Fn(&T) -> f64,
    settle: Duration,
) -> Result<Vec<(Vec<T>, Costs)>>
where
    F: Fn(&'static Side) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut out: Vec<(Vec<T>, Costs)> = sides.iter().map(|_| (vec![], Costs::default())).collect();
    for _ in 0..args.rounds {
        for (behind, (results, costs)) in sides.iter().zip(out.iter_mut()) {
            let before = behind.pids.cpu();
            let result = measure(behind.side).await?;
            tokio::time::sleep(settle).await;
            costs.push(behind.pids.since(&before), units(&result));
            results.push(result);
        }
    }
    Ok(out)
}

/// tether-agent and upstream's agent, each behind upstream's server (HTTP CONNECT on a Unix
/// socket), measured in the same run: the agent's CPU per unit side by side, and the ratio.
async fn versus_upstream(
    args: &Args,
    dir: &std::path::Path,
    bulk: u64,
    (src, dst, echo): (SocketAddr, SocketAddr, SocketAddr),
    (rtt_n, dial_n): (usize, usize),
) -> Result<()> {
    let pki = Pki::new(&[])?;
    let upstream_server = Impl::Upstream(dir.to_path_buf());
    let mut behind = Vec::new();
    for (agent, name) in [
        (Impl::Tether, "tether-agent"),
        (Impl::Upstream(dir.to_path_buf()), "upstream agent"),
    ] {
        let uds = pki.dir().join(format!("{}.sock", agent.name()));
        let server = peers::server(
            &upstream_server,
            &pki,
            Mode::HttpConnect,
            Transport::Uds,
            &uds,
            peers::ServerPorts::free()?,
            &[],
        )?;
        let agent = peers::agent(&agent, &pki, server.agent_port, &[])?;
        anyhow::ensure!(
            tether_tests::procs::wait_ready(server.health_port, Duration::from_secs(15)),
            "upstream's server never saw {name}"
        );
        behind.push(Behind {
            side: Box::leak(Box::new(Side {
                name,
                target: server.target.clone(),
            })),
            pids: Pids {
                agent: agent.pid,
                server: server.pid,
            },
            _server: server,
            _agent: agent,
        });
    }
    let sides: Vec<&Behind> = behind.iter().collect();
    for side in &sides {
        download(side.side, src, 16 << 20).await?;
    }
    println!(
        "\nBehind upstream's server (HTTP CONNECT, Unix socket), interleaved rounds; agent CPU: median (lowest–highest)"
    );
    println!(
        "| measure | tether-agent | upstream agent | tether-agent CPU / upstream agent CPU | upstream server CPU with tether-agent / with upstream agent |"
    );
    println!("|---|---|---|---|---|");
    let row = |label: &str, shown: [String; 2], costs: &[Costs], unit: &str, decimals: usize| {
        let ratio = median(costs[0].agent.0.clone()) / median(costs[1].agent.0.clone());
        let server = median(costs[0].server.0.clone()) / median(costs[1].server.0.clone());
        println!(
            "| {label} | {}, {} {unit} | {}, {} {unit} | {ratio:.2} | {server:.2} |",
            shown[0],
            costs[0].agent.show(decimals),
            shown[1],
            costs[1].agent.show(decimals)
        );
    };
    let mibs = |bytes: u64, runs: &[Duration]| {
        format!(
            "{:.0} MiB/s",
            median(
                runs.iter()
                    .map(|d| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64())
                    .collect()
            )
        )
    };
    let settle = Duration::from_millis(300);
    let per_gib = |_: &Duration| bulk as f64 / GIB as f64;
    if args.runs("download") {
        let out = interleaved(
            args,
            &sides,
            |side| download(side, src, bulk),
            per_gib,
            settle,
        )
        .await?;
        let costs: Vec<Costs> = out.iter().map(|(_, c)| c.clone()).collect();
        row(
            &format!("download {} MiB", bulk >> 20),
            [mibs(bulk, &out[0].0), mibs(bulk, &out[1].0)],
            &costs,
            "CPU-s/GiB",
            2,
        );
    }
    if args.runs("upload") {
        let out = interleaved(
            args,
            &sides,
            |side| upload(side, dst, bulk),
            per_gib,
            settle,
        )
        .await?;
        let costs: Vec<Costs> = out.iter().map(|(_, c)| c.clone()).collect();
        row(
            &format!("upload {} MiB", bulk >> 20),
            [mibs(bulk, &out[0].0), mibs(bulk, &out[1].0)],
            &costs,
            "CPU-s/GiB",
            2,
        );
    }
    if args.runs("rtt") {
        let out = interleaved(
            args,
            &sides,
            |side| rtts(side, echo, rtt_n, 1),
            |round| round.len() as f64 / 1e6,
            Duration::ZERO,
        )
        .await?;
        let p50s: Vec<Duration> = out
            .iter()
            .map(|(runs, _)| {
                let mut all = runs.concat();
                all.sort();
                pct(&all, 0.5)
            })
            .collect();
        let costs: Vec<Costs> = out.iter().map(|(_, c)| c.clone()).collect();
        row(
            "64 B round trip x1",
            [
                format!("p50 {:.0} µs", us(p50s[0])),
                format!("p50 {:.0} µs", us(p50s[1])),
            ],
            &costs,
            "CPU-µs/rtt",
            1,
        );
        println!(
            "| 64 B round trip x1, p50 | | | {:.2} (latency) | |",
            us(p50s[0]) / us(p50s[1]).max(1.0)
        );
    }
    if args.runs("dial") {
        for parallel in [1usize, 16] {
            let out = interleaved(
                args,
                &sides,
                |side| dials(side, echo, dial_n, parallel),
                |r: &(usize, f64)| r.0 as f64 / 1e6,
                Duration::ZERO,
            )
            .await?;
            let rate = |runs: &[(usize, f64)]| {
                format!("{:.0}/s", median(runs.iter().map(|r| r.1).collect()))
            };
            let costs: Vec<Costs> = out.iter().map(|(_, c)| c.clone()).collect();
            row(
                &format!("dials, {parallel} at a time"),
                [rate(&out[0].0), rate(&out[1].0)],
                &costs,
                "CPU-µs/dial",
                0,
            );
        }
    }
    Ok(())
}

/// `--connect-loop N ADDR`: the helper the hooks phase starts inside a cgroup. It connects to
/// ADDR N times and prints its own CPU time (user + system) in microseconds.
fn connect_loop(n: usize, addr: std::net::SocketAddr) -> Result<()> {
    for _ in 0..n {
        drop(std::net::TcpStream::connect(addr)?);
    }
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64;
    println!(
        "{}",
        micros(usage.user_time()) + micros(usage.system_time())
    );
    Ok(())
}

/// The dial policy's connect hook, per connect(): the same loop of connects from a process in
/// a cgroup without hooks and from one in a cgroup where an agent attached them (the agent's
/// default rules plus the harness's loopback allowance; a connect walks a few rules).
fn hooks_phase(args: &Args, n: usize) -> Result<()> {
    use tether_tests::cgroup::TestCgroup;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let plain = TestCgroup::new("bench-plain")?;
    let hooked = TestCgroup::new("bench-hooks")?;
    let pki = Pki::new(&[])?;
    let server_port = format!("--proxy-server-port={closed}");
    let ca = format!("--ca-cert={}", pki.ca().display());
    // One Service whose only backend is the listener: a connect to it is rewritten.
    let map = pki.dir().join("services");
    std::fs::write(&map, format!("10.96.0.10:80/tcp 127.0.0.1:{port}\n"))?;
    let services = format!("--service-map-file={}", map.display());
    let mut agent = hooked.command(&tether_tests::procs::built("tether-agent")?);
    agent
        .args(tether_tests::procs::AGENT_WITHOUT_GUARD)
        .args([
            tether_tests::procs::DIALS_LOOPBACK,
            "--dial-policy-cgroup=auto",
        ])
        .args([
            server_port.as_str(),
            ca.as_str(),
            services.as_str(),
            "--health-server-port=0",
            "--admin-server-port=0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut agent = tether_tests::process::Process::spawn("tether-agent", &mut agent)?;
    let mut log = std::io::BufReader::new(agent.take_stderr().context("agent stderr")?);
    let mut line = String::new();
    while !line.contains("dial policy enforced in the kernel") {
        line.clear();
        anyhow::ensure!(
            std::io::BufRead::read_line(&mut log, &mut line)? > 0,
            "the agent exited before attaching its hooks"
        );
    }
    let me = std::env::current_exe()?;
    let listener_addr = format!("127.0.0.1:{port}");
    let run = |cgroup: &TestCgroup, to: &str| -> Result<f64> {
        let out = cgroup
            .command(&me)
            .args(["--connect-loop", &n.to_string(), to])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()? / n as f64)
    };
    let mut without = Spread::default();
    let mut with = Spread::default();
    let mut steered = Spread::default();
    for _ in 0..args.rounds {
        without.push(run(&plain, &listener_addr)?);
        with.push(run(&hooked, &listener_addr)?);
        steered.push(run(&hooked, "10.96.0.10:80")?);
    }
    println!(
        "| connect() to 127.0.0.1, CPU-µs per call | {} without hooks | {} with the dial hooks | {:.2} | — | — |",
        without.show(2),
        with.show(2),
        median(with.0.clone()) / median(without.0.clone())
    );
    println!(
        "| connect() to a Service address, rewritten to its backend, CPU-µs per call | {} without hooks (backend dialled directly) | {} through the Service rewrite | {:.2} | — | — |",
        without.show(2),
        steered.show(2),
        median(steered.0.clone()) / median(without.0.clone())
    );
    drop(agent);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("--connect-loop") {
        let n = raw
            .next()
            .and_then(|n| n.parse().ok())
            .context("--connect-loop N ADDR")?;
        let addr = raw
            .next()
            .and_then(|a| a.parse().ok())
            .context("--connect-loop N ADDR")?;
        return connect_loop(n, addr);
    }
    let args = Args::parse()?;
    let bulk = if args.quick { GIB / 8 } else { GIB };
    let (rtt_n, idle_n, dial_n) = if args.quick {
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
    let direct: &'static Side = Box::leak(Box::new(Side {
        name: "direct TCP",
        target: None,
    }));
    let tunnel: &'static Side = Box::leak(Box::new(Side {
        name: "tether tunnel",
        target: Some(cluster.target.clone()),
    }));
    let (src, dst) = (source().await, sink().await);
    let echo = tether_tests::destination::echo().await;

    println!(
        "{} round(s) per measure; CPU columns: median (lowest–highest) over the rounds",
        args.rounds
    );
    println!("| measure | direct TCP | tether tunnel | ratio | agent CPU | server CPU |");
    println!("|---|---|---|---|---|---|");

    let (total0, steal0) = machine_steal();
    // Warm up both paths.
    download(direct, src, 16 << 20).await?;
    download(tunnel, src, 16 << 20).await?;

    if args.runs("download") {
        bulk_row("download", &args, bulk, &pids, direct, tunnel, |side| {
            download(side, src, bulk)
        })
        .await?;
    }
    if args.runs("upload") {
        bulk_row("upload", &args, bulk, &pids, direct, tunnel, |side| {
            upload(side, dst, bulk)
        })
        .await?;
    }

    if args.runs("rtt") {
        for concurrency in [1usize, 64] {
            let per = if concurrency == 1 { rtt_n } else { rtt_n / 16 };
            let (base, through, costs) = rounds(
                &args,
                &pids,
                direct,
                tunnel,
                |side| rtts(side, echo, per, concurrency),
                |round| round.len() as f64 / 1e6,
                Duration::ZERO,
            )
            .await?;
            let mut base: Vec<Duration> = base.concat();
            let mut through: Vec<Duration> = through.concat();
            base.sort();
            through.sort();
            println!(
                "| 64 B round trip x{concurrency} p50 / p99 (µs) | {} | {} | {:.1} | {} CPU-µs/rtt | {} CPU-µs/rtt |",
                p50_p99(&base),
                p50_p99(&through),
                us(pct(&through, 0.5)) / us(pct(&base, 0.5)).max(1.0),
                costs.agent.show(1),
                costs.server.show(1)
            );
        }
    }

    if args.runs("dial") {
        // Dials one after another, then 16 at a time (as kube-apiserver's log and exec
        // requests arrive): a rate is the batch's dials over its wall time.
        for parallel in [1usize, 16] {
            let dial_rate = |side: &'static Side| dials(side, echo, dial_n, parallel);
            let per_round = |r: &(usize, f64)| r.0 as f64 / 1e6;
            let (base, through, costs) = rounds(
                &args,
                &pids,
                direct,
                tunnel,
                dial_rate,
                per_round,
                Duration::ZERO,
            )
            .await?;
            let rate = |v: Vec<(usize, f64)>| median(v.into_iter().map(|r| r.1).collect());
            let (base, through) = (rate(base), rate(through));
            let label = if parallel == 1 {
                "dials per second, one at a time".to_owned()
            } else {
                format!("dials per second, {parallel} at a time")
            };
            println!(
                "| {label} | {base:.0} | {through:.0} | {:.2} | {} CPU-µs/dial | {} CPU-µs/dial |",
                through / base,
                costs.agent.show(0),
                costs.server.show(0)
            );
        }
    }

    if args.runs("idle") {
        // Idle connections: memory per connection, and memory given back after they close.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ra0, rs0) = (rss_kib(pids.agent), rss_kib(pids.server));
        let mut held = Vec::with_capacity(idle_n);
        for _ in 0..idle_n {
            held.push(tunnel.open(echo).await?);
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
    }

    if args.runs("hol") {
        // Head-of-line: interactive round trips while a bulk download runs on the same tunnel.
        let quiet = rtts(tunnel, echo, 200, 1).await?;
        let bulk_task = tokio::spawn(async move { download(tunnel, src, bulk).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let busy = rtts(tunnel, echo, 200, 1).await?;
        bulk_task.abort();
        println!(
            "| round trip p50 / p99 during a bulk download (µs) | — | {} quiet | {} busy | {:+.0} µs p50 | — |",
            p50_p99(&quiet),
            p50_p99(&busy),
            us(pct(&busy, 0.5)) - us(pct(&quiet, 0.5))
        );
    }
    if args.runs("hooks") {
        hooks_phase(&args, if args.quick { 2000 } else { 20000 })?;
    }
    let (total, steal) = machine_steal();
    println!(
        "\nside labels: {} vs {}; hypervisor steal during the run: {:.1}% of CPU time",
        direct.name,
        tunnel.name,
        (steal - steal0) as f64 * 100.0 / (total - total0).max(1) as f64
    );
    if let Some(dir) = &args.upstream {
        let (total0, steal0) = machine_steal();
        versus_upstream(&args, dir, bulk, (src, dst, echo), (rtt_n, dial_n)).await?;
        let (total, steal) = machine_steal();
        println!(
            "\nhypervisor steal during these rows: {:.1}% of CPU time",
            (steal - steal0) as f64 * 100.0 / (total - total0).max(1) as f64
        );
    }
    Ok(())
}
