//! `cargo xtask docs`: regenerates the documentation that comes from the binaries
//! (docs/flags.md, from `--help`).

use std::process::Command;

use anyhow::{Context, Result};
use tether_tests::docs;

use crate::{build_ebpf, run_checked, workspace_root};

pub fn run() -> Result<()> {
    build_ebpf::run(&build_ebpf::Options { release: false })?;
    let root = workspace_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--bin",
        "tether-agent",
        "--bin",
        "tether-server",
    ]))?;
    let path = root.join("docs/flags.md");
    std::fs::write(&path, docs::flag_reference(&root.join("target/debug"))?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("docs: wrote {}", path.display());
    Ok(())
}
