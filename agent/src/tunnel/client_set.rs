//! The set of server streams: one per distinct server replica (by `serverid`) until the
//! announced `servercount` is reached, redialled with jittered exponential backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::lease_count::LeaseCounter;
use super::scheduler::{CONTROL_BACKLOG, Scheduler};
use super::server_stream::{Limits, ServerStream};
use super::transport::{self, ConnectError};
use crate::config::Config;
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
}

enum Outcome {
    /// Nothing to do: enough servers held, or draining.
    Idle,
    Connected,
    /// The new stream reached a server already held; it was closed.
    Duplicate,
}

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
        })
    }

    /// The sync loop: runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.config.sync_interval, self.config.sync_interval_cap);
        loop {
            let delay = match self.sync_once().await {
                Ok(Outcome::Idle | Outcome::Connected | Outcome::Duplicate) => {
                    backoff.reset();
                    jitter(self.config.sync_interval)
                }
                Err(err) => {
                    let delay = backoff.step();
                    tracing::warn!(
                        server = format!("{}:{}", self.config.server_host, self.config.server_port),
                        error = tether_runtime::error_chain(&err),
                        retry_in = ?delay,
                        "cannot connect to the proxy server"
                    );
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn sync_once(self: &Arc<Self>) -> Result<Outcome, ConnectError> {
        if self.draining.load(Ordering::Relaxed) {
            return Ok(Outcome::Idle);
        }
        let count = self.server_count();
        self.metrics.known_server_count.set(i64::from(count));
        let held = self.servers().len();
        if !self.config.sync_forever && held >= usize::try_from(count).unwrap_or(usize::MAX) {
            return Ok(Outcome::Idle);
        }
        let scheduler = Arc::new(Scheduler::new());
        let outbound = futures_util::stream::unfold(scheduler.clone(), |scheduler| async move {
            scheduler.next().await.map(|packet| (packet, scheduler))
        });
        let connected = match transport::connect(&self.config, outbound).await {
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
            server_count = connected.server_count,
            flow_control = connected.flow_control,
            "connected to proxy server"
        );

        let set = self.clone();
        let mut inbound = connected.inbound;
        let stall = self.limits.stall_timeout;
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
        });
        Ok(Outcome::Connected)
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
