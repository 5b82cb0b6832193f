//! Network namespaces owned by one test process.
//!
//! Each is named `tether-<pid>-<tag>` so `cargo xtask test` can remove the leftovers of a
//! process that was killed before its guards ran. Dropping a [`Netns`] deletes it, which also
//! deletes the veths inside it — on success and on panic alike.

use std::fs::File;
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::process::dead_owner;

const PREFIX: &str = "tether-";

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=…`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Drops, in this namespace's firewall, every incoming TCP segment whose `side`
    /// (`--sport` or `--dport`) is `port`: a peer that goes silent without a FIN or RST.
    pub fn swallow_tcp(&self, side: &str, port: u16) -> Result<()> {
        run(Command::new("ip")
            .args([
                "netns", "exec", &self.name, "iptables", "-I", "INPUT", "-p", "tcp",
            ])
            .args([side, &port.to_string(), "-j", "DROP"]))?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it creates stay in the
    /// namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair between two namespaces, both ends up and addressed.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A control-plane namespace and a node namespace joined by `eth0` in /24s, the node's default
/// route via the control plane: an agent without `--guard-interface` finds eth0 the way it
/// finds a node's uplink.
pub fn control_plane_and_node(tag: &str, cp: &str, node: &str) -> Result<(Netns, Netns)> {
    let cp_ns = Netns::new(&format!("{tag}-cp"))?;
    let node_ns = Netns::new(&format!("{tag}-node"))?;
    veth(
        &cp_ns,
        "eth0",
        &format!("{cp}/24"),
        &node_ns,
        "eth0",
        &format!("{node}/24"),
    )?;
    node_ns.ip(&["route", "add", "default", "via", cp])?;
    Ok((cp_ns, node_ns))
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Removes the namespaces of test processes that died before their guards ran (their owner's
/// pid is gone), and only those.
pub fn remove_stale() -> Result<()> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(owner) = dead_owner(name, PREFIX) {
            eprintln!("removing stale network namespace {name} (owner {owner} is gone)");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    Ok(())
}
