//! What `deploy/` ships is checked against the binaries it runs: the systemd unit verifies
//! with systemd's own checker, and the flags it passes parse.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use tether_tests::procs::built;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// The agent's flags in the example environment file, split as systemd splits `$VAR`.
fn example_args() -> Vec<String> {
    let env = std::fs::read_to_string(deploy("systemd/agent.env.example")).unwrap();
    let line = env
        .lines()
        .find_map(|l| l.strip_prefix("TETHER_AGENT_ARGS="))
        .expect("no TETHER_AGENT_ARGS line");
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(deploy("systemd/tether-agent.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("agent.env");
    std::fs::copy(deploy("systemd/agent.env.example"), &env).unwrap();
    // Where this checkout's binary and env file are; verify checks that both exist.
    let agent = built("tether-agent").unwrap();
    let local = unit
        .replace("/usr/local/bin/tether-agent", &agent.display().to_string())
        .replace("/etc/tether/agent.env", &env.display().to_string());
    assert_ne!(
        local, unit,
        "the unit no longer names the paths this test replaces"
    );
    let path = dir.path().join("tether-agent.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains(&*path.display().to_string()),
        "systemd-analyze has remarks on the unit:\n{stderr}"
    );
}

#[test]
fn the_systemd_example_flags_parse() {
    let mut args = vec!["tether-agent".to_owned()];
    args.extend(example_args());
    if let Err(err) = tether_agent::config::Args::try_parse_from(&args) {
        panic!("{args:?}: {err}");
    }
}
