//! tether-server: the control-plane half of the Konnectivity tunnel.
//!
//! A packet's way through, and the module that owns each step:
//!
//! ```text
//! kube-apiserver ─▶ frontend::{grpc, connect}   one dial per gRPC stream or CONNECT socket
//!                   (frontend::authority lets grpc-go's socket-path :authority through)
//!                     │ registry: picks an agent stream by strategy
//!                     ▼
//!                   connection     one tunnelled connection: its state, its queue toward the
//!                     │            frontend, its single close path (Connections::end)
//!                     ▼
//!                   outbox         what goes to one agent: DATA waits, control never does
//!                     ▼
//! agents ◀──────── agent_service  the AgentService: checks, authenticates (token_auth),
//!                     │            binds claims to the credential (identity), registers the
//!                     │            stream and runs its receive loop
//!                     ▼
//!                   agent_stream   one agent stream: each packet it sends, to its connection
//! ```
//!
//! Beside them: `app` wires everything and returns what it bound; `config` turns flags into a
//! checked `Config`; `listen` accepts TCP/TLS and Unix-socket connections; `strategy` is
//! `--proxy-strategies`; `token_auth` checks agents' service-account tokens (rate-limited,
//! cached, strangers kept from starving proven agents) and `review_store` keeps its cache
//! across a restart; `identity` checks an agent's claims
//! against its certificate or token and limits streams per identity; `nodes` follows every
//! Node's addresses for token-bound claims, which `registry` uses to serve an address only
//! when one node claims it; `metrics`.

pub mod agent_service;
pub mod agent_stream;
pub mod app;
pub mod config;
pub mod connection;
pub mod frontend;
pub mod identity;
pub mod leases;
pub mod listen;
pub mod metrics;
pub mod nodes;
pub mod outbox;
pub mod probe;
pub mod registry;
pub mod review_store;
pub mod strategy;
pub mod tickets;
pub mod token_auth;
