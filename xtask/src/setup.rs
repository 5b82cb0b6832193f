//! `cargo xtask setup`: installs, idempotently, everything building and testing need.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Debian packages: the eBPF toolchain (Debian's rustc and cargo with std sources, LLVM for
/// bpf-linker) plus what tests and the demo drive (ip, nsenter, iptables, nft, openssl,
/// systemd-analyze for the shipped unit).
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "iptables",
    "nftables",
    "openssl",
    "util-linux",
    "systemd",
    // The container image: built from scratch and run in the tests.
    "buildah",
    "podman",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// From PyPI, pinned: grpcio (gRPC's C core) drives the gRPC frontend in the tests as a peer
/// tether did not write; kubernetes-validate and yamllint check deploy/'s manifests.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("grpcio", "1.85.3"),
    ("kubernetes-validate", "1.37.0"),
    ("yamllint", "1.38.0"),
];

pub fn run() -> Result<()> {
    apt_packages()?;
    bpf_linker()?;
    nextest()?;
    cargo_fuzz()?;
    python_packages()?;
    Ok(())
}

/// The Python environment with [`PYTHON_PACKAGES`]; `tether_tests::python_tool` looks here.
fn python_env() -> std::path::PathBuf {
    crate::workspace_root().join("target/python-venv")
}

fn python_packages() -> Result<()> {
    let env = python_env();
    let python = env.join("bin/python");
    let pins: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    let missing: Vec<&String> = pins
        .iter()
        .zip(PYTHON_PACKAGES)
        .filter(|(_, (name, version))| {
            !Command::new(&python)
                .args([
                    "-c",
                    "import importlib.metadata as m, sys; sys.exit(m.version(sys.argv[1]) != sys.argv[2])",
                    name,
                    version,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(pin, _)| pin)
        .collect();
    if missing.is_empty() {
        println!(
            "setup: skipped {} (present in {})",
            pins.join(" "),
            env.display()
        );
        return Ok(());
    }
    let missing: Vec<&str> = missing.iter().map(|pin| pin.as_str()).collect();
    println!(
        "setup: installing {} into {}",
        missing.join(" "),
        env.display()
    );
    if !python.exists() {
        install(Command::new("python3").arg("-m").arg("venv").arg(&env))
            .context("python3 -m venv failed; is Python 3 with venv installed?")?;
    }
    install(
        Command::new(env.join("bin/pip"))
            .args(["install", "-q"])
            .args(&missing),
    )
    .with_context(|| {
        format!(
            "pip install {} failed; is PyPI reachable?",
            missing.join(" ")
        )
    })?;
    println!("setup: installed {}", missing.join(" "));
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: skipped apt packages (all present: {})",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    println!("setup: installing apt packages: {}", missing.join(" "));
    apt(&["update", "-q"]).context("apt-get update failed; is the Debian mirror reachable?")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args).with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    println!("setup: installed apt packages: {}", missing.join(" "));
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.stdout == b"installed")
}

fn apt(args: &[&str]) -> Result<()> {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("could not run apt-get")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("{} ({last})", out.status);
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        });
    if present {
        println!("setup: skipped bpf-linker {BPF_LINKER_VERSION} (present)");
        return Ok(());
    }
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)"
    );
    install(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            // llvm-sys reads the first variable; bpf-linker's own build script reads the second
            // and would otherwise pick whichever llvm-config comes first on PATH.
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context(
        "cargo install bpf-linker failed; is crates.io reachable and llvm-22-dev installed?",
    )?;
    println!("setup: installed bpf-linker {BPF_LINKER_VERSION}");
    Ok(())
}

fn nextest() -> Result<()> {
    cargo_tool("nextest", &["cargo-nextest", "--locked"])
}

/// cargo-fuzz drives libFuzzer for `cargo xtask fuzz`.
fn cargo_fuzz() -> Result<()> {
    cargo_tool("fuzz", &["cargo-fuzz", "--locked", "--version", "0.13.2"])
}

/// Installs the cargo subcommand `name` with `cargo install ARGS` unless it answers
/// `--version`.
fn cargo_tool(name: &str, args: &[&str]) -> Result<()> {
    let present = Command::new("cargo")
        .args([name, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let package = args[0];
    if present {
        println!("setup: skipped {package} (present)");
        return Ok(());
    }
    println!("setup: installing {package}");
    install(Command::new("cargo").arg("install").args(args))
        .with_context(|| format!("cargo install {package} failed; is crates.io reachable?"))?;
    println!("setup: installed {package}");
    Ok(())
}

/// Runs an installer, failing with its last error line.
fn install(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("could not run cargo")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("error"))
            .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("");
        bail!("{} ({last})", out.status);
    }
    Ok(())
}
