//! Every connected agent stream, and how a dial picks one.
//!
//! Under destHost, an address or host name belongs to one node, and only that node's agent
//! is handed its dials:
//! - an address two Nodes list (with `--bind-agent-identity=token`, from `nodes`), or that
//!   agents of two different bound identities claim, is served by neither: the dial fails,
//!   naming the claimants, whichever registered first;
//! - a host that belongs to a node (a Node's name or address, or what an agent claimed since
//!   the server started) whose agent is not connected is not handed to a later strategy
//!   (`default`): that agent could not reach the node's kubelet through its guard anyway,
//!   and must never see the stream.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use tether_proto::identifiers::{Destination, Identifiers, dial_host};

use crate::agent_stream::AgentStream;
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::strategy::Strategy;

/// Hosts remembered as some agent's claim; past it the oldest claims are forgotten.
const KNOWN_HOSTS: usize = 100_000;

pub struct Registry {
    streams: RwLock<Streams>,
    strategies: Vec<Strategy>,
    metrics: Arc<Metrics>,
    /// Claims are bound to credentials (`--bind-agent-identity`), so two identities claiming
    /// one address is a conflict rather than two replicas of one agent.
    bound: bool,
    nodes: Option<Arc<Nodes>>,
    known: Mutex<Claims>,
    /// Woken whenever an agent stream is added.
    joined: tokio::sync::Notify,
    /// Until then a dial no agent can take yet waits for one (--hold-dials-after-start).
    hold_until: Option<tokio::time::Instant>,
}

/// The agent streams held now, in arrival order, and indexed by what they claim: a destHost
/// dial looks up its host instead of asking every agent, which with ten thousand agents was
/// most of a dial's time.
#[derive(Default)]
struct Streams {
    list: Vec<Held>,
    by_address: HashMap<IpAddr, Vec<Held>>,
    /// By host name (identifiers hold them lowercased).
    by_name: HashMap<String, Vec<Held>>,
    /// Streams that claim CIDRs, which no key finds.
    with_cidrs: Vec<Held>,
    /// Streams each strategy counts (in `Strategy::ALL`'s order), kept as streams come and
    /// go: recounting the whole list at every arrival made a fleet's return quadratic.
    counted: [usize; Strategy::ALL.len()],
    arrivals: u64,
}

/// A stream with its place in arrival order.
#[derive(Clone)]
struct Held {
    arrival: u64,
    stream: Arc<AgentStream>,
}

impl Streams {
    fn add(&mut self, stream: Arc<AgentStream>) {
        let held = Held {
            arrival: self.arrivals,
            stream,
        };
        self.arrivals += 1;
        let ids = &held.stream.identifiers;
        for address in &ids.addresses {
            self.by_address
                .entry(*address)
                .or_default()
                .push(held.clone());
        }
        for host in &ids.hosts {
            self.by_name
                .entry(host.clone())
                .or_default()
                .push(held.clone());
        }
        if !ids.cidrs.is_empty() {
            self.with_cidrs.push(held.clone());
        }
        for (slot, strategy) in self.counted.iter_mut().zip(Strategy::ALL) {
            if strategy.counts(ids) {
                *slot += 1;
            }
        }
        self.list.push(held);
    }

    /// Takes out the stream with `id`, if held.
    fn remove(&mut self, id: u64) -> Option<Arc<AgentStream>> {
        let at = self.list.iter().position(|h| h.stream.id == id)?;
        let stream = self.list.remove(at).stream;
        let ids = &stream.identifiers;
        for address in &ids.addresses {
            unindex(&mut self.by_address, address, id);
        }
        for host in &ids.hosts {
            unindex(&mut self.by_name, host.as_str(), id);
        }
        self.with_cidrs.retain(|h| h.stream.id != id);
        for (slot, strategy) in self.counted.iter_mut().zip(Strategy::ALL) {
            if strategy.counts(ids) {
                *slot -= 1;
            }
        }
        Some(stream)
    }

    /// Streams `strategy` counts now.
    fn counted(&self, strategy: Strategy) -> usize {
        Strategy::ALL
            .iter()
            .position(|s| *s == strategy)
            .map_or(0, |i| self.counted[i])
    }

    /// The streams `strategy` may hand a dial to `destination`, in arrival order.
    fn candidates(
        &self,
        strategy: Strategy,
        destination: &Destination<'_>,
    ) -> Vec<&Arc<AgentStream>> {
        match strategy {
            Strategy::DestHost => self.serving(destination),
            // Any agent the strategy counts will do.
            _ => self
                .iter()
                .filter(|b| strategy.counts(&b.identifiers))
                .collect(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<AgentStream>> {
        self.list.iter().map(|h| &h.stream)
    }

    /// The streams that serve `destination` under destHost, in arrival order: exactly those
    /// `Identifiers::serves_destination` accepts.
    fn serving(&self, destination: &Destination<'_>) -> Vec<&Arc<AgentStream>> {
        let mut found: Vec<&Held> = Vec::new();
        if let Some(held) = self.by_name.get(&destination.host.to_ascii_lowercase()) {
            found.extend(held);
        }
        if let Some(ip) = destination.ip {
            if let Some(held) = self.by_address.get(&ip) {
                found.extend(held);
            }
            found.extend(
                self.with_cidrs
                    .iter()
                    .filter(|h| h.stream.identifiers.cidrs.iter().any(|c| c.contains(ip))),
            );
        }
        found.sort_by_key(|h| h.arrival);
        found.dedup_by_key(|h| h.arrival);
        found.into_iter().map(|h| &h.stream).collect()
    }
}

fn unindex<K, Q>(index: &mut HashMap<K, Vec<Held>>, key: &Q, id: u64)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(held) = index.get_mut(key) {
        held.retain(|h| h.stream.id != id);
        if held.is_empty() {
            index.remove(key);
        }
    }
}

/// Hosts and addresses agents claimed since the server started, with the identity that
/// claimed each last; at most [`KNOWN_HOSTS`], the oldest claims forgotten first.
#[derive(Default)]
struct Claims {
    hosts: HashMap<String, (String, u64)>,
    /// Counts claims, to tell the oldest.
    clock: u64,
}

impl Claims {
    fn remember(&mut self, host: String, identity: &str) {
        self.clock += 1;
        if self.hosts.len() >= KNOWN_HOSTS && !self.hosts.contains_key(&host) {
            let oldest = self
                .hosts
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(h, _)| h.clone());
            if let Some(oldest) = oldest {
                self.hosts.remove(&oldest);
            }
        }
        self.hosts.insert(host, (identity.to_owned(), self.clock));
    }

    fn owner(&self, host: &str) -> Option<&str> {
        self.hosts
            .get(&host_key(host))
            .map(|(identity, _)| identity.as_str())
    }
}

/// Why a dial has no agent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoAgent {
    /// Upstream's words, which clients may match.
    #[error("No agent available")]
    None,
    #[error(
        "No agent available: {host} is claimed by {}; tether-server serves a node's address only when one node claims it",
        .claimants.join(" and ")
    )]
    Ambiguous {
        host: String,
        claimants: Vec<String>,
    },
    #[error(
        "No agent available: {host} belongs to {owner}, whose agent is not connected; tether-server does not hand a node's dials to another node's agent"
    )]
    Absent { host: String, owner: String },
}

impl NoAgent {
    /// For the `tether_server_dials_withheld_total` reason.
    pub fn withheld(&self) -> Option<&'static str> {
        match self {
            NoAgent::None => None,
            NoAgent::Ambiguous { .. } => Some("ambiguous_address"),
            NoAgent::Absent { .. } => Some("node_agent_absent"),
        }
    }
}

/// How a host is remembered: host names lowercased, addresses in their canonical text.
fn host_key(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

fn claimed_hosts(ids: &Identifiers) -> impl Iterator<Item = String> + '_ {
    ids.hosts
        .iter()
        .map(|h| host_key(h))
        .chain(ids.addresses.iter().map(|a| host_key(&a.to_string())))
}

impl Registry {
    pub fn new(strategies: Vec<Strategy>, metrics: Arc<Metrics>) -> Self {
        let registry = Registry {
            streams: RwLock::default(),
            strategies,
            metrics,
            bound: false,
            nodes: None,
            known: Mutex::default(),
            joined: tokio::sync::Notify::new(),
            hold_until: None,
        };
        registry.publish();
        registry
    }

    /// Claims are bound to credentials; with `nodes`, addresses are also checked against
    /// what every Node's status lists.
    pub fn binding(mut self, bound: bool, nodes: Option<Arc<Nodes>>) -> Self {
        self.bound = bound;
        self.nodes = nodes;
        self
    }

    /// Dials that find no agent before `until` wait for one to connect, at most until then.
    pub fn hold_dials_until(mut self, until: Option<tokio::time::Instant>) -> Self {
        self.hold_until = until;
        self
    }

    pub fn add(&self, agent_stream: Arc<AgentStream>) {
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            for host in claimed_hosts(&agent_stream.identifiers) {
                known.remember(host, &agent_stream.identity);
            }
        }
        self.write().add(agent_stream);
        self.publish();
        self.joined.notify_waiters();
    }

    /// The addresses in `ids` that do not belong to `identity` alone: each with the other
    /// claimants (Nodes that list it, other identities whose agents claim it now).
    pub fn conflicts(&self, identity: &str, ids: &Identifiers) -> Vec<(IpAddr, Vec<String>)> {
        if !self.bound {
            return Vec::new();
        }
        let streams = self.read();
        ids.addresses
            .iter()
            .filter_map(|address| {
                let mut others: BTreeSet<String> = self
                    .nodes
                    .iter()
                    .flat_map(|nodes| nodes.owners(*address))
                    .map(|node| format!("node {node}"))
                    .filter(|owner| owner != identity)
                    .collect();
                others.extend(
                    streams
                        .by_address
                        .get(address)
                        .into_iter()
                        .flatten()
                        .filter(|h| h.stream.identity != identity)
                        .map(|h| h.stream.identity.clone()),
                );
                (!others.is_empty()).then(|| (*address, others.into_iter().collect()))
            })
            .collect()
    }

    pub fn remove(&self, id: u64) {
        self.write().remove(id);
        self.publish();
    }

    /// The server is stopping: every connection on every agent stream ends.
    pub fn end_tunnels(&self) {
        let list: Vec<Arc<AgentStream>> = self.read().iter().cloned().collect();
        for agent_stream in list {
            agent_stream.end_tunnels();
        }
    }

    /// Agent streams held right now.
    pub fn len(&self) -> usize {
        self.read().list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Picks the agent for a dial to `address`, trying each strategy in order; a draining
    /// agent is used only when it is the only candidate.
    pub fn pick(&self, address: &str) -> Result<Arc<AgentStream>, NoAgent> {
        let picked = self.choose(address);
        if let Err(refusal) = &picked
            && let Some(reason) = refusal.withheld()
        {
            self.metrics.dial_withheld(reason);
        }
        picked
    }

    /// [`Registry::pick`], except that while the server is fresh (--hold-dials-after-start) a
    /// dial that no connected agent can take, or whose node's agent is not back yet, waits
    /// for agents to connect until the window closes. A restarted server is thus not the
    /// cause of failed dials in the moment before its agents return.
    pub async fn pick_or_wait(&self, address: &str) -> Result<Arc<AgentStream>, NoAgent> {
        let Some(until) = self.hold_until else {
            return self.pick(address);
        };
        let mut held = false;
        loop {
            let joined = self.joined.notified();
            tokio::pin!(joined);
            joined.as_mut().enable();
            let waits = match self.choose(address) {
                Ok(agent_stream) => {
                    if held {
                        self.metrics.dial_held("served");
                    }
                    return Ok(agent_stream);
                }
                Err(NoAgent::None | NoAgent::Absent { .. }) => tokio::time::Instant::now() < until,
                Err(NoAgent::Ambiguous { .. }) => false,
            };
            if !waits {
                if held {
                    self.metrics.dial_held("failed");
                }
                return self.pick(address);
            }
            held = true;
            let _ = tokio::time::timeout_at(until, joined).await;
        }
    }

    fn choose(&self, address: &str) -> Result<Arc<AgentStream>, NoAgent> {
        let streams = self.read();
        let host = dial_host(address);
        let destination = Destination::new(host);
        for strategy in &self.strategies {
            let candidates = streams.candidates(*strategy, &destination);
            if *strategy == Strategy::DestHost {
                self.unambiguous(host, &candidates)?;
            }
            let live: Vec<&Arc<AgentStream>> = candidates
                .iter()
                .copied()
                .filter(|b| !b.draining())
                .collect();
            let pool = if live.is_empty() { candidates } else { live };
            let chosen = match strategy {
                // destHost keeps arrival order: the first agent that claimed the host wins.
                Strategy::DestHost => pool.first().map(|b| (*b).clone()),
                _ if pool.is_empty() => None,
                _ => pool
                    .get(rand::random_range(0..pool.len()))
                    .map(|b| (*b).clone()),
            };
            if let Some(agent_stream) = chosen {
                return Ok(agent_stream);
            }
            if *strategy == Strategy::DestHost
                && let Some(owner) = self.owner(host)
            {
                return Err(NoAgent::Absent {
                    host: host.to_owned(),
                    owner,
                });
            }
        }
        Err(NoAgent::None)
    }

    /// Refuses a host that two Nodes list, or that agents of two bound identities claim.
    fn unambiguous(&self, host: &str, candidates: &[&Arc<AgentStream>]) -> Result<(), NoAgent> {
        if !self.bound {
            return Ok(());
        }
        let mut claimants: BTreeSet<String> = BTreeSet::new();
        if let (Some(nodes), Ok(ip)) = (&self.nodes, host.parse::<IpAddr>()) {
            let owners = nodes.owners(ip);
            if owners.len() > 1 {
                claimants.extend(owners.into_iter().map(|n| format!("node {n}")));
            }
        }
        let identities: BTreeSet<&str> = candidates.iter().map(|b| b.identity.as_str()).collect();
        if identities.len() > 1 {
            claimants.extend(identities.into_iter().map(str::to_owned));
        }
        if claimants.is_empty() {
            return Ok(());
        }
        Err(NoAgent::Ambiguous {
            host: host.to_owned(),
            claimants: claimants.into_iter().collect(),
        })
    }

    /// Who a host belongs to when no agent serves it: a Node, or the identity that claimed it
    /// last since the server started.
    fn owner(&self, host: &str) -> Option<String> {
        if let Some(node) = self.nodes.as_ref().and_then(|n| n.node_of(host)) {
            return Some(format!("node {node}"));
        }
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.owner(host).map(str::to_owned)
    }

    /// Ready when the first strategy has at least one agent (as upstream).
    pub fn ready(&self) -> bool {
        let streams = self.read();
        self.strategies
            .first()
            .is_some_and(|s| streams.counted(*s) > 0)
    }

    fn publish(&self) {
        let streams = self.read();
        let count = |strategy: Strategy| streams.counted(strategy);
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Streams> {
        self.streams.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Streams> {
        self.streams.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tether_proto::identifiers::Identifiers;

    use super::*;
    use crate::connection::{Connections, Settings};
    use crate::outbox::Outbox;

    fn agent_stream(ids: &str, metrics: &Arc<Metrics>) -> Arc<AgentStream> {
        bound_backend(ids, "agent a", metrics)
    }

    fn bound_backend(ids: &str, identity: &str, metrics: &Arc<Metrics>) -> Arc<AgentStream> {
        let (outbox, _stream) = Outbox::new(1, 16);
        let settings = Settings {
            queue_bytes: 1 << 20,
            buffer_bytes: 1 << 20,
            stall_timeout: Duration::from_secs(5),
            dial_timeout: None,
            flow_control: false,
        };
        AgentStream::new(
            "a".into(),
            Identifiers::parse(ids).unwrap(),
            identity.into(),
            outbox.clone(),
            Connections::new(
                outbox,
                settings,
                metrics.clone(),
                tokio_util::task::TaskTracker::new(),
            ),
            metrics.clone(),
        )
    }

    /// The destHost index finds exactly the streams a scan of every stream with
    /// `serves_destination` finds, in arrival order, also after streams leave: claims by
    /// address, by host name (also one that looks like an address), by CIDR, overlapping and
    /// repeated.
    #[tokio::test]
    async fn the_host_index_finds_what_asking_every_agent_finds() {
        let metrics = Arc::new(Metrics::new());
        let claims = [
            "ipv4=10.0.0.1&host=node-a",
            "ipv4=10.0.0.2&ipv4=10.0.0.2",
            "cidr=10.0.0.0/24",
            "host=10.0.0.1",
            "ipv6=fd00::1&host=Node-B",
            "ipv4=10.0.0.1",
            "cidr=fd00::/64&host=node-a",
            "default-route=true",
            "ipv4=10.0.0.3&cidr=10.0.0.0/30",
        ];
        let dials = [
            "10.0.0.1",
            "10.0.0.2",
            "10.0.0.3",
            "10.0.0.9",
            "10.0.1.1",
            "node-a",
            "NODE-B",
            "node-c",
            "fd00::1",
            "fd00:0:0:0::1",
            "fd00::2",
            "::ffff:10.0.0.1",
            "[fd00::1]",
        ];
        let mut streams = Streams::default();
        let mut added = Vec::new();
        for claim in claims {
            let stream = agent_stream(claim, &metrics);
            added.push(stream.id);
            streams.add(stream);
        }
        // Leave two in the middle, and add one back at the end.
        let leaving = [added[1], added[5]];
        let check = |streams: &Streams| {
            for dial in dials {
                let host = dial_host(dial);
                let destination = Destination::new(host);
                let indexed: Vec<u64> =
                    streams.serving(&destination).iter().map(|b| b.id).collect();
                let scanned: Vec<u64> = streams
                    .iter()
                    .filter(|b| b.identifiers.serves_destination(&destination))
                    .map(|b| b.id)
                    .collect();
                assert_eq!(indexed, scanned, "dial to {dial}");
            }
        };
        check(&streams);
        for id in leaving {
            assert!(streams.remove(id).is_some());
        }
        assert!(streams.remove(leaving[0]).is_none(), "removed twice");
        streams.add(agent_stream("ipv4=10.0.0.1&host=node-a", &metrics));
        check(&streams);
        // What left is no longer found through any key.
        assert!(
            !streams
                .by_address
                .values()
                .flatten()
                .any(|h| leaving.contains(&h.stream.id))
        );
        assert!(
            !streams
                .by_address
                .contains_key(&"10.0.0.2".parse::<IpAddr>().unwrap())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_server_holds_a_dial_until_an_agent_comes_or_the_window_closes() {
        let metrics = Arc::new(Metrics::new());
        let start = tokio::time::Instant::now();
        let registry = Arc::new(
            Registry::new(vec![Strategy::Default], metrics.clone())
                .hold_dials_until(Some(start + Duration::from_secs(5))),
        );
        let waiting = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.pick_or_wait("10.0.0.5:10250").await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !waiting.is_finished(),
            "the dial failed before the window closed"
        );
        registry.add(agent_stream("", &metrics));
        let picked = waiting.await.unwrap();
        assert!(
            picked.is_ok(),
            "the agent that connected did not get the dial"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        // No agent comes: the dial fails when the window closes, and past it at once.
        let empty = Registry::new(vec![Strategy::Default], metrics.clone())
            .hold_dials_until(Some(tokio::time::Instant::now() + Duration::from_secs(1)));
        let before = tokio::time::Instant::now();
        assert_eq!(
            empty.pick_or_wait("10.0.0.5:10250").await.err(),
            Some(NoAgent::None)
        );
        assert_eq!(before.elapsed(), Duration::from_secs(1));
        let before = tokio::time::Instant::now();
        assert_eq!(
            empty.pick_or_wait("10.0.0.5:10250").await.err(),
            Some(NoAgent::None)
        );
        assert_eq!(before.elapsed(), Duration::ZERO);
        let page = tether_runtime::exposition::text(&metrics.registry).unwrap();
        for outcome in ["served", "failed"] {
            assert!(
                page.contains(&format!(
                    "tether_server_dials_held_total{{outcome=\"{outcome}\"}} 1"
                )),
                "{page}"
            );
        }
    }

    #[test]
    fn strategies_fall_through_in_order_and_prefer_non_draining() {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(
            vec![Strategy::DestHost, Strategy::DefaultRoute],
            metrics.clone(),
        );
        assert_eq!(registry.pick("10.0.0.5:10250").err(), Some(NoAgent::None));
        assert!(!registry.ready());
        let node = agent_stream("ipv4=10.0.0.5", &metrics);
        let router = agent_stream("default-route=true", &metrics);
        registry.add(node.clone());
        registry.add(router.clone());
        assert!(registry.ready());
        let picked = |address: &str| registry.pick(address).ok().map(|b| b.id);
        assert_eq!(picked("10.0.0.5:10250"), Some(node.id));
        assert_eq!(picked("10.9.9.9:80"), Some(router.id));

        let twin = agent_stream("ipv4=10.0.0.5", &metrics);
        registry.add(twin.clone());
        let _ = node.handle(tether_proto::Packet::drain());
        assert_eq!(picked("10.0.0.5:1"), Some(twin.id));
        registry.remove(twin.id);
        assert_eq!(
            picked("10.0.0.5:1"),
            Some(node.id),
            "a draining agent is still used when it is the only match"
        );
    }

    #[test]
    fn a_nodes_dials_never_go_to_another_nodes_agent() {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(vec![Strategy::DestHost, Strategy::Default], metrics.clone());
        let node = bound_backend("host=node-a&ipv4=10.0.0.5", "node node-a", &metrics);
        let other = bound_backend("ipv4=10.0.0.6", "node node-b", &metrics);
        registry.add(node.clone());
        registry.add(other.clone());
        assert_eq!(
            registry.pick("10.0.0.5:10250").ok().map(|b| b.id),
            Some(node.id)
        );
        registry.remove(node.id);
        for (address, host) in [("10.0.0.5:10250", "10.0.0.5"), ("NODE-A:10250", "NODE-A")] {
            assert_eq!(
                registry.pick(address).err(),
                Some(NoAgent::Absent {
                    host: host.into(),
                    owner: "node node-a".into()
                }),
                "{address} went to another node's agent"
            );
        }
        assert_eq!(
            registry.pick("10.9.9.9:80").ok().map(|b| b.id),
            Some(other.id),
            "what belongs to no node still goes to any agent"
        );
    }

    #[test]
    fn an_address_two_identities_or_two_nodes_claim_is_served_by_neither() {
        let metrics = Arc::new(Metrics::new());
        let nodes = Arc::new(crate::nodes::Nodes::with(&[
            ("node-a", &["10.0.0.5"]),
            ("rogue", &["10.0.0.5", "10.0.0.7"]),
            ("node-c", &["10.0.0.8"]),
        ]));
        let registry = Registry::new(vec![Strategy::DestHost, Strategy::Default], metrics.clone())
            .binding(true, Some(nodes));
        let rogue = bound_backend(
            "ipv4=10.0.0.5&ipv4=10.0.0.7&host=rogue",
            "node rogue",
            &metrics,
        );
        registry.add(rogue.clone());
        let ambiguous = NoAgent::Ambiguous {
            host: "10.0.0.5".into(),
            claimants: vec!["node node-a".into(), "node rogue".into()],
        };
        assert_eq!(
            registry.pick("10.0.0.5:10250").err(),
            Some(ambiguous.clone()),
            "the first to register won a contested address"
        );
        assert_eq!(
            registry.conflicts("node rogue", &rogue.identifiers),
            [("10.0.0.5".parse().unwrap(), vec!["node node-a".to_owned()])]
        );
        let victim = bound_backend("ipv4=10.0.0.5&host=node-a", "node node-a", &metrics);
        registry.add(victim.clone());
        assert_eq!(registry.pick("10.0.0.5:10250").err(), Some(ambiguous));
        // The names are the token's, not the Node's status: they stay each node's own.
        assert_eq!(registry.pick("node-a:10250").map(|b| b.id), Ok(victim.id));
        assert_eq!(
            registry.pick("10.0.0.7:22").ok().map(|b| b.id),
            Some(rogue.id)
        );

        // Two identities claiming one address no Node lists.
        let first = bound_backend("ipv4=10.0.0.8", "certificate one", &metrics);
        let second = bound_backend("ipv4=10.0.0.8", "certificate two", &metrics);
        registry.add(first.clone());
        assert_eq!(
            registry.pick("10.0.0.8:1").ok().map(|b| b.id),
            Some(first.id)
        );
        registry.add(second.clone());
        assert!(matches!(
            registry.pick("10.0.0.8:1"),
            Err(NoAgent::Ambiguous { claimants, .. }) if claimants == ["certificate one", "certificate two"]
        ));
        registry.remove(second.id);
        assert_eq!(
            registry.pick("10.0.0.8:1").ok().map(|b| b.id),
            Some(first.id)
        );
    }
}
