//! Every connected agent stream, and how a dial picks one.

use std::sync::{Arc, RwLock};

use tether_proto::identifiers::dial_host;

use crate::backend::Backend;
use crate::metrics::Metrics;
use crate::strategy::Strategy;

pub struct Registry {
    list: RwLock<Vec<Arc<Backend>>>,
    strategies: Vec<Strategy>,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(strategies: Vec<Strategy>, metrics: Arc<Metrics>) -> Self {
        let registry = Registry {
            list: RwLock::new(Vec::new()),
            strategies,
            metrics,
        };
        registry.publish();
        registry
    }

    pub fn add(&self, backend: Arc<Backend>) {
        self.write().push(backend);
        self.publish();
    }

    pub fn remove(&self, id: u64) {
        self.write().retain(|b| b.id != id);
        self.publish();
    }

    /// The server is stopping: every tunnel on every agent stream ends.
    pub fn end_tunnels(&self) {
        let list = self.read().clone();
        for backend in list {
            backend.end_tunnels();
        }
    }

    /// Agent streams held right now.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Picks the agent for a dial to `address`, trying each strategy in order; a draining
    /// agent is used only when it is the only candidate.
    pub fn pick(&self, address: &str) -> Option<Arc<Backend>> {
        let list = self.read();
        let host = dial_host(address);
        self.strategies.iter().find_map(|strategy| {
            let candidates: Vec<&Arc<Backend>> = list
                .iter()
                .filter(|b| strategy.serves(&b.identifiers, host))
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
        self.strategies
            .first()
            .is_some_and(|s| list.iter().any(|b| s.counts(&b.identifiers)))
    }

    fn publish(&self) {
        let list = self.read();
        let count = |strategy: Strategy| {
            list.iter()
                .filter(|b| strategy.counts(&b.identifiers))
                .count()
        };
        for strategy in Strategy::ALL {
            self.metrics
                .ready_backends(strategy.label(), count(strategy));
        }
        let first = self
            .strategies
            .first()
            .copied()
            .unwrap_or(Strategy::Default);
        self.metrics
            .ready_backend_connections
            .set(i64::try_from(count(first)).unwrap_or(i64::MAX));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Backend>>> {
        self.list.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Backend>>> {
        self.list.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tether_proto::identifiers::Identifiers;

    use super::*;
    use crate::outbox::Outbox;
    use crate::tunnel::{Settings, Tunnels};

    fn backend(ids: &str, metrics: &Arc<Metrics>) -> Arc<Backend> {
        let (outbox, _stream) = Outbox::new(1, 16);
        let settings = Settings {
            queue_bytes: 1 << 20,
            buffer_bytes: 1 << 20,
            stall_timeout: Duration::from_secs(5),
            dial_timeout: None,
            flow_control: false,
        };
        Backend::new(
            "a".into(),
            Identifiers::parse(ids).unwrap(),
            outbox.clone(),
            Tunnels::new(outbox, settings, metrics.clone()),
            metrics.clone(),
        )
    }

    #[test]
    fn strategies_fall_through_in_order_and_prefer_non_draining() {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(
            vec![Strategy::DestHost, Strategy::DefaultRoute],
            metrics.clone(),
        );
        assert!(registry.pick("10.0.0.5:10250").is_none());
        assert!(!registry.ready());
        let node = backend("ipv4=10.0.0.5", &metrics);
        let router = backend("default-route=true", &metrics);
        registry.add(node.clone());
        registry.add(router.clone());
        assert!(registry.ready());
        assert_eq!(registry.pick("10.0.0.5:10250").map(|b| b.id), Some(node.id));
        assert_eq!(registry.pick("10.9.9.9:80").map(|b| b.id), Some(router.id));

        let twin = backend("ipv4=10.0.0.5", &metrics);
        registry.add(twin.clone());
        let _ = node.handle(tether_proto::Packet::drain());
        assert_eq!(registry.pick("10.0.0.5:1").map(|b| b.id), Some(twin.id));
        registry.remove(twin.id);
        assert_eq!(
            registry.pick("10.0.0.5:1").map(|b| b.id),
            Some(node.id),
            "a draining agent is still used when it is the only match"
        );
    }
}
