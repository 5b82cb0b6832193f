//! `cargo xtask build-ebpf`: builds agent-ebpf with Debian's cargo and rustc (called by full
//! path, since rustup's come first on PATH), their bundled std sources for `build-std=core`,
//! and bpf-linker.
//!
//! The object lands in `target/ebpf/bpfel-unknown-none/{debug,release}/tether-ebpf`, where the
//! agent's build script embeds it from.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::{run_checked, workspace_root};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";

#[derive(clap::Args)]
pub struct Options {
    /// Build the release profile (embedded by release builds of the agent).
    #[arg(long)]
    pub release: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    preflight()?;
    let root = workspace_root();
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(root.join("agent-ebpf"))
        .args([
            "build",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        // aya-build, a build dependency of aya-ebpf, declares a newer rust-version than it needs.
        .arg("--ignore-rust-version")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", DEBIAN_RUSTC)
        .env("CARGO_TARGET_DIR", root.join("target").join("ebpf"));
    // Running under rustup's cargo leaks its toolchain choice and flags into the environment;
    // the Debian toolchain must not see them.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    if opts.release {
        cmd.arg("--release");
    }
    run_checked(&mut cmd)
}

/// Fails with one line naming `cargo xtask setup` when a piece of the toolchain is missing.
fn preflight() -> Result<()> {
    for path in [DEBIAN_CARGO, DEBIAN_RUSTC, RUST_SRC] {
        if !Path::new(path).exists() {
            bail!("eBPF toolchain incomplete: {path} is missing; run `cargo xtask setup`");
        }
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        bail!("eBPF toolchain incomplete: bpf-linker is not on PATH; run `cargo xtask setup`");
    }
    Ok(())
}
