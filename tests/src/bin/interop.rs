//! `cargo xtask interop --upstream-bin DIR`: tether against upstream Konnectivity's own
//! binaries (proxy-server, proxy-agent, test-client, test-server, built from
//! kubernetes-sigs/apiserver-network-proxy into DIR), both ways round: tether-agent behind the
//! upstream server, and the upstream agent behind tether-server. One line per check, then
//! `N passed, M failed`; a failed check prints the peers' last log lines. A last argument runs
//! only the checks whose name contains it.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tether_proto::Packet;
use tether_tests::backend;
use tether_tests::cluster::{Mode, Transport};
use tether_tests::frontend::{Event, GrpcTunnel, Target, grpc_client, http_connect, raw_h2};
use tether_tests::peers::{self, Impl, Peer, ServerPorts};
use tether_tests::pki::Pki;
use tether_tests::process::wait_until;
use tether_tests::procs::wait_ready;
use tether_tests::raw_h2::RawH2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// One pairing: whose agent behind whose server.
#[derive(Clone)]
struct Pair {
    agent: Impl,
    server: Impl,
    upstream: PathBuf,
}

impl Pair {
    fn label(&self) -> String {
        format!("{}-agent/{}-server", self.agent.name(), self.server.name())
    }
}

/// A server and its agents, with a private PKI and socket directory.
struct Setup {
    pki: Pki,
    server: Peer,
    agents: Vec<Peer>,
    ports: ServerPorts,
    mode: Mode,
    transport: Transport,
}

impl Setup {
    fn start(pair: &Pair, mode: Mode, transport: Transport, server_extra: &[&str]) -> Result<Self> {
        let pki = Pki::new(&[])?;
        let ports = ServerPorts::free()?;
        let extra: Vec<String> = server_extra.iter().map(|s| s.to_string()).collect();
        let server = peers::server(
            &pair.server,
            &pki,
            mode,
            transport,
            &pki.dir().join("s.sock"),
            ports,
            &extra,
        )?;
        Ok(Setup {
            pki,
            server,
            agents: Vec::new(),
            ports,
            mode,
            transport,
        })
    }

    fn add_agent(&mut self, pair: &Pair, extra: &[&str]) -> Result<()> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let agent = peers::agent(&pair.agent, &self.pki, self.server.agent_port, &extra)?;
        if !wait_ready(agent.health_port, Duration::from_secs(15)) {
            bail!("the agent never became ready");
        }
        self.agents.push(agent);
        ensure!(
            wait_ready(self.server.health_port, Duration::from_secs(15)),
            "the server never became ready"
        );
        Ok(())
    }

    fn with_agent(pair: &Pair, mode: Mode, transport: Transport) -> Result<Self> {
        let mut setup = Self::start(pair, mode, transport, &[])?;
        setup.add_agent(pair, &[])?;
        Ok(setup)
    }

    fn target(&self) -> Result<&Target> {
        self.server
            .target
            .as_ref()
            .context("server has no frontend")
    }

    fn restart_server(&mut self, pair: &Pair) -> Result<()> {
        self.server
            .logged
            .process
            .signal(nix::sys::signal::Signal::SIGKILL)?;
        self.server
            .logged
            .process
            .wait_timeout(Duration::from_secs(5))?;
        self.server = peers::server(
            &pair.server,
            &self.pki,
            self.mode,
            self.transport,
            &self.pki.dir().join("s.sock"),
            self.ports,
            &[],
        )?;
        Ok(())
    }

    /// The last log lines of every process, for a failed check.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, peer) in std::iter::once(("server", &self.server))
            .chain(self.agents.iter().map(|a| ("agent", a)))
        {
            let lines = peer.logged.logs.lines();
            let tail = &lines[lines.len().saturating_sub(8)..];
            out.push_str(&format!("    --- {name} (pid {}):\n", peer.pid));
            for line in tail {
                out.push_str(&format!(
                    "    {}\n",
                    line.chars().take(300).collect::<String>()
                ));
            }
        }
        out
    }
}

/// Echoes `len` bytes over a gRPC `Proxy` stream, then closes it.
async fn grpc_echo(target: &Target, echo: &str, len: usize) -> Result<()> {
    let mut client = grpc_client(target).await?;
    let mut tunnel = GrpcTunnel::dial(&mut client, echo)
        .await?
        .map_err(|e| anyhow::anyhow!("dial failed: {e}"))?;
    let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let (tx, id) = (tunnel.sender(), tunnel.connect_id);
    let chunks: Vec<Bytes> = sent.chunks(32 * 1024).map(Bytes::copy_from_slice).collect();
    let writer = tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(Packet::data(id, chunk)).await.is_err() {
                break;
            }
        }
    });
    let mut got = Vec::with_capacity(len);
    while got.len() < len {
        match tunnel.next().await? {
            Some(Event::Data(data)) => got.extend_from_slice(&data),
            other => bail!("echo ended after {} bytes: {other:?}", got.len()),
        }
    }
    writer.await?;
    ensure!(got == sent, "echoed bytes differ");
    tunnel.close().await?;
    let (_, error) = tunnel.read_to_close().await?;
    ensure!(error.is_empty(), "CLOSE_RSP carried {error:?}");
    Ok(())
}

/// Echoes `len` bytes over an HTTP CONNECT tunnel.
async fn connect_echo(target: &Target, echo: &str, len: usize) -> Result<()> {
    let stream = http_connect(target, echo)
        .await?
        .map_err(|e| anyhow::anyhow!("CONNECT refused: {e}"))?;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sent: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let to_send = sent.clone();
    let write = tokio::spawn(async move { writer.write_all(&to_send).await });
    let mut got = vec![0u8; len];
    reader.read_exact(&mut got).await?;
    write.await??;
    ensure!(got == sent, "echoed bytes differ");
    Ok(())
}

async fn echo_through(mode: Mode, target: &Target, echo: &str, len: usize) -> Result<()> {
    match mode {
        Mode::Grpc => grpc_echo(target, echo, len).await,
        Mode::HttpConnect => connect_echo(target, echo, len).await,
    }
}

/// Upstream's test-client fetching test-server's page through the tunnel (for gRPC over a Unix
/// socket it sends the socket path as :authority, as kube-apiserver does).
fn test_client(upstream: &Path, setup: &Setup, page_port: u16) -> Result<()> {
    let mut cmd = Command::new(upstream.join("test-client"));
    cmd.arg(format!(
        "--mode={}",
        match setup.mode {
            Mode::Grpc => "grpc",
            Mode::HttpConnect => "http-connect",
        }
    ))
    .args(["--request-host=127.0.0.1", "--request-path=success"])
    .arg(format!("--request-port={page_port}"));
    match setup.target()? {
        Target::Uds(path) => {
            cmd.arg(format!("--proxy-uds={}", path.display()))
                .args(["--proxy-host=", "--proxy-port=0"]);
        }
        Target::Tls {
            port,
            ca,
            cert,
            key,
        } => {
            cmd.args(["--proxy-host=localhost"])
                .arg(format!("--proxy-port={port}"))
                .arg(format!("--ca-cert={}", ca.display()))
                .arg(format!("--client-cert={}", cert.display()))
                .arg(format!("--client-key={}", key.display()));
        }
    }
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && text.contains("The success test page!"),
        "test-client {}: {}",
        out.status,
        text.lines()
            .filter(|l| l.starts_with('E') || l.starts_with("Error"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    Ok(())
}

/// Upstream's test-server on a free port.
fn page_server(upstream: &Path) -> Result<(tether_tests::process::Process, u16)> {
    let port = peers::free_port()?;
    let mut cmd = Command::new(upstream.join("test-server"));
    cmd.arg(format!("--server-port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let process = tether_tests::process::Process::spawn("test-server", &mut cmd)?;
    ensure!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "test-server did not listen"
    );
    Ok((process, port))
}

/// A metric's value by name and labels, whatever order the labels are printed in.
fn metric_with(port: u16, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = peers::metrics_page(port).ok()?;
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let found: BTreeSet<&str> = rest.trim_end_matches('}').split(',').collect();
        labels
            .iter()
            .all(|(k, v)| found.contains(format!("{k}=\"{v}\"").as_str()))
            .then(|| value.parse().ok())?
    })
}

/// The sample names (without labels) a `/metrics` page shows, minus Go's runtime metrics.
fn names(port: u16) -> Result<BTreeSet<String>> {
    let text = peers::metrics_page(port)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| n.starts_with("konnectivity_") || n.starts_with("process_"))
        .map(str::to_owned)
        .collect())
}

struct Report {
    passed: usize,
    failed: usize,
    /// Only checks whose name contains this run.
    only: Option<String>,
}

impl Report {
    async fn check<F>(&mut self, name: String, check: F)
    where
        F: Future<Output = Result<()>>,
    {
        if self
            .only
            .as_ref()
            .is_some_and(|only| !name.contains(only.as_str()))
        {
            return;
        }
        let outcome = match tokio::time::timeout(Duration::from_secs(120), check).await {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("timed out after 120 s")),
        };
        match outcome {
            Ok(()) => {
                self.passed += 1;
                println!("PASS {name}");
            }
            Err(err) => {
                self.failed += 1;
                println!("FAIL {name}: {err:#}");
            }
        }
    }
}

/// Adds the peers' logs to an error.
fn with_logs<T>(setup: &Setup, result: Result<T>) -> Result<T> {
    result.map_err(|err| anyhow::anyhow!("{err:#}\n{}", setup.logs()))
}

async fn modes_and_transports(pair: &Pair, report: &mut Report) {
    let echo = backend::echo().await.to_string();
    for mode in [Mode::Grpc, Mode::HttpConnect] {
        for transport in [Transport::Uds, Transport::Mtls] {
            let name = format!(
                "{}: {mode:?} over {transport:?}: 4 MiB echoed, closed cleanly",
                pair.label()
            );
            report
                .check(name, async {
                    let setup = Setup::with_agent(pair, mode, transport)?;
                    with_logs(
                        &setup,
                        echo_through(mode, setup.target()?, &echo, 4 << 20).await,
                    )
                })
                .await;
            let name = format!(
                "{}: {mode:?} over {transport:?}: upstream test-client GET",
                pair.label()
            );
            report
                .check(name, async {
                    let setup = Setup::with_agent(pair, mode, transport)?;
                    let (_page, port) = page_server(&pair.upstream)?;
                    let upstream = pair.upstream.clone();
                    with_logs(&setup, test_client(&upstream, &setup, port))
                })
                .await;
        }
    }
}

/// `tether-server probe` against either server: reachable, and the agent named where the
/// server is tether (upstream ignores the question, so the probe says it does not know).
async fn probe(pair: &Pair, report: &mut Report) {
    for mode in [Mode::Grpc, Mode::HttpConnect] {
        for transport in [Transport::Uds, Transport::Mtls] {
            let name = format!(
                "{}: {mode:?} over {transport:?}: tether-server probe reaches upstream's test-server",
                pair.label()
            );
            report
                .check(name, async {
                    let setup = Setup::with_agent(pair, mode, transport)?;
                    let (_page, port) = page_server(&pair.upstream)?;
                    with_logs(&setup, run_probe(pair, &setup, port))
                })
                .await;
        }
    }
}

fn run_probe(pair: &Pair, setup: &Setup, page_port: u16) -> Result<()> {
    let mut cmd = setup.target()?.probe_command(setup.mode)?;
    cmd.args(["--timeout=5s", "--http-get=/success"]);
    let out = cmd.arg(format!("127.0.0.1:{page_port}")).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success()
            && text.contains("reachable: yes")
            && text.contains("reply: HTTP/1.1 200 OK"),
        "probe {}: {text}",
        out.status
    );
    let named = !text.contains("agent: unknown");
    ensure!(
        named == matches!(pair.server, Impl::Tether),
        "the agent line does not match the server ({}): {text}",
        pair.server.name()
    );
    Ok(())
}

async fn closed_port(pair: &Pair, report: &mut Report) {
    let name = format!(
        "{}: a closed port's dial error reaches the client",
        pair.label()
    );
    report
        .check(name, async {
            let setup = Setup::with_agent(pair, Mode::Grpc, Transport::Uds)?;
            let (_refusing, closed) = backend::refusing_port();
            let closed = closed.to_string();
            let mut client = grpc_client(setup.target()?).await?;
            match GrpcTunnel::dial(&mut client, &closed).await? {
                Err(error) => ensure!(
                    error == format!("dial tcp {closed}: connect: connection refused"),
                    "error text {error:?}"
                ),
                Ok(_) => bail!("dial to a closed port succeeded"),
            }
            let setup = Setup::with_agent(pair, Mode::HttpConnect, Transport::Uds)?;
            match http_connect(setup.target()?, &closed).await? {
                Err(response) => ensure!(
                    response.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
                        && response.ends_with("connect: connection refused"),
                    "response {response:?}"
                ),
                Ok(_) => bail!("CONNECT to a closed port succeeded"),
            }
            Ok(())
        })
        .await;
}

async fn restarts(pair: &Pair, report: &mut Report) {
    let echo = backend::echo().await.to_string();
    let name = format!(
        "{}: the agent reconnects after the server restarts",
        pair.label()
    );
    report
        .check(name, async {
            let mut setup = Setup::with_agent(pair, Mode::HttpConnect, Transport::Uds)?;
            connect_echo(setup.target()?, &echo, 1 << 16).await?;
            setup.restart_server(pair)?;
            let ready = wait_ready(setup.server.health_port, Duration::from_secs(30));
            with_logs(
                &setup,
                ensure_ok(ready, "the agent did not come back within 30 s"),
            )?;
            with_logs(&setup, connect_echo(setup.target()?, &echo, 1 << 16).await)
        })
        .await;
    let name = format!("{}: a restarted agent serves again", pair.label());
    report
        .check(name, async {
            let mut setup = Setup::with_agent(pair, Mode::Grpc, Transport::Uds)?;
            let old = setup.agents.remove(0);
            old.logged
                .process
                .signal(nix::sys::signal::Signal::SIGKILL)?;
            drop(old);
            setup.add_agent(pair, &[])?;
            with_logs(&setup, grpc_echo(setup.target()?, &echo, 1 << 16).await)
        })
        .await;
}

/// tether-server's `--bind-agent-identity=certificate` with an agent it did not write: the
/// upstream agent's certificate (CN and DNS name `agent`) backs `--agent-id=agent`, and
/// nothing else.
async fn identity_binding(pair: &Pair, report: &mut Report) {
    let echo = backend::echo().await.to_string();
    let name = format!(
        "{}: --bind-agent-identity=certificate lets in the certificate's name and refuses another",
        pair.label()
    );
    report
        .check(name, async {
            let mut setup = Setup::start(
                pair,
                Mode::HttpConnect,
                Transport::Uds,
                &["--bind-agent-identity=certificate"],
            )?;
            let extra = [
                "--agent-id=agent".to_owned(),
                "--agent-identifiers=host=agent".to_owned(),
            ];
            setup.agents.push(peers::agent(
                &pair.agent,
                &setup.pki,
                setup.server.agent_port,
                &extra,
            )?);
            let ready = wait_ready(setup.server.health_port, Duration::from_secs(15));
            with_logs(&setup, ensure_ok(ready, "the honest agent was not let in"))?;
            with_logs(&setup, connect_echo(setup.target()?, &echo, 1 << 16).await)?;
            let extra = ["--agent-id=node-b".to_owned()];
            setup.agents.push(peers::agent(
                &pair.agent,
                &setup.pki,
                setup.server.agent_port,
                &extra,
            )?);
            let refused = wait_until(Duration::from_secs(15), || {
                setup.server.logged.logs.lines().iter().any(|l| {
                    l.contains("node-b")
                        && l.contains("is not a name of the agent's certificate agent")
                })
            });
            with_logs(&setup, ensure_ok(refused, "node-b was not refused"))
        })
        .await;
}

fn ensure_ok(ok: bool, why: &str) -> Result<()> {
    if ok { Ok(()) } else { bail!("{why}") }
}

async fn server_count_two(pair: &Pair, report: &mut Report) {
    let name = format!(
        "{}: two servers (--server-count=2) behind one address: the agent holds both",
        pair.label()
    );
    report
        .check(name, async {
            let mut first = Setup::start(
                pair,
                Mode::HttpConnect,
                Transport::Uds,
                &["--server-count=2", "--server-id=first"],
            )?;
            let pki_dir = first.pki.dir().to_path_buf();
            let second_ports = ServerPorts::free()?;
            let second = peers::server(
                &pair.server,
                &first.pki,
                Mode::HttpConnect,
                Transport::Uds,
                &pki_dir.join("s2.sock"),
                second_ports,
                &["--server-count=2".into(), "--server-id=second".into()],
            )?;
            let lb = tether_tests::lb::round_robin(vec![
                ([127, 0, 0, 1], first.ports.agent).into(),
                ([127, 0, 0, 1], second_ports.agent).into(),
            ])
            .await;
            let extra: Vec<String> = vec![];
            let agent = peers::agent(&pair.agent, &first.pki, lb.port(), &extra)?;
            first.agents.push(agent);
            let agent_port = first.agents[0].health_port;
            let both = wait_until(Duration::from_secs(20), || {
                peers::metric(
                    agent_port,
                    "konnectivity_network_proxy_agent_open_server_connections ",
                ) == Some(2.0)
            });
            with_logs(
                &first,
                ensure_ok(both, "the agent does not hold two server streams"),
            )?;
            ensure!(
                wait_ready(first.server.health_port, Duration::from_secs(5))
                    && wait_ready(second.health_port, Duration::from_secs(5)),
                "not both servers are ready"
            );
            let echo = backend::echo().await.to_string();
            for target in [
                first.target()?.clone(),
                Target::Uds(pki_dir.join("s2.sock")),
            ] {
                with_logs(&first, connect_echo(&target, &echo, 1 << 16).await)?;
            }
            Ok(())
        })
        .await;
}

async fn dest_host(pair: &Pair, report: &mut Report) {
    let name = format!(
        "{}: destHost sends each dial to the agent that serves its host",
        pair.label()
    );
    report
        .check(name, async {
            let mut setup = Setup::start(
                pair,
                Mode::HttpConnect,
                Transport::Uds,
                &["--proxy-strategies=destHost"],
            )?;
            setup.add_agent(pair, &["--agent-identifiers=ipv4=127.0.0.1"])?;
            setup.add_agent(pair, &["--agent-identifiers=ipv4=127.0.0.2"])?;
            let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
            let far = listener.local_addr()?;
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = stream.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
            with_logs(
                &setup,
                connect_echo(setup.target()?, &far.to_string(), 1 << 16).await,
            )?;
            let dials = |agent: &Peer| {
                metric_with(
                    agent.health_port,
                    "konnectivity_network_proxy_agent_stream_packets_total",
                    &[("segment", "to_agent"), ("packet_type", "DIAL_REQ")],
                )
                .unwrap_or(0.0)
            };
            let (a, b) = (dials(&setup.agents[0]), dials(&setup.agents[1]));
            ensure!(
                (a, b) == (0.0, 1.0),
                "DIAL_REQs: agent for 127.0.0.1 got {a}, agent for 127.0.0.2 got {b}"
            );
            match http_connect(setup.target()?, "127.0.0.3:80").await? {
                Err(response) => ensure!(response.contains("No agent available"), "{response:?}"),
                Ok(_) => bail!("a host no agent serves was dialled"),
            }
            Ok(())
        })
        .await;
}

async fn slow_readers(pair: &Pair, report: &mut Report) {
    const TOTAL: u64 = 48 * MIB;
    const RATE: u64 = 12 * MIB;
    let name = format!(
        "{}: 48 MiB upload to a destination reading 12 MiB/s arrives whole",
        pair.label()
    );
    report
        .check(name, async {
            let setup = Setup::with_agent(pair, Mode::HttpConnect, Transport::Uds)?;
            let (sink, done) = backend::slow_sink(RATE, Some(TOTAL)).await;
            let mut stream = http_connect(setup.target()?, &sink.to_string())
                .await?
                .map_err(|e| anyhow::anyhow!("CONNECT refused: {e}"))?;
            let written = backend::write_pattern(&mut stream, TOTAL).await;
            with_logs(&setup, written.context("the upload was cut off"))?;
            // Kept open until the destination has it all: Konnectivity has no half-close, and
            // an upstream agent drops what it still holds when the server asks it to close.
            let got = tokio::time::timeout(Duration::from_secs(60), done).await??;
            with_logs(
                &setup,
                ensure_ok(
                    got.bytes == TOTAL && got.intact,
                    &format!("destination got {got:?}"),
                ),
            )
        })
        .await;
    let name = format!(
        "{}: 48 MiB download to a client reading 12 MiB/s arrives whole",
        pair.label()
    );
    report
        .check(name, async {
            let setup = Setup::with_agent(pair, Mode::HttpConnect, Transport::Uds)?;
            let source = backend::pattern_source(TOTAL).await;
            let mut stream = http_connect(setup.target()?, &source.to_string())
                .await?
                .map_err(|e| anyhow::anyhow!("CONNECT refused: {e}"))?;
            let got = backend::read_pattern_throttled(&mut stream, RATE).await?;
            with_logs(
                &setup,
                ensure_ok(
                    got.bytes == TOTAL && got.intact,
                    &format!("client got {got:?}"),
                ),
            )
        })
        .await;
}

/// The same traffic through both implementations of `role`; every metric name upstream shows
/// must be on tether's page too (lease metrics aside: tether refuses the lease flags).
async fn metric_names(upstream: &Path, role: &str, report: &mut Report) {
    let name = format!("{role} /metrics has every name upstream's {role} shows");
    report
        .check(name, async {
            let mut pages = Vec::new();
            let theirs = || Impl::Upstream(upstream.to_path_buf());
            for imp in [theirs(), Impl::Tether] {
                let upstream = upstream.to_path_buf();
                let pair = match role {
                    "agent" => Pair {
                        agent: imp,
                        server: theirs(),
                        upstream,
                    },
                    _ => Pair {
                        agent: theirs(),
                        server: imp,
                        upstream,
                    },
                };
                let setup = Setup::with_agent(&pair, Mode::Grpc, Transport::Uds)?;
                let echo = backend::echo().await.to_string();
                grpc_echo(setup.target()?, &echo, 1 << 16).await?;
                let (_refusing, closed) = backend::refusing_port();
                let closed = closed.to_string();
                let mut client = grpc_client(setup.target()?).await?;
                let _ = GrpcTunnel::dial(&mut client, &closed).await?;
                // A frontend message that is not a Packet: a stream error on both servers.
                let mut h2 = RawH2::handshake(raw_h2(setup.target()?).await?, b"localhost").await?;
                let stream = h2.open_proxy().await?;
                h2.send_message(stream, &[0xff; 8], false).await?;
                let _ = tokio::time::timeout(Duration::from_secs(2), h2.next()).await;
                let port = match role {
                    "agent" => setup.agents[0].health_port,
                    _ => setup.server.health_port,
                };
                pages.push(names(port)?);
            }
            let missing: Vec<&String> = pages[0]
                .difference(&pages[1])
                .filter(|n| !n.contains("lease"))
                .collect();
            ensure!(missing.is_empty(), "tether lacks {missing:?}");
            Ok(())
        })
        .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(flag), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: interop --upstream-bin DIR [ONLY]");
        return std::process::ExitCode::from(2);
    };
    if flag != "--upstream-bin" {
        eprintln!("usage: interop --upstream-bin DIR [ONLY]");
        return std::process::ExitCode::from(2);
    }
    let upstream = PathBuf::from(dir);
    let mut report = Report {
        passed: 0,
        failed: 0,
        only: args.next(),
    };
    let pairs = [
        Pair {
            agent: Impl::Tether,
            server: Impl::Upstream(upstream.clone()),
            upstream: upstream.clone(),
        },
        Pair {
            agent: Impl::Upstream(upstream.clone()),
            server: Impl::Tether,
            upstream: upstream.clone(),
        },
    ];
    for pair in &pairs {
        modes_and_transports(pair, &mut report).await;
        closed_port(pair, &mut report).await;
        probe(pair, &mut report).await;
        restarts(pair, &mut report).await;
        server_count_two(pair, &mut report).await;
        dest_host(pair, &mut report).await;
        slow_readers(pair, &mut report).await;
        if matches!(pair.server, Impl::Tether) {
            identity_binding(pair, &mut report).await;
        }
    }
    metric_names(&upstream, "agent", &mut report).await;
    metric_names(&upstream, "server", &mut report).await;
    println!("{} passed, {} failed", report.passed, report.failed);
    if report.failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
