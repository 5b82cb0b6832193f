//! Embeds the eBPF objects built by `cargo xtask build-ebpf`, and refuses to embed one that is
//! missing or older than its sources: a stale guard program must never ship silently.
//!
//! Freshness comes from the dep-info file cargo writes beside the object, which lists every
//! source file the object was compiled from.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

fn main() -> ExitCode {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest_dir
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let (profile, command) = if release {
        ("release", "cargo xtask build-ebpf --release")
    } else {
        ("debug", "cargo xtask build-ebpf")
    };
    for dir in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(dir).display());
    }
    // The guard, and the dial policy's cgroup hooks.
    for (name, variable) in [
        ("tether-ebpf", "TETHER_EBPF_OBJECT"),
        ("tether-dial", "TETHER_DIAL_OBJECT"),
    ] {
        let object = root.join(format!("target/ebpf/bpfel-unknown-none/{profile}/{name}"));
        let dep_info = object.with_extension("d");
        println!("cargo::rerun-if-changed={}", object.display());
        println!("cargo::rerun-if-changed={}", dep_info.display());
        let Some(built) = modified(&object) else {
            println!(
                "cargo::error=eBPF object {} is missing; run `{command}` first",
                object.display()
            );
            continue;
        };
        let sources = fs::read_to_string(&dep_info).unwrap_or_default();
        if let Some(newer) = dep_sources(&sources)
            .filter(|src| src.starts_with(&root))
            .find(|src| modified(src).is_none_or(|m| m > built))
        {
            println!(
                "cargo::error=eBPF object {} is older than {}; run `{command}` again",
                object.display(),
                newer.display()
            );
            continue;
        }
        println!("cargo::rustc-env={variable}={}", object.display());
    }
    ExitCode::SUCCESS
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The prerequisites of a Makefile-style dep-info file (`target: dep dep\ with\ space …`).
fn dep_sources(dep_info: &str) -> impl Iterator<Item = PathBuf> + '_ {
    dep_info
        .lines()
        .filter_map(|line| line.split_once(": ").map(|(_, deps)| deps))
        .flat_map(|deps| {
            let mut out = Vec::new();
            let mut current = String::new();
            let mut chars = deps.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => current.extend(chars.next()),
                    ' ' => {
                        if !current.is_empty() {
                            out.push(PathBuf::from(std::mem::take(&mut current)));
                        }
                    }
                    _ => current.push(c),
                }
            }
            if !current.is_empty() {
                out.push(PathBuf::from(current));
            }
            out
        })
}
