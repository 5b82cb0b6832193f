//! Harness for tether's end-to-end tests: network namespaces that clean up after themselves.

pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod destination;
pub mod docs;
pub mod fake_agent;
pub mod fake_server;
pub mod frontend;
pub mod guard_site;
pub mod image;
pub mod kube_api;
pub mod lb;
pub mod manifests;
pub mod netns;
pub mod packets;
pub mod peers;
pub mod pki;
pub mod process;
pub mod procs;
pub mod raw_h2;
pub mod rtt;
pub mod tun;

/// Fails the calling test loudly unless it runs as root: privileged tests never pass by
/// skipping.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces, eBPF); run it through `cargo xtask test` as root"
    );
}

/// The Python interpreter that has grpcio, installed by `cargo xtask setup`.
pub fn python() -> anyhow::Result<std::path::PathBuf> {
    python_tool("python")
}

/// A program of the Python environment `cargo xtask setup` installs (python, yamllint,
/// kubernetes-validate).
pub fn python_tool(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/python-venv/bin")
        .join(name);
    anyhow::ensure!(
        tool.exists(),
        "{} is missing; run `cargo xtask setup` (cargo xtask test does)",
        tool.display()
    );
    Ok(tool)
}
