//! `cargo xtask bench tunnel|guard|soak|fleet|ha`: release builds, each measured against a baseline in
//! the same run (direct TCP for the tunnel; no-op XDP programs and iptables for the guard), or
//! watched over time (the soak). Results go in docs/benchmarks.md by hand, with the command.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, run_checked, setup, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// What to measure.
    #[arg(value_enum)]
    pub what: What,
    /// Smaller sizes, for a smoke run.
    #[arg(long)]
    pub quick: bool,
    /// Tunnel: how often each CPU measure is repeated (the median is reported).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Tunnel: also measure tether-agent and upstream's agent behind upstream's server; fleet:
    /// also measure upstream's server. From upstream's binaries in this directory (see
    /// `cargo xtask interop`).
    #[arg(long, value_name = "DIR")]
    pub upstream_bin: Option<std::path::PathBuf>,
    /// Tunnel: only these phases (download, upload, rtt, dial, idle, hol).
    pub phases: Vec<String>,
    /// Fleet: the fleet sizes to measure, comma-separated; ha: how many agents (default 40).
    #[arg(long)]
    pub agents: Option<String>,
    /// Fleet: agents authenticate by service-account token, each server reviewing them at
    /// this many TokenReviews per second, instead of by client certificate.
    #[arg(long, value_name = "QPS")]
    pub token_qps: Option<u32>,
    /// Soak: how long to run, printing a line a minute.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// tether-server + tether-agent: throughput, round trips, dials, idle memory, head-of-line.
    Tunnel,
    /// The XDP guard: cost per packet against a no-op floor, drop rate on a veth against a
    /// no-op XDP_DROP and an iptables raw rule.
    Guard,
    /// tether-server + tether-agent under mixed traffic for --minutes, printing throughput,
    /// round-trip p99, RSS, descriptors and tasks once a minute (not part of CI).
    Soak,
    /// One process playing --agents agents against one server (and upstream's, with
    /// --upstream-bin): memory and idle CPU per agent, the reconnect storm after a server
    /// restart, dial latency to random agents.
    Fleet,
    /// Three servers and --agents real agents through a rolling restart of the servers:
    /// reached by address, through a balancer, and upstream's pair (with --upstream-bin).
    Ha,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    match opts.what {
        What::Tunnel => {
            release_build(&["tether-server", "tether-agent", "tunnel_bench"])?;
            let mut cmd = Command::new(root.join("target/release/tunnel_bench"));
            if opts.quick {
                cmd.arg("--quick");
            }
            if let Some(rounds) = opts.rounds {
                cmd.arg("--rounds").arg(rounds.to_string());
            }
            if let Some(dir) = &opts.upstream_bin {
                cmd.arg("--upstream-bin").arg(dir);
            }
            cmd.args(&opts.phases);
            run_checked(&mut cmd)
        }
        What::Fleet => {
            release_build(&["tether-server", "fleet_bench"])?;
            let mut cmd = Command::new(root.join("target/release/fleet_bench"));
            cmd.args([
                "--agents",
                opts.agents.as_deref().unwrap_or("1000,5000,10000"),
            ]);
            if opts.quick {
                cmd.args(["--idle-seconds", "5", "--dials", "200"]);
            }
            if let Some(qps) = opts.token_qps {
                cmd.args(["--token-qps", &qps.to_string()]);
            }
            if let Some(dir) = &opts.upstream_bin {
                cmd.arg("--upstream-bin").arg(dir);
            }
            run_checked(&mut cmd)
        }
        What::Ha => {
            release_build(&["tether-server", "tether-agent", "ha_bench"])?;
            let mut cmd = Command::new(root.join("target/release/ha_bench"));
            cmd.args(["--agents", opts.agents.as_deref().unwrap_or("40")]);
            if let Some(dir) = &opts.upstream_bin {
                cmd.arg("--upstream-bin").arg(dir);
            }
            run_checked(&mut cmd)
        }
        What::Soak => {
            release_build(&["tether-server", "tether-agent", "soak"])?;
            run_checked(
                Command::new(root.join("target/release/soak"))
                    .args(["--minutes", &opts.minutes.to_string()]),
            )
        }
        What::Guard => {
            run_checked(Command::new("cargo").current_dir(&root).args([
                "build",
                "--release",
                "--quiet",
                "--package",
                "tether-tests",
                "--features",
                "guard-bench",
                "--bin",
                "guard_bench",
            ]))?;
            let mut cmd = Command::new(root.join("target/release/guard_bench"));
            cmd.arg("--bench-object")
                .arg(root.join("target/ebpf/bpfel-unknown-none/release/tether-bench-ebpf"));
            if opts.quick {
                cmd.arg("--quick");
            }
            run_checked(&mut cmd)
        }
    }
}

fn release_build(bins: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--quiet"]);
    for bin in bins {
        cmd.args(["--bin", bin]);
    }
    run_checked(&mut cmd)
}
