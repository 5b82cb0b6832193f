//! Faults under traffic, with real processes: the server killed and restarted over and over,
//! the agent killed under load, destinations that misbehave, a storm of dials, and an agent
//! that vanishes without a FIN. Nothing a completed transfer carried may be altered, traffic
//! must come back within the agent's reconnect backoff, and a dead peer must be noticed.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tether_tests::destination;
use tether_tests::frontend::{Target, http_connect};
use tether_tests::peers::free_port;
use tether_tests::pki::Pki;
use tether_tests::process::{open_fds, wait_until};
use tether_tests::procs::{Agent, Server, connect_server_args, wait_ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The agents' reconnect backoff cap in these tests (`--sync-interval-cap`).
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// What a loaded two-core machine adds to the cap: a TLS handshake, a process start.
const SLACK: Duration = Duration::from_secs(2);

fn server_args(pki: &Pki, uds: &Path, agent_port: u16, extra: &[&str]) -> Vec<&'static str> {
    let agent_port = format!("--agent-port={agent_port}");
    let mut args = vec!["--delete-existing-uds-file", agent_port.as_str()];
    args.extend_from_slice(extra);
    connect_server_args(pki, uds, &args)
}

fn start_server(args: &[&str]) -> Server {
    Server::start(args).unwrap()
}

fn start_agent(pki: &Pki, agent_port: u16) -> Agent {
    Agent::start(&[
        &format!("--proxy-server-port={agent_port}"),
        &format!("--ca-cert={}", pki.ca().display()),
        "--sync-interval=100ms",
        &format!("--sync-interval-cap={}s", BACKOFF_CAP.as_secs()),
    ])
    .unwrap()
}

/// Bytes `seed` makes, different for every transfer.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    corrupted: AtomicU64,
}

/// One transfer through the tunnel to the echo server: a bulk one both ways, a run of small
/// round trips, or a short connection. `Ok(false)` when the tunnel failed under it (expected
/// while a process is down); `Err` when bytes came back altered.
async fn transfer(target: &Target, echo: SocketAddr, seed: u64) -> Result<bool, String> {
    let Ok(Ok(mut stream)) = http_connect(target, &echo.to_string()).await else {
        return Ok(false);
    };
    let (len, rounds) = match seed % 3 {
        0 => (256 * 1024, 1),
        1 => (100, 20),
        _ => (10, 1),
    };
    for round in 0..rounds {
        let sent = pattern(seed + round, len);
        let (mut reader, mut writer) = tokio::io::split(&mut stream);
        let write = async {
            writer.write_all(&sent).await?;
            writer.flush().await
        };
        let mut back = vec![0u8; len];
        let read = reader.read_exact(&mut back);
        let (written, read) = tokio::join!(write, read);
        if written.is_err() || read.is_err() {
            return Ok(false);
        }
        if back != sent {
            return Err(format!(
                "transfer {seed} round {round}: bytes came back altered"
            ));
        }
    }
    if stream.shutdown().await.is_err() {
        return Ok(false);
    }
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest).await {
        Ok(_) if rest.is_empty() => Ok(true),
        Ok(_) => Err(format!(
            "transfer {seed}: {} bytes after the echo",
            rest.len()
        )),
        Err(_) => Ok(false),
    }
}

/// Workers that run transfers until `stop`, counting what completed and what was altered.
fn traffic(
    target: Target,
    echo: SocketAddr,
    workers: u64,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let handles = (0..workers)
        .map(|w| {
            let (target, stop, tally) = (target.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let mut seed = w;
                while !stop.load(Ordering::Relaxed) {
                    match transfer(&target, echo, seed).await {
                        Ok(true) => {
                            tally.completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Err(why) => {
                            eprintln!("{why}");
                            tally.corrupted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    seed += workers;
                }
            })
        })
        .collect();
    (tally, handles)
}

/// Waits until transfers complete again; how long that took.
async fn resumed(tally: &Tally, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let before = tally.completed.load(Ordering::Relaxed);
    while started.elapsed() < limit {
        if tally.completed.load(Ordering::Relaxed) > before {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn kill(process: &mut tether_tests::process::Process) {
    process.signal(Signal::SIGKILL).unwrap();
    process.wait_timeout(Duration::from_secs(5)).unwrap();
}

/// The server killed (SIGKILL) and restarted 50 times under continuous mixed traffic: each
/// time transfers complete again within the agent's backoff cap (plus slack), and no
/// completed transfer was altered.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_killed_fifty_times_loses_no_completed_transfer() {
    const RESTARTS: usize = 50;
    let pki = Pki::new(&[]).unwrap();
    let uds: PathBuf = pki.dir().join("faults.sock");
    let agent_port = free_port().unwrap();
    let args = server_args(&pki, &uds, agent_port, &[]);
    let mut server = start_server(&args);
    let _agent = start_agent(&pki, agent_port);
    assert!(wait_ready(server.health_port, Duration::from_secs(10)));
    let echo = destination::echo().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, workers) = traffic(Target::Uds(uds), echo, 6, stop.clone());
    assert!(resumed(&tally, Duration::from_secs(10)).await.is_some());

    let mut slowest = Duration::ZERO;
    for restart in 1..=RESTARTS {
        kill(&mut server.logged.process);
        server = start_server(&args);
        let took = resumed(&tally, BACKOFF_CAP + SLACK + Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("no transfer completed after restart {restart}"));
        slowest = slowest.max(took);
        assert!(
            took <= BACKOFF_CAP + SLACK,
            "restart {restart}: transfers resumed only after {took:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let completed = tally.completed.load(Ordering::Relaxed);
    println!(
        "{RESTARTS} restarts: {completed} transfers completed, slowest resumption {slowest:?}"
    );
    assert_eq!(
        tally.corrupted.load(Ordering::Relaxed),
        0,
        "altered transfers"
    );
}

/// The agent killed and restarted under load, five times: transfers come back each time,
/// unaltered, and the server holds no more than it did before.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_killed_under_load_comes_back() {
    let pki = Pki::new(&[]).unwrap();
    let uds: PathBuf = pki.dir().join("faults.sock");
    let agent_port = free_port().unwrap();
    let server = start_server(&server_args(&pki, &uds, agent_port, &[]));
    let mut agent = start_agent(&pki, agent_port);
    assert!(wait_ready(server.health_port, Duration::from_secs(10)));
    let echo = destination::echo().await;
    let server_fds = open_fds(server.logged.process.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, workers) = traffic(Target::Uds(uds), echo, 6, stop.clone());
    assert!(resumed(&tally, Duration::from_secs(10)).await.is_some());
    for restart in 1..=5 {
        kill(&mut agent.logged.process);
        agent = start_agent(&pki, agent_port);
        assert!(
            resumed(&tally, Duration::from_secs(10)).await.is_some(),
            "no transfer completed after agent restart {restart}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(
        tally.corrupted.load(Ordering::Relaxed),
        0,
        "altered transfers"
    );
    let pid = server.logged.process.pid();
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(pid) <= server_fds),
        "the server holds {} descriptors after the agent restarts, {server_fds} before",
        open_fds(pid)
    );
}

/// A destination that resets after its first bytes.
async fn resetting_mid_stream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1024];
                let _ = stream.read_exact(&mut first).await;
                let _ = stream.set_zero_linger();
            });
        }
    });
    addr
}

/// Destinations that never accept, that reset mid-stream and that never read each fail on
/// their own, promptly and in words, while a transfer beside them on the same agent stream
/// goes through.
#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_destinations_fail_alone() {
    let cluster = tether_tests::cluster::Cluster::start(
        tether_tests::cluster::Mode::HttpConnect,
        tether_tests::cluster::Transport::Uds,
        &[],
        &["--dial-timeout=1s"],
    )
    .unwrap();
    let target = cluster.target.clone();
    let (stuck, _fillers, _listener) = destination::stuck().await;
    let resetting = resetting_mid_stream().await;
    let silent = destination::never_reads().await;
    let echo = destination::echo().await;

    let never_accepts = {
        let target = target.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = http_connect(&target, &stuck.to_string()).await.unwrap();
            (answer.err().unwrap_or_default(), started.elapsed())
        })
    };
    let resets = {
        let target = target.clone();
        tokio::spawn(async move {
            let mut stream = http_connect(&target, &resetting.to_string())
                .await
                .unwrap()
                .unwrap();
            let started = Instant::now();
            let chunk = vec![1u8; 16 * 1024];
            // Writes fail, or the read sees the end, once the reset has come through.
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 64];
                    if let Ok(Ok(0) | Err(_)) =
                        tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
                    {
                        return;
                    }
                }
            })
            .await;
            (ended.is_ok(), started.elapsed())
        })
    };
    let mut unread = http_connect(&target, &silent.to_string())
        .await
        .unwrap()
        .unwrap();
    let blocked = tokio::time::timeout(
        Duration::from_secs(3),
        unread.write_all(&vec![2u8; 16 << 20]),
    )
    .await;
    assert!(
        blocked.is_err(),
        "16 MiB went into a destination that reads nothing"
    );
    // Beside the blocked one, on the same agent stream: 4 MiB both ways.
    let started = Instant::now();
    assert!(
        transfer_big(&target, echo).await,
        "a transfer beside a blocked connection did not complete"
    );
    let beside = started.elapsed();

    let (answer, took) = never_accepts.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 504"),
        "a destination that never accepts got {answer:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the dial timeout took {took:?}"
    );
    let (ended, took) = resets.await.unwrap();
    assert!(ended, "a reset destination's client was never told");
    println!("reset noticed after {took:?}; transfer beside a blocked one took {beside:?}");
}

/// 4 MiB to the echo server and back, checked.
async fn transfer_big(target: &Target, echo: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) = http_connect(target, &echo.to_string()).await else {
        return false;
    };
    let sent = pattern(7, 4 << 20);
    let (mut reader, mut writer) = tokio::io::split(&mut stream);
    let mut back = vec![0u8; sent.len()];
    let (written, read) = tokio::join!(writer.write_all(&sent), reader.read_exact(&mut back));
    written.is_ok() && read.is_ok() && back == sent
}

/// 10 000 dials, 1 000 in flight at a time: every one is answered (connected, or refused with
/// the agent's limit error), none hangs, and afterwards the agent and the server hold what
/// they held before.
#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_ten_thousand_dials_is_answered() {
    const DIALS: u64 = 10_000;
    const IN_FLIGHT: u64 = 1_000;
    let cluster = tether_tests::cluster::Cluster::start(
        tether_tests::cluster::Mode::HttpConnect,
        tether_tests::cluster::Transport::Uds,
        &[],
        &[],
    )
    .unwrap();
    let echo = destination::echo().await;
    let server_pid = cluster.server.logged.process.pid();
    let agent_pid = cluster.agent.as_ref().unwrap().logged.process.pid();
    let before = (open_fds(server_pid), open_fds(agent_pid));
    let connected = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let target = cluster.target.clone();
            let (connected, refused) = (connected.clone(), refused.clone());
            tokio::spawn(async move {
                for i in (w..DIALS).step_by(IN_FLIGHT as usize) {
                    let dial = async {
                        match http_connect(&target, &echo.to_string()).await.unwrap() {
                            Ok(mut stream) => {
                                stream.write_all(&[i as u8]).await.unwrap();
                                let mut back = [0u8; 1];
                                stream.read_exact(&mut back).await.unwrap();
                                assert_eq!(back[0], i as u8);
                                connected.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(response) => {
                                assert!(
                                    response.contains("dials already in flight")
                                        || response.contains("connection limit"),
                                    "dial {i} refused without the limit's words: {response:?}"
                                );
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    };
                    tokio::time::timeout(Duration::from_secs(30), dial)
                        .await
                        .unwrap_or_else(|_| panic!("dial {i} hung"));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let (connected, refused) = (
        connected.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    println!("{DIALS} dials: {connected} connected, {refused} refused at the limit");
    assert_eq!(connected + refused, DIALS);
    assert!(
        connected >= DIALS / 2,
        "only {connected} of {DIALS} dials connected"
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            open_fds(server_pid) <= before.0 && open_fds(agent_pid) <= before.1
        }),
        "descriptors after the storm: server {} (was {}), agent {} (was {})",
        open_fds(server_pid),
        before.0,
        open_fds(agent_pid),
        before.1
    );
}

/// An agent that vanishes without a FIN (its node died, a partition) is given up by the server
/// within four `--agent-probe-interval`s, so no dial waits on it; without the probe, only an
/// HTTP/2 keepalive (`--keepalive-time`, an hour) would notice. The server's firewall, in a
/// namespace of the test's own, swallows everything the agent sends.
#[test]
fn an_agent_that_vanishes_is_given_up_by_the_server() {
    use tether_tests::netns::Netns;

    let ns = Netns::new("vanish").unwrap();
    let pki = Pki::new(&[]).unwrap();
    let uds = pki.dir().join("vanish.sock");
    let args = server_args(&pki, &uds, 0, &["--agent-probe-interval=1s"]);
    let (server, _agent) = tether_tests::procs::connected_in(&ns, &pki.ca(), &args, &[]).unwrap();
    let health = server.health_port;
    ns.swallow_tcp("--dport", server.agent_port).unwrap();
    let cut = Instant::now();
    let gone = ns
        .run(|| {
            wait_until(Duration::from_secs(15), || {
                tether_tests::procs::http_get(health, "/readyz").is_ok_and(|(s, _)| s != 200)
            })
        })
        .unwrap();
    let took = cut.elapsed();
    assert!(gone, "the server still counts on an agent that vanished");
    assert!(
        took < Duration::from_secs(8),
        "the server gave the agent up after {took:?}; four probe intervals are 4s"
    );
}

/// Drops every packet on `netns`'s eth0, both ways, until the returned guard goes: a network
/// that blackholes without a word (no RST, no ICMP), as a failing link or a routing flap does.
struct Blackhole<'a>(&'a tether_tests::netns::Netns);

impl<'a> Blackhole<'a> {
    fn on(netns: &'a tether_tests::netns::Netns) -> Self {
        let rules = "table inet blip {\n\
            chain in { type filter hook input priority -300; iifname \"eth0\" drop; }\n\
            chain out { type filter hook output priority -300; oifname \"eth0\" drop; }\n\
            }\n";
        let mut nft = std::process::Command::new("ip")
            .args(["netns", "exec", netns.name(), "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft refused the blackhole");
        Blackhole(netns)
    }
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                self.0.name(),
                "nft",
                "delete",
                "table",
                "inet",
                "blip",
            ])
            .status();
    }
}

/// A ten-second network blip between the node and the control plane while a session is open
/// (an exec's stream: a line each 200 ms, echoed): the tunnel rides it out, as upstream's pair
/// does, and every line arrives, in order, once the network is back. The agent gives a silent
/// server `--peer-timeout` (30 s), the server a silent agent four `--agent-probe-interval`s
/// (20 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_ten_second_blip_costs_no_session() {
    use tether_tests::guard_site::{NODE, Site};
    let site = Site::new("blip");
    let echo = site
        .node
        .run(|| std::net::TcpListener::bind(format!("{NODE}:0")))
        .unwrap()
        .unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in echo.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    let _agent = site.agent(&["--guard-mode=off"]);
    let target = Target::Uds(site.socket.clone());
    let io = http_connect(&target, &format!("{NODE}:{port}"))
        .await
        .unwrap()
        .unwrap();
    let (mut reader, mut writer) = tokio::io::split(io);
    let lines: Vec<String> = (0..80)
        .map(|i| format!("line {i:03} of the session\n"))
        .collect();
    let sent: String = lines.concat();
    let echoed = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < sent.len() {
            match tokio::time::timeout(Duration::from_secs(45), reader.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
        (String::from_utf8_lossy(&got).into_owned(), sent)
    });
    let started = Instant::now();
    let mut blackhole = None;
    for (i, line) in lines.iter().enumerate() {
        // From the tenth line on, ten seconds of silence on the wire.
        if i == 10 {
            blackhole = Some(Blackhole::on(&site.node));
        }
        if blackhole.is_some() && started.elapsed() > Duration::from_secs(12) {
            blackhole = None;
        }
        writer.write_all(line.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(blackhole);
    let (got, sent) = echoed.await.unwrap();
    assert_eq!(
        got.len(),
        sent.len(),
        "the session ended or lost bytes across the blip; it got:\n{got}"
    );
    assert_eq!(got, sent);
}
