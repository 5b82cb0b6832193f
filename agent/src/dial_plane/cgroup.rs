//! Which cgroup v2 directory the dial-policy hooks go on: the agent's own when it is alone there
//! (a container), otherwise a child the agent creates and moves itself into (a plain host,
//! where its cgroup, a systemd service's or the root, holds other processes that are not the
//! agent's to police).

use std::path::{Path, PathBuf};

/// The child created on a plain host; a restarted agent moves into the same one.
pub const CHILD: &str = "tether-agent";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NoHierarchy,
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("/proc/self/cgroup has no cgroup v2 line (\"0::/path\")")]
    NotInV2,
    #[error("cannot create cgroup {0} or move the agent into it")]
    Move(String, #[source] std::io::Error),
}

/// The mount point of the cgroup v2 hierarchy and the cgroup path its root stands for, from
/// mountinfo lines (`id parent major:minor root mountpoint options - fstype source …`).
fn v2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        Some((PathBuf::from(mount_point), root.to_owned()))
    })
}

/// The process's cgroup v2 path, from `/proc/self/cgroup`.
fn v2_path(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The directory of this process's cgroup.
pub fn own() -> Result<PathBuf, CgroupError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|err| CgroupError::Read(path.to_owned(), err))
    };
    let (mount_point, mount_root) =
        v2_mount(&read("/proc/self/mountinfo")?).ok_or(CgroupError::NoHierarchy)?;
    let path = v2_path(&read("/proc/self/cgroup")?).ok_or(CgroupError::NotInV2)?;
    // With a cgroup namespace the mount's root is the namespace's root, and paths are relative.
    let relative = path
        .strip_prefix(mount_root.trim_end_matches('/'))
        .unwrap_or(&path)
        .trim_start_matches('/');
    Ok(mount_point.join(relative))
}

/// The PIDs in a cgroup directory.
fn members(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&path)
        .map_err(|err| CgroupError::Read(path.display().to_string(), err))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Where this agent's hooks go: its own cgroup if nothing else runs there, else [`CHILD`]
/// under it, which the agent then joins.
pub fn for_hooks() -> Result<PathBuf, CgroupError> {
    let own = own()?;
    let me = std::process::id();
    if members(&own)?.iter().all(|pid| *pid == me) {
        return Ok(own);
    }
    let child = own.join(CHILD);
    let moved = (|| {
        if !child.exists() {
            std::fs::create_dir(&child)?;
        }
        std::fs::write(child.join("cgroup.procs"), me.to_string())
    })();
    moved.map_err(|err| CgroupError::Move(child.display().to_string(), err))?;
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_in_a_hybrid_and_a_unified_layout() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro\n\
                      36 35 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      44 35 0:39 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v2_mount(hybrid),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_owned()))
        );
        // Inside a container with its own cgroup namespace.
        let container = "1210 1200 0:27 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n";
        assert_eq!(
            v2_mount(container),
            Some((PathBuf::from("/sys/fs/cgroup"), "/".to_owned()))
        );
        assert_eq!(v2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn reads_the_v2_line_of_proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/kubepods/pod1/c1\n";
        assert_eq!(v2_path(hybrid).as_deref(), Some("/kubepods/pod1/c1"));
        assert_eq!(v2_path("4:memory:/x\n"), None);
    }
}
