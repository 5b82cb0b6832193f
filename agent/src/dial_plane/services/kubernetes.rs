//! The Service map from the Kubernetes API: Services and their EndpointSlices, listed and then
//! watched, turned into ClusterIP:port/protocol → ready backends. What the kernel hooks steer
//! is rebuilt from the whole cache on every change, so a backend that goes away leaves the map
//! with the event that says so.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::{Client, Resource, ResourceExt};

use super::{Protocol, Service, ServiceMap};

/// The label an EndpointSlice names its Service with.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

fn protocol_of(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        // SCTP is not steered.
        _ => None,
    }
}

/// Every ClusterIP Service's ports and the ready endpoints of its slices.
pub fn service_map<'a>(
    services: impl IntoIterator<Item = &'a KubeService>,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
) -> ServiceMap {
    let mut map = ServiceMap::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let namespace = service.namespace().unwrap_or_default();
        let name = service.name_any();
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let own_slices: Vec<&EndpointSlice> = slices
            .clone()
            .into_iter()
            .filter(|s| {
                s.namespace().unwrap_or_default() == namespace
                    && s.labels().get(SERVICE_LABEL) == Some(&name)
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            let Some(protocol) = protocol_of(port.protocol.as_deref()) else {
                continue;
            };
            for ip in &cluster_ips {
                let Ok(service_port) = u16::try_from(port.port) else {
                    continue;
                };
                let mut backends = Vec::new();
                for slice in &own_slices {
                    // A slice's port is the Service port's by name (unnamed when only one).
                    let Some(target) = slice.ports.iter().flatten().find_map(|p| {
                        (p.name == port.name
                            && protocol_of(p.protocol.as_deref()) == Some(protocol))
                        .then_some(p.port)
                        .flatten()
                    }) else {
                        continue;
                    };
                    let Ok(target) = u16::try_from(target) else {
                        continue;
                    };
                    for endpoint in &slice.endpoints {
                        let ready = endpoint
                            .conditions
                            .as_ref()
                            .and_then(|c| c.ready)
                            .unwrap_or(true);
                        if !ready {
                            continue;
                        }
                        backends.extend(
                            endpoint
                                .addresses
                                .iter()
                                .filter_map(|a| a.parse::<IpAddr>().ok())
                                .filter(|a| a.is_ipv4() == ip.is_ipv4())
                                .map(|a| SocketAddr::new(a, target)),
                        );
                    }
                }
                backends.sort();
                backends.dedup();
                map.insert(
                    Service {
                        addr: SocketAddr::new(*ip, service_port),
                        protocol,
                    },
                    backends,
                );
            }
        }
    }
    map
}

/// A cache of one resource kind, kept by listing and then watching; re-lists when the watch
/// falls too far behind.
struct Cache<K> {
    api: Api<K>,
    items: BTreeMap<String, K>,
    version: String,
}

fn key<K: Resource>(item: &K) -> String {
    format!(
        "{}/{}",
        item.meta().namespace.clone().unwrap_or_default(),
        item.meta().name.clone().unwrap_or_default()
    )
}

impl<K> Cache<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    async fn list(&mut self) -> Result<(), kube::Error> {
        let list = self.api.list(&ListParams::default()).await?;
        self.version = list.metadata.resource_version.clone().unwrap_or_default();
        self.items = list.items.into_iter().map(|i| (key(&i), i)).collect();
        Ok(())
    }
}

/// Lists and watches Services and EndpointSlices in every namespace and calls `apply` with the
/// whole map after the first list and after every change. Returns only on an error the caller
/// should log and retry.
pub async fn follow(
    client: Client,
    mut apply: impl FnMut(ServiceMap) + Send,
) -> Result<(), kube::Error> {
    let mut services = Cache::<KubeService> {
        api: Api::all(client.clone()),
        items: BTreeMap::new(),
        version: String::new(),
    };
    let mut slices = Cache::<EndpointSlice> {
        api: Api::all(client),
        items: BTreeMap::new(),
        version: String::new(),
    };
    services.list().await?;
    slices.list().await?;
    apply(service_map(services.items.values(), slices.items.values()));
    let params = WatchParams::default().timeout(290);
    loop {
        let service_events = services
            .api
            .watch(&params, &services.version)
            .await?
            .boxed();
        let slice_events = slices.api.watch(&params, &slices.version).await?.boxed();
        let mut events = futures_util::stream::select(
            service_events.map_ok(|e| Either::Service(Box::new(e))),
            slice_events.map_ok(|e| Either::Slice(Box::new(e))),
        );
        while let Some(event) = events.try_next().await? {
            let changed = match event {
                Either::Service(event) => apply_event(&mut services, *event),
                Either::Slice(event) => apply_event(&mut slices, *event),
            };
            match changed {
                Changed::Yes => {
                    apply(service_map(services.items.values(), slices.items.values()));
                }
                Changed::No => {}
                Changed::Relist => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    services.list().await?;
                    slices.list().await?;
                    apply(service_map(services.items.values(), slices.items.values()));
                    break;
                }
            }
        }
    }
}

enum Either {
    Service(Box<WatchEvent<KubeService>>),
    Slice(Box<WatchEvent<EndpointSlice>>),
}

enum Changed {
    Yes,
    No,
    /// The watch's version is gone (410): list again.
    Relist,
}

fn apply_event<K: Resource>(cache: &mut Cache<K>, event: WatchEvent<K>) -> Changed {
    let version = |item: &K| item.meta().resource_version.clone().unwrap_or_default();
    match event {
        WatchEvent::Added(item) | WatchEvent::Modified(item) => {
            cache.version = version(&item);
            cache.items.insert(key(&item), item);
            Changed::Yes
        }
        WatchEvent::Deleted(item) => {
            cache.version = version(&item);
            cache.items.remove(&key(&item));
            Changed::Yes
        }
        WatchEvent::Bookmark(bookmark) => {
            cache.version = bookmark.metadata.resource_version;
            Changed::No
        }
        WatchEvent::Error(_) => Changed::Relist,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(json: serde_json::Value) -> KubeService {
        serde_json::from_value(json).unwrap()
    }

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn ready_endpoints_of_a_services_slices_become_its_backends() {
        let services = [
            service(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "protocol": "UDP"}]}
            })),
            // Headless: nothing to steer.
            service(serde_json::json!({
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
            })),
        ];
        let slices = [
            slice(serde_json::json!({
                "metadata": {"name": "web-a", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                          {"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": [
                    {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.2.7"], "conditions": {"ready": false}},
                    {"addresses": ["10.244.3.9"]}
                ]
            })),
            // Same name, another namespace: not this Service's.
            slice(serde_json::json!({
                "metadata": {"name": "web-b", "namespace": "other",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 9999, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.9.9"]}]
            })),
        ];
        let map = service_map(services.iter(), slices.iter());
        let text: Vec<String> = map
            .iter()
            .map(|(s, b)| {
                let list: Vec<String> = b.iter().map(ToString::to_string).collect();
                format!("{s} {}", list.join(" "))
            })
            .collect();
        assert_eq!(
            text,
            [
                "10.96.0.10:53/udp 10.244.1.5:5353 10.244.3.9:5353",
                "10.96.0.10:80/tcp 10.244.1.5:8080 10.244.3.9:8080",
            ]
        );
    }
}
