//! Agents' streams ("backends") and how a dial picks one.
//!
//! Each backend owns its tables of pending dials and established connections, so connectIDs
//! (which every agent stream numbers from 1) can never collide between streams — upstream keys
//! them by agent ID and misroutes when one agent holds two streams. Dial IDs sent to agents are
//! allocated here, per backend, and mapped back to the frontend's own ID: one frontend cannot
//! cancel or hijack another's dial by reusing its ID.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_proto::{Message, Packet};
use tether_runtime::backpressure::{self, Budget, Pressure, Queues};
use tether_runtime::mailbox::PushError;
use tokio::sync::{Notify, mpsc};

use crate::frontend::{DialCause, FrontendConn, ToFrontend};
use crate::metrics::Metrics;

/// How a dial picks an agent; tried in the order given by `--proxy-strategies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Any agent, at random.
    Default,
    /// The agent whose identifiers (host, ipv4, ipv6, cidr) match the dial's host.
    DestHost,
    /// Any agent that declared `default-route=true`, at random.
    DefaultRoute,
}

impl Strategy {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Strategy::Default),
            "destHost" => Some(Strategy::DestHost),
            "defaultRoute" => Some(Strategy::DefaultRoute),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Strategy::Default => "default",
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
        }
    }
}

/// What an agent says it serves (`agentidentifiers` metadata).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identifiers {
    pub hosts: Vec<String>,
    pub addresses: Vec<IpAddr>,
    pub cidrs: Vec<(IpAddr, u8)>,
    pub default_route: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdentifiersError {
    #[error("agent identifiers {0:?}: ';' is not a separator (use '&')")]
    Semicolon(String),
    #[error("agent identifier {key}={value:?} is not a valid {what}")]
    Invalid {
        key: String,
        value: String,
        what: &'static str,
    },
}

impl Identifiers {
    /// Parses a URL query string such as `host=node1&ipv4=10.0.0.5&default-route=true`.
    /// Unknown keys are ignored for forward compatibility, as upstream does.
    pub fn parse(query: &str) -> Result<Self, IdentifiersError> {
        if query.contains(';') {
            return Err(IdentifiersError::Semicolon(query.to_owned()));
        }
        let mut ids = Identifiers::default();
        let mut saw_default_route = false;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let invalid = |what| IdentifiersError::Invalid {
                key: key.to_string(),
                value: value.to_string(),
                what,
            };
            match key.as_ref() {
                "host" => ids.hosts.push(value.to_ascii_lowercase()),
                "ipv4" | "ipv6" => {
                    let ip: IpAddr = value.parse().map_err(|_| invalid("IP address"))?;
                    ids.addresses.push(ip);
                }
                "cidr" => ids
                    .cidrs
                    .push(parse_cidr(&value).ok_or_else(|| invalid("CIDR"))?),
                "default-route" if !saw_default_route => {
                    saw_default_route = true;
                    ids.default_route =
                        tether_runtime::flags::go_bool(&value).map_err(|_| invalid("boolean"))?;
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Whether this agent serves `host` (the dial address without its port).
    fn serves(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                self.addresses.contains(&ip)
                    || self
                        .cidrs
                        .iter()
                        .any(|&(net, len)| cidr_contains(net, len, ip))
            }
            Err(_) => self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }

    fn has_dest_keys(&self) -> bool {
        !(self.hosts.is_empty() && self.addresses.is_empty() && self.cidrs.is_empty())
    }
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let (net, ip, bits) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(n.to_bits()), u128::from(i.to_bits()), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
        _ => return false,
    };
    if len == 0 {
        return true;
    }
    let shift = bits - u32::from(len);
    (net >> shift) == (ip >> shift)
}

/// The host part of a dial address: `host:port` → `host`, `[v6]:port` → `v6`.
pub fn dial_host(address: &str) -> &str {
    if address.matches(':').count() <= 1 {
        return address.split(':').next().unwrap_or(address);
    }
    let host = match address.rfind(':') {
        Some(i) if address.contains('[') => &address[..i],
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Limits on what one agent stream may queue toward its frontends.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub buffer_bytes: usize,
    pub stall_timeout: Duration,
}

/// One agent stream.
pub struct Backend {
    pub id: u64,
    pub agent_id: String,
    pub identifiers: Identifiers,
    draining: AtomicBool,
    to_agent: mpsc::Sender<Packet>,
    state: Mutex<Tables>,
    next_dial: AtomicI64,
    closed: Notify,
    is_closed: AtomicBool,
    dial_timeout: Option<Duration>,
    /// The agent speaks tether's WINDOW extension.
    flow_control: bool,
    /// Every byte queued toward this stream's frontends.
    budget: Arc<Budget>,
    stall_timeout: Duration,
    me: std::sync::Weak<Backend>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Tables {
    /// Our dial ID → the waiting frontend.
    pending: HashMap<i64, Pending>,
    /// Agent connectID → frontend.
    established: HashMap<i64, Arc<FrontendConn>>,
}

struct Pending {
    frontend: Arc<FrontendConn>,
    started: Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("the agent stream closed")]
pub struct BackendClosed;

/// Largest DATA payload sent to an agent (under the window minus its grant batch, and far
/// under gRPC's 4 MiB).
const MAX_DATA: usize = 256 * 1024;

static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

impl Backend {
    pub fn new(
        agent_id: String,
        identifiers: Identifiers,
        to_agent: mpsc::Sender<Packet>,
        dial_timeout: Option<Duration>,
        flow_control: bool,
        limits: StreamLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Backend {
            id: NEXT_BACKEND.fetch_add(1, Ordering::Relaxed),
            agent_id,
            identifiers,
            draining: AtomicBool::new(false),
            to_agent,
            state: Mutex::new(Tables::default()),
            next_dial: AtomicI64::new(1),
            closed: Notify::new(),
            is_closed: AtomicBool::new(false),
            dial_timeout,
            flow_control,
            budget: Arc::new(Budget::new(limits.buffer_bytes)),
            stall_timeout: limits.stall_timeout,
            me: me.clone(),
            metrics,
        })
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// What a frontend of this stream charges its queued bytes to.
    pub fn budget(&self) -> Arc<Budget> {
        self.budget.clone()
    }

    /// Asks the agent to dial `address` for `frontend`; returns our dial ID. With
    /// `--backend-dial-timeout`, a dial the agent has not answered in time fails with a timeout.
    pub async fn dial(
        self: &Arc<Self>,
        address: &str,
        frontend: &Arc<FrontendConn>,
    ) -> Result<i64, BackendClosed> {
        let dial_id = self.next_dial.fetch_add(1, Ordering::Relaxed);
        self.tables().pending.insert(
            dial_id,
            Pending {
                frontend: frontend.clone(),
                started: Instant::now(),
            },
        );
        self.metrics.pending_dials.inc();
        if self
            .send(Packet::dial_request(address, dial_id))
            .await
            .is_err()
        {
            if self.tables().pending.remove(&dial_id).is_some() {
                self.metrics.pending_dials.dec();
            }
            return Err(BackendClosed);
        }
        if let Some(limit) = self.dial_timeout {
            let backend = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                if let Some(backend) = backend.upgrade() {
                    backend.expire_dial(dial_id);
                }
            });
        }
        Ok(dial_id)
    }

    fn expire_dial(&self, dial_id: i64) {
        let Some(pending) = self.tables().pending.remove(&dial_id) else {
            return;
        };
        self.metrics.pending_dials.dec();
        self.metrics.dial_failure("backend_dial_timeout");
        tracing::warn!(backend = self.id, agent = %self.agent_id, "agent did not answer a dial in time");
        let _ = pending
            .frontend
            .mailbox
            .push_control(ToFrontend::DialFailed {
                error: "timed out waiting for backend dial".into(),
                cause: DialCause::Timeout,
            });
        pending.frontend.close();
        self.send_control(Packet::close_dial(dial_id));
    }

    /// Frontend bytes for an established connection. Waits for the connection's window (with
    /// flow control) and when the agent stream is backed up, which pushes back on that
    /// frontend only.
    pub async fn send_data(
        &self,
        conn: &FrontendConn,
        mut data: Bytes,
    ) -> Result<(), BackendClosed> {
        let connect_id = conn.connect_id();
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_DATA));
            conn.reserve(piece.len()).await.map_err(|_| BackendClosed)?;
            self.send(Packet::data(connect_id, piece)).await?;
        }
        Ok(())
    }

    /// Tells a tether agent the frontend will send nothing more (an empty DATA is FIN).
    pub async fn send_fin(&self, conn: &FrontendConn) -> Result<(), BackendClosed> {
        self.send(Packet::data(conn.connect_id(), Bytes::new()))
            .await
    }

    /// Asks the agent to close a connection without waiting; its CLOSE_RSP ends it here.
    pub fn request_close(&self, connect_id: i64) {
        self.send_control(Packet::close_request(connect_id));
    }

    /// Returns window to the agent for bytes its frontend consumed.
    pub fn grant(&self, connect_id: i64, bytes: i64) {
        self.send_control(Packet::window(connect_id, bytes));
    }

    /// The frontend asked to close: the agent answers with CLOSE_RSP, which ends the connection.
    pub async fn close_request(&self, connect_id: i64) -> Result<(), BackendClosed> {
        self.send(Packet::close_request(connect_id)).await
    }

    /// The frontend gave up on a pending dial: forget it and tell the agent to cancel.
    pub fn cancel_dial(&self, dial_id: i64, reason: &'static str) {
        if self.tables().pending.remove(&dial_id).is_some() {
            self.metrics.pending_dials.dec();
            self.metrics.dial_failure(reason);
            self.send_control(Packet::close_dial(dial_id));
        }
    }

    /// The frontend is gone: forget its connection and have the agent close the endpoint.
    pub fn forget(&self, connect_id: i64) {
        if let Some(frontend) = self.tables().established.remove(&connect_id) {
            self.metrics.connection_ended(frontend.established_at());
            self.send_control(Packet::close_request(connect_id));
        }
    }

    /// Handles one packet from the agent. Never waits on a frontend; returns why the stream
    /// must wait (see [`Backend::relieve`]) before its next packet, if it must.
    #[must_use]
    pub fn handle(&self, packet: Packet) -> Option<Pressure> {
        let message = packet.into_message();
        self.metrics.packet("from_agent", message.type_name());
        match message {
            Message::DialResponse(rsp) => {
                self.on_dial_response(rsp.random, rsp.connect_id, rsp.error)
            }
            Message::Data(data) => {
                if data.connect_id == 0 {
                    self.metrics.reject("data_connect_id_zero");
                    tracing::warn!(backend = self.id, agent = %self.agent_id, "agent sent DATA with connectID 0; ignored");
                    return None;
                }
                let frontend = self.tables().established.get(&data.connect_id).cloned();
                match frontend {
                    Some(frontend) => {
                        return self.deliver(
                            data.connect_id,
                            &frontend,
                            ToFrontend::Data(data.data),
                        );
                    }
                    None => {
                        self.metrics.reject("data_unknown_connect_id");
                        tracing::debug!(
                            backend = self.id,
                            connect_id = data.connect_id,
                            "DATA for unknown connectID; asking the agent to close it"
                        );
                        self.send_control(Packet::close_request(data.connect_id));
                    }
                }
            }
            Message::CloseResponse(rsp) => {
                let frontend = self.tables().established.remove(&rsp.connect_id);
                match frontend {
                    Some(frontend) => {
                        self.metrics.connection_ended(frontend.established_at());
                        let _ = frontend
                            .mailbox
                            .push_control(ToFrontend::Closed { error: rsp.error });
                        frontend.close();
                    }
                    None => {
                        self.metrics.reject("close_unknown_connect_id");
                        tracing::debug!(
                            backend = self.id,
                            connect_id = rsp.connect_id,
                            "CLOSE_RSP for unknown connectID; dropped"
                        );
                    }
                }
            }
            Message::CloseDial(cls) => {
                let pending = self.tables().pending.remove(&cls.random);
                match pending {
                    Some(pending) => {
                        self.metrics.pending_dials.dec();
                        self.metrics.dial_failure("backend_close");
                        let _ = pending
                            .frontend
                            .mailbox
                            .push_control(ToFrontend::DialClosed);
                        pending.frontend.close();
                    }
                    None => self.metrics.reject("dial_close_unknown_random"),
                }
            }
            Message::Window(grant) => {
                let frontend = self.tables().established.get(&grant.connect_id).cloned();
                if let Some(frontend) = frontend {
                    frontend.granted(grant.bytes);
                }
            }
            Message::Drain => {
                if !self.draining.swap(true, Ordering::Relaxed) {
                    tracing::info!(backend = self.id, agent = %self.agent_id, "agent is draining; new dials prefer other agents");
                }
            }
            other @ (Message::DialRequest(_) | Message::CloseRequest(_) | Message::Unknown(_)) => {
                self.metrics.reject("unexpected_packet_from_agent");
                tracing::warn!(backend = self.id, agent = %self.agent_id, packet_type = other.type_name(), "agent sent a packet type agents never send; ignored");
            }
        }
        None
    }

    /// Holds this stream (its reader calls this instead of taking the next packet) until the
    /// frontends behind `pressure` catch up; see [`backpressure::hold`].
    pub async fn relieve(&self, pressure: Pressure) {
        self.metrics.stream_pauses.inc();
        let blocked = self.metrics.full_receive_channels("Connect");
        blocked.inc();
        let started = Instant::now();
        backpressure::hold(&self.budget, self.stall_timeout, pressure, self).await;
        blocked.dec();
        self.metrics
            .stream_paused_seconds
            .inc_by(started.elapsed().as_secs_f64());
    }

    fn on_dial_response(&self, dial_id: i64, connect_id: i64, error: String) {
        let pending = self.tables().pending.remove(&dial_id);
        let Some(pending) = pending else {
            self.metrics.dial_failure("unrecognized_response");
            if connect_id != 0 {
                // The frontend gave up before the agent answered: close the orphan endpoint.
                self.send_control(Packet::close_request(connect_id));
            }
            return;
        };
        self.metrics.pending_dials.dec();
        let frontend = pending.frontend;
        if !error.is_empty() || connect_id == 0 {
            self.metrics.dial_failure("error_response");
            let error = if error.is_empty() {
                "agent returned no connectID".into()
            } else {
                error
            };
            let _ = frontend.mailbox.push_control(ToFrontend::DialFailed {
                error,
                cause: DialCause::Agent,
            });
            frontend.close();
            return;
        }
        self.metrics
            .dial_duration
            .observe(pending.started.elapsed().as_secs_f64());
        frontend.set_connect_id(connect_id);
        frontend.mark_established();
        if self.flow_control {
            frontend.enable_flow(self.me.clone());
        }
        if frontend
            .mailbox
            .push_control(ToFrontend::DialOk { connect_id })
            .is_err()
        {
            self.metrics.dial_failure("send_rsp");
            self.send_control(Packet::close_request(connect_id));
            return;
        }
        self.tables().established.insert(connect_id, frontend);
        self.metrics.established.inc();
    }

    /// Hands an event to a frontend without waiting. With a flow-controlled agent a frontend
    /// whose queue is full is closed (the agent broke its window); without, the bytes are
    /// queued and the stream is told to wait.
    fn deliver(
        &self,
        connect_id: i64,
        frontend: &Arc<FrontendConn>,
        event: ToFrontend,
    ) -> Option<Pressure> {
        if !self.flow_control {
            if frontend.mailbox.push_control(event).is_err() {
                self.forget(connect_id);
                return None;
            }
            return frontend.mailbox.pressure(connect_id);
        }
        match frontend.mailbox.push(event) {
            Ok(()) => {}
            Err(PushError::Full { limit }) => {
                self.metrics.frontend_queue_full.inc();
                tracing::warn!(
                    backend = self.id,
                    frontend = frontend.id,
                    connect_id,
                    limit,
                    "agent sent past the connection's window; closing that connection"
                );
                if self.tables().established.remove(&connect_id).is_some() {
                    self.metrics.connection_ended(frontend.established_at());
                }
                frontend.abandon(format!(
                    "tether-server: frontend queue limit of {limit} bytes reached"
                ));
                self.send_control(Packet::close_request(connect_id));
            }
            Err(PushError::Closed) => self.forget(connect_id),
        }
        None
    }

    /// The agent stream ended: every connection and pending dial on it ends now, with a reason.
    pub fn shut_down(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.closed.notify_waiters();
        let tables = std::mem::take(&mut *self.tables());
        for (_, frontend) in tables.established {
            self.metrics.connection_ended(frontend.established_at());
            let _ = frontend.mailbox.push_control(ToFrontend::Closed {
                error: String::new(),
            });
            frontend.close();
        }
        for (_, pending) in tables.pending {
            self.metrics.pending_dials.dec();
            let _ = pending
                .frontend
                .mailbox
                .push_control(ToFrontend::DialFailed {
                    error: "agent stream closed before the dial completed".into(),
                    cause: DialCause::Backend,
                });
            pending.frontend.close();
        }
    }

    /// Resolves once the agent stream has ended.
    pub async fn wait_closed(&self) {
        let notified = self.closed.notified();
        if self.is_closed.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    async fn send(&self, packet: Packet) -> Result<(), BackendClosed> {
        let kind = packet.type_name();
        self.to_agent
            .send(packet)
            .await
            .map_err(|_| BackendClosed)?;
        self.metrics.packet("to_agent", kind);
        Ok(())
    }

    /// Sends a control packet from a context that must not wait: queued at once when there is
    /// room, otherwise by a short-lived task.
    fn send_control(&self, packet: Packet) {
        let kind = packet.type_name();
        match self.to_agent.try_send(packet) {
            Ok(()) => self.metrics.packet("to_agent", kind),
            Err(mpsc::error::TrySendError::Full(packet)) => {
                let tx = self.to_agent.clone();
                tokio::spawn(async move {
                    let _ = tx.send(packet).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`backpressure::hold`] needs to see of this stream's connections.
impl Queues for Backend {
    fn queued(&self, id: i64) -> Option<(usize, usize)> {
        self.tables()
            .established
            .get(&id)
            .map(|f| (f.mailbox.queued_bytes(), f.mailbox.limit()))
    }

    fn marks(&self, only: Option<i64>) -> Vec<(i64, u64)> {
        let tables = self.tables();
        match only {
            Some(id) => tables
                .established
                .get(&id)
                .map(|f| (id, f.progress.mark()))
                .into_iter()
                .collect(),
            None => tables
                .established
                .iter()
                .filter(|(_, f)| f.mailbox.queued_bytes() > 0)
                .map(|(id, f)| (*id, f.progress.mark()))
                .collect(),
        }
    }

    fn close_stalled(&self, id: i64) {
        let Some(frontend) = self.tables().established.remove(&id) else {
            return;
        };
        self.metrics.connection_ended(frontend.established_at());
        self.metrics.stalled_closes.inc();
        tracing::warn!(
            backend = self.id,
            frontend = frontend.id,
            connect_id = id,
            stall_timeout = ?self.stall_timeout,
            "frontend read nothing while the agent stream waited for it; closing that connection"
        );
        frontend.abandon(format!(
            "tether-server: frontend read nothing for {:?}",
            self.stall_timeout
        ));
        self.send_control(Packet::close_request(id));
    }
}

/// Every connected agent stream.
pub struct Backends {
    list: RwLock<Vec<Arc<Backend>>>,
    strategies: Vec<Strategy>,
    metrics: Arc<Metrics>,
}

impl Backends {
    pub fn new(strategies: Vec<Strategy>, metrics: Arc<Metrics>) -> Self {
        let backends = Backends {
            list: RwLock::new(Vec::new()),
            strategies,
            metrics,
        };
        backends.publish();
        backends
    }

    pub fn add(&self, backend: Arc<Backend>) {
        self.write().push(backend);
        self.publish();
    }

    pub fn remove(&self, id: u64) {
        self.write().retain(|b| b.id != id);
        self.publish();
    }

    /// Picks the agent for a dial to `address`, trying each strategy in order.
    pub fn pick(&self, address: &str) -> Option<Arc<Backend>> {
        let list = self.read();
        let host = dial_host(address);
        self.strategies.iter().find_map(|strategy| {
            let candidates: Vec<&Arc<Backend>> = list
                .iter()
                .filter(|b| match strategy {
                    Strategy::Default => true,
                    Strategy::DestHost => b.identifiers.serves(host),
                    Strategy::DefaultRoute => b.identifiers.default_route,
                })
                .collect();
            let live: Vec<&Arc<Backend>> = candidates
                .iter()
                .copied()
                .filter(|b| !b.draining())
                .collect();
            let pool = if live.is_empty() { candidates } else { live };
            match strategy {
                // destHost keeps arrival order: the first agent that claimed the host wins.
                Strategy::DestHost => pool.first().map(|b| (*b).clone()),
                _ if pool.is_empty() => None,
                _ => pool
                    .get(rand::random_range(0..pool.len()))
                    .map(|b| (*b).clone()),
            }
        })
    }

    /// Ready when the first strategy has at least one agent (as upstream).
    pub fn ready(&self) -> bool {
        let list = self.read();
        match self.strategies.first() {
            Some(strategy) => list.iter().any(|b| matches_strategy(b, *strategy)),
            None => false,
        }
    }

    fn publish(&self) {
        let list = self.read();
        for strategy in [
            Strategy::Default,
            Strategy::DestHost,
            Strategy::DefaultRoute,
        ] {
            let count = list
                .iter()
                .filter(|b| matches_strategy(b, strategy))
                .count();
            self.metrics.ready_backends(strategy.label(), count);
        }
        let first = self
            .strategies
            .first()
            .copied()
            .unwrap_or(Strategy::Default);
        let count = list.iter().filter(|b| matches_strategy(b, first)).count();
        self.metrics
            .ready_backend_connections
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Backend>>> {
        self.list.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Backend>>> {
        self.list.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn matches_strategy(backend: &Backend, strategy: Strategy) -> bool {
    match strategy {
        Strategy::Default => true,
        Strategy::DestHost => backend.identifiers.has_dest_keys(),
        Strategy::DefaultRoute => backend.identifiers.default_route,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_host_strips_ports_and_brackets() {
        assert_eq!(dial_host("node1:10250"), "node1");
        assert_eq!(dial_host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(dial_host("[fd00::1]:10250"), "fd00::1");
        assert_eq!(dial_host("fd00::1"), "fd00::1");
        assert_eq!(dial_host("node1"), "node1");
    }

    #[test]
    fn identifiers_parse_like_a_query_string() {
        let ids = Identifiers::parse(
            "host=Node1.example&ipv4=10.0.0.5&ipv6=fd00:0::1&cidr=10.1.0.0/16&default-route=true&default-route=false&future=x",
        )
        .unwrap();
        assert_eq!(ids.hosts, vec!["node1.example"]);
        assert!(ids.default_route, "only the first default-route counts");
        assert!(ids.serves("node1.EXAMPLE"));
        assert!(ids.serves("fd00::1"), "IPv6 addresses compare canonically");
        assert!(ids.serves("10.0.0.5"));
        assert!(ids.serves("10.1.200.7"));
        assert!(!ids.serves("10.2.0.1"));
        assert_eq!(
            Identifiers::parse("host=a;ipv4=1.2.3.4"),
            Err(IdentifiersError::Semicolon("host=a;ipv4=1.2.3.4".into()))
        );
        assert!(Identifiers::parse("ipv4=not-an-ip").is_err());
        assert_eq!(Identifiers::parse("").unwrap(), Identifiers::default());
    }

    fn backend(ids: &str, metrics: &Arc<Metrics>) -> Arc<Backend> {
        let (tx, _rx) = mpsc::channel(1);
        Backend::new(
            "a".into(),
            Identifiers::parse(ids).unwrap(),
            tx,
            None,
            false,
            StreamLimits {
                buffer_bytes: 1 << 20,
                stall_timeout: Duration::from_secs(5),
            },
            metrics.clone(),
        )
    }

    #[test]
    fn strategies_fall_through_in_order_and_prefer_non_draining() {
        let metrics = Arc::new(Metrics::new());
        let backends = Backends::new(
            vec![Strategy::DestHost, Strategy::DefaultRoute],
            metrics.clone(),
        );
        assert!(backends.pick("10.0.0.5:10250").is_none());
        assert!(!backends.ready());
        let node = backend("ipv4=10.0.0.5", &metrics);
        let router = backend("default-route=true", &metrics);
        backends.add(node.clone());
        backends.add(router.clone());
        assert!(backends.ready());
        assert_eq!(backends.pick("10.0.0.5:10250").map(|b| b.id), Some(node.id));
        assert_eq!(backends.pick("10.9.9.9:80").map(|b| b.id), Some(router.id));

        let twin = backend("ipv4=10.0.0.5", &metrics);
        backends.add(twin.clone());
        node.draining.store(true, Ordering::Relaxed);
        assert_eq!(backends.pick("10.0.0.5:1").map(|b| b.id), Some(twin.id));
        backends.remove(twin.id);
        assert_eq!(
            backends.pick("10.0.0.5:1").map(|b| b.id),
            Some(node.id),
            "a draining agent is still used when it is the only match"
        );
    }
}
