//! Plumbing shared by tether-agent and tether-server. Nothing here knows about the
//! Konnectivity protocol or about eBPF.

pub mod admin;
pub mod flags;
pub mod mailbox;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod window;
