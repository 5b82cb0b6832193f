//! One agent stream ("backend", in upstream's words): who the agent is, what it serves, and
//! the handling of each packet it sends, which never waits on a frontend.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tether_proto::identifiers::Identifiers;
use tether_proto::{Message, Packet};
use tether_runtime::backpressure::Pressure;

use crate::connection::{Connection, Connections, End};
use crate::metrics::Metrics;
use crate::outbox::Outbox;

pub struct AgentStream {
    /// Server-unique, for logs.
    pub id: u64,
    pub agent_id: String,
    pub identifiers: Identifiers,
    /// Who its credential says it is (`identity`'s label: "node X", "certificate Y"), or
    /// "agent ID" when claims are not bound.
    pub identity: String,
    draining: AtomicBool,
    connections: Arc<Connections>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
}

static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

impl AgentStream {
    pub fn new(
        agent_id: String,
        identifiers: Identifiers,
        identity: String,
        outbox: Outbox,
        connections: Arc<Connections>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(AgentStream {
            id: NEXT_BACKEND.fetch_add(1, Ordering::Relaxed),
            agent_id,
            identifiers,
            identity,
            draining: AtomicBool::new(false),
            connections,
            outbox,
            metrics,
        })
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A connection for a frontend whose own dial ID is `random`; [`Connection::dial`] sends
    /// the dial.
    pub fn open(&self, random: i64) -> Arc<Connection> {
        self.connections.open(random)
    }

    /// Handles one packet from the agent without waiting on any frontend; returns why the
    /// stream must wait (see [`AgentStream::relieve`]) before its next packet, if it must.
    #[must_use]
    pub fn handle(&self, packet: Packet) -> Option<Pressure> {
        let message = packet.into_message();
        self.metrics.packet("from_agent", message.type_name());
        match message {
            Message::DialResponse(rsp) => {
                self.connections
                    .answered(rsp.random, rsp.connect_id, rsp.error)
            }
            Message::Data(data) if data.connect_id == 0 => {
                self.metrics.reject("data_connect_id_zero");
                tracing::warn!(agent_stream = self.id, agent = %self.agent_id, "agent sent DATA with connectID 0; ignored");
            }
            Message::Data(data) => return self.connections.data(data.connect_id, data.data),
            Message::CloseResponse(rsp) => self.connections.agent_closed(rsp.connect_id, rsp.error),
            Message::CloseDial(cls) => self.connections.dial_cancelled(cls.random),
            Message::Window(grant) => self.connections.granted(grant.connect_id, grant.bytes),
            Message::Drain => {
                if !self.draining.swap(true, Ordering::Relaxed) {
                    tracing::info!(agent_stream = self.id, agent = %self.agent_id, "agent is draining; new dials prefer other agents");
                }
            }
            other @ (Message::DialRequest(_) | Message::CloseRequest(_) | Message::Unknown(_)) => {
                self.metrics.reject("unexpected_packet_from_agent");
                tracing::warn!(agent_stream = self.id, agent = %self.agent_id, packet_type = other.type_name(), "agent sent a packet type agents never send; ignored");
            }
        }
        None
    }

    /// Holds this stream (its reader calls this instead of taking the next packet) until the
    /// frontends behind `pressure` catch up.
    pub async fn relieve(&self, pressure: Pressure) {
        self.metrics.stream_pauses.inc();
        let blocked = self.metrics.full_receive_channels("Connect");
        blocked.inc();
        let started = std::time::Instant::now();
        self.connections.hold(pressure).await;
        blocked.dec();
        self.metrics
            .stream_paused_seconds
            .inc_by(started.elapsed().as_secs_f64());
    }

    /// The agent stream ended: every connection on it ends, and nothing more goes to the agent.
    pub fn shut_down(&self) {
        self.outbox.close();
        self.connections.agent_gone();
    }

    /// The server is stopping: each connection's frontend is told, and the agent asked to close.
    pub fn end_tunnels(&self) {
        self.connections.end_all(|| End::ServerStopping);
    }

    /// The server is stopping: what is queued toward the agent goes out, then the stream ends.
    pub async fn finish(&self, within: std::time::Duration) {
        self.outbox.finish();
        let _ = tokio::time::timeout(within, self.outbox.closed()).await;
    }

    /// Resolves once the stream toward the agent is over (it left, or was cut off).
    pub async fn wait_closed(&self) {
        self.outbox.closed().await;
    }

    /// Connections open or being dialled on this stream.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }
}
