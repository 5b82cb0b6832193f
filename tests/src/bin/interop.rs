//! `cargo xtask interop --upstream-bin DIR`: tether against upstream Konnectivity's own
//! binaries (proxy-server, proxy-agent, test-client, test-server, built from
//! kubernetes-sigs/apiserver-network-proxy into DIR), both ways round: tether-agent behind the
//! upstream server, and the upstream agent behind tether-server. One line per check, then
//! `N passed, M failed`; a failed check prints the peers' last log lines. A last argument runs
//! only the checks whose name contains it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tether_proto::Packet;
use tether_tests::cluster::{Mode, Transport};
use tether_tests::destination;
use tether_tests::frontend::{Event, GrpcTunnel, Target, grpc_client, http_connect, raw_h2};
use tether_tests::kube_api;
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

/// Each `konnectivity_*` family a `/metrics` page shows: its type and its label names
/// (histograms' `le` aside).
fn typed_families(port: u16) -> Result<BTreeMap<String, (String, BTreeSet<String>)>> {
    let text = peers::metrics_page(port)?;
    let mut families: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' ')) {
            if name.starts_with("konnectivity_") {
                families.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
            }
            continue;
        }
        let Some((series, labels)) = line.split_once('{') else {
            continue;
        };
        let family = families.iter_mut().find(|(name, _)| {
            series == name.as_str()
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| series.strip_suffix(suffix) == Some(name.as_str()))
        });
        if let Some((_, (_, names))) = family {
            for label in labels.split(',') {
                if let Some((key, _)) = label.split_once('=')
                    && key != "le"
                {
                    names.insert(key.to_owned());
                }
            }
        }
    }
    Ok(families)
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
    let echo = destination::echo().await.to_string();
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
            let (_refusing, closed) = destination::refusing_port();
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
    let echo = destination::echo().await.to_string();
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
    let echo = destination::echo().await.to_string();
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

/// Token authentication across implementations: the agent sends its service-account token
/// (`--service-account-token-path`) and the server reviews it with a stand-in kube-apiserver.
/// tether-server, given `--token-review-cache-file`, also lets the agent back after a restart
/// without asking for a second review.
async fn token_authentication(pair: &Pair, report: &mut Report) {
    let echo = destination::echo().await.to_string();
    let keeps = matches!(pair.server, Impl::Tether);
    let name = format!(
        "{}: the agent gets in by service-account token{}",
        pair.label(),
        if keeps {
            ", and back after a restart without a second TokenReview"
        } else {
            ", and again after a restart"
        }
    );
    report
        .check(name, async {
            let pki = Pki::new(&[])?;
            let api_pair = pki.pair("server");
            let cluster = kube_api::Cluster {
                tokens: vec![kube_api::TokenOwner {
                    token: "interop-token".to_owned(),
                    username: "system:serviceaccount:kube-system:konnectivity-agent".to_owned(),
                    audiences: vec!["system:konnectivity-server".to_owned()],
                    node: None,
                }],
                ..kube_api::Cluster::default()
            };
            let (api, api_port) =
                kube_api::KubeApi::start_on_loopback(cluster, &api_pair.cert, &api_pair.key);
            let kubeconfig = kube_api::KubeApi::kubeconfig(pki.dir(), api_port, &pki.ca());
            let token = pki.dir().join("token");
            std::fs::write(&token, "interop-token")?;
            let cache = pki.dir().join("reviews.json");
            let mut extra = vec![
                "--agent-namespace=kube-system".to_owned(),
                "--agent-service-account=konnectivity-agent".to_owned(),
                "--authentication-audience=system:konnectivity-server".to_owned(),
                format!("--kubeconfig={}", kubeconfig.display()),
                "--kube-api-content-type=application/json".to_owned(),
            ];
            if keeps {
                extra.push(format!("--token-review-cache-file={}", cache.display()));
            }
            let ports = ServerPorts::free()?;
            let start = |pki: &Pki| {
                peers::server(
                    &pair.server,
                    pki,
                    Mode::HttpConnect,
                    Transport::Uds,
                    &pki.dir().join("s.sock"),
                    ports,
                    &extra,
                )
            };
            let server = start(&pki)?;
            let agent = peers::agent(
                &pair.agent,
                &pki,
                ports.agent,
                &[format!("--service-account-token-path={}", token.display())],
            )?;
            let mut setup = Setup {
                pki,
                server,
                agents: vec![agent],
                ports,
                mode: Mode::HttpConnect,
                transport: Transport::Uds,
            };
            let ready = wait_ready(setup.server.health_port, Duration::from_secs(15));
            with_logs(&setup, ensure_ok(ready, "the agent was not let in"))?;
            with_logs(&setup, connect_echo(setup.target()?, &echo, 1 << 16).await)?;
            let before = api.token_reviews();
            with_logs(
                &setup,
                ensure_ok(before >= 1, "the server asked for no TokenReview"),
            )?;
            if keeps {
                let written = wait_until(Duration::from_secs(10), || cache.exists());
                with_logs(
                    &setup,
                    ensure_ok(written, "the answer never reached the file"),
                )?;
            }
            setup
                .server
                .logged
                .process
                .signal(nix::sys::signal::Signal::SIGKILL)?;
            setup
                .server
                .logged
                .process
                .wait_timeout(Duration::from_secs(5))?;
            setup.server = start(&setup.pki)?;
            let ready = wait_ready(setup.server.health_port, Duration::from_secs(30));
            with_logs(
                &setup,
                ensure_ok(ready, "the agent did not come back within 30 s"),
            )?;
            with_logs(&setup, connect_echo(setup.target()?, &echo, 1 << 16).await)?;
            if keeps {
                let after = api.token_reviews();
                with_logs(
                    &setup,
                    ensure_ok(
                        after == before,
                        &format!(
                            "the restarted server asked for {} more reviews",
                            after - before
                        ),
                    ),
                )?;
            }
            Ok(())
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
            let echo = destination::echo().await.to_string();
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

/// Servers publish Leases and the agent counts them (upstream's --enable-lease-controller and
/// --count-server-leases): every server announces a servercount of 1, so only the Leases can
/// tell the agent there are more. A server of the other implementation joins (a migration),
/// one leaves, and the agent follows both with no restart.
async fn server_leases(pair: &Pair, report: &mut Report) {
    let name = format!(
        "{}: servers counted by their Leases, one of the other implementation added and one removed",
        pair.label()
    );
    report
        .check(name, async {
            let pki = Pki::new(&[])?;
            let api_pair = pki.pair("server");
            let (api, api_port) = tether_tests::kube_api::KubeApi::start_on_loopback(
                tether_tests::kube_api::Cluster::default(),
                &api_pair.cert,
                &api_pair.key,
            );
            let kubeconfig =
                tether_tests::kube_api::KubeApi::kubeconfig(pki.dir(), api_port, &pki.ca());
            let kube_flags = vec![
                format!("--kubeconfig={}", kubeconfig.display()),
                "--kube-api-content-type=application/json".to_owned(),
            ];
            let other = match &pair.server {
                Impl::Tether => Impl::Upstream(pair.upstream.clone()),
                Impl::Upstream(_) => Impl::Tether,
            };
            let ports: Vec<ServerPorts> =
                (0..3).map(|_| ServerPorts::free()).collect::<Result<_>>()?;
            let start = |imp: &Impl, i: usize| {
                let mut extra = kube_flags.clone();
                extra.extend([
                    "--enable-lease-controller".to_owned(),
                    "--server-count=1".to_owned(),
                    format!("--server-id=server-{i}"),
                ]);
                peers::server(
                    imp,
                    &pki,
                    Mode::HttpConnect,
                    Transport::Uds,
                    &pki.dir().join(format!("s{i}.sock")),
                    ports[i],
                    &extra,
                )
            };
            let mut servers = vec![start(&pair.server, 0)?, start(&pair.server, 1)?];
            // The third address answers nothing until its server starts.
            let lb = peers::balancer(&ports).await;
            let mut extra = kube_flags.clone();
            extra.push("--count-server-leases".to_owned());
            let agent = peers::agent(&pair.agent, &pki, lb.port(), &extra)?;
            let logs = |servers: &[Peer]| {
                format!(
                    "{}leases: {:#?}",
                    peers::logs_of(&agent, servers),
                    api.leases.list("kube-system")
                )
            };
            ensure!(
                peers::holds_servers(agent.health_port, 2.0),
                "the agent does not count and hold two servers\n{}",
                logs(&servers)
            );
            let leases = api.leases.list("kube-system");
            for i in 0..2 {
                let lease = leases
                    .iter()
                    .find(|l| {
                        l["metadata"]["name"] == format!("konnectivity-proxy-server-server-{i}")
                    })
                    .with_context(|| format!("no Lease for server-{i}\n{}", logs(&servers)))?;
                ensure!(
                    lease["spec"]["holderIdentity"] == format!("server-{i}")
                        && lease["metadata"]["labels"]["k8s-app"] == "konnectivity-server"
                        && lease["spec"]["leaseDurationSeconds"] == 30,
                    "server-{i}'s Lease is not upstream's shape: {lease:#}"
                );
            }
            servers.push(start(&other, 2)?);
            ensure!(
                peers::holds_servers(agent.health_port, 3.0),
                "the agent does not follow a third server\n{}",
                logs(&servers)
            );
            let first = servers.remove(0);
            first
                .logged
                .process
                .signal(nix::sys::signal::Signal::SIGTERM)?;
            drop(first);
            ensure!(
                wait_until(Duration::from_secs(30), || api
                    .leases
                    .list("kube-system")
                    .len()
                    == 2),
                "the stopped server did not delete its Lease\n{}",
                logs(&servers)
            );
            ensure!(
                peers::holds_servers(agent.health_port, 2.0),
                "the agent does not follow a removed server\n{}",
                logs(&servers)
            );
            for (i, server) in servers.iter().enumerate() {
                ensure!(
                    wait_ready(server.health_port, Duration::from_secs(5)),
                    "server {} has no agent\n{}",
                    i + 1,
                    logs(&servers)
                );
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
            let (sink, done) = destination::slow_sink(RATE, Some(TOTAL)).await;
            let mut stream = http_connect(setup.target()?, &sink.to_string())
                .await?
                .map_err(|e| anyhow::anyhow!("CONNECT refused: {e}"))?;
            let written = destination::write_pattern(&mut stream, TOTAL).await;
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
            let source = destination::pattern_source(TOTAL).await;
            let mut stream = http_connect(setup.target()?, &source.to_string())
                .await?
                .map_err(|e| anyhow::anyhow!("CONNECT refused: {e}"))?;
            let got = destination::read_pattern_throttled(&mut stream, RATE).await?;
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
/// must be on tether's page too (lease metrics aside: tether refuses the lease flags), and
/// every family both show has the same type and label names.
async fn metric_names(upstream: &Path, role: &str, report: &mut Report) {
    let name = format!("{role} /metrics has every name upstream's {role} shows");
    report
        .check(name, async {
            let mut pages = Vec::new();
            let mut typed = Vec::new();
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
                let echo = destination::echo().await.to_string();
                grpc_echo(setup.target()?, &echo, 1 << 16).await?;
                let (_refusing, closed) = destination::refusing_port();
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
                typed.push(typed_families(port)?);
            }
            for (name, theirs) in &typed[0] {
                if let Some(ours) = typed[1].get(name) {
                    ensure!(
                        ours == theirs,
                        "{name}: tether shows {ours:?}, upstream {theirs:?} (type, labels)"
                    );
                }
            }
            let missing: Vec<&String> = pages[0].difference(&pages[1]).collect();
            ensure!(missing.is_empty(), "tether lacks {missing:?}");
            Ok(())
        })
        .await;
}

/// The flags `--help` of a Go program lists, each with whether it takes a value (pflag prints
/// a value's type one space after the name, a description two or more spaces after it).
fn go_flags(help: &str) -> Vec<(String, bool)> {
    help.lines()
        .filter_map(|line| {
            let at = line.find("--")?;
            line[..at]
                .trim()
                .trim_end_matches(',')
                .trim_start_matches('-')
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
                .then_some(())?;
            let rest = &line[at + 2..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .unwrap_or(rest.len());
            let after = &rest[end..];
            let takes_value = after.starts_with(' ') && !after.starts_with("  ");
            Some((rest[..end].to_owned(), takes_value))
        })
        .collect()
}

/// Every flag upstream's binary takes is one tether's parses (it may then refuse it, with a
/// reason) or one the operator guide's migration table names: an upstream manifest never meets
/// a bare "unknown flag".
async fn upstream_flags(upstream: &Path, report: &mut Report) {
    for role in ["agent", "server"] {
        let name = format!(
            "every flag of upstream's {role} is tether-{role}'s too, or in the guide's migration table"
        );
        report
            .check(name, async {
                let out = Command::new(upstream.join(role)).arg("--help").output()?;
                let help = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let flags = go_flags(&help);
                ensure!(flags.len() > 20, "no flags in upstream's --help:\n{help}");
                let guide = std::fs::read_to_string(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-guide.md"),
                )?;
                let tether = tether_tests::procs::built(&format!("tether-{role}"))?;
                let mut unknown = Vec::new();
                for (flag, takes_value) in flags {
                    let arg = if takes_value {
                        format!("--{flag}=1")
                    } else {
                        format!("--{flag}")
                    };
                    let out = Command::new(&tether).arg(&arg).arg("--version").output()?;
                    let said = String::from_utf8_lossy(&out.stderr);
                    if said.contains("unexpected argument") && !guide.contains(&format!("`--{flag}`"))
                    {
                        unknown.push(flag);
                    }
                }
                ensure!(
                    unknown.is_empty(),
                    "tether-{role} does not know, and the migration table does not name: {unknown:?}"
                );
                Ok(())
            })
            .await;
    }
}

const MIGRATION_CP: &str = "10.81.0.1";
const MIGRATION_NODE: &str = "10.81.0.2";

/// The operator guide's way onto tether and back, on one node behind upstream's server.
async fn migration(upstream: &Path, report: &mut Report) {
    let name = "migration: upstream agent, then tether's with an enforcing guard, then `guard detach` and upstream's again: the tunnel works at every step, and the node is directly reachable again at the end".to_owned();
    report
        .check(name, async {
            tokio::task::block_in_place(|| migrate(upstream))
        })
        .await;
}

fn migrate(upstream: &Path) -> Result<()> {
    use tether_tests::guard_site::{get_through, kubelet};
    let (cp, node) =
        tether_tests::netns::control_plane_and_node("mig", MIGRATION_CP, MIGRATION_NODE)?;
    kubelet(&node, MIGRATION_NODE, "kubelet on the node");
    let pki = Pki::new(&[MIGRATION_CP])?;
    let socket = pki.dir().join("s.sock");
    let (serving, client) = (pki.pair("server"), pki.pair("agent"));
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", cp.path()))
        .arg(upstream.join("server"))
        .arg("--mode=http-connect")
        .arg(format!("--uds-name={}", socket.display()))
        .args(["--server-port=0", "--agent-port=8132", "--admin-port=8133"])
        .arg("--health-port=8134")
        .arg(format!("--cluster-cert={}", serving.cert.display()))
        .arg(format!("--cluster-key={}", serving.key.display()))
        .arg(format!("--cluster-ca-cert={}", pki.ca().display()));
    let server = tether_tests::procs::spawn_collected("upstream-server", &mut cmd, false)?;
    // The same flags for both agents: what an operator's DaemonSet passes.
    let agent_args = vec![
        format!("--ca-cert={}", pki.ca().display()),
        format!("--agent-cert={}", client.cert.display()),
        format!("--agent-key={}", client.key.display()),
        format!("--proxy-server-host={MIGRATION_CP}"),
        "--proxy-server-port=8132".to_owned(),
        format!("--agent-identifiers=ipv4={MIGRATION_NODE}"),
        "--sync-interval=200ms".to_owned(),
        "--sync-interval-cap=1s".to_owned(),
    ];
    let upstream_agent = || -> Result<tether_tests::procs::Logged> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.path()))
            .arg(upstream.join("agent"))
            .args(&agent_args);
        tether_tests::procs::spawn_collected("upstream-agent", &mut cmd, false)
    };
    let tunnel_works = || {
        wait_until(Duration::from_secs(15), || {
            get_through(&socket, MIGRATION_NODE).is_ok_and(|r| r.contains("kubelet on the node"))
        })
    };
    let direct = || -> Result<bool> {
        let to = format!("{MIGRATION_NODE}:10250").parse()?;
        cp.run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
    };
    let logs = |what: &str| format!("{what}\n{}", server.logs.lines().join("\n"));

    let before = upstream_agent()?;
    ensure!(tunnel_works(), logs("no tunnel through upstream's agent"));
    ensure!(
        direct()?,
        "the node is not reachable directly before tether"
    );
    drop(before);

    let bpffs = tether_tests::bpffs::Bpffs::mount()?;
    let cgroup = tether_tests::cgroup::TestCgroup::new("mig")?;
    let mut args = agent_args.clone();
    args.extend([
        "--guard-mode=enforce".to_owned(),
        "--guard-interface=eth0".to_owned(),
        format!("--control-plane-cidr={MIGRATION_CP}/32"),
        format!("--bpffs-root={}", bpffs.root().display()),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let tether = tether_tests::procs::Agent::start_in_cgroup(
        &node,
        &cgroup,
        Some(&["bpf", "perfmon", "net_admin"]),
        &refs,
    )?;
    ensure!(tunnel_works(), logs("no tunnel through tether's agent"));
    ensure!(
        !direct()?,
        "tether's guard enforces, yet the node is reachable directly"
    );
    drop(tether);
    ensure!(
        !direct()?,
        "the pinned guard went with its agent: the node was open before the uninstall step"
    );

    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.path()))
        .arg(tether_tests::procs::built("tether-agent")?)
        .args(["guard", "detach"])
        .arg(format!("--bpffs-root={}", bpffs.root().display()))
        .output()?;
    ensure!(
        out.status.success(),
        "guard detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(bpffs.root())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "pins left after guard detach: {left:?}");
    ensure!(
        direct()?,
        "the node is not reachable directly after guard detach"
    );

    let after = upstream_agent()?;
    ensure!(
        tunnel_works(),
        logs("no tunnel through upstream's agent after tether")
    );
    ensure!(
        direct()?,
        "the node is not reachable directly with upstream's agent back"
    );
    drop(after);
    Ok(())
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
        server_leases(pair, &mut report).await;
        dest_host(pair, &mut report).await;
        slow_readers(pair, &mut report).await;
        token_authentication(pair, &mut report).await;
        if matches!(pair.server, Impl::Tether) {
            identity_binding(pair, &mut report).await;
        }
    }
    upstream_flags(&upstream, &mut report).await;
    migration(&upstream, &mut report).await;
    metric_names(&upstream, "agent", &mut report).await;
    metric_names(&upstream, "server", &mut report).await;
    println!("{} passed, {} failed", report.passed, report.failed);
    if report.failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
