//! tether-agent: the node half of the Konnectivity tunnel, and the XDP guard that makes the
//! tunnel the only way in.

pub mod app;
pub mod capabilities;
pub mod cgroup;
pub mod config;
pub mod dataplane;
pub mod dial_policy;
pub mod dialer;
pub mod guard;
pub mod interfaces;
pub mod kernel;
pub mod metrics;
pub mod services;
pub mod tunnel;
