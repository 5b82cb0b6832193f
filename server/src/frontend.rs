//! The frontends kube-apiserver dials through: gRPC `ProxyService` and HTTP CONNECT, over a
//! Unix socket or mTLS TCP. Each picks an agent stream from the registry, opens a connection on it,
//! and from then on holds only that connection.

pub mod authority;
pub mod connect;
pub mod connect_head;
pub mod grpc;
