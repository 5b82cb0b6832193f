//! `cargo xtask interop --upstream-bin DIR`: tether against upstream Konnectivity's binaries
//! (`server`, `agent`, `test-client`, `test-server` from kubernetes-sigs/apiserver-network-proxy,
//! built with `go build -o DIR ./cmd/...`), both ways round. Not part of CI: the binaries are not
//! there. The checks live in tests/src/bin/interop.rs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::{run_checked, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Directory with upstream's `server`, `agent`, `test-client` and `test-server`.
    #[arg(long, value_name = "DIR")]
    pub upstream_bin: PathBuf,
    /// Run only the checks whose name contains this.
    pub only: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    for binary in ["server", "agent", "test-client", "test-server"] {
        if !opts.upstream_bin.join(binary).exists() {
            bail!(
                "{} has no `{binary}`: build upstream's binaries with \
                 `GOFLAGS=-mod=vendor go build -o {} ./cmd/...` in a checkout of \
                 kubernetes-sigs/apiserver-network-proxy",
                opts.upstream_bin.display(),
                opts.upstream_bin.display()
            );
        }
    }
    // The agent embeds the eBPF object of its own profile (debug here), which a checkout
    // where only the release one was built does not have.
    crate::build_ebpf::run(&crate::build_ebpf::Options { release: false })?;
    let root = workspace_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--bin",
        "tether-server",
        "--bin",
        "tether-agent",
        "--bin",
        "interop",
    ]))?;
    let mut cmd = Command::new(root.join("target/debug/interop"));
    cmd.arg("--upstream-bin").arg(&opts.upstream_bin);
    if let Some(only) = &opts.only {
        cmd.arg(only);
    }
    run_checked(&mut cmd)
}
