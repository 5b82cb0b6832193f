//! Documentation generated from the binaries themselves, so that it cannot drift from them:
//! `cargo xtask docs` writes it, and a test fails when what is committed is stale.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// Every command line a user can type, as (binary, arguments before `--help`).
const COMMANDS: &[(&str, &[&str])] = &[
    ("tether-agent", &[]),
    ("tether-agent", &["guard", "status"]),
    ("tether-agent", &["guard", "detach"]),
    ("tether-server", &[]),
    ("tether-server", &["probe"]),
];

/// docs/flags.md: each command's `--help`, verbatim.
pub fn flag_reference(bin_dir: &Path) -> Result<String> {
    let mut out = String::from(
        "# Flag reference\n\n\
         Generated from the binaries' `--help` by `cargo xtask docs`; a test fails when this file\n\
         and the binaries disagree. Each tether-specific flag also reads the `TETHER_*`\n\
         environment variable shown beside it; upstream Konnectivity's flags keep upstream's\n\
         names, defaults and environment variables (`PROXY_AGENT_ID`, `PROXY_SERVER_ID`).\n",
    );
    for (binary, args) in COMMANDS {
        // No inherited environment: clap prints an env var's current value beside its flag.
        let output = Command::new(bin_dir.join(binary))
            .args(*args)
            .arg("--help")
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {binary} --help (build the binaries first)"))?;
        ensure!(
            output.status.success(),
            "{binary} {} --help failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        let title = std::iter::once(*binary)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!(
            "\n## `{title}`\n\n```text\n{}\n```\n",
            String::from_utf8_lossy(&output.stdout).trim_end()
        ));
    }
    Ok(out)
}
