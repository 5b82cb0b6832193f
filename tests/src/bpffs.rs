//! A BPF filesystem of the test's own, for the guard's pins.
//!
//! Mounted at `/tmp/tether-bpffs-<pid>-<n>` so `cargo xtask test` can unmount the leftovers of a
//! killed test process. Unmounting releases every pin in it, which detaches any XDP link the
//! test left pinned — on success and on panic alike. The host's `/sys/fs/bpf` is never touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::process::dead_owner;

const PREFIX: &str = "/tmp/tether-bpffs-";

pub struct Bpffs {
    mountpoint: PathBuf,
}

impl Bpffs {
    pub fn mount() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mountpoint = PathBuf::from(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mountpoint)
            .status()
            .context("running mount")?;
        if !status.success() {
            let _ = std::fs::remove_dir(&mountpoint);
            bail!("mount -t bpf bpf {} failed: {status}", mountpoint.display());
        }
        Ok(Bpffs { mountpoint })
    }

    /// Where the agent keeps its pins: `--bpffs-root`.
    pub fn root(&self) -> PathBuf {
        self.mountpoint.join("tether")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        unmount(&self.mountpoint);
    }
}

fn unmount(mountpoint: &Path) {
    let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
    let _ = std::fs::remove_dir(mountpoint);
}

/// Unmounts the BPF filesystems of test processes that are gone, and only those.
pub fn remove_stale() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    for mountpoint in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        if let Some(owner) = dead_owner(mountpoint, PREFIX) {
            eprintln!("unmounting stale test bpffs {mountpoint} (owner {owner} is gone)");
            unmount(Path::new(mountpoint));
        }
    }
    Ok(())
}
