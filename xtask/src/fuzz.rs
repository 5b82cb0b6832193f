//! `cargo xtask fuzz [TARGET…] --time N`: builds the fuzz targets in `fuzz/` with cargo-fuzz
//! and runs each for N seconds on its corpus and its regression inputs, failing when any
//! target finds a crash (libFuzzer leaves the input in `fuzz/artifacts/TARGET/`).
//!
//! The targets build without a sanitizer: tether's code is safe Rust, where a sanitizer finds
//! little a panic would not, and without one each run covers several times more inputs.
//! Overflow checks and debug assertions stay on. cargo-fuzz wants nightly flags, which the
//! stable compiler accepts under RUSTC_BOOTSTRAP=1.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};

/// Every target in fuzz/Cargo.toml, in the order CI runs them.
pub const TARGETS: &[&str] = &[
    "packet_decode",
    "identifiers",
    "policy_parsers",
    "connect_head",
    "agent_server_stream",
    "server_agent_stream",
    "xdp_guard",
];

#[derive(clap::Args)]
pub struct Options {
    /// Targets to run (default: all of them).
    targets: Vec<String>,
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    time: u64,
}

pub fn run(opts: &Options) -> Result<()> {
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for target in &opts.targets {
            if !TARGETS.contains(&target.as_str()) {
                bail!(
                    "unknown fuzz target {target:?} (targets: {})",
                    TARGETS.join(", ")
                );
            }
        }
        opts.targets.iter().map(String::as_str).collect()
    };
    // The agent embeds the release eBPF object into the optimised build cargo-fuzz makes.
    crate::build_ebpf::run(&crate::build_ebpf::Options { release: true })?;
    let dir = crate::workspace_root().join("fuzz");
    crate::run_checked(fuzz_command(&dir).args(["build", "-s", "none", "-a"]))?;
    let mut failed = Vec::new();
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let regressions = dir.join("regressions").join(target);
        let mut cmd = fuzz_command(&dir);
        cmd.args(["run", "-s", "none", "-a", target]).arg(&corpus);
        if regressions.is_dir() {
            cmd.arg(&regressions);
        }
        cmd.args([
            "--",
            &format!("-max_total_time={}", opts.time),
            "-print_final_stats=1",
        ]);
        println!("fuzz: {target} for {} s", opts.time);
        let started = Instant::now();
        let status = cmd.status()?;
        println!(
            "fuzz: {target} {} after {:.0?}",
            if status.success() { "clean" } else { "FAILED" },
            started.elapsed()
        );
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets found crashes: {} (inputs in fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn fuzz_command(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("fuzz").current_dir(dir).env("RUSTC_BOOTSTRAP", "1");
    cmd
}
