//! `cargo xtask …`: the project's developer and CI tasks, one module per task.

mod bench;
mod build_ebpf;
mod demo;
mod docs;
mod fuzz;
mod image;
mod interop;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tether's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, bpf-linker, cargo-nextest,
    /// cargo-fuzz),
    /// skipping whatever is already present.
    Setup,
    /// Build the eBPF programs (agent-ebpf) for bpfel-unknown-none with Debian's toolchain.
    BuildEbpf(build_ebpf::Options),
    /// Build the eBPF object, then run every test (unit and privileged end-to-end) with nextest.
    Test(test::Options),
    /// Run the local demo in network namespaces it creates and removes.
    Demo,
    /// Measure against a baseline taken in the same run (release builds).
    Bench(bench::Options),
    /// Run tether against upstream Konnectivity's own binaries, both ways round.
    Interop(interop::Options),
    /// Build the container image from the release binaries (buildah, from scratch).
    Image(image::Options),
    /// Regenerate docs/flags.md from the binaries' --help.
    Docs,
    /// Run the coverage-guided fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) for a while each.
    Fuzz(fuzz::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf(opts) => build_ebpf::run(&opts),
        Task::Test(opts) => test::run(&opts),
        Task::Demo => demo::run(),
        Task::Bench(opts) => bench::run(&opts),
        Task::Interop(opts) => interop::run(&opts),
        Task::Image(opts) => image::run(&opts),
        Task::Docs => docs::run(),
        Task::Fuzz(opts) => fuzz::run(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command to completion, failing with the command line when it does not succeed.
fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
