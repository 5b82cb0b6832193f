//! The servers' Leases, listed and then watched, counted when the client set asks how many
//! servers there are. Validity is judged at each count, so a server that died without deleting
//! its Lease stops counting when the Lease lapses, with or without a watch event.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};

use crate::config::LeaseCount;
use crate::metrics::Metrics;

/// How soon a failed list is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How long one watch runs before it is renewed (kube-apiserver ends it near this anyway).
const WATCH_SECONDS: u32 = 290;

#[derive(Default)]
pub struct LeaseCounter {
    /// `None` until the first list: the count is then unknown, not 0.
    leases: Mutex<Option<BTreeMap<String, Lease>>>,
}

impl LeaseCounter {
    /// Valid Leases now, at least 1; `None` before the Leases were first listed.
    pub fn count(&self) -> Option<u32> {
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let now = Timestamp::now();
        leases.as_ref().map(|leases| {
            let valid = leases
                .values()
                .filter(|lease| tether_runtime::leases::valid(lease, now))
                .count();
            u32::try_from(valid).unwrap_or(u32::MAX).max(1)
        })
    }

    fn replace(&self, leases: BTreeMap<String, Lease>) {
        *self.leases.lock().unwrap_or_else(|p| p.into_inner()) = Some(leases);
    }

    fn apply(&self, event: WatchEvent<Lease>) -> Option<String> {
        let mut guard = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let leases = guard.get_or_insert_default();
        match event {
            WatchEvent::Added(lease) | WatchEvent::Modified(lease) => {
                let version = lease.metadata.resource_version.clone();
                if let Some(name) = lease.metadata.name.clone() {
                    leases.insert(name, lease);
                }
                version
            }
            WatchEvent::Deleted(lease) => {
                if let Some(name) = &lease.metadata.name {
                    leases.remove(name);
                }
                lease.metadata.resource_version
            }
            WatchEvent::Bookmark(bookmark) => Some(bookmark.metadata.resource_version),
            WatchEvent::Error(_) => None,
        }
    }

    /// Lists, then watches from the list's version; lists again after any error or a watch
    /// the API server says is too old. Runs until the task is dropped.
    pub async fn follow(
        self: Arc<Self>,
        client: kube::Client,
        settings: LeaseCount,
        metrics: Arc<Metrics>,
    ) {
        let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
        let mut failing = false;
        loop {
            let started = Instant::now();
            let listed = api
                .list(&ListParams::default().labels(&settings.selector))
                .await;
            let (status, reason) = tether_runtime::kube_client::outcome(&listed);
            metrics.lease_list(status, &reason, started.elapsed());
            let listed = match listed {
                Ok(listed) => listed,
                Err(err) => {
                    if !failing {
                        tracing::warn!(
                            namespace = settings.namespace,
                            selector = settings.selector,
                            error = tether_runtime::error_chain(&err),
                            "cannot list the server leases; the last count stands"
                        );
                    }
                    failing = true;
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            if failing {
                tracing::info!("server leases listed again");
            }
            failing = false;
            let mut version = listed.metadata.resource_version.clone().unwrap_or_default();
            self.replace(
                listed
                    .items
                    .into_iter()
                    .filter_map(|lease| Some((lease.metadata.name.clone()?, lease)))
                    .collect(),
            );
            // Watch until the API server says the version is gone or the watch fails.
            loop {
                let params = WatchParams::default()
                    .labels(&settings.selector)
                    .timeout(WATCH_SECONDS);
                let watched = api.watch(&params, &version).await;
                let (status, reason) = tether_runtime::kube_client::outcome(&watched);
                metrics.lease_watch(status, &reason);
                let Ok(stream) = watched else {
                    // Listing may work where watching does not (RBAC without watch): not a
                    // list and a refused watch back to back, forever.
                    tokio::time::sleep(RETRY).await;
                    break;
                };
                let mut stream = stream.boxed();
                let started = Instant::now();
                let mut expired = false;
                while let Ok(Some(event)) = stream.try_next().await {
                    if let WatchEvent::Error(status) = &event {
                        // 410 Gone: the version is too old to resume from; list again.
                        expired = status.code == 410;
                        break;
                    }
                    if let Some(next) = self.apply(event) {
                        version = next;
                    }
                }
                if expired {
                    break;
                }
                // A watch the API server ends at once is not renewed at once.
                if started.elapsed() < RETRY {
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    use super::*;

    fn lease(name: &str, renewed_ago: i64) -> Lease {
        let renewed = Timestamp::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(renewed_ago))
            .unwrap();
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(30),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn counts_valid_leases_as_events_arrive() {
        let counter = LeaseCounter::default();
        assert_eq!(counter.count(), None, "unknown before the first list");
        counter.replace(BTreeMap::new());
        assert_eq!(
            counter.count(),
            Some(1),
            "no valid lease counts as one server"
        );
        for name in ["a", "b", "c"] {
            assert_eq!(
                counter.apply(WatchEvent::Added(lease(name, 1))),
                Some("7".into())
            );
        }
        counter.apply(WatchEvent::Added(lease("lapsed", 31)));
        assert_eq!(counter.count(), Some(3));
        counter.apply(WatchEvent::Deleted(lease("b", 1)));
        assert_eq!(counter.count(), Some(2));
        counter.apply(WatchEvent::Modified(lease("a", 40)));
        assert_eq!(counter.count(), Some(1), "a lapsed Lease stops counting");
    }
}
