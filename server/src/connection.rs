//! One tunnelled connection from the server's side, and the table of them on one agent stream.
//!
//! A frontend's dial makes a [`Connection`]. It sits in its agent stream's [`Connections`] as a
//! pending dial, then, once the agent answers, under the agent's connectID, until
//! [`Connections::end`], the one close path, has told the agent and the frontend what each needs to
//! know, counted it once and removed it. Once the server has asked the agent to close (CLOSE_REQ),
//! the entry stays until the agent's CLOSE_RSP, so that answer is expected rather than "unknown";
//! an agent that never answers loses such entries after [`CLOSE_WAIT`].
//!
//! The frontend side only ever holds its `Arc<Connection>`: it moves bytes through it and ends it
//! through it, and never needs the agent stream it belongs to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

use bytes::Bytes;
use tether_proto::Packet;
use tether_runtime::backpressure::{self, Budget, Pressure, Progress, Queues};
use tether_runtime::mailbox::{Mailbox, PushError, Weigh};
use tether_runtime::sparse::ShrinkWhenSparse;
use tether_runtime::window::{Grants, SendWindow};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::outbox::{AgentGone, Outbox, Overflow};

/// How long a connection the server asked the agent to close waits for its CLOSE_RSP.
pub const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// Largest DATA payload sent to an agent (under the window minus its grant batch, and far under
/// gRPC's 4 MiB).
const MAX_DATA: usize = 256 * 1024;

/// What the agent side hands a frontend, in order.
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
    StreamGone,
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

/// How a connection ends; [`Connections::end`] decides from it and the connection's state who
/// is told what.
#[derive(Debug)]
pub enum End {
    /// The agent refused the dial (or answered without a connectID).
    DialFailed { error: String },
    /// The agent did not answer the dial within `--backend-dial-timeout`.
    DialTimeout,
    /// The agent cancelled the dial (DIAL_CLS).
    DialCancelled,
    /// The agent closed the connection (CLOSE_RSP).
    AgentClosed { error: String },
    /// The agent stream ended.
    AgentGone,
    /// The frontend asked to close (CLOSE_REQ); it waits for the agent's CLOSE_RSP.
    FrontendClose,
    /// The frontend went away (stream ended or reset, socket closed).
    FrontendGone,
    /// The frontend broke the protocol; it is told why, and the agent to close.
    FrontendError { error: String },
    /// The frontend stopped taking bytes (stalled, or past a window it was given); what it
    /// has not taken is dropped.
    Abandoned { error: String },
    /// The server is stopping: the frontend is told, the agent asked to close.
    ServerStopping,
}

/// What a frontend is told when the server stops under it.
const STOPPING: &str = "the proxy server is shutting down";

/// One tunnelled connection, as its frontend holds it.
pub struct Connection {
    /// Server-unique, for logs.
    pub id: u64,
    /// The dial ID the frontend chose (echoed back to it; never sent to agents).
    pub random: i64,
    pub mailbox: Mailbox<ToFrontend>,
    /// How much the frontend has taken, for telling a slow reader from a stalled one.
    pub progress: Progress,
    /// Fired when the connection is given up on while its frontend may be blocked.
    abandoned: CancellationToken,
    /// The server's dial ID toward the agent (never the frontend's: one frontend cannot
    /// reach another's dial).
    dial_id: i64,
    connect_id: AtomicI64,
    established_at: OnceLock<Instant>,
    flow: OnceLock<Flow>,
    outbox: Outbox,
    owner: Weak<Connections>,
}

/// Credit for one connection when its agent negotiated flow control.
struct Flow {
    /// What we may still send the agent.
    window: SendWindow,
    /// What the frontend took, owed back to the agent as WINDOW grants.
    grants: Grants,
}

static NEXT_TUNNEL: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// The agent's connectID once the dial succeeded, else 0.
    pub fn connect_id(&self) -> i64 {
        self.connect_id.load(Ordering::Acquire)
    }

    /// Whether a client's EOF can be passed on as a half-close (tether agents only).
    pub fn half_close(&self) -> bool {
        self.flow.get().is_some()
    }

    /// A value that changes whenever either direction moves: the reply into the frontend's
    /// socket (however slowly the frontend reads), or the destination taking the upload (as
    /// the agent's grants show, with flow control).
    pub fn motion(&self) -> (u64, Option<u64>) {
        (
            self.progress.mark(),
            self.flow.get().map(|flow| flow.window.granted()),
        )
    }

    /// Frontend bytes for the agent. Waits for the connection's window (with flow control)
    /// and for room toward the agent, which pushes back on this frontend only.
    pub async fn send_data(&self, mut data: Bytes) -> Result<(), AgentGone> {
        let connect_id = self.connect_id();
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_DATA));
            if let Some(flow) = self.flow.get() {
                flow.window.take(piece.len()).await.map_err(|_| AgentGone)?;
            }
            self.outbox.send(Packet::data(connect_id, piece)).await?;
        }
        Ok(())
    }

    /// Tells a tether agent the frontend will send nothing more (an empty DATA is FIN).
    pub async fn send_fin(&self) -> Result<(), AgentGone> {
        self.outbox
            .send(Packet::data(self.connect_id(), Bytes::new()))
            .await
    }

    /// The frontend took `n` bytes: owes the agent a grant once enough has accumulated.
    pub fn delivered(&self, n: usize) {
        if let Some(flow) = self.flow.get()
            && let Some(grant) = flow.grants.consumed(n)
            && let Some(connections) = self.owner.upgrade()
        {
            connections.control(Packet::window(self.connect_id(), grant));
        }
    }

    /// Sends the DIAL_REQ; with `--backend-dial-timeout`, a dial the agent does not answer in
    /// time ends as a timeout. `Err` when the agent stream is gone (the connection has ended).
    pub async fn dial(self: &Arc<Self>, address: &str) -> Result<(), AgentGone> {
        let Some(connections) = self.owner.upgrade() else {
            return Err(AgentGone);
        };
        if let Err(gone) = self
            .outbox
            .send(Packet::dial_request(address, self.dial_id))
            .await
        {
            connections.end(self, End::AgentGone);
            return Err(gone);
        }
        if let Some(limit) = connections.settings.dial_timeout {
            let connection = Arc::downgrade(self);
            connections.timers.spawn(async move {
                tokio::time::sleep(limit).await;
                if let Some(connection) = connection.upgrade() {
                    connection.end(End::DialTimeout);
                }
            });
        }
        Ok(())
    }

    /// Ends this connection from the agent's side or a timer (see [`Connections::end`]).
    pub fn end(self: &Arc<Self>, end: End) {
        if let Some(connections) = self.owner.upgrade() {
            connections.end(self, end);
        }
    }

    /// Ends this connection from the frontend's side: the CLOSE_REQ, when one is due, follows the
    /// DATA this frontend sent before, so the agent writes all of it before closing.
    pub async fn end_from_frontend(self: &Arc<Self>, end: End) {
        let Some(connections) = self.owner.upgrade() else {
            return;
        };
        if let Some(request) = connections.end_inner(self, end) {
            let _ = self.outbox.send(request).await;
        }
    }

    /// Resolves once the connection was abandoned.
    pub async fn abandoned(&self) {
        self.abandoned.cancelled().await;
    }

    /// The last event for the frontend; nothing more will come.
    fn finish(&self, event: ToFrontend) {
        let _ = self.mailbox.push_control(event);
        self.close();
    }

    fn close(&self) {
        self.mailbox.close();
        if let Some(flow) = self.flow.get() {
            flow.window.close();
        }
    }

    fn abandon(&self, error: String) {
        self.mailbox.discard();
        self.finish(ToFrontend::Closed { error });
        self.abandoned.cancel();
    }
}

/// Limits and switches one agent stream's connections work with.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes queued toward one frontend (`--frontend-queue-bytes`).
    pub queue_bytes: usize,
    /// Bytes queued toward all frontends of the stream (`--stream-buffer-bytes`).
    pub buffer_bytes: usize,
    pub stall_timeout: Duration,
    pub dial_timeout: Option<Duration>,
    /// The agent speaks tether's WINDOW extension.
    pub flow_control: bool,
}

/// Every connection of one agent stream.
pub struct Connections {
    outbox: Outbox,
    tables: Mutex<Tables>,
    next_dial: AtomicI64,
    budget: Arc<Budget>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// Dial timers (`--backend-dial-timeout`).
    timers: TaskTracker,
    me: Weak<Connections>,
}

#[derive(Default)]
struct Tables {
    /// Our dial ID → the connection waiting for the agent's answer.
    pending: HashMap<i64, Arc<Connection>>,
    /// The agent's connectID → the connection, and since when it waits for the agent's CLOSE_RSP.
    established: HashMap<i64, Entry>,
    last_sweep: Option<Instant>,
}

struct Entry {
    connection: Arc<Connection>,
    closing: Option<Instant>,
}

impl Connections {
    pub fn new(
        outbox: Outbox,
        settings: Settings,
        metrics: Arc<Metrics>,
        timers: TaskTracker,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Connections {
            outbox,
            tables: Mutex::new(Tables::default()),
            next_dial: AtomicI64::new(1),
            budget: Arc::new(Budget::new(settings.buffer_bytes)),
            settings,
            metrics,
            timers,
            me: me.clone(),
        })
    }

    /// A connection for a frontend whose own dial ID is `random`, waiting to dial
    /// ([`Connection::dial`]).
    pub fn open(&self, random: i64) -> Arc<Connection> {
        let dial_id = self.next_dial.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            id: NEXT_TUNNEL.fetch_add(1, Ordering::Relaxed),
            random,
            mailbox: Mailbox::with_budget(self.settings.queue_bytes, self.budget.clone()),
            progress: Progress::default(),
            abandoned: CancellationToken::new(),
            dial_id,
            connect_id: AtomicI64::new(0),
            established_at: OnceLock::new(),
            flow: OnceLock::new(),
            outbox: self.outbox.clone(),
            owner: self.me.clone(),
        });
        self.tables().pending.insert(dial_id, connection.clone());
        self.metrics.pending_dials.inc();
        connection
    }

    /// The one close path: what is sent to whom depends on where the connection is.
    pub fn end(&self, connection: &Arc<Connection>, end: End) {
        if let Some(request) = self.end_inner(connection, end) {
            self.control(request);
        }
    }

    /// [`Connections::end`], except that a CLOSE_REQ the frontend's end calls for is returned for
    /// the caller to send in line behind the DATA it sent before, rather than ahead of it.
    fn end_inner(&self, connection: &Arc<Connection>, end: End) -> Option<Packet> {
        let mut tables = self.tables();
        if tables
            .pending
            .get(&connection.dial_id)
            .is_some_and(|t| Arc::ptr_eq(t, connection))
        {
            tables.pending.remove(&connection.dial_id);
            tables.pending.shrink_when_sparse();
            drop(tables);
            self.metrics.pending_dials.dec();
            self.end_dial(connection, end);
            return None;
        }
        let connect_id = connection.connect_id();
        let entry = tables
            .established
            .get_mut(&connect_id)
            .filter(|e| Arc::ptr_eq(&e.connection, connection))?;
        match end {
            End::AgentClosed { error } => {
                self.remove(&mut tables, connect_id);
                drop(tables);
                connection.finish(ToFrontend::Closed { error });
                None
            }
            End::AgentGone => {
                self.remove(&mut tables, connect_id);
                drop(tables);
                connection.finish(ToFrontend::Closed {
                    error: String::new(),
                });
                None
            }
            // The agent was asked already; its CLOSE_RSP (or the wait) ends this.
            _ if entry.closing.is_some() => None,
            End::FrontendClose => {
                entry.closing = Some(Instant::now());
                Some(Packet::close_request(connect_id))
            }
            End::FrontendGone => {
                entry.closing = Some(Instant::now());
                drop(tables);
                connection.mailbox.discard();
                connection.close();
                Some(Packet::close_request(connect_id))
            }
            End::FrontendError { error } => {
                entry.closing = Some(Instant::now());
                drop(tables);
                connection.finish(ToFrontend::Closed { error });
                Some(Packet::close_request(connect_id))
            }
            End::Abandoned { error } => {
                entry.closing = Some(Instant::now());
                drop(tables);
                connection.abandon(error);
                Some(Packet::close_request(connect_id))
            }
            End::ServerStopping => {
                entry.closing = Some(Instant::now());
                drop(tables);
                connection.finish(ToFrontend::Closed {
                    error: STOPPING.into(),
                });
                Some(Packet::close_request(connect_id))
            }
            End::DialFailed { .. } | End::DialTimeout | End::DialCancelled => None,
        }
    }

    fn end_dial(&self, connection: &Connection, end: End) {
        let failed = |error: String, cause| ToFrontend::DialFailed { error, cause };
        match end {
            End::DialFailed { error } => {
                self.metrics.dial_failure("error_response");
                connection.finish(failed(error, DialCause::Agent));
            }
            End::DialTimeout => {
                self.metrics.dial_failure("backend_dial_timeout");
                tracing::warn!(
                    dial = connection.dial_id,
                    "agent did not answer a dial in time"
                );
                connection.finish(failed(
                    "timed out waiting for backend dial".into(),
                    DialCause::Timeout,
                ));
                self.control(Packet::close_dial(connection.dial_id));
            }
            End::DialCancelled => {
                self.metrics.dial_failure("backend_close");
                connection.finish(ToFrontend::DialClosed);
            }
            End::AgentGone | End::AgentClosed { .. } => {
                connection.finish(failed(
                    "agent stream closed before the dial completed".into(),
                    DialCause::StreamGone,
                ));
            }
            End::FrontendClose
            | End::FrontendGone
            | End::FrontendError { .. }
            | End::Abandoned { .. } => {
                self.metrics.dial_failure("frontend_close");
                connection.close();
                self.control(Packet::close_dial(connection.dial_id));
            }
            End::ServerStopping => {
                connection.finish(failed(STOPPING.into(), DialCause::StreamGone));
                self.control(Packet::close_dial(connection.dial_id));
            }
        }
    }

    /// Ends every connection of this agent stream with `end`.
    pub fn end_all(&self, end: impl Fn() -> End) {
        let open: Vec<Arc<Connection>> = {
            let tables = self.tables();
            tables
                .pending
                .values()
                .cloned()
                .chain(tables.established.values().map(|e| e.connection.clone()))
                .collect()
        };
        for connection in &open {
            self.end(connection, end());
        }
    }

    /// Removes an established connection, counting it once.
    fn remove(&self, tables: &mut Tables, connect_id: i64) {
        if let Some(entry) = tables.established.remove(&connect_id) {
            tables.established.shrink_when_sparse();
            self.metrics
                .connection_ended(entry.connection.established_at.get().copied());
        }
    }

    /// The agent answered dial `dial_id`.
    pub fn answered(&self, dial_id: i64, connect_id: i64, error: String) {
        let mut tables = self.tables();
        let Some(connection) = tables.pending.remove(&dial_id) else {
            drop(tables);
            self.metrics.dial_failure("unrecognized_response");
            if connect_id != 0 {
                // The frontend gave up before the agent answered: close the orphan endpoint.
                self.control(Packet::close_request(connect_id));
            }
            return;
        };
        self.metrics.pending_dials.dec();
        if !error.is_empty() || connect_id == 0 {
            drop(tables);
            let error = if error.is_empty() {
                "agent returned no connectID".into()
            } else {
                error
            };
            self.end_dial(&connection, End::DialFailed { error });
            return;
        }
        if tables.established.contains_key(&connect_id) {
            // Taking it would orphan the connection that holds the ID: its frontend would
            // never hear its end. No CLOSE_REQ either, which would end that connection.
            drop(tables);
            self.metrics.reject("dial_response_connect_id_in_use");
            tracing::warn!(
                dial = dial_id,
                connect_id,
                "agent answered a dial with a connectID another connection holds; the dial fails"
            );
            let error =
                format!("the agent answered with connectID {connect_id}, which is already in use");
            self.end_dial(&connection, End::DialFailed { error });
            return;
        }
        connection.connect_id.store(connect_id, Ordering::Release);
        let _ = connection.established_at.set(Instant::now());
        if self.settings.flow_control {
            let _ = connection.flow.set(Flow {
                window: SendWindow::new(tether_proto::INITIAL_WINDOW),
                grants: Grants::new(tether_proto::INITIAL_WINDOW / 4),
            });
        }
        if connection
            .mailbox
            .push_control(ToFrontend::DialOk { connect_id })
            .is_err()
        {
            drop(tables);
            self.metrics.dial_failure("send_rsp");
            self.control(Packet::close_request(connect_id));
            return;
        }
        if let Some(started) = connection.established_at.get() {
            self.metrics
                .dial_duration
                .observe(started.elapsed().as_secs_f64());
        }
        tables.established.insert(
            connect_id,
            Entry {
                connection,
                closing: None,
            },
        );
        self.metrics.established.inc();
        self.sweep(&mut tables);
    }

    /// DATA from the agent. Returns why the agent stream must wait, if it must.
    pub fn data(&self, connect_id: i64, data: Bytes) -> Option<Pressure> {
        let connection = {
            let tables = self.tables();
            match tables.established.get(&connect_id) {
                Some(entry) if entry.closing.is_some() => return None,
                Some(entry) => entry.connection.clone(),
                None => {
                    drop(tables);
                    self.metrics.reject("data_unknown_connect_id");
                    tracing::debug!(
                        connect_id,
                        "DATA for unknown connectID; asking the agent to close it"
                    );
                    self.control(Packet::close_request(connect_id));
                    return None;
                }
            }
        };
        let event = ToFrontend::Data(data);
        if !self.settings.flow_control {
            if connection.mailbox.push_control(event).is_err() {
                self.end(&connection, End::FrontendGone);
                return None;
            }
            return connection.mailbox.pressure(connect_id);
        }
        match connection.mailbox.push(event) {
            Ok(()) => {}
            Err(PushError::Full { limit }) => {
                self.metrics.frontend_queue_full.inc();
                tracing::warn!(
                    connection = connection.id,
                    connect_id,
                    limit,
                    "agent sent past the connection's window; closing that connection"
                );
                self.end(
                    &connection,
                    End::Abandoned {
                        error: format!(
                            "tether-server: frontend queue limit of {limit} bytes reached"
                        ),
                    },
                );
            }
            Err(PushError::Closed) => self.end(&connection, End::FrontendGone),
        }
        None
    }

    /// CLOSE_RSP from the agent.
    pub fn agent_closed(&self, connect_id: i64, error: String) {
        let connection = self
            .tables()
            .established
            .get(&connect_id)
            .map(|e| e.connection.clone());
        match connection {
            Some(connection) => self.end(&connection, End::AgentClosed { error }),
            None => {
                self.metrics.reject("close_unknown_connect_id");
                tracing::debug!(connect_id, "CLOSE_RSP for unknown connectID; dropped");
            }
        }
    }

    /// DIAL_CLS from the agent: it gave up on a pending dial.
    pub fn dial_cancelled(&self, dial_id: i64) {
        let connection = self.tables().pending.get(&dial_id).cloned();
        match connection {
            Some(connection) => self.end(&connection, End::DialCancelled),
            None => self.metrics.reject("dial_close_unknown_random"),
        }
    }

    /// WINDOW from the agent.
    pub fn granted(&self, connect_id: i64, bytes: i64) {
        let flow = self
            .tables()
            .established
            .get(&connect_id)
            .map(|e| e.connection.clone());
        if let Some(flow) = flow.as_ref().and_then(|t| t.flow.get()) {
            flow.window.grant(bytes);
        }
    }

    /// The agent stream ended: every connection on it ends now.
    pub fn agent_gone(&self) {
        self.end_all(|| End::AgentGone);
    }

    /// Holds the agent stream until the frontends behind `pressure` catch up; see
    /// [`backpressure::hold`].
    pub async fn hold(&self, pressure: Pressure) {
        backpressure::hold(&self.budget, self.settings.stall_timeout, pressure, self).await;
    }

    /// Connections in the table (pending, open and closing).
    pub fn len(&self) -> usize {
        let tables = self.tables();
        tables.pending.len() + tables.established.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops entries whose CLOSE_RSP never came, at most every few seconds.
    fn sweep(&self, tables: &mut Tables) {
        let now = Instant::now();
        if tables
            .last_sweep
            .is_some_and(|at| now.duration_since(at) < CLOSE_WAIT / 4)
        {
            return;
        }
        tables.last_sweep = Some(now);
        let stale: Vec<i64> = tables
            .established
            .iter()
            .filter(|(_, e)| {
                e.closing
                    .is_some_and(|at| now.duration_since(at) >= CLOSE_WAIT)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.metrics.reject("close_response_never_came");
            if let Some(entry) = tables.established.get(&id) {
                entry.connection.finish(ToFrontend::Closed {
                    error: "tether-server: the agent did not confirm the close".into(),
                });
            }
            self.remove(tables, id);
        }
    }

    fn control(&self, packet: Packet) {
        match self.outbox.send_control(packet) {
            Ok(()) => {}
            Err(Overflow::CutOff) => {
                self.metrics.reject("agent_not_reading");
                tracing::warn!(
                    "agent stopped reading while its answers piled up; disconnecting it"
                );
            }
            Err(Overflow::Gone) => {}
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`backpressure::hold`] needs to see of this stream's connections.
impl Queues for Connections {
    fn queued(&self, id: i64) -> Option<(usize, usize)> {
        self.tables().established.get(&id).map(|e| {
            (
                e.connection.mailbox.queued_bytes(),
                e.connection.mailbox.limit(),
            )
        })
    }

    fn marks(&self, only: Option<i64>) -> Vec<(i64, u64)> {
        let tables = self.tables();
        match only {
            Some(id) => tables
                .established
                .get(&id)
                .map(|e| (id, e.connection.progress.mark()))
                .into_iter()
                .collect(),
            None => tables
                .established
                .iter()
                .filter(|(_, e)| e.connection.mailbox.queued_bytes() > 0)
                .map(|(id, e)| (*id, e.connection.progress.mark()))
                .collect(),
        }
    }

    fn close_stalled(&self, id: i64) {
        let Some(connection) = self
            .tables()
            .established
            .get(&id)
            .map(|e| e.connection.clone())
        else {
            return;
        };
        self.metrics.stalled_closes.inc();
        tracing::warn!(
            connection = connection.id,
            connect_id = id,
            stall_timeout = ?self.settings.stall_timeout,
            "frontend read nothing while the agent stream waited for it; closing that connection"
        );
        self.end(
            &connection,
            End::Abandoned {
                error: format!(
                    "tether-server: frontend read nothing for {:?}",
                    self.settings.stall_timeout
                ),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::CONTROL_LIMIT;

    /// An agent that answers a second dial with the connectID of a connection it already
    /// has must not take that ID over: the first frontend would never hear its end.
    #[tokio::test]
    async fn a_connect_id_in_use_fails_the_later_dial_and_orphans_nothing() {
        let (outbox, _to_agent) = Outbox::new(16, CONTROL_LIMIT);
        let settings = Settings {
            queue_bytes: 8192,
            buffer_bytes: 32 * 1024,
            stall_timeout: Duration::from_millis(20),
            dial_timeout: None,
            flow_control: false,
        };
        let connections = Connections::new(
            outbox,
            settings,
            Arc::new(Metrics::new()),
            TaskTracker::new(),
        );
        let (first, second) = (connections.open(1), connections.open(2));
        first.dial("10.0.0.1:10250").await.unwrap();
        second.dial("10.0.0.1:10250").await.unwrap();
        connections.answered(first.dial_id, 32, String::new());
        connections.answered(second.dial_id, 32, String::new());
        assert!(
            matches!(second.mailbox.pop().await, Some(ToFrontend::DialFailed { error, .. }) if error.contains("already in use")),
            "the later dial took a connectID in use"
        );
        assert_eq!(connections.len(), 1);
        connections.agent_gone();
        let mut told = Vec::new();
        while let Some(event) = first.mailbox.pop().await {
            told.push(event);
        }
        assert!(
            matches!(
                told.as_slice(),
                [
                    ToFrontend::DialOk { connect_id: 32 },
                    ToFrontend::Closed { .. }
                ]
            ),
            "the first frontend was not told its dial and its end"
        );
        assert!(connections.is_empty());
    }
}
