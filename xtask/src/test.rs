//! `cargo xtask test`: the one command that runs every test, locally and in CI.

use std::process::Command;

use anyhow::Result;

use tether_tests::{bpffs, netns};

use crate::{build_ebpf, run_checked, setup, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo nextest run` (e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub nextest_args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    build_ebpf::run(&build_ebpf::Options { release: false })?;
    netns::remove_stale()?;
    bpffs::remove_stale()?;
    // The end-to-end tests run the real executables, which `nextest` does not build. Building
    // every target here, with the dev-dependencies' features, lets nextest reuse the one build
    // instead of compiling a second copy of tokio and everything above it.
    run_checked(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--workspace",
        "--all-targets",
    ]))?;
    run_checked(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["nextest", "run", "--workspace", "--no-tests=fail"])
            .args(&opts.nextest_args),
    )
}
