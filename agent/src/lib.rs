//! tether-agent: the node half of the Konnectivity tunnel, and the XDP guard that makes the
//! tunnel the only way in.
//!
//! A tunnelled connection's way through, and the module that owns each step:
//!
//! ```text
//! proxy server ──▶ tunnel::transport     TLS, HTTP/2 and the Connect stream to one server
//!                    │ tunnel::client_set one stream per server replica, redialled with backoff
//!                    ▼
//!                  tunnel::server_stream one server stream: its packets, its connections
//!                    │                   (a dial, a reader and a writer task each) and their
//!                    │                   single close path
//!                    │ tunnel::scheduler  fair turns between connections toward the server
//!                    ▼
//!                  dialer ──▶ dial_plane  the destination, if the dial policy allows it
//!                    ▼
//!                  kubelet, pods, Services on this node
//! ```
//!
//! Beside the tunnel, two features that each run on their own:
//!
//! - `guard`: the XDP program on the node's uplinks that drops the control plane's direct
//!   connections (`guard_program` loads, pins and attaches it and reads its counters and events;
//!   `interfaces` finds the uplinks and the tunnel devices' ports; `kernel` and `capabilities`
//!   check what the host allows).
//! - `dial_plane`: what the agent may dial and where a Service dial goes, enforced in
//!   userspace and by cgroup hooks in the kernel, with the Service map it follows.
//!
//! `app` starts them in that order (guard, dial plane, tunnel) under one task tracker and one
//! cancellation token and returns what it bound; `config` turns flags into a checked `Config`;
//! `metrics` holds upstream's and tether's metrics.

pub mod app;
pub mod capabilities;
pub mod config;
pub mod dial_plane;
pub mod dialer;
pub mod guard;
pub mod guard_program;
pub mod interfaces;
pub mod kernel;
pub mod metrics;
pub mod tunnel;
