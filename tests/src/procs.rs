//! tether-server and tether-agent as real processes. Each logs JSON to stderr, and the harness
//! keeps every line for assertions; it learns the ports bound on port 0, and that the process is
//! up, from the file `--listen-addresses-file` names.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;
use crate::process::Process;

/// A built workspace binary, beside the running executable: tests run from
/// `target/<profile>/deps/`, the benchmark driver from `target/<profile>/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let beside = dir.join(name);
    if beside.exists() {
        return beside;
    }
    dir.parent().map(|p| p.join(name)).unwrap_or(beside)
}

/// [`bin`], failing with the command that builds it when it is missing.
pub fn built(name: &str) -> Result<PathBuf> {
    let path = bin(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins` first (`cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    /// Set when the process's stderr reached EOF: every line it wrote is in `lines`.
    ended: Arc<AtomicBool>,
}

impl Logs {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the process closed its stderr (it exited) and every line is collected.
    pub fn wait_ended(&self, limit: Duration) -> bool {
        crate::process::wait_until(limit, || self.ended.load(Ordering::Acquire))
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// Waits for a line containing `needle`.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Some(line);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A process whose stderr is collected into [`Logs`] (and echoed, for failed-test output).
pub struct Logged {
    pub process: Process,
    pub logs: Logs,
}

pub fn spawn_logged(name: &str, cmd: &mut Command) -> Result<Logged> {
    spawn_collected(name, cmd, true)
}

/// [`spawn_logged`], echoing the lines to stderr only when `echo` is set.
pub fn spawn_collected(name: &str, cmd: &mut Command, echo: bool) -> Result<Logged> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut process = Process::spawn(name, cmd)?;
    let stderr = process.take_stderr().context("stderr not piped")?;
    let logs = Logs::default();
    let sink = logs.clone();
    let label = name.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[{label}] {line}");
            }
            if let Ok(mut lines) = sink.lines.lock() {
                lines.push(line);
            }
        }
        sink.ended.store(true, Ordering::Release);
    });
    Ok(Logged { process, logs })
}

/// The port of a listener in a `--listen-addresses-file`, when it is a TCP one.
fn port_of(addresses: &serde_json::Value, key: &str) -> Option<u16> {
    addresses[key]
        .as_str()?
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.port())
}

pub struct Server {
    pub logged: Logged,
    pub agent_port: u16,
    pub health_port: u16,
    pub admin_port: u16,
    /// The TCP frontend's port, when the frontend is TCP.
    pub frontend_port: Option<u16>,
    /// Holds the `--listen-addresses-file` while the process runs.
    _addresses: tempfile::TempDir,
}

impl Server {
    /// Starts tether-server with `args` plus JSON logs and port-0 defaults for every port the
    /// caller does not set.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::spawn(Command::new(built("tether-server")?), args)
    }

    /// [`Server::start`] inside `netns`.
    pub fn start_in(netns: &Netns, args: &[&str]) -> Result<Self> {
        Self::spawn(in_netns(netns, "tether-server")?, args)
    }

    fn spawn(mut cmd: Command, args: &[&str]) -> Result<Self> {
        cmd.args(["--log-format", "json"]);
        for (flag, default) in [
            ("--agent-port", "0"),
            ("--health-port", "0"),
            ("--admin-port", "0"),
        ] {
            if !args.iter().any(|a| a.starts_with(flag)) {
                cmd.args([flag, default]);
            }
        }
        cmd.args(args);
        let dir = listen_addresses_file(&mut cmd)?;
        let mut logged = spawn_logged("server", &mut cmd)?;
        let addresses = wait_started(&mut logged, &dir)?;
        let get =
            |key| port_of(&addresses, key).with_context(|| format!("no {key} in {addresses}"));
        Ok(Server {
            agent_port: get("agent")?,
            health_port: get("health")?,
            admin_port: get("admin")?,
            frontend_port: port_of(&addresses, "frontend"),
            logged,
            _addresses: dir,
        })
    }
}

pub struct Agent {
    pub logged: Logged,
    pub health_port: u16,
    pub admin_port: u16,
    /// Holds the `--listen-addresses-file` while the process runs.
    _addresses: tempfile::TempDir,
}

/// An agent in the test's own network namespace must never touch its interfaces, nor a guard a
/// real agent on this machine pinned: guard off, and pins looked for where there are none.
pub const AGENT_WITHOUT_GUARD: [&str; 2] =
    ["--guard-mode=off", "--bpffs-root=/nonexistent/tether-tests"];

/// The tests' destinations listen on loopback, which the dial policy denies by default: the
/// agents they start allow it (and everything else but link-local), unless a test sets its own
/// policy.
pub const DIALS_LOOPBACK: &str = "--dial-allow=127.0.0.0/8,::1,0.0.0.0/0,::/0";

/// Runs the program `cmd` goes on to name under setpriv, with only `caps` (setpriv names, e.g.
/// `bpf`): as root, a process keeps only what its bounding set allows across exec.
fn keeping_only(cmd: &mut Command, caps: &[&str]) {
    let keep: String = caps.iter().map(|c| format!(",+{c}")).collect();
    cmd.arg("setpriv")
        .arg(format!("--bounding-set=-all{keep}"))
        .arg(format!("--inh-caps=-all{keep}"));
}

/// Kernel enforcement of the dial policy goes on the agent's cgroup, or one it creates beside
/// the test's processes: only tests that give an agent a cgroup of its own turn it on.
pub const NO_DIAL_HOOKS: &str = "--dial-policy-cgroup=off";

impl Agent {
    /// Starts tether-agent with `args` plus JSON logs, port-0 health and admin ports, and
    /// [`AGENT_WITHOUT_GUARD`].
    pub fn start(args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(built("tether-agent")?);
        cmd.args(AGENT_WITHOUT_GUARD);
        Self::spawn(cmd, args)
    }

    /// Starts tether-agent inside `netns`, where the guard flags are the caller's to choose.
    pub fn start_in(netns: &Netns, args: &[&str]) -> Result<Self> {
        Self::spawn(in_netns(netns, "tether-agent")?, args)
    }

    /// [`Agent::start_in`] with only the capabilities `caps` (setpriv names, e.g. `bpf`):
    /// as root, a process keeps only what its bounding set allows across exec.
    pub fn start_in_with_caps(netns: &Netns, caps: &[&str], args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.path()));
        keeping_only(&mut cmd, caps);
        cmd.arg(built("tether-agent")?);
        Self::spawn(cmd, args)
    }

    /// [`Agent::start_in`], as the only process of `cgroup` (as in a container), with the dial
    /// policy enforced there by the kernel; holding only `caps` when given.
    pub fn start_in_cgroup(
        netns: &Netns,
        cgroup: &crate::cgroup::TestCgroup,
        caps: Option<&[&str]>,
        args: &[&str],
    ) -> Result<Self> {
        let mut cmd = cgroup.command(std::path::Path::new("nsenter"));
        cmd.arg(format!("--net={}", netns.path()));
        if let Some(caps) = caps {
            keeping_only(&mut cmd, caps);
        }
        cmd.arg(built("tether-agent")?)
            .arg("--dial-policy-cgroup=auto");
        Self::spawn(cmd, args)
    }

    fn spawn(mut cmd: Command, args: &[&str]) -> Result<Self> {
        cmd.args([
            "--log-format",
            "json",
            "--health-server-port",
            "0",
            "--admin-server-port",
            "0",
        ]);
        if !args
            .iter()
            .any(|a| a.starts_with("--dial-allow") || a.starts_with("--dial-deny"))
        {
            cmd.arg(DIALS_LOOPBACK);
        }
        let given = |prefix: &str| {
            args.iter().any(|a| a.starts_with(prefix))
                || cmd
                    .get_args()
                    .any(|a| a.to_string_lossy().starts_with(prefix))
        };
        if !given("--dial-policy-cgroup") {
            cmd.arg(NO_DIAL_HOOKS);
        }
        cmd.args(args);
        let dir = listen_addresses_file(&mut cmd)?;
        let mut logged = spawn_logged("agent", &mut cmd)?;
        let addresses = wait_started(&mut logged, &dir)?;
        let get =
            |key| port_of(&addresses, key).with_context(|| format!("no {key} in {addresses}"));
        Ok(Agent {
            health_port: get("health")?,
            admin_port: get("admin")?,
            logged,
            _addresses: dir,
        })
    }
}

/// `nsenter --net=<netns> <binary>`: the process lives in the namespace from its first instruction.
fn in_netns(netns: &Netns, binary: &str) -> Result<Command> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path()))
        .arg(built(binary)?);
    Ok(cmd)
}

/// A directory for the process's `--listen-addresses-file`, named on `cmd`.
fn listen_addresses_file(cmd: &mut Command) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    cmd.arg(format!(
        "--listen-addresses-file={}",
        dir.path().join(ADDRESSES).display()
    ));
    Ok(dir)
}

const ADDRESSES: &str = "addresses.json";

/// Waits until the process is up, which it says by writing its listen-addresses file, and
/// returns what the file holds.
fn wait_started(logged: &mut Logged, dir: &tempfile::TempDir) -> Result<serde_json::Value> {
    let path = dir.path().join(ADDRESSES);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        // Renamed into place whole: once it exists it can be read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            return serde_json::from_str(&text).with_context(|| format!("{path:?}: {text}"));
        }
        if logged.process.exited() {
            // Its last lines may still be in the pipe.
            logged.logs.wait_ended(Duration::from_secs(2));
            bail!(
                "process exited before starting:\n{}",
                logged.logs.lines().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "not up within 20s (no {path:?}):\n{}",
        logged.logs.lines().join("\n")
    )
}

/// `GET path` on 127.0.0.1:`port` → (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `/metrics` on `port` until the sample `series` (name and labels as the page prints
/// them) reaches `at_least`.
pub fn wait_metric(port: u16, series: &str, at_least: f64, limit: Duration) -> bool {
    let prefix = format!("{series} ");
    crate::process::wait_until(limit, || {
        crate::peers::metric(port, &prefix).is_some_and(|v| v >= at_least)
    })
}

/// Polls `port`'s `/readyz` until it answers 200.
pub fn wait_ready(port: u16, limit: Duration) -> bool {
    crate::process::wait_until(limit, || {
        http_get(port, "/readyz").is_ok_and(|(s, _)| s == 200)
    })
}

/// A server with `server_args` and an agent (no guard, quick reconnects, `agent_extra`)
/// connected to it, both in `netns`; returns once the server is ready.
pub fn connected_in(
    netns: &Netns,
    ca: &std::path::Path,
    server_args: &[&str],
    agent_extra: &[&str],
) -> Result<(Server, Agent)> {
    let server = Server::start_in(netns, server_args)?;
    let proxy_port = format!("--proxy-server-port={}", server.agent_port);
    let ca = format!("--ca-cert={}", ca.display());
    let mut args = AGENT_WITHOUT_GUARD.to_vec();
    args.extend([
        proxy_port.as_str(),
        ca.as_str(),
        "--sync-interval=100ms",
        "--sync-interval-cap=1s",
    ]);
    args.extend_from_slice(agent_extra);
    let agent = Agent::start_in(netns, &args)?;
    let health = server.health_port;
    if !netns.run(|| wait_ready(health, Duration::from_secs(10)))? {
        bail!("the agent never connected");
    }
    Ok((server, agent))
}

/// Arguments for an HTTP CONNECT server on the Unix socket `uds` with `pki`'s server pair and
/// unauthenticated agents, plus `extra`. Leaked: they live as long as the test process.
pub fn connect_server_args(
    pki: &crate::pki::Pki,
    uds: &std::path::Path,
    extra: &[&str],
) -> Vec<&'static str> {
    let pair = pki.pair("server");
    let mut args = vec![
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        "--allow-unauthenticated-agents".into(),
        format!("--uds-name={}", uds.display()),
        "--server-port=0".into(),
        "--mode=http-connect".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.into_iter()
        .map(|a| &*Box::leak(a.into_boxed_str()))
        .collect()
}
