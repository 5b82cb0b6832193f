//! The cluster's Nodes as `--bind-agent-identity=token` needs them: the addresses each Node's
//! status lists, listed and then watched.
//!
//! A kubelet may write its own Node's status (NodeRestriction allows it), so a rogue node can
//! list a victim's address as its own. An address more than one Node lists therefore belongs
//! to none of them as far as the server is concerned: no agent serves dials to it by that
//! address, whichever registered first (see `registry`). Knowing every Node also tells which
//! addresses belong to a node at all, so a dial for a node whose agent is away is refused
//! rather than handed to another node's agent.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

/// How long a failed list or watch waits before it tries again.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Nodes {
    state: RwLock<State>,
}

/// Empty until the first list arrives: nothing is refused for Nodes not yet seen.
#[derive(Default)]
struct State {
    addresses: HashMap<String, Vec<IpAddr>>,
    owners: HashMap<IpAddr, BTreeSet<String>>,
}

impl State {
    fn set(&mut self, name: &str, addresses: Vec<IpAddr>) {
        self.remove(name);
        for address in &addresses {
            self.owners
                .entry(*address)
                .or_default()
                .insert(name.to_owned());
        }
        self.addresses.insert(name.to_owned(), addresses);
    }

    fn remove(&mut self, name: &str) {
        for address in self.addresses.remove(name).unwrap_or_default() {
            if let Some(owners) = self.owners.get_mut(&address) {
                owners.remove(name);
                if owners.is_empty() {
                    self.owners.remove(&address);
                }
            }
        }
    }
}

/// The IP addresses a Node's status lists, in canonical form: an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.5`) is the IPv4 address it maps, as it is to the kernel that dials it and
/// to the registry, so a node cannot contest or claim an address by spelling it differently.
pub fn addresses_of(node: &Node) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|status| status.addresses.iter().flatten())
        .filter_map(|address| address.address.parse::<IpAddr>().ok())
        .map(|address| address.to_canonical())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

impl Nodes {
    /// The Nodes whose status lists `address` (in any spelling), by name, sorted.
    pub fn owners(&self, address: IpAddr) -> Vec<String> {
        self.read()
            .owners
            .get(&address.to_canonical())
            .map(|owners| owners.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The Node a dial's host belongs to, when one does: a Node's name, or an address its
    /// status lists (in any spelling).
    pub fn node_of(&self, host: &str) -> Option<String> {
        let state = self.read();
        if let Ok(address) = host.parse::<IpAddr>() {
            return state
                .owners
                .get(&address.to_canonical())?
                .iter()
                .next()
                .cloned();
        }
        let host = host.to_ascii_lowercase();
        state.addresses.contains_key(&host).then_some(host)
    }

    /// Lists the Nodes, then follows their changes until `stop`; lists again whenever the
    /// watch breaks.
    pub async fn follow(&self, api: Api<Node>, stop: CancellationToken) {
        loop {
            let result = tokio::select! {
                result = self.list_and_watch(&api) => result,
                () = stop.cancelled() => return,
            };
            if let Err(err) = result {
                tracing::warn!(error = %tether_runtime::error_chain(&err), "cannot follow Nodes; retrying (claims of addresses two Nodes list are not refused until then)");
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn list_and_watch(&self, api: &Api<Node>) -> Result<(), kube::Error> {
        let list = api.list(&ListParams::default()).await?;
        let mut version = list.metadata.resource_version.clone().unwrap_or_default();
        {
            let mut state = self.write();
            *state = State::default();
            for node in &list.items {
                state.set(&node.name_any(), addresses_of(node));
            }
        }
        loop {
            let params = WatchParams::default().timeout(290);
            let mut events = api.watch(&params, &version).await?.boxed();
            while let Some(event) = events.next().await {
                match event? {
                    WatchEvent::Added(node) | WatchEvent::Modified(node) => {
                        version = node.meta().resource_version.clone().unwrap_or(version);
                        self.write().set(&node.name_any(), addresses_of(&node));
                    }
                    WatchEvent::Deleted(node) => {
                        version = node.meta().resource_version.clone().unwrap_or(version);
                        self.write().remove(&node.name_any());
                    }
                    WatchEvent::Bookmark(bookmark) => {
                        version = bookmark.metadata.resource_version;
                    }
                    // Expired version (410) and the like: list again.
                    WatchEvent::Error(_) => return Ok(()),
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
impl Nodes {
    /// A cache holding `nodes`, for tests.
    pub fn with(nodes: &[(&str, &[&str])]) -> Self {
        let cache = Nodes::default();
        {
            let mut state = cache.write();
            for (name, addresses) in nodes {
                state.set(name, addresses.iter().map(|a| a.parse().unwrap()).collect());
            }
        }
        cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_two_nodes_list_has_both_owners_until_one_lets_go() {
        let nodes = Nodes::with(&[
            ("node-a", &["10.0.0.5"]),
            ("rogue", &["10.0.0.5", "10.0.0.7"]),
        ]);
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(nodes.owners(a), ["node-a", "rogue"]);
        assert_eq!(nodes.node_of("10.0.0.7").as_deref(), Some("rogue"));
        assert_eq!(nodes.node_of("::ffff:10.0.0.7").as_deref(), Some("rogue"));
        assert_eq!(nodes.node_of("NODE-A").as_deref(), Some("node-a"));
        assert_eq!(nodes.node_of("10.9.9.9"), None);
        nodes
            .write()
            .set("rogue", vec!["10.0.0.7".parse().unwrap()]);
        assert_eq!(nodes.owners(a), ["node-a"]);
        nodes.write().remove("node-a");
        assert!(nodes.owners(a).is_empty());
        assert_eq!(nodes.node_of("node-a"), None);
    }

    #[test]
    fn a_nodes_addresses_are_read_as_the_kernel_dials_them() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rogue"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "::ffff:10.0.0.5"},
                {"type": "ExternalIP", "address": "fd00::5"},
                {"type": "InternalIP", "address": "10.0.0.5"},
                {"type": "Hostname", "address": "rogue"},
            ]},
        }))
        .unwrap();
        let expected: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        assert_eq!(addresses_of(&node), expected);
    }
}
