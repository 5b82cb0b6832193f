//! The guard end to end in network namespaces: a control-plane namespace running tether-server,
//! a node namespace running tether-agent (with its guard) and a kubelet stand-in. Through the
//! tunnel the kubelet answers; directly it does not (enforce), or does and is counted (monitor),
//! or does and is not counted (off). The node's own outbound connections keep working, and the
//! guard outlives the agent: a graceful exit or a SIGKILL leaves no window for a direct hit.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tether_tests::bpffs::Bpffs;
use tether_tests::netns::{Netns, veth};
use tether_tests::pki::Pki;
use tether_tests::procs::{Agent, Server, built, http_get, spawn_logged};
use tether_tests::require_root;

const CP: &str = "10.77.0.1";
const NODE: &str = "10.77.0.2";

/// A control plane and a node joined by a veth, with a server in one and a kubelet stand-in in
/// the other; agents are started per case.
struct Site {
    pki: Pki,
    socket: PathBuf,
    // Dropped after the namespaces' processes: fields drop in declaration order.
    server: Server,
    bpffs: Bpffs,
    node: Netns,
    cp: Netns,
}

impl Site {
    fn new(tag: &str) -> Site {
        require_root();
        let pki = Pki::new(&[CP]).unwrap();
        let socket = pki.dir().join("s.sock");
        let cp = Netns::new(&format!("g{tag}-cp")).unwrap();
        let node = Netns::new(&format!("g{tag}-node")).unwrap();
        veth(
            &cp,
            "eth0",
            &format!("{CP}/24"),
            &node,
            "eth0",
            &format!("{NODE}/24"),
        )
        .unwrap();
        // A default route, so an agent without --guard-interface finds eth0 the way it finds
        // a node's uplink.
        node.ip(&["route", "add", "default", "via", CP]).unwrap();

        let kubelet = node
            .run(|| TcpListener::bind((NODE, 10250)))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            for mut stream in kubelet.incoming().flatten() {
                // One thread each: a direct connection that sends nothing must not block the
                // next.
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                    );
                });
            }
        });
        let pair = pki.pair("server");
        let args = [
            "--mode=http-connect".to_owned(),
            format!("--uds-name={}", socket.display()),
            "--server-port=0".into(),
            format!("--cluster-cert={}", pair.cert.display()),
            format!("--cluster-key={}", pair.key.display()),
            "--allow-unauthenticated-agents".into(),
            format!("--agent-bind-address={CP}"),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start_in(&cp, &refs).unwrap();
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
    fn agent(&self, guard: &[&str]) -> Agent {
        self.agent_with(None, guard)
    }

    /// [`Site::agent`], holding only `caps` when given.
    fn agent_with(&self, caps: Option<&[&str]>, guard: &[&str]) -> Agent {
        let mut args = vec![
            format!("--proxy-server-host={CP}"),
            format!("--proxy-server-port={}", self.server.agent_port),
            format!("--ca-cert={}", self.pki.ca().display()),
            "--sync-interval=100ms".into(),
            format!("--bpffs-root={}", self.bpffs.root().display()),
        ];
        args.extend(guard.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = match caps {
            Some(caps) => Agent::start_in_with_caps(&self.node, caps, &refs).unwrap(),
            None => Agent::start_in(&self.node, &refs).unwrap(),
        };
        assert!(
            self.node
                .run(|| tether_tests::procs::wait_ready(agent.health_port, Duration::from_secs(10)))
                .unwrap(),
            "agent never connected to the server"
        );
        agent
    }

    fn through_tunnel(&self) -> String {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "CONNECT {NODE}:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 39];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head[..], b"HTTP/1.1 200 Connection Established\r\n\r\n");
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    /// A direct connection from the control plane to the kubelet port.
    fn direct(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        self.cp
            .run(|| TcpStream::connect_timeout(&format!("{NODE}:10250").parse().unwrap(), timeout))
            .unwrap()
    }

    /// The node's own outbound connection to the control plane (its SYN-ACK must pass).
    fn outbound_works(&self) -> bool {
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
    fn guard_packets(&self, agent: &Agent, reason: &str, action: &str) -> Option<u64> {
        let (status, body) = self
            .node
            .run(|| http_get(agent.health_port, "/metrics"))
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        let series =
            format!(r#"tether_agent_guard_packets_total{{reason="{reason}",action="{action}"}} "#);
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.trim().parse().unwrap())
    }

    /// `tether-agent guard <action>` on this site's pins: (exit code, stdout).
    fn guard_cli(&self, action: &str) -> (i32, String) {
        let out = Command::new(built("tether-agent").unwrap())
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

fn log_field(line: &str, key: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value["fields"][key].as_str().unwrap_or_default().to_owned()
}

#[test]
fn enforce_drops_the_direct_path_keeps_the_tunnel_and_detaches_cleanly() {
    let site = Site::new("enf");
    let agent = site.agent(&[
        "--guard-interface=eth0",
        &format!("--control-plane-cidr={CP}/32"),
    ]);
    let attached = agent
        .logged
        .logs
        .wait_for("XDP guard attached", Duration::from_secs(1))
        .unwrap();
    assert_eq!(log_field(&attached, "attach"), "native");

    assert!(site.through_tunnel().ends_with("hello"));
    assert!(site.outbound_works(), "node -> control plane was broken");
    assert!(
        site.direct(Duration::from_secs(1)).is_err(),
        "direct connection to the kubelet succeeded under enforce"
    );
    assert!(site.through_tunnel().ends_with("hello"));

    let dropped = site
        .guard_packets(&agent, "control_plane_syn", "drop")
        .unwrap();
    assert!(dropped >= 1, "the dropped SYN was not counted: {dropped}");
    assert_eq!(
        site.guard_packets(&agent, "control_plane_syn", "pass"),
        Some(0)
    );
    let event = agent
        .logged
        .logs
        .wait_for("guard drop", Duration::from_secs(5))
        .expect("no drop event logged");
    assert_eq!(log_field(&event, "reason"), "control_plane_syn");
    assert_eq!(log_field(&event, "action"), "dropped");
    assert!(log_field(&event, "source").starts_with(&format!("{CP}:")));
    assert_eq!(log_field(&event, "destination"), format!("{NODE}:10250"));
    assert_eq!(log_field(&event, "protocol"), "tcp");

    let (code, status) = site.guard_cli("status");
    assert_eq!(code, 0, "{status}");
    for expected in [
        "mode:                enforce",
        "interfaces:          eth0 (program ",
        &format!("control-plane CIDRs: {CP}/32"),
        "protected ports:     10250, 10255",
        "allowed CIDRs:       none",
    ] {
        assert!(
            status.contains(expected),
            "{expected:?} missing in\n{status}"
        );
    }
    let syn_row = status
        .lines()
        .find(|l| l.starts_with("control_plane_syn"))
        .unwrap();
    let dropped_in_status: u64 = syn_row.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(dropped_in_status >= dropped, "{syn_row}");

    // Detach works while the agent still runs: the link's only holder is its pin.
    let (code, out) = site.guard_cli("detach");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("detached from eth0"), "{out}");
    assert!(!site.bpffs.root().exists(), "pins left behind");
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "still dropped after guard detach"
    );
    let (code, out) = site.guard_cli("status");
    assert_ne!(code, 0, "status after detach: {out}");
}

/// The DaemonSet grants CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and nothing else: with exactly
/// those the agent attaches, stays up, drops the direct path and reports its counters (it
/// once exited here: it reopened the counters map by ID, which needs CAP_SYS_ADMIN).
#[test]
fn the_guard_runs_with_only_the_daemonsets_capabilities() {
    let site = Site::new("cap");
    let agent = site.agent_with(
        Some(&["bpf", "net_admin", "perfmon"]),
        &[
            "--guard-interface=eth0",
            &format!("--control-plane-cidr={CP}/32"),
        ],
    );
    assert!(
        agent
            .logged
            .logs
            .wait_for("XDP guard attached", Duration::from_secs(5))
            .is_some(),
        "{:?}",
        agent.logged.logs.lines()
    );
    assert!(site.through_tunnel().ends_with("hello"));
    assert!(site.direct(Duration::from_secs(1)).is_err());
    let dropped = site.guard_packets(&agent, "control_plane_syn", "drop");
    assert!(dropped.is_some_and(|n| n >= 1), "{dropped:?}");
    assert!(
        !agent.logged.logs.contains("Operation not permitted"),
        "{:?}",
        agent.logged.logs.lines()
    );
}

#[test]
fn monitor_passes_the_direct_path_and_counts_it() {
    let site = Site::new("mon");
    let agent = site.agent(&[
        "--guard-mode=monitor",
        "--guard-interface=eth0",
        &format!("--control-plane-cidr={CP}/32"),
    ]);
    assert!(site.through_tunnel().ends_with("hello"));
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "monitor mode dropped a connection"
    );
    assert_eq!(
        site.guard_packets(&agent, "control_plane_syn", "drop"),
        Some(0)
    );
    let would_drop = site
        .guard_packets(&agent, "control_plane_syn", "pass")
        .unwrap();
    assert!(
        would_drop >= 1,
        "monitor did not count the SYN it would have dropped"
    );
    let event = agent
        .logged
        .logs
        .wait_for("guard drop", Duration::from_secs(5))
        .expect("no event for what monitor would drop");
    assert_eq!(log_field(&event, "action"), "would drop (monitor)");
}

/// On a node whose own address is inside the control-plane range (a control-plane node),
/// enforcing would cut it off from its peers: the agent refuses, says so, and monitors.
#[test]
fn a_control_plane_node_is_monitored_not_enforced() {
    let site = Site::new("cpn");
    let agent = site.agent(&[
        "--guard-interface=eth0",
        "--control-plane-cidr=10.77.0.0/24",
    ]);
    let refusal = agent
        .logged
        .logs
        .wait_for("so it is a control-plane node", Duration::from_secs(5))
        .expect("no refusal logged");
    assert!(
        refusal.contains(r#"\"10.77.0.2 in 10.77.0.0/24\""#),
        "{refusal}"
    );
    let attached = agent
        .logged
        .logs
        .wait_for("XDP guard attached", Duration::from_secs(5))
        .unwrap();
    assert_eq!(log_field(&attached, "mode"), "monitor");
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "a control-plane peer was dropped"
    );
    assert_eq!(
        site.guard_packets(&agent, "control_plane_syn", "drop"),
        Some(0)
    );
}

/// The guard stays after a graceful exit; a later agent with `--guard-mode=off` switches the
/// pinned program off through its map (no reload): everything passes, nothing is counted.
#[test]
fn guard_outlives_the_agent_and_off_switches_it_off() {
    let site = Site::new("off");
    // Defaults: the default route's interface, the proxy server's address as control plane.
    let mut agent = site.agent(&[]);
    let attached = agent
        .logged
        .logs
        .wait_for("XDP guard attached", Duration::from_secs(1))
        .unwrap();
    assert_eq!(log_field(&attached, "interface"), "eth0");
    assert!(attached.contains(&format!("{CP}/32")), "{attached}");
    assert!(site.direct(Duration::from_millis(500)).is_err());

    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(
        site.direct(Duration::from_millis(500)).is_err(),
        "the guard went away with the agent"
    );

    let agent = site.agent(&["--guard-mode=off"]);
    assert!(
        agent
            .logged
            .logs
            .contains("the pinned guard now passes everything")
    );
    let before: Vec<Option<u64>> = ["pass", "drop"]
        .iter()
        .map(|action| site.guard_packets(&agent, "control_plane_syn", action))
        .collect();
    assert!(before[1].unwrap() >= 2, "{before:?}");
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "off mode dropped a connection"
    );
    assert!(site.through_tunnel().ends_with("hello"));
    let after: Vec<Option<u64>> = ["pass", "drop"]
        .iter()
        .map(|action| site.guard_packets(&agent, "control_plane_syn", action))
        .collect();
    assert_eq!(before, after, "off mode counted packets");
    assert_eq!(
        site.guard_cli("status").1.lines().nth(1).unwrap(),
        "mode:                off"
    );
}

/// The agent is SIGKILLed and restarted while probers keep trying the direct path: the pinned
/// link keeps the old program until the new one replaces it atomically.
#[test]
fn sigkill_and_restart_leave_no_gap() {
    let site = Site::new("kill");
    let guard = [
        "--guard-interface=eth0".to_owned(),
        format!("--control-plane-cidr={CP}/32"),
    ];
    let guard: Vec<&str> = guard.iter().map(String::as_str).collect();
    let mut first = site.agent(&guard);
    let program_before = site.guard_cli("status").1;

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let successes = Arc::new(AtomicU64::new(0));
    let probers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, attempts, successes) = (stop.clone(), attempts.clone(), successes.clone());
            let cp = std::fs::File::open(site.cp.path()).unwrap();
            std::thread::spawn(move || {
                nix::sched::setns(&cp, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let target = format!("{NODE}:10250").parse().unwrap();
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    // Without the guard the SYN-ACK comes back across the veth in well under
                    // a millisecond, so 20 ms tells a drop from an answer.
                    if TcpStream::connect_timeout(&target, Duration::from_millis(20)).is_ok() {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(200));
    first.logged.process.signal(Signal::SIGKILL).unwrap();
    first
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    let second = site.agent(&guard);
    let attached = second
        .logged
        .logs
        .wait_for("XDP guard attached", Duration::from_secs(1))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for prober in probers {
        prober.join().unwrap();
    }

    let attempts = attempts.load(Ordering::Relaxed);
    assert!(attempts >= 20, "only {attempts} direct attempts were made");
    assert_eq!(
        successes.load(Ordering::Relaxed),
        0,
        "a direct connection got through during the restart ({attempts} attempts)"
    );
    assert_eq!(log_field(&attached, "attach"), "replaced on pinned link");
    assert!(second.logged.logs.contains("adopted the pinned guard"));
    // The new program runs on the same link, and the counters carried over.
    let program_after = site.guard_cli("status").1;
    let program = |status: &str| {
        status
            .lines()
            .find(|l| l.starts_with("interfaces:"))
            .unwrap()
            .to_owned()
    };
    assert_ne!(program(&program_before), program(&program_after));
    let dropped = site
        .guard_packets(&second, "control_plane_syn", "drop")
        .unwrap();
    assert!(
        dropped >= attempts,
        "{dropped} drops for {attempts} attempts"
    );
    assert!(site.through_tunnel().ends_with("hello"));
}

/// What an operator gets wrong first: pins outside a BPF filesystem, a mistyped interface.
/// Each fails at start with one line that says what to fix.
#[test]
fn bad_guard_setups_fail_with_the_fix() {
    require_root();
    let pki = Pki::new(&[CP]).unwrap();
    let ns = Netns::new("gbad").unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let start = |guard: &[String]| {
        let mut args = vec![
            format!("--proxy-server-host={CP}"),
            format!("--ca-cert={}", pki.ca().display()),
        ];
        args.extend(guard.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match Agent::start_in(&ns, &refs) {
            Ok(_) => panic!("agent started with {guard:?}"),
            Err(err) => format!("{err:#}"),
        }
    };
    let off_bpffs = pki.dir().join("pins");
    let err = start(&[
        "--guard-interface=lo".into(),
        format!("--bpffs-root={}", off_bpffs.display()),
    ]);
    assert!(
        err.contains("is not on a BPF filesystem") && err.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{err}"
    );
    assert!(!off_bpffs.exists(), "created pins outside bpffs");

    let err = start(&[
        "--guard-interface=nosuch0".into(),
        format!("--bpffs-root={}", bpffs.root().display()),
    ]);
    assert!(
        err.contains(r#"network interface \"nosuch0\" does not exist"#)
            || err.contains(r#"network interface "nosuch0" does not exist"#),
        "{err}"
    );

    // Root without capabilities, like a pod that was not granted CAP_BPF.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path()))
        .args(["setpriv", "--bounding-set=-all", "--inh-caps=-all"])
        .arg(built("tether-agent").unwrap())
        .args([
            "--log-format=json",
            "--health-server-port=0",
            "--admin-server-port=0",
            "--guard-interface=lo",
        ])
        .arg(format!("--proxy-server-host={CP}"))
        .arg(format!("--ca-cert={}", pki.ca().display()))
        .arg(format!("--bpffs-root={}", bpffs.root().display()));
    let mut agent = spawn_logged("agent", &mut cmd).unwrap();
    let status = agent.process.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(!status.success(), "started without capabilities");
    assert!(
        agent
            .logs
            .wait_for(
                "loading eBPF is not permitted: the agent needs CAP_BPF",
                Duration::from_secs(2)
            )
            .is_some(),
        "{:#?}",
        agent.logs.lines()
    );
}
