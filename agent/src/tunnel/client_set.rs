//! The set of server streams: one per distinct server replica (by `serverid`).
//!
//! Through a load balancer (`--server-addresses=balancer`) the agent dials until it holds as
//! many distinct servers as it counts (announced `servercount`, or Leases), backing off with
//! jitter, and dials at once when a stream is lost. Given the servers' addresses (`each`), it
//! holds one stream per address, each redialled on its own within about a second of a loss
//! (jittered, so a restarted server is not met by every agent at the same instant), and
//! follows the addresses as they resolve.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lease_count::LeaseCounter;
use super::scheduler::{CONTROL_BACKLOG, Scheduler};
use super::server_stream::{Limits, ServerStream};
use super::transport::{self, ConnectError, Target};
use crate::config::{Config, ServerAddresses};
use crate::metrics::Metrics;

pub struct ClientSet {
    config: Arc<Config>,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    servers: Mutex<HashMap<String, Arc<ServerStream>>>,
    /// The servercount the last new server announced.
    last_server_count: AtomicU32,
    /// Set with --count-server-leases.
    leases: Option<Arc<LeaseCounter>>,
    draining: Arc<AtomicBool>,
    /// One task per server stream, reading it until it ends.
    streams: TaskTracker,
    /// The tunnelled connections' tasks, across every stream.
    connections: TaskTracker,
    /// Told when a server stream ends, so the balancer loop dials again at once.
    lost: Notify,
    tls_settings: transport::TlsSettings,
}

enum Outcome {
    /// Nothing to do: enough servers held, or draining.
    Idle,
    /// A new server is held; the receiver resolves when its stream ends.
    Connected(oneshot::Receiver<()>),
    /// The new stream reached a server already held; it was closed.
    Duplicate,
}

/// The first redial of a lost stream waits up to this long (uniformly jittered), and later
/// attempts grow from it; a restarted server is back in use within about a second.
const REDIAL: Duration = Duration::from_millis(250);
/// For this long after a loss, redials stay at most --sync-interval apart; after that they
/// back off up to --sync-interval-cap, as for a server that never answered.
const FAST_REDIALS: Duration = Duration::from_secs(30);

impl ClientSet {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        dial_policy: Arc<crate::dial_plane::policy::DialPolicy>,
        leases: Option<Arc<LeaseCounter>>,
    ) -> Arc<Self> {
        let limits = Arc::new(Limits {
            dial_timeout: config.dial_timeout,
            conn_queue_bytes: config.conn_queue_bytes,
            stream_buffer_bytes: config.stream_buffer_bytes,
            stall_timeout: config.stall_timeout,
            max_pending_dials: config.max_pending_dials,
            max_connections: config.max_connections,
            dial_policy,
        });
        Arc::new(ClientSet {
            config,
            limits,
            metrics,
            servers: Mutex::new(HashMap::new()),
            last_server_count: AtomicU32::new(0),
            leases,
            draining: Arc::new(AtomicBool::new(false)),
            streams: TaskTracker::new(),
            connections: TaskTracker::new(),
            lost: Notify::new(),
            tls_settings: transport::TlsSettings::default(),
        })
    }

    /// The sync loop: runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        match self.config.server_addresses {
            ServerAddresses::Balancer => self.run_balanced(stop).await,
            ServerAddresses::Each => self.run_each(stop).await,
        }
    }

    async fn run_balanced(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (interval, cap) = (self.config.sync_interval, self.config.sync_interval_cap);
        let mut backoff = Backoff::new(interval, cap);
        // After a stream is lost, the way back to its server is found in about a second:
        // failures back off from REDIAL and stay within --sync-interval, and reaching a server
        // already held is tried again within one interval rather than after a full one.
        let mut fast = Backoff::new(REDIAL, interval.max(REDIAL));
        let mut lost_at: Option<tokio::time::Instant> = None;
        let mut failures = Failures::default();
        for turn in 0.. {
            let hosts = &self.config.server_hosts;
            let target = Target {
                host: hosts[turn % hosts.len()].clone(),
                port: self.config.server_port,
                address: None,
            };
            let recovering = lost_at.is_some_and(|at| at.elapsed() < FAST_REDIALS);
            let delay = match self.sync_once(&target).await {
                Ok(outcome) => {
                    failures.recovered(&target);
                    backoff.reset();
                    fast.reset();
                    match outcome {
                        // Maybe more servers to reach: look again soon, not a full interval later.
                        Outcome::Connected(_) => jitter_within(REDIAL),
                        Outcome::Duplicate if recovering => jitter_within(interval),
                        _ => jitter(interval),
                    }
                }
                Err(err) => {
                    let delay = if recovering {
                        fast.step()
                    } else {
                        backoff.step()
                    };
                    failures.failed(&target, &err, delay);
                    delay
                }
            };
            let lost = tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                () = self.lost.notified() => true,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            if lost {
                lost_at = Some(tokio::time::Instant::now());
                backoff.reset();
                fast.reset();
                tokio::select! {
                    _ = tokio::time::sleep(jitter_within(REDIAL)) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        }
    }

    /// One holder per address the hosts resolve to; re-resolved every --resolve-interval.
    async fn run_each(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut holders: BTreeMap<Target, CancellationToken> = BTreeMap::new();
        let mut unresolved = false;
        loop {
            match self.resolve().await {
                Ok(targets) => {
                    unresolved = false;
                    holders.retain(|target, holder| {
                        let keep = targets.contains(target);
                        if !keep {
                            // Its stream, if any, stays until it ends; it is just not redialled.
                            tracing::info!(server = %target, "server address gone from DNS; not redialled");
                            holder.cancel();
                        }
                        keep
                    });
                    for target in targets {
                        if holders.contains_key(&target) {
                            continue;
                        }
                        let holder = CancellationToken::new();
                        self.streams
                            .spawn(self.clone().hold(target.clone(), holder.clone()));
                        holders.insert(target, holder);
                    }
                    self.metrics
                        .known_server_count
                        .set(i64::try_from(holders.len()).unwrap_or(i64::MAX));
                }
                Err((host, err)) => {
                    if !unresolved {
                        tracing::warn!(
                            host,
                            error = %err,
                            "cannot resolve the proxy server; holding on to the addresses it had"
                        );
                    }
                    unresolved = true;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.resolve_interval) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        for holder in holders.values() {
            holder.cancel();
        }
    }

    /// Every address of every host; one failed lookup fails the round (an address that is
    /// only unresolvable for a moment is not dropped).
    async fn resolve(&self) -> Result<Vec<Target>, (String, std::io::Error)> {
        let port = self.config.server_port;
        let mut targets = Vec::new();
        for host in &self.config.server_hosts {
            let addresses = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|err| (host.clone(), err))?;
            targets.extend(addresses.map(|address| Target {
                host: host.clone(),
                port,
                address: Some(address),
            }));
        }
        targets.sort();
        targets.dedup();
        Ok(targets)
    }

    /// Keeps one stream to `target` until `holder` is cancelled or the agent drains.
    async fn hold(self: Arc<Self>, target: Target, holder: CancellationToken) {
        let cap = self.config.sync_interval.max(REDIAL);
        let mut backoff = Backoff::new(REDIAL, cap);
        let mut failures = Failures::default();
        let mut lost_at = tokio::time::Instant::now();
        loop {
            let delay = match self.open(&target).await {
                Ok(Outcome::Connected(ended)) => {
                    failures.recovered(&target);
                    tokio::select! {
                        _ = ended => {}
                        () = holder.cancelled() => return,
                    }
                    backoff = Backoff::new(REDIAL, cap);
                    lost_at = tokio::time::Instant::now();
                    jitter_within(REDIAL)
                }
                // Another address of a server already held: look again now and then, in case
                // the address moves to a new server.
                Ok(Outcome::Duplicate) => jitter(self.config.sync_interval_cap),
                Ok(Outcome::Idle) => return,
                Err(err) => {
                    if lost_at.elapsed() > FAST_REDIALS {
                        backoff.cap = self.config.sync_interval_cap;
                    }
                    let delay = backoff.step();
                    failures.failed(&target, &err, delay);
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = holder.cancelled() => return,
            }
        }
    }

    async fn sync_once(self: &Arc<Self>, target: &Target) -> Result<Outcome, ConnectError> {
        let count = self.server_count();
        self.metrics.known_server_count.set(i64::from(count));
        let held = self.servers().len();
        if !self.config.sync_forever && held >= usize::try_from(count).unwrap_or(usize::MAX) {
            return Ok(Outcome::Idle);
        }
        self.open(target).await
    }

    /// Opens a stream to `target` and holds it, unless it reaches a server already held.
    async fn open(self: &Arc<Self>, target: &Target) -> Result<Outcome, ConnectError> {
        if self.draining.load(Ordering::Relaxed) {
            return Ok(Outcome::Idle);
        }
        let scheduler = Arc::new(Scheduler::new());
        let outbound = futures_util::stream::unfold(scheduler.clone(), |scheduler| async move {
            scheduler.next().await.map(|packet| (packet, scheduler))
        });
        let connected =
            match transport::connect(&self.config, &self.tls_settings, target, outbound).await {
                Ok(connected) => connected,
                Err(err) => {
                    self.metrics.server_failure("to_server");
                    self.metrics.connect_failure(err.reason());
                    return Err(err);
                }
            };
        let stream = {
            let mut servers = self.servers();
            if servers.contains_key(&connected.server_id) {
                scheduler.close();
                tracing::debug!(
                    server = connected.server_id,
                    "reached a server already held; closed the extra stream"
                );
                return Ok(Outcome::Duplicate);
            }
            let stream = ServerStream::new(
                connected.server_id.clone(),
                connected.flow_control,
                scheduler.clone(),
                self.draining.clone(),
                self.limits.clone(),
                self.metrics.clone(),
                self.connections.clone(),
            );
            servers.insert(connected.server_id.clone(), stream.clone());
            stream
        };
        self.last_server_count
            .store(connected.server_count, Ordering::Relaxed);
        self.metrics.open_server_connections.inc();
        tracing::info!(
            server = connected.server_id,
            address = %target,
            server_count = connected.server_count,
            flow_control = connected.flow_control,
            "connected to proxy server"
        );

        let set = self.clone();
        let mut inbound = connected.inbound;
        let stall = self.limits.stall_timeout;
        let (ended, ended_rx) = oneshot::channel::<()>();
        self.streams.spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(packet)) => {
                        if let Some(pressure) = stream.handle(packet) {
                            stream.relieve(pressure).await;
                        }
                        // Answers the server does not take: read nothing more until it does.
                        if scheduler.control_backlog() >= CONTROL_BACKLOG
                            && tokio::time::timeout(stall, scheduler.control_drained())
                                .await
                                .is_err()
                        {
                            set.metrics.server_failure("from_server");
                            break format!(
                                "the server left {CONTROL_BACKLOG} answers unread for {stall:?} \
                                 while it kept sending: it does not read its stream"
                            );
                        }
                    }
                    Ok(None) => break "server closed the stream".to_owned(),
                    Err(status) => {
                        set.metrics.server_failure("from_server");
                        set.metrics.stream_error("to_agent", status.code());
                        break format!("{} ({:?})", status.message(), status.code());
                    }
                }
            };
            if set.draining.load(Ordering::Relaxed) && stream.open_connections() == 0 {
                tracing::info!(server = stream.server_id, reason, "server stream closed");
            } else {
                tracing::warn!(
                    server = stream.server_id,
                    reason,
                    open = stream.open_connections(),
                    "lost proxy server stream; its connections are closed"
                );
            }
            set.servers().remove(&stream.server_id);
            stream.shut_down();
            set.metrics.open_server_connections.dec();
            drop(ended);
            set.lost.notify_waiters();
        });
        Ok(Outcome::Connected(ended_rx))
    }

    /// How many servers to hold streams to: the announced count, or the Lease count (with
    /// --server-count-source=max, the larger of the two) once the Leases are listed.
    fn server_count(&self) -> u32 {
        let announced = self.last_server_count.load(Ordering::Relaxed).max(1);
        let leased = self.leases.as_ref().and_then(|leases| leases.count());
        match (leased, &self.config.leases) {
            (Some(leased), Some(settings)) if settings.max_with_announced => leased.max(announced),
            (Some(leased), _) => leased,
            (None, _) => announced,
        }
    }

    /// Ready once at least one server stream is held (as upstream).
    pub fn ready(&self) -> bool {
        !self.servers().is_empty()
    }

    /// First signal: tell every server we are leaving, stop dialling servers and refuse new
    /// connections; open ones continue.
    pub fn drain(&self) {
        if self.draining.swap(true, Ordering::Relaxed) {
            return;
        }
        for stream in self.servers().values() {
            stream.send_drain();
        }
    }

    /// After [`ClientSet::drain`]: waits, at most `deadline`, for the open connections to
    /// finish. Returns how many are still open.
    pub async fn drained(&self, deadline: Duration) -> usize {
        self.connections.close();
        let _ = tokio::time::timeout(deadline, self.connections.wait()).await;
        self.open_connections()
    }

    /// After a drain: ends every server stream cleanly and waits, at most `limit`, for the
    /// servers to close theirs; a stream that ends closes what is left of its connections.
    pub async fn leave(&self, limit: Duration) {
        for stream in self.servers().values() {
            stream.finish();
        }
        self.streams.close();
        self.connections.close();
        let _ = tokio::time::timeout(limit, self.streams.wait()).await;
        let _ = tokio::time::timeout(limit, self.connections.wait()).await;
    }

    /// Stream and connection tasks still running.
    pub fn tasks_left(&self) -> usize {
        self.streams.len() + self.connections.len()
    }

    /// Tunnelled connections still open across all servers.
    pub fn open_connections(&self) -> usize {
        self.servers().values().map(|s| s.open_connections()).sum()
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerStream>>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// k8s-style backoff: factor 1.5, up to 10% jitter, capped.
struct Backoff {
    initial: Duration,
    current: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(initial: Duration, cap: Duration) -> Self {
        Backoff {
            initial,
            current: initial,
            cap,
        }
    }

    fn step(&mut self) -> Duration {
        let delay = jitter(self.current);
        self.current = self.current.mul_f64(1.5).min(self.cap);
        delay.min(self.cap.mul_f64(1.1))
    }

    fn reset(&mut self) {
        self.current = self.initial;
    }
}

fn jitter(base: Duration) -> Duration {
    base.mul_f64(1.0 + rand::random::<f64>() * 0.1)
}

/// Uniformly between 0 and `most`: spreads a fleet's redials over the whole span.
fn jitter_within(most: Duration) -> Duration {
    most.mul_f64(rand::random::<f64>())
}

/// Connect failures to one target: each different error is logged as a warning once, and
/// its repeats, at every redial of an outage, only at debug.
#[derive(Default)]
struct Failures {
    count: u32,
    last: String,
}

impl Failures {
    fn failed(&mut self, target: &Target, err: &ConnectError, retry_in: Duration) {
        self.count += 1;
        let error = tether_runtime::error_chain(err);
        if error != self.last {
            tracing::warn!(
                server = %target,
                error,
                retry_in = ?retry_in,
                "cannot connect to the proxy server"
            );
        } else {
            tracing::debug!(
                server = %target,
                error,
                failures = self.count,
                retry_in = ?retry_in,
                "still cannot connect to the proxy server"
            );
        }
        self.last = error;
    }

    fn recovered(&mut self, target: &Target) {
        if self.count > 1 {
            tracing::info!(server = %target, failures = self.count, "proxy server reachable again");
        }
        self.count = 0;
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let steps: Vec<f64> = (0..8).map(|_| backoff.step().as_secs_f64()).collect();
        let bases = [1.0, 1.5, 2.25, 3.375, 5.0625, 7.59375, 10.0, 10.0];
        for (got, base) in steps.iter().zip(bases) {
            assert!(
                *got >= base && *got <= base * 1.1 + 1e-9,
                "step {got} not within 10% above {base}"
            );
        }
        backoff.reset();
        assert!(backoff.step() < Duration::from_millis(1101));
    }
}
