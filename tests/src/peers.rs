//! tether's binaries or upstream Konnectivity's (proxy-server, proxy-agent), started the same
//! way: both take the same flags, which is the point. Used by `cargo xtask interop` and by the
//! tunnel benchmark's upstream rows; the upstream binaries are built outside this repository.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::cluster::{Mode, Transport};
use crate::frontend::Target;
use crate::pki::Pki;
use crate::procs::{
    AGENT_WITHOUT_GUARD, DIALS_LOOPBACK, Logged, NO_DIAL_HOOKS, built, http_get, spawn_collected,
};

/// Whose binary.
#[derive(Clone, Debug)]
pub enum Impl {
    Tether,
    /// The directory holding upstream's `server` and `agent` (as `go build ./cmd/...` names
    /// them).
    Upstream(PathBuf),
}

impl Impl {
    pub fn name(&self) -> &'static str {
        match self {
            Impl::Tether => "tether",
            Impl::Upstream(_) => "upstream",
        }
    }

    fn binary(&self, role: &str) -> Result<PathBuf> {
        match self {
            Impl::Tether => built(&format!("tether-{role}")),
            Impl::Upstream(dir) => {
                let path = dir.join(role);
                if !path.exists() {
                    bail!(
                        "{} is missing: build upstream's binaries into {} (go build -o DIR ./cmd/...)",
                        path.display(),
                        dir.display()
                    );
                }
                Ok(path)
            }
        }
    }
}

/// A running server or agent and the ports it was given.
pub struct Peer {
    pub logged: Logged,
    pub health_port: u16,
    /// Server only: the port agents dial.
    pub agent_port: u16,
    /// Server only: where frontends connect.
    pub target: Option<Target>,
    pub pid: u32,
}

impl Peer {
    /// Kills the process at once, as a crash or a lost node would end it, and reaps it.
    pub fn kill(self) -> Result<()> {
        self.logged
            .process
            .signal(nix::sys::signal::Signal::SIGKILL)
    }
}

/// A port on 127.0.0.1 that was free a moment ago (upstream's binaries cannot bind port 0 and
/// report what they got).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_healthy(peer: &mut Peer, what: &str) -> Result<()> {
    let healthy = crate::process::wait_until(Duration::from_secs(20), || {
        http_get(peer.health_port, "/healthz").is_ok_and(|(s, _)| s == 200)
    });
    if !healthy {
        peer.logged.logs.wait_ended(Duration::from_millis(200));
        bail!(
            "{what} never answered /healthz:\n{}",
            peer.logged.logs.lines().join("\n")
        );
    }
    Ok(())
}

/// The ports a server listens on, fixed so a restarted server comes back where its agents
/// and clients look for it.
#[derive(Clone, Copy, Debug)]
pub struct ServerPorts {
    pub agent: u16,
    pub health: u16,
    pub admin: u16,
    /// The mTLS frontend (unused over a Unix socket).
    pub frontend: u16,
}

impl ServerPorts {
    pub fn free() -> Result<Self> {
        Ok(ServerPorts {
            agent: free_port()?,
            health: free_port()?,
            admin: free_port()?,
            frontend: free_port()?,
        })
    }
}

/// A round-robin balancer on 127.0.0.1 over these servers' agent ports, as a Service VIP in
/// front of the replicas; returns its address.
pub async fn balancer(servers: &[ServerPorts]) -> std::net::SocketAddr {
    crate::lb::round_robin(
        servers
            .iter()
            .map(|p| ([127, 0, 0, 1], p.agent).into())
            .collect(),
    )
    .await
}

/// Starts a server; `uds` is used in UDS mode (removed first).
pub fn server(
    imp: &Impl,
    pki: &Pki,
    mode: Mode,
    transport: Transport,
    uds: &Path,
    ports: ServerPorts,
    extra: &[String],
) -> Result<Peer> {
    let pair = pki.pair("server");
    let (agent_port, health_port) = (ports.agent, ports.health);
    let mut args = vec![
        format!(
            "--mode={}",
            match mode {
                Mode::Grpc => "grpc",
                Mode::HttpConnect => "http-connect",
            }
        ),
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        format!("--agent-port={agent_port}"),
        format!("--health-port={health_port}"),
        format!("--admin-port={}", ports.admin),
    ];
    // Agents authenticate with client certificates, the same way for both implementations,
    // unless `extra` turns token authentication on (which tether takes instead of them).
    if !extra.iter().any(|a| a.starts_with("--agent-namespace")) {
        args.push(format!("--cluster-ca-cert={}", pki.ca().display()));
    }
    let target = match transport {
        Transport::Uds => {
            args.push(format!("--uds-name={}", uds.display()));
            args.push("--server-port=0".into());
            Target::Uds(uds.to_path_buf())
        }
        Transport::Mtls => {
            let port = ports.frontend;
            args.push(format!("--server-port={port}"));
            args.push(format!("--server-cert={}", pair.cert.display()));
            args.push(format!("--server-key={}", pair.key.display()));
            args.push(format!("--server-ca-cert={}", pki.ca().display()));
            Target::tls(port, pki, "apiserver")
        }
    };
    args.extend(extra.iter().cloned());
    let mut cmd = Command::new(imp.binary("server")?);
    cmd.args(&args);
    let logged = spawn_collected(&format!("{}-server", imp.name()), &mut cmd, false)?;
    let pid = logged.process.pid();
    let mut peer = Peer {
        logged,
        health_port,
        agent_port,
        target: Some(target),
        pid,
    };
    wait_healthy(&mut peer, "the server")?;
    Ok(peer)
}

/// Starts an agent that dials `server_port` on 127.0.0.1 (or on the hosts a
/// `--proxy-server-host=` in `extra` names).
pub fn agent(imp: &Impl, pki: &Pki, server_port: u16, extra: &[String]) -> Result<Peer> {
    agent_in(imp, pki, server_port, extra, None)
}

/// [`agent`], resolving names through `hosts` instead of /etc/hosts: the agent runs in a
/// mount namespace of its own where that file is mounted over /etc/hosts, so a test changes
/// what a name resolves to by rewriting it in place.
pub fn agent_in(
    imp: &Impl,
    pki: &Pki,
    server_port: u16,
    extra: &[String],
    hosts: Option<&Path>,
) -> Result<Peer> {
    let health_port = free_port()?;
    let mut cmd = match hosts {
        Some(hosts) => {
            let mut cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
                .arg(hosts)
                .arg(imp.binary("agent")?);
            cmd
        }
        None => Command::new(imp.binary("agent")?),
    };
    if matches!(imp, Impl::Tether) {
        cmd.args(AGENT_WITHOUT_GUARD)
            .args([DIALS_LOOPBACK, NO_DIAL_HOOKS]);
    }
    let client = pki.pair("agent");
    if !extra.iter().any(|a| a.starts_with("--proxy-server-host=")) {
        cmd.arg("--proxy-server-host=127.0.0.1");
    }
    cmd.arg(format!("--ca-cert={}", pki.ca().display()))
        .arg(format!("--agent-cert={}", client.cert.display()))
        .arg(format!("--agent-key={}", client.key.display()))
        .arg(format!("--proxy-server-port={server_port}"))
        .arg(format!("--health-server-port={health_port}"))
        .arg(format!("--admin-server-port={}", free_port()?))
        .args(["--sync-interval=200ms", "--sync-interval-cap=1s"])
        .args(extra);
    let logged = spawn_collected(&format!("{}-agent", imp.name()), &mut cmd, false)?;
    let pid = logged.process.pid();
    let mut peer = Peer {
        logged,
        health_port,
        agent_port: 0,
        target: None,
        pid,
    };
    wait_healthy(&mut peer, "the agent")?;
    Ok(peer)
}

/// `/metrics` on `port` over HTTP/1.0, so Go's server sends it unchunked.
pub fn metrics_page(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The value of the first sample line of `/metrics` on `port` that starts with `prefix`.
pub fn metric(port: u16, prefix: &str) -> Option<f64> {
    let text = metrics_page(port).ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Whether the agent whose health port is `port` comes to hold `count` server streams and to
/// count that many servers, within 30 s (either implementation: the names are upstream's).
pub fn holds_servers(port: u16, count: f64) -> bool {
    crate::process::wait_until(Duration::from_secs(30), || {
        metric(
            port,
            "konnectivity_network_proxy_agent_open_server_connections ",
        ) == Some(count)
            && metric(port, "konnectivity_network_proxy_agent_known_server_count ") == Some(count)
    })
}

/// Every line `agent` and `servers` logged, each under its role, for a failed check's message.
pub fn logs_of(agent: &Peer, servers: &[Peer]) -> String {
    let mut text = format!("agent:\n{}\n", agent.logged.logs.lines().join("\n"));
    for server in servers {
        text.push_str(&format!(
            "server:\n{}\n",
            server.logged.logs.lines().join("\n")
        ));
    }
    text
}
