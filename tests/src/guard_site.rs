//! The guard's test site: a control-plane namespace running tether-server and a node
//! namespace with a kubelet stand-in, joined by a veth; agents are started per case.
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is how a failed check reports"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::bpffs::Bpffs;
use crate::netns::{Netns, control_plane_and_node};
use crate::pki::Pki;
use crate::procs::{Agent, Server, built, http_get};
use crate::require_root;

pub const CP: &str = "10.77.0.1";
pub const NODE: &str = "10.77.0.2";

/// A control plane and a node joined by a veth, with a server in one and a kubelet stand-in in
/// the other; agents are started per case.
pub struct Site {
    pub pki: Pki,
    pub socket: PathBuf,
    // Dropped after the namespaces' processes: fields drop in declaration order.
    pub server: Server,
    pub bpffs: Bpffs,
    pub node: Netns,
    pub cp: Netns,
}

impl Site {
    pub fn new(tag: &str) -> Site {
        require_root();
        let pki = Pki::new(&[CP]).unwrap();
        let socket = pki.dir().join("s.sock");
        let (cp, node) = control_plane_and_node(&format!("g{tag}"), CP, NODE).unwrap();

        kubelet(&node, NODE, "hello");
        let server = start_server(&cp, &pki, &socket, &[format!("--agent-bind-address={CP}")]);
        Site {
            bpffs: Bpffs::mount().unwrap(),
            pki,
            socket,
            server,
            node,
            cp,
        }
    }

    /// An agent in the node namespace pinning under this site's bpffs, plus `guard` flags.
    pub fn agent(&self, guard: &[&str]) -> Agent {
        self.agent_with(None, guard)
    }

    /// An agent guarding eth0 against this site's control-plane address.
    pub fn guarded_agent(&self) -> Agent {
        self.agent(&[
            "--guard-interface=eth0",
            &format!("--control-plane-cidr={CP}/32"),
        ])
    }

    /// [`Site::agent`], holding only `caps` when given.
    pub fn agent_with(&self, caps: Option<&[&str]>, guard: &[&str]) -> Agent {
        let args = self.agent_args(guard);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = match caps {
            Some(caps) => Agent::start_in_with_caps(&self.node, caps, &refs).unwrap(),
            None => Agent::start_in(&self.node, &refs).unwrap(),
        };
        self.wait_connected(&agent);
        agent
    }

    /// An agent of this site, plus `extra` flags, as the only process of `cgroup`, where it
    /// puts its dial hooks; holding only `caps` when given; connected to the server.
    pub fn agent_in_cgroup(
        &self,
        cgroup: &crate::cgroup::TestCgroup,
        caps: Option<&[&str]>,
        extra: &[String],
    ) -> Agent {
        let mut args = self.agent_args(&[]);
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_in_cgroup(&self.node, cgroup, caps, &refs).unwrap();
        self.wait_connected(&agent);
        agent
    }

    fn wait_connected(&self, agent: &Agent) {
        assert!(
            self.node
                .run(|| crate::procs::wait_ready(agent.health_port, Duration::from_secs(10)))
                .unwrap(),
            "agent never connected to the server"
        );
    }

    /// The flags of an agent of this site, plus `guard`.
    pub fn agent_args(&self, guard: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--proxy-server-host={CP}"),
            format!("--proxy-server-port={}", self.server.agent_port),
            format!("--ca-cert={}", self.pki.ca().display()),
            "--sync-interval=100ms".into(),
            format!("--bpffs-root={}", self.bpffs.root().display()),
        ];
        args.extend(guard.iter().map(|a| (*a).to_owned()));
        args
    }

    pub fn through_tunnel(&self) -> String {
        get_through(&self.socket, NODE).unwrap()
    }

    /// A direct connection from the control plane to the kubelet port.
    pub fn direct(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        self.cp
            .run(|| TcpStream::connect_timeout(&format!("{NODE}:10250").parse().unwrap(), timeout))
            .unwrap()
    }

    /// The node's own outbound connection to the control plane (its SYN-ACK must pass).
    pub fn outbound_works(&self) -> bool {
        let service = self
            .cp
            .run(|| TcpListener::bind((CP, 6443)))
            .unwrap()
            .unwrap();
        let outbound = self
            .node
            .run(|| {
                TcpStream::connect_timeout(
                    &format!("{CP}:6443").parse().unwrap(),
                    Duration::from_secs(2),
                )
            })
            .unwrap();
        drop(service);
        outbound.is_ok()
    }

    /// `tether_agent_guard_packets_total{reason, action}` from the agent's /metrics.
    pub fn guard_packets(&self, agent: &Agent, reason: &str, action: &str) -> Option<u64> {
        metric_in(
            &self.node,
            agent.health_port,
            &format!(r#"tether_agent_guard_packets_total{{reason="{reason}",action="{action}"}}"#),
        )
    }

    /// `tether-agent guard <action>` on this site's pins: (exit code, stdout).
    /// Run in the node's namespace, as an operator runs it on the node: interface names are
    /// per namespace.
    pub fn guard_cli(&self, action: &str) -> (i32, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path()))
            .arg(built("tether-agent").unwrap())
            .args(["guard", action])
            .arg(format!("--bpffs-root={}", self.bpffs.root().display()))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

pub fn log_field(line: &str, key: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value["fields"][key].as_str().unwrap_or_default().to_owned()
}

/// tether-server in `cp`, with the HTTP CONNECT frontend on `socket`, unauthenticated agents,
/// and `extra` flags.
pub fn start_server(cp: &Netns, pki: &Pki, socket: &Path, extra: &[String]) -> Server {
    let pair = pki.pair("server");
    let mut args = vec![
        "--mode=http-connect".to_owned(),
        format!("--uds-name={}", socket.display()),
        "--server-port=0".into(),
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        "--allow-unauthenticated-agents".into(),
    ];
    args.extend_from_slice(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in(cp, &refs).unwrap()
}

/// An apiserver-style request to `host:10250` through the server's UDS frontend: CONNECT, then
/// a GET; the reply, or what went wrong.
pub fn get_through(socket: &Path, host: &str) -> Result<String, String> {
    let mut stream = open_through(socket, host)?;
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    Ok(reply)
}

/// A tunnel to `host:10250` opened with HTTP CONNECT on the server's socket, or the
/// server's answer when it refused.
pub fn open_through(socket: &Path, host: &str) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "CONNECT {host}:10250 HTTP/1.1\r\nHost: {host}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 39];
    stream.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head[..] != b"HTTP/1.1 200 Connection Established\r\n\r\n" {
        return Err(String::from_utf8_lossy(&head).into_owned());
    }
    Ok(stream)
}

/// The value of one series (name and labels, as /metrics prints them) on the /metrics of a
/// process in `ns` listening on `port`.
pub fn metric_in(ns: &Netns, port: u16, series: &str) -> Option<u64> {
    let (status, body) = ns.run(|| http_get(port, "/metrics")).unwrap().unwrap();
    assert_eq!(status, 200);
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// How XDP is attached to `interface` in `ns`, as the kernel reports it (`ip -d link`):
/// "native", "generic" or "offload"; `None` when no program is attached.
pub fn xdp_attach_mode(ns: &Netns, interface: &str) -> Option<&'static str> {
    let out = ns
        .ip(&["-j", "-d", "link", "show", "dev", interface])
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    // XDP_ATTACHED_DRV, _SKB and _HW from linux/if_link.h.
    match links[0]["xdp"]["mode"].as_u64()? {
        1 => Some("native"),
        2 => Some("generic"),
        3 => Some("offload"),
        _ => None,
    }
}

/// A kubelet stand-in on `address:10250` in `ns` that answers every request with `body`.
pub fn kubelet(ns: &Netns, address: &str, body: &'static str) {
    let listener = ns
        .run(|| TcpListener::bind((address, 10250)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            // One thread each: a direct connection that sends nothing must not block the next.
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
}

/// Direct connections from the control plane to the kubelet, made over and over from two
/// threads until [`DirectProbe::finish`]: none may succeed while a guard enforces.
pub struct DirectProbe {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
    successes: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DirectProbe {
    pub fn start(site: &Site) -> DirectProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU64::new(0));
        let successes = Arc::new(AtomicU64::new(0));
        let threads = (0..2)
            .map(|_| {
                let (stop, attempts, successes) =
                    (stop.clone(), attempts.clone(), successes.clone());
                let cp = std::fs::File::open(site.cp.path()).unwrap();
                std::thread::spawn(move || {
                    nix::sched::setns(&cp, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    let target = format!("{NODE}:10250").parse().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        // Without the guard the SYN-ACK comes back across the veth in well
                        // under a millisecond, so 20 ms tells a drop from an answer.
                        if TcpStream::connect_timeout(&target, Duration::from_millis(20)).is_ok() {
                            successes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        DirectProbe {
            stop,
            attempts,
            successes,
            threads,
        }
    }

    /// Stops probing: (attempts, successes).
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        (
            self.attempts.load(Ordering::Relaxed),
            self.successes.load(Ordering::Relaxed),
        )
    }
}
