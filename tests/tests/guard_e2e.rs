//! The guard end to end in network namespaces: a control-plane namespace running tether-server,
//! a node namespace running tether-agent, a kubelet stand-in and the XDP guard. Through the
//! tunnel the kubelet answers; directly it does not (enforce) or does and is counted (monitor)
//! or does and is not counted (off). The node's own outbound connections keep working.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tether_tests::netns::{Netns, veth};
use tether_tests::pki::Pki;
use tether_tests::procs::{Logged, built, spawn_logged};
use tether_tests::require_root;

const CP: &str = "10.77.0.1";
const NODE: &str = "10.77.0.2";

fn nsenter(ns: &Netns, binary: &str, args: &[String]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path()))
        .arg(built(binary).unwrap())
        .args(["--log-format", "json"])
        .args(args);
    cmd
}

fn through_tunnel(socket: &std::path::Path) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
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

/// Drop counts the guard logged at shutdown, per reason label.
fn shutdown_counts(guard: &Logged, reason: &str) -> (u64, u64) {
    let line = guard
        .logs
        .wait_for(&format!(r#""reason":"{reason}""#), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no counters for {reason}"));
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = &value["fields"];
    (
        fields["passed"].as_u64().unwrap(),
        fields["dropped"].as_u64().unwrap(),
    )
}

fn case(mode: &str) -> (Result<TcpStream, std::io::Error>, (u64, u64)) {
    require_root();
    let pki = Pki::new(&[CP]).unwrap();
    let socket = pki.dir().join("s.sock");
    let cp = Netns::new(&format!("g{mode}-cp")).unwrap();
    let node = Netns::new(&format!("g{mode}-node")).unwrap();
    veth(
        &cp,
        "eth0",
        &format!("{CP}/24"),
        &node,
        "eth0",
        &format!("{NODE}/24"),
    )
    .unwrap();

    let kubelet = node
        .run(|| TcpListener::bind((NODE, 10250)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in kubelet.incoming().flatten() {
            // One thread each: a direct connection that sends nothing must not block the next.
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                );
            });
        }
    });
    let control_plane_service = cp.run(|| TcpListener::bind((CP, 6443))).unwrap().unwrap();

    let pair = pki.pair("server");
    let server = spawn_logged(
        "server",
        &mut nsenter(
            &cp,
            "tether-server",
            &[
                "--mode=http-connect".into(),
                format!("--uds-name={}", socket.display()),
                "--server-port=0".into(),
                format!("--cluster-cert={}", pair.cert.display()),
                format!("--cluster-key={}", pair.key.display()),
                format!("--agent-bind-address={CP}"),
                "--health-port=0".into(),
                "--admin-port=0".into(),
            ],
        ),
    )
    .unwrap();
    let _agent = spawn_logged(
        "agent",
        &mut nsenter(
            &node,
            "tether-agent",
            &[
                format!("--proxy-server-host={CP}"),
                format!("--ca-cert={}", pki.ca().display()),
                "--sync-interval=100ms".into(),
                "--health-server-port=0".into(),
                "--admin-server-port=0".into(),
            ],
        ),
    )
    .unwrap();
    let mut guard = spawn_logged(
        "guard",
        &mut nsenter(
            &node,
            "tether-agent",
            &[
                "guard".into(),
                "--guard-interface=eth0".into(),
                format!("--guard-mode={mode}"),
                format!("--control-plane-cidr={CP}/32"),
            ],
        ),
    )
    .unwrap();
    assert!(
        guard
            .logs
            .wait_for("XDP guard attached", Duration::from_secs(10))
            .is_some(),
        "guard did not attach"
    );
    assert!(
        server
            .logs
            .wait_for("agent connected", Duration::from_secs(10))
            .is_some(),
        "agent never connected"
    );

    let reply = through_tunnel(&socket);
    assert!(reply.ends_with("hello"), "through the tunnel: {reply}");

    // The node's own outbound connection to the control plane: its SYN-ACK must pass.
    let outbound = node.run(|| {
        TcpStream::connect_timeout(
            &format!("{CP}:6443").parse().unwrap(),
            Duration::from_secs(2),
        )
    });
    assert!(
        outbound.unwrap().is_ok(),
        "node -> control plane connection was broken by the guard"
    );
    drop(control_plane_service);

    let direct = cp
        .run(|| {
            TcpStream::connect_timeout(
                &format!("{NODE}:10250").parse().unwrap(),
                Duration::from_secs(1),
            )
        })
        .unwrap();
    // The tunnel still works after the attempt.
    assert!(through_tunnel(&socket).ends_with("hello"));

    guard.process.signal(Signal::SIGTERM).unwrap();
    guard.process.wait_timeout(Duration::from_secs(10)).unwrap();
    (direct, shutdown_counts(&guard, "control_plane_syn"))
}

#[test]
fn enforce_drops_the_direct_path_and_keeps_the_tunnel() {
    let (direct, (passed, dropped)) = case("enforce");
    assert!(
        direct.is_err(),
        "direct connection to the kubelet succeeded under enforce"
    );
    assert_eq!(passed, 0);
    assert!(dropped >= 1, "the dropped SYN was not counted");
}

#[test]
fn monitor_passes_the_direct_path_and_counts_it() {
    let (direct, (passed, dropped)) = case("monitor");
    assert!(direct.is_ok(), "monitor mode dropped a connection");
    assert_eq!(dropped, 0);
    assert!(
        passed >= 1,
        "monitor did not count the SYN it would have dropped"
    );
}

#[test]
fn off_passes_and_counts_nothing() {
    let (direct, counts) = case("off");
    assert!(direct.is_ok(), "off mode dropped a connection");
    assert_eq!(counts, (0, 0));
}
