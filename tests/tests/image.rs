//! The container image, assembled as `cargo xtask image` assembles it (from this build's debug
//! binaries), run with podman: both binaries start in it, with nothing else there.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use tether_tests::image;
use tether_tests::procs::built;

struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = image::remove(&self.0);
    }
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_image_runs_both_binaries_and_holds_nothing_else() {
    let bin_dir = built("tether-agent")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let tag = format!("localhost/tether-test:{}", std::process::id());
    image::build(&bin_dir, &tag, "test").unwrap();
    let image = Image(tag);

    let out = image::podman_run(&image.0, &[], &["--help"]).unwrap();
    assert!(out.status.success(), "{}", output(&out));
    assert!(
        output(&out).contains("Usage: tether-agent"),
        "`podman run IMAGE --help` is the agent's:\n{}",
        output(&out)
    );

    let out = image::podman_run(
        &image.0,
        &["--entrypoint=/tether-server"],
        &["probe", "--help"],
    )
    .unwrap();
    assert!(
        out.status.success() && output(&out).contains("Usage: tether-server probe"),
        "{}",
        output(&out)
    );

    // From scratch: no shell to run anything else with.
    let out = image::podman_run(&image.0, &["--entrypoint=/bin/sh"], &["-c", "true"]).unwrap();
    assert!(
        !out.status.success(),
        "the image has a shell:\n{}",
        output(&out)
    );
}
