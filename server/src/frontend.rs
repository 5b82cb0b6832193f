//! What the agent side hands to one frontend connection (a gRPC `Proxy` stream or an HTTP
//! CONNECT socket): events in a bounded [`Mailbox`] that the frontend's own task drains, so a
//! slow kube-apiserver reader never blocks the agent stream.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use tether_runtime::backpressure::{Budget, Progress};
use tether_runtime::mailbox::{Mailbox, Weigh};
use tether_runtime::window::{Grants, SendWindow, WindowClosed};
use tokio_util::sync::CancellationToken;

use crate::backends::Backend;

pub mod authority;
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
    /// How much the frontend has taken, for telling a slow reader from a stalled one.
    pub progress: Progress,
    /// Fired when the connection is given up on while its frontend may be blocked.
    abandoned: CancellationToken,
    connect_id: AtomicI64,
    established_at: OnceLock<Instant>,
    flow: OnceLock<Flow>,
}

/// Credit for one connection when its agent negotiated flow control.
struct Flow {
    backend: Weak<Backend>,
    /// What we may still send the agent for this connection.
    window: SendWindow,
    /// What the frontend took, owed back to the agent as WINDOW grants.
    grants: Grants,
}

static NEXT_FRONTEND: AtomicU64 = AtomicU64::new(1);

impl FrontendConn {
    /// `budget` is the agent stream's, when there is one to charge.
    pub fn new(random: i64, queue_bytes: usize, budget: Option<Arc<Budget>>) -> Self {
        FrontendConn {
            id: NEXT_FRONTEND.fetch_add(1, Ordering::Relaxed),
            random,
            mailbox: match budget {
                Some(budget) => Mailbox::with_budget(queue_bytes, budget),
                None => Mailbox::new(queue_bytes),
            },
            progress: Progress::default(),
            abandoned: CancellationToken::new(),
            connect_id: AtomicI64::new(0),
            established_at: OnceLock::new(),
            flow: OnceLock::new(),
        }
    }

    /// Gives up on a frontend that stopped reading: drops what it has not taken, tells it why
    /// (should it ever read again) and wakes whatever writes to it.
    pub(crate) fn abandon(&self, error: String) {
        self.mailbox.discard();
        let _ = self.mailbox.push_control(ToFrontend::Closed { error });
        self.close();
        self.abandoned.cancel();
    }

    /// Resolves once the connection was abandoned.
    pub async fn abandoned(&self) {
        self.abandoned.cancelled().await;
    }

    /// Turns on per-connection credit once the dial succeeded on a flow-controlled agent.
    pub(crate) fn enable_flow(&self, backend: Weak<Backend>) {
        let _ = self.flow.set(Flow {
            backend,
            window: SendWindow::new(tether_proto::INITIAL_WINDOW),
            grants: Grants::new(tether_proto::INITIAL_WINDOW / 4),
        });
    }

    /// Waits until `n` more bytes may be sent to the agent (at once without flow control).
    pub async fn reserve(&self, n: usize) -> Result<(), WindowClosed> {
        match self.flow.get() {
            Some(flow) => flow.window.take(n).await,
            None => Ok(()),
        }
    }

    /// Whether a client's EOF can be passed on as a half-close (tether agents only).
    pub fn half_close(&self) -> bool {
        self.flow.get().is_some()
    }

    /// The agent granted more window.
    pub(crate) fn granted(&self, bytes: i64) {
        if let Some(flow) = self.flow.get() {
            flow.window.grant(bytes);
        }
    }

    /// The frontend took `n` bytes; owes the agent a grant once enough has accumulated.
    pub fn delivered(&self, n: usize) {
        let Some(flow) = self.flow.get() else {
            return;
        };
        if let Some(grant) = flow.grants.consumed(n)
            && let Some(backend) = flow.backend.upgrade()
        {
            backend.grant(self.connect_id(), grant);
        }
    }

    /// The destination finished sending (the agent's FIN) on a frontend that cannot represent
    /// a half-close: ask the agent to close, so its CLOSE_RSP ends the stream as upstream's
    /// EOF would.
    pub fn finish_without_half_close(&self) {
        if let Some(backend) = self.flow.get().and_then(|flow| flow.backend.upgrade()) {
            backend.request_close(self.connect_id());
        }
    }

    /// No more events will be queued; a sender waiting for window gives up.
    pub fn close(&self) {
        self.mailbox.close();
        if let Some(flow) = self.flow.get() {
            flow.window.close();
        }
    }

    /// The agent's connectID once the dial succeeded, else 0.
    pub fn connect_id(&self) -> i64 {
        self.connect_id.load(Ordering::Acquire)
    }

    pub(crate) fn set_connect_id(&self, id: i64) {
        self.connect_id.store(id, Ordering::Release);
    }

    pub(crate) fn mark_established(&self) {
        let _ = self.established_at.set(Instant::now());
    }

    /// When the agent's dial succeeded, for the connection-duration histogram.
    pub(crate) fn established_at(&self) -> Option<Instant> {
        self.established_at.get().copied()
    }
}
