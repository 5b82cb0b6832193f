//! tether-server: the control-plane half of the Konnectivity tunnel.

pub mod agent_service;
pub mod app;
pub mod backends;
pub mod config;
pub mod frontend;
pub mod listen;
pub mod metrics;
pub mod token_auth;
