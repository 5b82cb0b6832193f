//! `cargo xtask demo`: the local demo, in network namespaces it creates and removes.
//!
//! A "control-plane" namespace runs tether-server; a "node" namespace runs tether-agent (whose
//! XDP guard sits on the node's uplink) and a kubelet-like HTTP server on :10250.
//! `tether-server probe` plays kube-apiserver: it reaches the kubelet through the tunnel (HTTP
//! CONNECT on the server's Unix socket); then a direct connection tries, which the guard drops. The guard's pins live on a BPF
//! filesystem the demo mounts for itself and removes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tether_tests::bpffs::Bpffs;
use tether_tests::netns::{Netns, veth};
use tether_tests::pki::Pki;
use tether_tests::process::{Process, wait_until};

use crate::{build_ebpf, run_checked, setup, workspace_root};

const CP: &str = "10.77.0.1";
const NODE: &str = "10.77.0.2";

pub fn run() -> Result<()> {
    setup::run()?;
    build_ebpf::run(&build_ebpf::Options { release: false })?;
    let root = workspace_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--package",
        "tether-agent",
        "--package",
        "tether-server",
    ]))?;
    let bin = |name: &str| root.join("target/debug").join(name);
    let pki = Pki::new(&[CP])?;
    let socket = pki.dir().join("konnectivity-server.socket");

    println!("\n== network: control-plane ({CP}) <-veth-> node ({NODE})");
    let cp = Netns::new("demo-cp")?;
    let node = Netns::new("demo-node")?;
    veth(
        &cp,
        "eth0",
        &format!("{CP}/24"),
        &node,
        "eth0",
        &format!("{NODE}/24"),
    )?;
    node.ip(&["route", "add", "default", "via", CP])?;
    let bpffs = Bpffs::mount()?;

    println!("== node: a kubelet-like HTTP server on {NODE}:10250");
    let kubelet = node.run(|| TcpListener::bind((NODE, 10250)))??;
    std::thread::spawn(move || serve_kubelet(kubelet));

    println!(
        "== control plane: tether-server (HTTP CONNECT on {}, agents on {CP}:8091 with client \
         certificates; the agent may claim only its certificate's names and addresses)",
        socket.display()
    );
    let server_pair = pki.pair("server");
    // The agent's certificate names its node: the server holds the agent to that name and
    // address (--bind-agent-identity), so no other node could claim them.
    let agent_pair = pki.client("demo-node", &["demo-node", NODE])?;
    let _server = Process::spawn(
        "tether-server",
        nsenter(&cp, &bin("tether-server")).args([
            "--mode=http-connect",
            &format!("--uds-name={}", socket.display()),
            "--server-port=0",
            &format!("--cluster-cert={}", server_pair.cert.display()),
            &format!("--cluster-key={}", server_pair.key.display()),
            &format!("--cluster-ca-cert={}", pki.ca().display()),
            "--bind-agent-identity=certificate",
            &format!("--agent-bind-address={CP}"),
        ]),
    )?;

    println!(
        "== node: tether-agent dials out to the server and guards eth0 (the default route's \
         interface; control plane = {CP}, the server's address)"
    );
    let bpffs_root = format!("--bpffs-root={}", bpffs.root().display());
    let mut agent = Process::spawn(
        "tether-agent",
        nsenter(&node, &bin("tether-agent")).args([
            &format!("--proxy-server-host={CP}"),
            &format!("--ca-cert={}", pki.ca().display()),
            &format!("--agent-cert={}", agent_pair.cert.display()),
            &format!("--agent-key={}", agent_pair.key.display()),
            &format!("--agent-identifiers=ipv4={NODE}"),
            "--agent-id=demo-node",
            &bpffs_root,
            // The demo runs the agent beside the machine's own processes, where the kernel
            // hooks would go on a cgroup the demo does not own.
            "--dial-policy-cgroup=off",
        ]),
    )?;
    let ready = wait_until(Duration::from_secs(15), || {
        cp.run(|| http_get_status((CP, 8092), "/readyz"))
            .ok()
            .flatten()
            == Some(200)
    });
    if !ready {
        bail!("tether-server did not become ready (no agent connected) within 15s");
    }

    if !wait_until(Duration::from_secs(10), || {
        node.ip(&["link", "show", "eth0"])
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("xdp"))
    }) {
        bail!("the XDP guard did not attach to the node's eth0 within 10s");
    }

    println!(
        "\n== kube-apiserver's path, as an operator checks it: tether-server probe {NODE}:10250"
    );
    let probe = || through_tunnel(&bin("tether-server"), &socket, &format!("{NODE}:10250"));
    println!("{}", indent(&probe()?));

    println!("== the direct path, control plane -> {NODE}:10250 (2 s timeout)");
    let direct = cp.run(|| {
        TcpStream::connect_timeout(
            &format!("{NODE}:10250").parse().expect("addr"),
            Duration::from_secs(2),
        )
    })?;
    match direct {
        Ok(_) => bail!("the direct connection got through; the guard should have dropped its SYN"),
        Err(err) => println!("   no connection ({err}): its SYN was dropped in XDP"),
    }
    println!("== the tunnel still works: the agent's own connection is outbound");
    let again = probe()?;
    println!(
        "{}",
        indent(again.lines().find(|l| l.starts_with("reply")).unwrap_or(""))
    );

    println!("\n== tether-agent guard status");
    println!(
        "{}",
        indent(&guard_cli(
            "status",
            &node,
            &bin("tether-agent"),
            &bpffs_root
        )?)
    );

    println!("== stopping the agent: the guard stays pinned, so the direct path stays closed");
    agent.signal(Signal::SIGTERM)?;
    agent.wait_timeout(Duration::from_secs(30))?;
    let direct = cp.run(|| {
        TcpStream::connect_timeout(
            &format!("{NODE}:10250").parse().expect("addr"),
            Duration::from_secs(1),
        )
    })?;
    if direct.is_ok() {
        bail!("the direct path opened when the agent stopped");
    }
    println!("   still dropped");
    println!("== tether-agent guard detach (what an uninstall job runs)");
    println!(
        "{}",
        indent(&guard_cli(
            "detach",
            &node,
            &bin("tether-agent"),
            &bpffs_root
        )?)
    );
    println!("== done; processes stopped, bpffs and namespaces removed");
    Ok(())
}

fn nsenter(ns: &Netns, program: &std::path::Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path()))
        .arg(program)
        .stdin(Stdio::null());
    cmd
}

/// Run in the node's namespace, as on a node: the per-interface counters name interfaces by
/// index, which only the node's namespace resolves.
fn guard_cli(
    action: &str,
    node: &Netns,
    agent: &std::path::Path,
    bpffs_root: &str,
) -> Result<String> {
    let out = nsenter(node, agent)
        .args(["guard", action, bpffs_root])
        .output()
        .with_context(|| format!("running tether-agent guard {action}"))?;
    if !out.status.success() {
        bail!(
            "tether-agent guard {action} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn serve_kubelet(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let body = "kubelet on the demo node says hello\n";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

fn http_get_status(addr: (&str, u16), path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// `tether-server probe` in HTTP CONNECT mode, as the demo's server runs, with a GET through.
fn through_tunnel(
    server: &std::path::Path,
    socket: &std::path::Path,
    target: &str,
) -> Result<String> {
    let out = Command::new(server)
        .args(["probe", "--mode=http-connect", "--http-get=/healthz"])
        .arg(format!("--uds-name={}", socket.display()))
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .context("running tether-server probe")?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{target} is not reachable through the tunnel:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(report)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("   {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
