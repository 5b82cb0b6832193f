//! `cargo xtask demo`: the local demo, in network namespaces it creates and removes.
//!
//! A "node" namespace runs tether-agent with the XDP guard on its uplink; a "peer" namespace
//! sends it traffic; the agent reports what its kernel program counted when it stops.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tether_tests::netns::{Netns, veth};
use tether_tests::process::{Process, wait_until};

use crate::{build_ebpf, run_checked, setup, workspace_root};

const DATAGRAMS: usize = 20;

pub fn run() -> Result<()> {
    setup::run()?;
    build_ebpf::run(&build_ebpf::Options { release: false })?;
    let root = workspace_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--package",
        "tether-agent",
    ]))?;
    let agent_bin = root.join("target/debug/tether-agent");

    println!("\n== network: node (10.77.0.1, eth0) <-veth-> peer (10.77.0.2, eth0)");
    let node = Netns::new("demo-node")?;
    let peer = Netns::new("demo-peer")?;
    veth(&node, "eth0", "10.77.0.1/24", &peer, "eth0", "10.77.0.2/24")?;

    println!("== starting tether-agent in the node namespace, guarding eth0");
    let mut agent = Process::spawn(
        "tether-agent",
        Command::new("nsenter")
            .arg(format!("--net={}", node.path()))
            .arg(&agent_bin)
            .args(["--guard-interface", "eth0"])
            .stdin(Stdio::null()),
    )?;
    let attached = wait_until(Duration::from_secs(10), || {
        node.ip(&["link", "show", "eth0"])
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("xdp"))
    });
    if !attached {
        bail!("tether-agent did not attach its XDP program to eth0 within 10s");
    }

    println!("== peer sends {DATAGRAMS} UDP datagrams to the node; each passes through the guard");
    peer.run(|| -> Result<()> {
        let socket = UdpSocket::bind("10.77.0.2:0")?;
        for _ in 0..DATAGRAMS {
            socket.send_to(b"hello from the peer", "10.77.0.1:9")?;
        }
        Ok(())
    })?
    .context("sending from the peer namespace")?;

    println!("== stopping tether-agent (SIGTERM); it reports the guard's counters");
    agent.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = agent.wait_timeout(Duration::from_secs(10))?;
    if !status.success() {
        bail!("tether-agent exited with {status}");
    }
    println!("== done; namespaces removed");
    Ok(())
}
