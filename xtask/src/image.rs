//! `cargo xtask image [--check]`: the container image from the release binaries, built with
//! buildah from scratch (nothing pulled from a registry) into the local container storage.

use std::process::Command;

use anyhow::{Result, ensure};
use tether_tests::image;

use crate::{build_ebpf, run_checked, setup, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Image name to commit.
    #[arg(long, default_value = concat!("localhost/tether:", env!("CARGO_PKG_VERSION")))]
    pub tag: String,
    /// Afterwards, run both binaries in the image with podman.
    #[arg(long)]
    pub check: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--bin",
        "tether-agent",
        "--bin",
        "tether-server",
    ]))?;
    image::build(
        &root.join("target/release"),
        &opts.tag,
        env!("CARGO_PKG_VERSION"),
    )?;
    println!("image: built {}", opts.tag);
    if opts.check {
        for (entrypoint, args, expect) in [
            (None, vec!["--help"], "Usage: tether-agent"),
            (
                Some("--entrypoint=/tether-server"),
                vec!["--help"],
                "Usage: tether-server",
            ),
        ] {
            let before: Vec<&str> = entrypoint.into_iter().collect();
            let out = image::podman_run(&opts.tag, &before, &args)?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success() && text.contains(expect),
                "podman run {} {}: {}{}",
                opts.tag,
                args.join(" "),
                text,
                String::from_utf8_lossy(&out.stderr)
            );
            println!(
                "image: podman run {before:?} {} {} ok",
                opts.tag,
                args.join(" ")
            );
        }
    }
    println!(
        "image: push it with `podman push {} docker://REGISTRY/tether:{}`",
        opts.tag,
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}
