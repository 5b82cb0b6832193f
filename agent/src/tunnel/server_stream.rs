//! One server stream's demultiplexer: dials on DIAL_REQ, moves DATA between the stream and each
//! destination, and closes connections exactly once whichever side ends them.
//!
//! Nothing here waits on a destination while handling a packet: DATA goes into the connection's
//! mailbox, drained by that connection's own writer task. With a flow-controlled (tether)
//! server a connection's queue never passes its window, and one that does is closed on its own.
//! A server without flow control (upstream) cannot be told to slow down one connection, so when
//! a destination falls behind, [`ServerStream::relieve`] holds the whole stream until it catches
//! up, closing only a destination that reads nothing for the stall timeout (see
//! `tether_runtime::backpressure`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use std::os::fd::AsRawFd;
use tether_proto::{Message, Packet};
use tether_runtime::backpressure::{self, Budget, Pressure, Progress, Queues};
use tether_runtime::mailbox::{Mailbox, PushError, Weigh};
use tether_runtime::sparse::ShrinkWhenSparse;
use tether_runtime::window::{Grants, SendWindow};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;

use super::scheduler::Scheduler;
use crate::dialer;
use crate::metrics::Metrics;

/// Largest read from a destination (one DATA packet); must stay well under the flow-control
/// window minus its grant batch (512 KiB - 128 KiB).
const CHUNK: usize = 256 * 1024;
/// Bytes a connection may have queued toward the server before its reader waits.
const OUTBOUND_CREDIT: usize = 256 * 1024;

/// Limits and shared state every server stream of the agent uses.
pub struct Limits {
    pub dial_timeout: Duration,
    pub conn_queue_bytes: usize,
    pub stream_buffer_bytes: usize,
    pub stall_timeout: Duration,
    pub max_pending_dials: usize,
    pub max_connections: usize,
    pub dial_policy: Arc<crate::dial_plane::policy::DialPolicy>,
}

struct Chunk(Bytes);

impl Weigh for Chunk {
    fn weight(&self) -> usize {
        self.0.len()
    }
}

struct Conn {
    inbound: Arc<Mailbox<Chunk>>,
    /// How much the destination has taken, for telling a slow reader from a stalled one.
    progress: Arc<Progress>,
    flow: Option<Arc<Flow>>,
    reader: Option<AbortHandle>,
    writer: Option<AbortHandle>,
}

/// Per-connection credit when the server negotiated flow control.
struct Flow {
    /// What we may still send the server.
    window: SendWindow,
    /// What the destination took, owed back to the server as WINDOW grants.
    grants: Grants,
    /// Which directions have ended (FIN_FROM_DESTINATION | FIN_FROM_SERVER); the connection
    /// closes when both have.
    finished: AtomicU8,
}

/// The destination sent EOF; the server got our FIN (an empty DATA).
const FIN_FROM_DESTINATION: u8 = 1;
/// The server sent FIN; the destination's write side was shut down.
const FIN_FROM_SERVER: u8 = 2;

impl Flow {
    /// Records one direction's end; true when both have ended.
    fn finish(&self, direction: u8) -> bool {
        let before = self.finished.fetch_or(direction, Ordering::AcqRel);
        (before | direction) == FIN_FROM_DESTINATION | FIN_FROM_SERVER
    }
}

pub struct ServerStream {
    pub server_id: String,
    /// Whether the server speaks tether's WINDOW extension.
    flow_control: bool,
    /// Every byte queued toward this stream's destinations.
    budget: Arc<Budget>,
    scheduler: Arc<Scheduler>,
    conns: Mutex<HashMap<i64, Conn>>,
    dials: Mutex<HashMap<i64, AbortHandle>>,
    next_connect_id: AtomicI64,
    dial_slots: Arc<Semaphore>,
    draining: Arc<AtomicBool>,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    /// Each connection's tasks (its dial, reader and writer): draining waits on them.
    tasks: TaskTracker,
}

impl ServerStream {
    pub fn new(
        server_id: String,
        flow_control: bool,
        scheduler: Arc<Scheduler>,
        draining: Arc<AtomicBool>,
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(ServerStream {
            server_id,
            flow_control,
            budget: Arc::new(Budget::new(limits.stream_buffer_bytes)),
            scheduler,
            conns: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            next_connect_id: AtomicI64::new(0),
            dial_slots: Arc::new(Semaphore::new(limits.max_pending_dials)),
            draining,
            limits,
            metrics,
            tasks,
        })
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.conns().len()
    }

    /// Handles one packet from the server without waiting on any destination. Returns why
    /// the stream must wait (see [`ServerStream::relieve`]) before its next packet, if it must.
    #[must_use]
    pub fn handle(self: &Arc<Self>, packet: Packet) -> Option<Pressure> {
        let message = packet.into_message();
        self.metrics.packet("to_agent", message.type_name());
        match message {
            Message::DialRequest(req) => self.on_dial(req.protocol, req.address, req.random),
            Message::CloseDial(cls) => {
                if let Some(dial) = self.take_dial(cls.random) {
                    dial.abort();
                    tracing::info!(
                        server = self.server_id,
                        random = cls.random,
                        "dial cancelled by the server"
                    );
                }
            }
            Message::Data(data) => {
                if data.connect_id == 0 {
                    self.metrics.reject("data_connect_id_zero");
                    return None;
                }
                let inbound = self
                    .conns()
                    .get(&data.connect_id)
                    .map(|c| c.inbound.clone());
                let Some(inbound) = inbound else {
                    // IDs are never reused on a stream: one we allocated and no longer hold is a
                    // connection we closed, whose CLOSE_RSP is already on its way. Answering its
                    // late DATA would race that CLOSE_RSP with a misleading error.
                    if data.connect_id <= self.next_connect_id.load(Ordering::Relaxed) {
                        self.metrics.reject("data_for_closed_connection");
                        return None;
                    }
                    self.metrics.reject("data_unknown_connect_id");
                    self.send_control(Packet::close_response(
                        data.connect_id,
                        "unrecognized connectID",
                    ));
                    return None;
                };
                let len = data.data.len();
                if !self.flow_control {
                    // Nothing can be refused: the bytes are queued, and the stream waits.
                    if inbound.push_control(Chunk(data.data)).is_ok() {
                        self.metrics.bytes_to_endpoint(len);
                    }
                    return inbound.pressure(data.connect_id);
                }
                match inbound.push(Chunk(data.data)) {
                    Ok(()) => self.metrics.bytes_to_endpoint(len),
                    Err(PushError::Full { limit }) => {
                        self.metrics.queue_full.inc();
                        tracing::warn!(
                            server = self.server_id,
                            connect_id = data.connect_id,
                            limit,
                            "server sent past the connection's window; closing that connection"
                        );
                        self.close(
                            data.connect_id,
                            format!(
                                "tether-agent: destination queue limit of {limit} bytes reached"
                            ),
                            false,
                        );
                    }
                    Err(PushError::Closed) => {}
                }
            }
            Message::Window(grant) => {
                let flow = self
                    .conns()
                    .get(&grant.connect_id)
                    .and_then(|c| c.flow.clone());
                if let Some(flow) = flow {
                    flow.window.grant(grant.bytes);
                }
            }
            Message::CloseRequest(req) => {
                if !self.close(req.connect_id, String::new(), true) {
                    self.send_control(Packet::close_response(req.connect_id, "Unknown connectID"));
                }
            }
            other => {
                self.metrics.reject("unexpected_packet_from_server");
                tracing::debug!(
                    server = self.server_id,
                    packet_type = other.type_name(),
                    "ignored packet from server"
                );
            }
        }
        None
    }

    /// Holds this stream (its reader calls this instead of taking the next packet) until the
    /// destinations behind `pressure` catch up; see [`backpressure::hold`].
    pub async fn relieve(&self, pressure: Pressure) {
        self.metrics.stream_pauses.inc();
        let started = Instant::now();
        backpressure::hold(&self.budget, self.limits.stall_timeout, pressure, self).await;
        self.metrics
            .stream_paused_seconds
            .inc_by(started.elapsed().as_secs_f64());
    }

    fn on_dial(self: &Arc<Self>, protocol: String, address: String, random: i64) {
        let refuse = |reason: &'static str, text: String| {
            self.metrics.dial_refused(reason);
            tracing::info!(server = self.server_id, address, reason, "dial refused");
            self.send_control(Packet::dial_response(random, 0, text));
        };
        if self.draining.load(Ordering::Relaxed) {
            return refuse(
                "draining",
                "tether-agent is draining and accepts no new connections".into(),
            );
        }
        if !(protocol.is_empty() || protocol == "tcp") {
            return refuse(
                "protocol",
                format!("dial {protocol} {address}: only tcp is tunnelled"),
            );
        }
        if self.conns().len() >= self.limits.max_connections {
            return refuse(
                "limit",
                format!(
                    "tether-agent: connection limit of {} reached",
                    self.limits.max_connections
                ),
            );
        }
        let Ok(slot) = self.dial_slots.clone().try_acquire_owned() else {
            return refuse(
                "limit",
                format!(
                    "tether-agent: {} dials already in flight",
                    self.limits.max_pending_dials
                ),
            );
        };
        // IDs are consumed by failed dials too, as upstream: gaps are normal.
        let connect_id = self.next_connect_id.fetch_add(1, Ordering::Relaxed) + 1;
        let this = self.clone();
        let mut dials = self.dials();
        let task = self.tasks.spawn(async move {
            let started = Instant::now();
            let result =
                dialer::dial(&address, this.limits.dial_timeout, &this.limits.dial_policy).await;
            drop(slot);
            this.take_dial(random);
            match result {
                Ok(stream) => {
                    this.metrics
                        .dial_duration
                        .observe(started.elapsed().as_secs_f64());
                    this.start(connect_id, random, stream);
                }
                Err(err) if err.reason == "policy" => {
                    this.metrics.dial_refused("policy");
                    tracing::warn!(
                        server = this.server_id,
                        address,
                        error = err.text,
                        "dial refused by the dial policy"
                    );
                    this.send_control(Packet::dial_response(random, 0, err.text));
                }
                Err(err) => {
                    this.metrics.dial_failure(err.reason);
                    tracing::info!(
                        server = this.server_id,
                        address,
                        error = err.text,
                        "dial failed"
                    );
                    this.send_control(Packet::dial_response(random, 0, err.text));
                }
            }
        });
        dials.insert(random, task.abort_handle());
    }

    /// Registers a dialled connection, answers the dial, then starts moving bytes.
    fn start(self: &Arc<Self>, connect_id: i64, random: i64, stream: tokio::net::TcpStream) {
        let progress = Arc::new(Progress::default());
        // The socket stays open while the connection is in the table, where `progress` is read.
        progress.watch_socket(stream.as_raw_fd());
        let (read, write) = stream.into_split();
        let inbound = Arc::new(Mailbox::with_budget(
            self.limits.conn_queue_bytes,
            self.budget.clone(),
        ));
        let flow = self.flow_control.then(|| {
            Arc::new(Flow {
                window: SendWindow::new(tether_proto::INITIAL_WINDOW),
                grants: Grants::new(tether_proto::INITIAL_WINDOW / 4),
                finished: AtomicU8::new(0),
            })
        });
        self.conns().insert(
            connect_id,
            Conn {
                inbound: inbound.clone(),
                progress: progress.clone(),
                flow: flow.clone(),
                reader: None,
                writer: None,
            },
        );
        self.metrics.open_endpoint_connections.inc();
        // Control packets leave before any lane's DATA, so the DIAL_RSP precedes this
        // connection's first DATA.
        self.send_control(Packet::dial_response(random, connect_id, ""));
        let reader = self
            .tasks
            .spawn(self.clone().read_endpoint(connect_id, read, flow.clone()))
            .abort_handle();
        let writer = self
            .tasks
            .spawn(
                self.clone()
                    .write_endpoint(connect_id, write, inbound, progress, flow),
            )
            .abort_handle();
        let mut conns = self.conns();
        match conns.get_mut(&connect_id) {
            Some(conn) => {
                conn.reader = Some(reader);
                conn.writer = Some(writer);
            }
            // Closed while we were starting (e.g. a CLOSE_REQ raced in).
            None => {
                reader.abort();
            }
        }
    }

    /// Destination → server. With flow control it spends the window the server grants;
    /// without, it holds local credit until the stream takes its packets. Either way a fast
    /// destination waits instead of growing a queue.
    async fn read_endpoint(
        self: Arc<Self>,
        connect_id: i64,
        mut read: OwnedReadHalf,
        flow: Option<Arc<Flow>>,
    ) {
        let credit = Arc::new(Semaphore::new(OUTBOUND_CREDIT));
        let error = loop {
            if let Err(err) = read.readable().await {
                break err.to_string();
            }
            // Allocated only when data is ready: an idle connection holds no read buffer.
            let mut buf = BytesMut::with_capacity(CHUNK);
            // Through AsyncRead rather than try_read: a read that comes back short has drained
            // the socket, and tokio then forgets the readiness instead of making the next loop
            // spend a recvfrom to learn it.
            match read.read_buf(&mut buf).await {
                Ok(0) => {
                    // With a tether server, pass the destination's EOF on as a half-close and
                    // keep the other direction open.
                    if let Some(flow) = &flow {
                        self.scheduler.push(
                            connect_id,
                            Packet::data(connect_id, Bytes::new()),
                            None,
                        );
                        if !flow.finish(FIN_FROM_DESTINATION) {
                            return;
                        }
                    }
                    break String::new();
                }
                Ok(n) => {
                    // Small reads are copied so they do not pin a CHUNK-sized allocation.
                    let data = if n < CHUNK / 8 {
                        Bytes::copy_from_slice(&buf)
                    } else {
                        buf.freeze()
                    };
                    let permit = match &flow {
                        Some(flow) => {
                            if flow.window.take(n).await.is_err() {
                                break String::new();
                            }
                            None
                        }
                        None => {
                            let weight = u32::try_from(n).unwrap_or(u32::MAX);
                            let Ok(permit) = credit.clone().acquire_many_owned(weight).await else {
                                break String::new();
                            };
                            Some(permit)
                        }
                    };
                    self.metrics.bytes_from_endpoint(n);
                    self.metrics.packet("from_agent", "DATA");
                    self.scheduler
                        .push(connect_id, Packet::data(connect_id, data), permit);
                }
                Err(err) => break format!("read from destination failed: {err}"),
            }
        };
        self.close(connect_id, error, false);
    }

    /// Server → destination. Ends (and shuts the socket down) once the mailbox is closed and
    /// drained, so data the server sent before its CLOSE_REQ is still delivered.
    async fn write_endpoint(
        self: Arc<Self>,
        connect_id: i64,
        mut write: OwnedWriteHalf,
        inbound: Arc<Mailbox<Chunk>>,
        progress: Arc<Progress>,
        flow: Option<Arc<Flow>>,
    ) {
        while let Some(Chunk(bytes)) = inbound.pop().await {
            if let Some(flow) = flow.as_ref().filter(|_| bytes.is_empty()) {
                // The server's FIN: the frontend sends nothing more.
                let _ = write.shutdown().await;
                if flow.finish(FIN_FROM_SERVER) {
                    self.close(connect_id, String::new(), false);
                }
                return;
            }
            // Once the server has closed the connection, nothing else watches this writer: a
            // destination that stops reading would hold it, its socket and its queue for good.
            // From then on a write that the socket takes nothing of for --stall-timeout ends it.
            let stall = self.limits.stall_timeout;
            if let Err(err) = write_counted(&mut write, &bytes, &progress, &inbound, stall).await {
                if err.kind() == std::io::ErrorKind::TimedOut {
                    self.metrics.stalled_closes.inc();
                    tracing::info!(
                        server = self.server_id,
                        connect_id,
                        error = %err,
                        "dropped what a closed connection's destination did not read"
                    );
                }
                self.close(
                    connect_id,
                    format!("write to destination failed: {err}"),
                    false,
                );
                return;
            }
            if let Some(grant) = flow.as_ref().and_then(|f| f.grants.consumed(bytes.len())) {
                self.send_control(Packet::window(connect_id, grant));
            }
        }
        let _ = write.shutdown().await;
    }

    /// Closes a connection once: the caller that removes it from the table does the work.
    /// (Its queued bytes leave the stream's budget when its writer lets go of the mailbox.)
    /// Its CLOSE_RSP goes into its lane behind its queued DATA. Returns false when it was
    /// already gone.
    fn close(&self, connect_id: i64, error: String, server_asked: bool) -> bool {
        let conn = {
            let mut conns = self.conns();
            let conn = conns.remove(&connect_id);
            conns.shrink_when_sparse();
            conn
        };
        let Some(conn) = conn else {
            return false;
        };
        self.metrics.open_endpoint_connections.dec();
        if let Some(reader) = conn.reader {
            reader.abort();
        }
        if error.is_empty() || server_asked {
            // Normal close: the writer flushes what the server already sent, then shuts down.
            conn.inbound.close();
        } else if let Some(writer) = conn.writer {
            // Failure: the destination is not taking data; drop the socket now.
            writer.abort();
        }
        if !error.is_empty() {
            tracing::info!(
                server = self.server_id,
                connect_id,
                error,
                "connection closed"
            );
        }
        self.metrics.packet("from_agent", "CLOSE_RSP");
        self.scheduler
            .push(connect_id, Packet::close_response(connect_id, error), None);
        true
    }

    /// Queues DRAIN ahead of all data.
    pub fn send_drain(&self) {
        self.send_control(Packet::drain());
    }

    /// Ends this agent's side of the stream once its queued packets are out, so the server
    /// sees the stream close cleanly rather than the connection drop.
    pub fn finish(&self) {
        self.scheduler.finish();
    }

    /// The stream is gone: every connection and dial of this stream ends now.
    pub fn shut_down(&self) {
        for (_, dial) in self.dials().drain() {
            dial.abort();
        }
        let conns: Vec<_> = self.conns().drain().collect();
        for (_, conn) in conns {
            self.metrics.open_endpoint_connections.dec();
            for task in [conn.reader, conn.writer].into_iter().flatten() {
                task.abort();
            }
        }
        self.scheduler.close();
    }

    fn send_control(&self, packet: Packet) {
        self.metrics.packet("from_agent", packet.type_name());
        self.scheduler.push_control(packet);
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_dial(&self, random: i64) -> Option<AbortHandle> {
        let mut dials = self.dials();
        let dial = dials.remove(&random);
        dials.shrink_when_sparse();
        dial
    }

    fn dials(&self) -> std::sync::MutexGuard<'_, HashMap<i64, AbortHandle>> {
        self.dials.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`backpressure::hold`] needs to see of this stream's connections.
impl Queues for ServerStream {
    fn queued(&self, id: i64) -> Option<(usize, usize)> {
        self.conns()
            .get(&id)
            .map(|c| (c.inbound.queued_bytes(), c.inbound.limit()))
    }

    fn marks(&self, only: Option<i64>) -> Vec<(i64, u64)> {
        let conns = self.conns();
        match only {
            Some(id) => conns
                .get(&id)
                .map(|c| (id, c.progress.mark()))
                .into_iter()
                .collect(),
            None => conns
                .iter()
                .filter(|(_, c)| c.inbound.queued_bytes() > 0)
                .map(|(id, c)| (*id, c.progress.mark()))
                .collect(),
        }
    }

    fn close_stalled(&self, id: i64) {
        self.metrics.stalled_closes.inc();
        tracing::warn!(
            server = self.server_id,
            connect_id = id,
            stall_timeout = ?self.limits.stall_timeout,
            "destination read nothing while the server stream waited for it; closing that connection"
        );
        self.close(
            id,
            format!(
                "tether-agent: destination read nothing for {:?}",
                self.limits.stall_timeout
            ),
            false,
        );
    }
}

/// `write_all` that records each piece the socket took, so a stall can be told from a slow
/// reader while the write is still blocked. Once `inbound` is closed (the server closed the
/// connection), a write the socket takes nothing of for `stall` fails with `TimedOut`.
async fn write_counted(
    write: &mut OwnedWriteHalf,
    mut bytes: &[u8],
    progress: &Progress,
    inbound: &Mailbox<Chunk>,
    stall: Duration,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // Write first: a socket with room answers at once and the watch is never made.
        let n = tokio::select! {
            biased;
            written = write.write(bytes) => written?,
            () = async {
                inbound.closed().await;
                tokio::time::sleep(stall).await;
            } => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the destination read nothing for {stall:?} after the close"),
                ));
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        progress.wrote(n);
        bytes = &bytes[n..];
    }
    Ok(())
}
