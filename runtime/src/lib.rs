//! Plumbing shared by tether-agent and tether-server. Nothing here knows about the
//! Konnectivity protocol or about eBPF.

pub mod admin;
pub mod flags;
pub mod mailbox;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod window;

/// Raises the soft open-files limit to the hard limit: every tunnelled connection costs a
/// descriptor, and the usual soft limit of 1024 would cap a node at about a thousand
/// (Go raises it the same way for upstream's binaries).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %err, "could not raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "could not read the open-files limit"),
    }
}
