//! The container image: both binaries and the shared libraries they load, in an image built
//! `from scratch` with buildah (nothing pulled from a registry), and podman to run it.
//!
//! `cargo xtask image` builds it from the release binaries; the tests build the same image from
//! the debug binaries, so the assembly is checked on every run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// The binaries the image holds, at its root.
pub const BINARIES: &[&str] = &["tether-agent", "tether-server"];

/// Builds image `tag` from `BINARIES` in `bin_dir`, stripped of debug information, with the
/// shared libraries `ldd` names (the C library and its loader) at their own paths.
pub fn build(bin_dir: &Path, tag: &str, version: &str) -> Result<()> {
    let stage = tempfile::tempdir()?;
    let mut libraries = Vec::new();
    for name in BINARIES {
        let binary = bin_dir.join(name);
        ensure!(
            binary.exists(),
            "{} is missing: build it first",
            binary.display()
        );
        let staged = stage.path().join(name);
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&binary)
            .arg(&staged))?;
        libraries.extend(shared_libraries(&binary)?);
    }
    libraries.sort();
    libraries.dedup();
    for library in &libraries {
        let relative = library.strip_prefix("/").unwrap_or(library);
        let target = stage.path().join(relative);
        std::fs::create_dir_all(target.parent().context("library path has a parent")?)?;
        // The file itself, not a symlink into the build host's tree.
        std::fs::copy(library, &target)
            .with_context(|| format!("copying {}", library.display()))?;
    }

    let container = text(run(Command::new("buildah").args(["from", "scratch"]))?);
    let result = (|| {
        run(Command::new("buildah")
            .args(["copy", "--quiet", &container])
            .arg(stage.path())
            .arg("/"))?;
        run(Command::new("buildah").args([
            "config",
            // `podman run IMAGE --help` is the agent's: the DaemonSet runs it, and the static
            // pod names /tether-server as its command.
            "--entrypoint",
            r#"["/tether-agent"]"#,
            "--cmd",
            "",
            "--user",
            "0:0",
            "--label",
            "org.opencontainers.image.title=tether",
            "--label",
            "org.opencontainers.image.description=Konnectivity agent and server with an XDP guard",
            "--label",
            "org.opencontainers.image.licenses=Apache-2.0",
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            &container,
        ]))?;
        run(Command::new("buildah").args(["commit", "--quiet", "--rm", &container, tag]))
    })();
    if result.is_err() {
        let _ = Command::new("buildah")
            .args(["rm", &container])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    result.map(drop)
}

/// Removes image `tag`.
pub fn remove(tag: &str) -> Result<()> {
    run(Command::new("podman").args(["rmi", "--force", tag])).map(drop)
}

/// `podman run --rm` of image `tag` with no network and the given arguments after the image.
///
/// Where the machine is a sandbox with a hybrid cgroup layout and without CAP_SYS_RESOURCE (as
/// this project's CI is), crun can neither place the container in cgroups nor raise limits:
/// it runs in a private mount namespace that sees cgroup v2 alone, without cgroups, and with
/// limits below the current ones. On an ordinary host these change nothing that matters for a
/// command that prints and exits.
pub fn podman_run(tag: &str, before_image: &[&str], after_image: &[&str]) -> Result<Output> {
    let mut podman = vec![
        "podman",
        "run",
        "--rm",
        "--network=none",
        "--cgroups=disabled",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=4096:4096",
    ];
    podman.extend_from_slice(before_image);
    podman.push(tag);
    podman.extend_from_slice(after_image);
    let quoted: Vec<String> = podman.iter().map(|a| shell_quote(a)).collect();
    let script = format!(
        "mount --make-rprivate / && \
         if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then \
           umount -R /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup; \
         fi && exec {}",
        quoted.join(" ")
    );
    Ok(Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()?)
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// The absolute paths of the shared libraries `binary` loads, per `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = text(run(Command::new("ldd").arg(binary))?);
    let mut found = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or the loader's own
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(path) if path.starts_with('/') => found.push(PathBuf::from(path)),
            Some("not") => bail!("{}: a library is not found: {line}", binary.display()),
            _ => {}
        }
    }
    ensure!(
        !found.is_empty(),
        "ldd found no libraries for {}",
        binary.display()
    );
    Ok(found)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("running {cmd:?} (is buildah/podman installed? cargo xtask setup)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn text(out: Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
