//! `cargo xtask bench fleet`: one process plays N agents against one server — each its own TLS
//! connection from its own loopback address, with its own ID and `host=` identifier, answering
//! dials and echoing data as upstream's agent protocol says — so tether-server and upstream's
//! server can be measured with thousands of agents on one machine, in the same run:
//!
//! - server RSS per connected agent, and server CPU per agent per minute while idle;
//! - the reconnect storm: the server killed and started again with N agents waiting (each
//!   redials after 0–250 ms, then backs off ×1.5 up to 1 s, as tether-agent does with
//!   `--server-addresses=each`): the time until all N are back, and how long the last one took;
//! - dial latency p50/p99 through the gRPC frontend to random agents while all are connected.
//!
//! tether-server is measured twice: as it starts by default, and with
//! `--session-ticket-key-file`, where the restarted server resumes the agents' TLS sessions.
//! Each simulated agent keeps its own session store, as separate agent processes would.
//!
//! With `--token-qps Q` the agents authenticate by service-account token instead, each its
//! own (as each agent pod has its own projected token), every server reviewing them at Q
//! TokenReviews per second against a stand-in kube-apiserver on loopback. tether-server is
//! then measured as it starts by default, and with `--token-review-cache-file`, where the
//! restarted server reuses the answers it had.
//!
//! Command line: `fleet_bench [--agents N,N,...] [--idle-seconds S] [--dials D]
//! [--token-qps Q] [--upstream-bin DIR]`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tether_proto::agent::agent_service_client::AgentServiceClient;
use tether_proto::{Message, Packet};
use tether_tests::cluster::{Mode, Transport};
use tether_tests::frontend::{GrpcTunnel, grpc_client};
use tether_tests::kube_api::{self, KubeApi, TokenOwner};
use tether_tests::peers::{self, Impl, Peer, ServerPorts};
use tether_tests::pki::Pki;
use tether_tests::process::{cpu_time, rss_kib, wait_until};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataValue;
use tonic::transport::{Endpoint, Uri};

struct Args {
    agents: Vec<usize>,
    idle: Duration,
    dials: usize,
    /// Token authentication at this many TokenReviews per second, instead of certificates.
    token_qps: Option<u32>,
    upstream: Option<PathBuf>,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut args = Args {
            agents: vec![1_000, 5_000, 10_000],
            idle: Duration::from_secs(30),
            dials: 1_000,
            token_qps: None,
            upstream: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = || it.next().with_context(|| format!("{arg} takes a value"));
            match arg.as_str() {
                "--agents" => {
                    args.agents = value()?
                        .split(',')
                        .map(|n| n.parse().context("--agents takes whole numbers"))
                        .collect::<Result<_>>()?;
                }
                "--idle-seconds" => args.idle = Duration::from_secs(value()?.parse()?),
                "--dials" => args.dials = value()?.parse()?,
                "--token-qps" => {
                    args.token_qps = Some(
                        value()?
                            .parse()
                            .context("--token-qps takes a whole number")?,
                    );
                }
                "--upstream-bin" => args.upstream = Some(PathBuf::from(value()?)),
                other => bail!(
                    "unknown argument {other:?}; usage: fleet_bench [--agents N,N,...] [--idle-seconds S] [--dials D] [--token-qps Q] [--upstream-bin DIR]"
                ),
            }
        }
        Ok(args)
    }
}

/// What every simulated agent shares.
struct Fleet {
    port: u16,
    /// Each agent builds its own connector from this, with its own session store, as
    /// separate agent processes would.
    tls: Arc<rustls::ClientConfig>,
    /// Agents whose stream is up now.
    connected: AtomicUsize,
    /// Per agent: milliseconds since `epoch` at which its stream last came up.
    up_at: Vec<AtomicU64>,
    epoch: Instant,
    stop: CancellationToken,
    /// Agents send their own service-account token ([`token`]).
    tokens: bool,
}

const ACCOUNT: &str = "system:serviceaccount:kube-system:konnectivity-agent";
const AUDIENCE: &str = "system:konnectivity-server";

/// Agent `i`'s service-account token.
fn token(i: usize) -> String {
    format!("fleet-token-{i}")
}

/// Agent `i`'s source address: 127.1.0.1 onwards, 250 per /24, so per-source admission limits
/// see a fleet of hosts rather than one.
fn source(i: usize) -> Ipv4Addr {
    let (hi, lo) = (i / 250, i % 250);
    Ipv4Addr::new(127, 1 + (hi / 256) as u8, (hi % 256) as u8, lo as u8 + 1)
}

impl Fleet {
    fn start(
        n: usize,
        port: u16,
        pki: &Pki,
        tokens: bool,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>> {
        let fleet = Arc::new(Fleet {
            port,
            tls: client_tls(pki)?,
            connected: AtomicUsize::new(0),
            up_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            stop: CancellationToken::new(),
            tokens,
        });
        for i in 0..n {
            tracker.spawn(fleet.clone().agent(i));
        }
        Ok(fleet)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One agent: a stream held, redialled when it ends.
    async fn agent(self: Arc<Self>, i: usize) {
        let mut config = (*self.tls).clone();
        config.resumption = rustls::client::Resumption::in_memory_sessions(1);
        let tls = TlsConnector::from(Arc::new(config));
        let mut backoff = Duration::from_millis(250);
        // The first dial is spread too: N agents starting at once are a storm of their own.
        let mut delay = Duration::from_millis(250).mul_f64(rand::random::<f64>());
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => return,
            }
            delay = match self.session(i, &tls).await {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                    backoff.mul_f64(rand::random::<f64>())
                }
                Err(_) => {
                    let step = backoff.mul_f64(1.0 + rand::random::<f64>() * 0.1);
                    backoff = backoff.mul_f64(1.5).min(Duration::from_secs(1));
                    step
                }
            };
        }
    }

    /// Connects, serves the stream until it ends; `Err` when it never came up.
    async fn session(&self, i: usize, tls: &TlsConnector) -> Result<()> {
        let (tls, port, from) = (tls.clone(), self.port, source(i));
        let channel = Endpoint::from_static("http://agent-port")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let tls = tls.clone();
                async move {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind((from, 0).into())?;
                    // A killed server can leave a connection that was still in its accept
                    // queue open on this side with nobody behind it; probes find those, as
                    // tether-agent's own do.
                    socket2::SockRef::from(&socket).set_tcp_keepalive(
                        &socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(2))
                            .with_interval(Duration::from_secs(1))
                            .with_retries(3),
                    )?;
                    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
                    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
                }
            }))
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let metadata = request.metadata_mut();
        metadata.insert("agentid", MetadataValue::try_from(format!("agent-{i}"))?);
        metadata.insert(
            "agentidentifiers",
            MetadataValue::try_from(format!("host=agent-{i}"))?,
        );
        if self.tokens {
            metadata.insert(
                "authorization",
                MetadataValue::try_from(format!("Bearer {}", token(i)))?,
            );
        }
        let mut client = AgentServiceClient::new(channel);
        let mut inbound = tokio::select! {
            response = client.connect(request) => response?.into_inner(),
            () = self.stop.cancelled() => return Ok(()),
        };
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.up_at[i].store(self.now_ms(), Ordering::Relaxed);
        let mut next_id = 0i64;
        loop {
            let packet = tokio::select! {
                packet = inbound.message() => packet,
                () = self.stop.cancelled() => break,
            };
            let Ok(Some(packet)) = packet else { break };
            let answer = match packet.into_message() {
                Message::DialRequest(dial) => {
                    next_id += 1;
                    Packet::dial_response(dial.random, next_id, "")
                }
                Message::Data(data) => Packet::data(data.connect_id, data.data),
                Message::CloseRequest(close) => Packet::close_response(close.connect_id, ""),
                _ => continue,
            };
            if tx.send(answer).await.is_err() {
                break;
            }
        }
        self.connected.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The agents' TLS: trusting the test CA, presenting the agent certificate.
fn client_tls(pki: &Pki) -> Result<Arc<rustls::ClientConfig>> {
    let pair = pki.pair("agent");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.ca())? {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_file_iter(&pair.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pair.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Whether all `n` agents are connected within `limit`.
async fn all_connected(fleet: &Fleet, n: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while fleet.connected.load(Ordering::Relaxed) != n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// One server's figures at one fleet size.
struct Row {
    connect_all: Duration,
    rss_per_agent_kib: f64,
    idle_cpu_ms_per_agent_minute: f64,
    dial_p50: Duration,
    dial_p99: Duration,
    dial_failures: usize,
    storm: Option<Duration>,
    /// The restarted server's CPU until every agent was back, per agent.
    storm_cpu_per_agent: Duration,
    /// Agents not back when the storm's deadline passed.
    starved: usize,
    /// Handshakes the restarted server resumed from a ticket (tether only).
    resumed: Option<f64>,
    /// TokenReviews the restarted server asked for until every agent was back (token legs).
    reviews: Option<usize>,
}

const STORM_DEADLINE: Duration = Duration::from_secs(120);

/// One server set-up the fleet faces.
struct Leg {
    imp: Impl,
    /// Agents authenticate by token, reviewed at this many per second.
    token_qps: Option<u32>,
    /// tether-server keeps what it learnt across the restart: with `--session-ticket-key-file`
    /// agents resume their TLS sessions, with `--token-review-cache-file` their tokens need
    /// no new review.
    keeps: bool,
}

impl Leg {
    fn name(&self) -> &'static str {
        match (&self.imp, self.token_qps.is_some(), self.keeps) {
            (Impl::Tether, false, false) => "tether",
            (Impl::Tether, false, true) => "tether, ticket key",
            (Impl::Tether, true, false) => "tether, token",
            (Impl::Tether, true, true) => "tether, token, cache file",
            (Impl::Upstream(_), false, _) => "upstream",
            (Impl::Upstream(_), true, _) => "upstream, token",
        }
    }
}

/// `kubeconfig` reaches the stand-in kube-apiserver (token legs only).
fn start_server(
    leg: &Leg,
    pki: &Pki,
    ports: ServerPorts,
    kubeconfig: Option<&std::path::Path>,
) -> Result<Peer> {
    let mut args = vec![
        "--server-count=1".to_owned(),
        "--proxy-strategies=destHost".to_owned(),
    ];
    if let (Some(qps), Some(kubeconfig)) = (leg.token_qps, kubeconfig) {
        args.extend([
            "--agent-namespace=kube-system".to_owned(),
            "--agent-service-account=konnectivity-agent".to_owned(),
            format!("--authentication-audience={AUDIENCE}"),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--kube-api-content-type=application/json".to_owned(),
            format!("--kubeconfig-qps={qps}"),
            format!("--kubeconfig-burst={qps}"),
        ]);
        if leg.keeps {
            args.push(format!(
                "--token-review-cache-file={}",
                pki.dir().join("reviews.json").display()
            ));
        }
    } else if leg.keeps {
        args.push(format!(
            "--session-ticket-key-file={}",
            ticket_key(pki)?.display()
        ));
    }
    peers::server(
        &leg.imp,
        pki,
        Mode::Grpc,
        Transport::Uds,
        &pki.dir().join("fleet.sock"),
        ports,
        &args,
    )
}

/// The ticket key file, made once per fleet: the restarted server must read the same one.
fn ticket_key(pki: &Pki) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = pki.dir().join("ticket.key");
    if !path.exists() {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?,
            &secret,
        )?;
    }
    Ok(path)
}

async fn measure(leg: &Leg, n: usize, args: &Args) -> Result<Row> {
    let pki = Pki::new(&[])?;
    let ports = ServerPorts::free()?;
    // Held for the whole measure: both the server and its restarted self review through it.
    let stand_in = leg.token_qps.is_some().then(|| {
        let tokens = (0..n)
            .map(|i| TokenOwner {
                token: token(i),
                username: ACCOUNT.to_owned(),
                audiences: vec![AUDIENCE.to_owned()],
                node: None,
            })
            .collect();
        let pair = pki.pair("server");
        let cluster = kube_api::Cluster {
            tokens,
            ..kube_api::Cluster::default()
        };
        let (api, port) = KubeApi::start_on_loopback(cluster, &pair.cert, &pair.key);
        (api, KubeApi::kubeconfig(pki.dir(), port, &pki.ca()))
    });
    let kubeconfig = stand_in.as_ref().map(|(_, path)| path.as_path());
    let mut server = start_server(leg, &pki, ports, kubeconfig)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(server.pid);
    let tracker = TaskTracker::new();
    let started = Instant::now();
    let fleet = Fleet::start(n, ports.agent, &pki, leg.token_qps.is_some(), &tracker)?;
    if !all_connected(&fleet, n, Duration::from_secs(300)).await {
        bail!(
            "{}: only {} of {n} agents connected",
            leg.name(),
            fleet.connected.load(Ordering::Relaxed)
        );
    }
    let connect_all = started.elapsed();
    // The server registers a stream a moment after it sends the headers the fleet counts.
    let port = server.health_port;
    let registered = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(30), || {
            peers::metric(
                port,
                "konnectivity_network_proxy_server_ready_backend_connections ",
            )
            .is_some_and(|v| v >= n as f64)
        })
    })
    .await?;
    if !registered {
        bail!("{}: the server never counted {n} agents", leg.name());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_per_agent_kib = (rss_kib(server.pid).saturating_sub(rss_before)) as f64 / n as f64;

    let cpu_before = cpu_time(server.pid);
    tokio::time::sleep(args.idle).await;
    let idle_cpu = cpu_time(server.pid).saturating_sub(cpu_before);
    let idle_cpu_ms_per_agent_minute =
        idle_cpu.as_secs_f64() * 1e3 / n as f64 * (60.0 / args.idle.as_secs_f64());

    let target = server.target.clone().context("no frontend")?;
    let mut client = grpc_client(&target).await?;
    let mut latencies = Vec::with_capacity(args.dials);
    let mut dial_failures = 0;
    for _ in 0..args.dials {
        let agent = rand::random_range(0..n);
        let begun = Instant::now();
        match GrpcTunnel::dial(&mut client, &format!("agent-{agent}:80")).await? {
            Ok(tunnel) => {
                latencies.push(begun.elapsed());
                tunnel.close().await?;
            }
            Err(_) => dial_failures += 1,
        }
    }
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let (dial_p50, dial_p99) = (percentile(0.5), percentile(0.99));

    // The storm: killed, started again on the same ports, every agent redialling.
    server
        .logged
        .process
        .signal(nix::sys::signal::Signal::SIGKILL)?;
    let _ = server.logged.process.wait_timeout(Duration::from_secs(10));
    drop(server);
    let killed = Instant::now();
    while fleet.connected.load(Ordering::Relaxed) > 0 {
        if killed.elapsed() > Duration::from_secs(60) {
            bail!(
                "{}: {} agents still think they are connected a minute after the server was killed",
                leg.name(),
                fleet.connected.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarted_at = fleet.now_ms();
    let reviews_before = stand_in.as_ref().map(|(api, _)| api.token_reviews());
    let server = start_server(leg, &pki, ports, kubeconfig)?;
    let back = all_connected(&fleet, n, STORM_DEADLINE).await;
    let reviews = stand_in
        .as_ref()
        .zip(reviews_before)
        .map(|((api, _), before)| api.token_reviews() - before);
    let storm_cpu_per_agent = cpu_time(server.pid) / u32::try_from(n)?;
    let resumed = matches!(leg.imp, Impl::Tether).then(|| {
        peers::metric(
            server.health_port,
            "tether_server_tls_handshakes_total{listener=\"agent\",kind=\"resumed\"} ",
        )
        .unwrap_or_default()
    });
    let storm = back.then(|| {
        let last = fleet
            .up_at
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .max()
            .unwrap_or(restarted_at);
        Duration::from_millis(last.saturating_sub(restarted_at))
    });
    let starved = fleet
        .up_at
        .iter()
        .filter(|t| t.load(Ordering::Relaxed) < restarted_at)
        .count();
    fleet.stop.cancel();
    tracker.close();
    tracker.wait().await;
    drop(server);
    Ok(Row {
        connect_all,
        rss_per_agent_kib,
        idle_cpu_ms_per_agent_minute,
        dial_p50,
        dial_p99,
        dial_failures,
        storm,
        storm_cpu_per_agent,
        starved,
        resumed,
        reviews,
    })
}

fn raise_descriptor_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    raise_descriptor_limit()?;
    let token_qps = args.token_qps;
    let mut legs = vec![
        Leg {
            imp: Impl::Tether,
            token_qps,
            keeps: false,
        },
        Leg {
            imp: Impl::Tether,
            token_qps,
            keeps: true,
        },
    ];
    if let Some(dir) = &args.upstream {
        legs.push(Leg {
            imp: Impl::Upstream(dir.clone()),
            token_qps,
            keeps: false,
        });
    }
    println!(
        "fleet bench: agents {:?}, idle {:?}, {} dials, {}; server CPU from /proc, RSS above the server's own before any agent",
        args.agents,
        args.idle,
        args.dials,
        token_qps.map_or_else(
            || "client certificates".to_owned(),
            |q| format!("tokens reviewed at {q}/s")
        )
    );
    println!(
        "| agents | server | all connected (s) | RSS per agent (KiB) | idle CPU per agent (ms/min) | dial p50 / p99 (ms) | dial failures | storm: all back (s) | storm: server CPU per agent (µs) | storm: resumed | storm: TokenReviews | starved |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.agents {
        let mut rows = Vec::new();
        for leg in &legs {
            let row = measure(leg, n, &args).await?;
            println!(
                "| {n} | {} | {:.1} | {:.1} | {:.3} | {} / {} | {} | {} | {:.0} | {} | {} | {} |",
                leg.name(),
                row.connect_all.as_secs_f64(),
                row.rss_per_agent_kib,
                row.idle_cpu_ms_per_agent_minute,
                ms(row.dial_p50),
                ms(row.dial_p99),
                row.dial_failures,
                row.storm.map_or_else(
                    || "not all".to_owned(),
                    |d| format!("{:.2}", d.as_secs_f64())
                ),
                row.storm_cpu_per_agent.as_secs_f64() * 1e6,
                row.resumed
                    .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.0}")),
                row.reviews
                    .map_or_else(|| "n/a".to_owned(), |r| r.to_string()),
                row.starved
            );
            rows.push(row);
        }
        let Some((theirs, ours)) = rows.split_last().filter(|_| args.upstream.is_some()) else {
            continue;
        };
        for (leg, ours) in legs.iter().zip(ours) {
            println!(
                "| {n} | {} / upstream | {:.2} | {:.2} | {} | {:.2} / {:.2} | | {} | {:.2} | | | |",
                leg.name(),
                ours.connect_all.as_secs_f64() / theirs.connect_all.as_secs_f64(),
                ours.rss_per_agent_kib / theirs.rss_per_agent_kib,
                // Both round to nothing when no keepalive fell in the idle window.
                if theirs.idle_cpu_ms_per_agent_minute > 0.0 {
                    format!(
                        "{:.2}",
                        ours.idle_cpu_ms_per_agent_minute / theirs.idle_cpu_ms_per_agent_minute
                    )
                } else {
                    "n/a".to_owned()
                },
                ours.dial_p50.as_secs_f64() / theirs.dial_p50.as_secs_f64(),
                ours.dial_p99.as_secs_f64() / theirs.dial_p99.as_secs_f64(),
                match (ours.storm, theirs.storm) {
                    (Some(a), Some(b)) => format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()),
                    _ => "n/a".to_owned(),
                },
                ours.storm_cpu_per_agent.as_secs_f64() / theirs.storm_cpu_per_agent.as_secs_f64(),
            );
        }
    }
    Ok(())
}
