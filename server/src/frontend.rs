//! What the agent side hands to one frontend connection (a gRPC `Proxy` stream or an HTTP
//! CONNECT socket): events in a bounded [`Mailbox`] that the frontend's own task drains, so a
//! slow kube-apiserver reader never blocks the agent stream.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::Bytes;
use tether_runtime::mailbox::{Mailbox, Weigh};

pub mod connect;
pub mod grpc;

#[derive(Debug)]
pub enum ToFrontend {
    /// The agent connected; DATA may flow.
    DialOk {
        connect_id: i64,
    },
    /// The dial failed; the text is the agent's (or ours).
    DialFailed {
        error: String,
        cause: DialCause,
    },
    Data(Bytes),
    /// The connection is over; a non-empty error says why.
    Closed {
        error: String,
    },
    /// The agent cancelled the pending dial.
    DialClosed,
}

/// Why a dial failed, which decides the HTTP status a CONNECT client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialCause {
    /// The agent answered with an error (its text is mapped to a status as upstream does).
    Agent,
    /// No answer within `--backend-dial-timeout`.
    Timeout,
    /// The agent stream went away first.
    Backend,
    /// Refused before reaching an agent.
    Refused,
}

/// Per-event bookkeeping cost counted against the queue, beyond the payload.
const EVENT_OVERHEAD: usize = 64;

impl Weigh for ToFrontend {
    fn weight(&self) -> usize {
        match self {
            ToFrontend::Data(bytes) => bytes.len() + EVENT_OVERHEAD,
            _ => EVENT_OVERHEAD,
        }
    }
}

/// One frontend connection as the agent side sees it.
pub struct FrontendConn {
    /// Server-unique, for logs.
    pub id: u64,
    /// The dial ID the frontend chose (echoed back to it; never sent to agents).
    pub random: i64,
    pub mailbox: Mailbox<ToFrontend>,
    connect_id: AtomicI64,
}

static NEXT_FRONTEND: AtomicU64 = AtomicU64::new(1);

impl FrontendConn {
    pub fn new(random: i64, queue_bytes: usize) -> Self {
        FrontendConn {
            id: NEXT_FRONTEND.fetch_add(1, Ordering::Relaxed),
            random,
            mailbox: Mailbox::new(queue_bytes),
            connect_id: AtomicI64::new(0),
        }
    }

    /// The agent's connectID once the dial succeeded, else 0.
    pub fn connect_id(&self) -> i64 {
        self.connect_id.load(Ordering::Acquire)
    }

    pub(crate) fn set_connect_id(&self, id: i64) {
        self.connect_id.store(id, Ordering::Release);
    }
}
