//! cgroup v2 directories a test creates for the processes it starts, and removes with them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A cgroup under the v2 hierarchy, removed (its processes killed first) when dropped.
pub struct TestCgroup {
    dir: PathBuf,
}

fn v2_mount() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 hierarchy is mounted")
}

impl TestCgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = v2_mount()?.join(format!("tether-test-{tag}-{}", std::process::id()));
        if dir.exists() {
            TestCgroup { dir: dir.clone() }.remove();
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TestCgroup { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `program args…` started as `sh`, which joins this cgroup and then becomes the program.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .arg(program);
        cmd
    }

    fn remove(&self) {
        remove_tree(&self.dir);
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills what runs in `dir` and its children (the cgroups a process under test made, such as
/// the agent's own `tether-agent`) and removes them, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids(dir);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}
