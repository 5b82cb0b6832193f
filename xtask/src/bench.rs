//! `cargo xtask bench tunnel`: release builds of both binaries, measured against a direct TCP
//! baseline in the same run. Results go in docs/benchmarks.md by hand, with this command.

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
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// tether-server + tether-agent: throughput, round trips, dials, idle memory, head-of-line.
    Tunnel,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "tether-server",
        "-p",
        "tether-agent",
        "-p",
        "tether-tests",
        "--bin",
        "tether-server",
        "--bin",
        "tether-agent",
        "--bin",
        "tunnel_bench",
    ]))?;
    match opts.what {
        What::Tunnel => {
            let mut cmd = Command::new(root.join("target/release/tunnel_bench"));
            if opts.quick {
                cmd.arg("--quick");
            }
            run_checked(&mut cmd)
        }
    }
}
