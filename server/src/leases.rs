//! This server's Lease: created, renewed every --lease-renew-interval, deleted when the server
//! drains; and the other servers' expired Leases, deleted so agents stop counting servers that
//! died without deleting theirs. Names, holder and labels are upstream's, so agents of either
//! implementation count servers of both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use tokio_util::sync::CancellationToken;

use crate::config::LeaseSettings;
use crate::metrics::{LeaseCall, Metrics};

/// How soon a failed renewal is tried again.
const RETRY: Duration = Duration::from_secs(1);

pub struct LeaseController {
    api: Api<Lease>,
    name: String,
    holder: String,
    settings: LeaseSettings,
    selector: String,
    metrics: Arc<Metrics>,
}

impl LeaseController {
    pub fn new(
        client: kube::Client,
        server_id: &str,
        settings: LeaseSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let selector = settings
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        LeaseController {
            api: Api::namespaced(client, &settings.namespace),
            name: format!("konnectivity-proxy-server-{server_id}"),
            holder: server_id.to_owned(),
            settings,
            selector,
            metrics,
        }
    }

    /// Renews and culls until `stop`, then deletes this server's Lease.
    pub async fn run(self, stop: CancellationToken) {
        let mut held: Option<Lease> = None;
        let mut failing = false;
        loop {
            match self.renew(held.take()).await {
                Ok(lease) => {
                    if failing {
                        tracing::info!(lease = self.name, "server lease renewed again");
                    }
                    failing = false;
                    held = Some(lease);
                }
                Err(err) => {
                    // Logged once per outage: a renewal is tried every second.
                    if !failing {
                        tracing::warn!(
                            lease = self.name,
                            namespace = self.settings.namespace,
                            error = tether_runtime::error_chain(&err),
                            "cannot renew the server lease; agents that count leases may stop counting this server"
                        );
                    }
                    failing = true;
                }
            }
            self.cull().await;
            let wait = if held.is_some() {
                self.settings.renew_interval
            } else {
                RETRY.min(self.settings.renew_interval)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => break,
            }
        }
        match self.api.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(lease = self.name, "server lease deleted"),
            Err(err) => tracing::warn!(
                lease = self.name,
                error = tether_runtime::error_chain(&err),
                "cannot delete the server lease; it lapses on its own"
            ),
        }
    }

    /// Writes the Lease with a fresh renewal time, over `held` (the version last written) or
    /// over what the API has. A conflict or a vanished Lease makes the next round read it anew.
    async fn renew(&self, held: Option<Lease>) -> Result<Lease, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let current = match held {
            Some(lease) => Some(lease),
            None => self.api.get_opt(&self.name).await?,
        };
        let duration = i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX);
        match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(self.settings.labels.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.holder.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        ..LeaseSpec::default()
                    }),
                };
                let created = self.api.create(&PostParams::default(), &lease).await?;
                tracing::info!(
                    lease = self.name,
                    namespace = self.settings.namespace,
                    "server lease created"
                );
                Ok(created)
            }
            Some(mut lease) => {
                lease
                    .metadata
                    .labels
                    .get_or_insert_default()
                    .extend(self.settings.labels.clone());
                let spec = lease.spec.get_or_insert_default();
                spec.holder_identity = Some(self.holder.clone());
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(now);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        }
    }

    /// Deletes every expired Lease with our labels, each only if nobody renewed it since it
    /// was listed.
    async fn cull(&self) {
        let started = Instant::now();
        let listed = self
            .api
            .list(&ListParams::default().labels(&self.selector))
            .await;
        let (status, reason) = tether_runtime::kube_client::outcome(&listed);
        self.metrics
            .lease_call(LeaseCall::List, status, &reason, started.elapsed());
        let Ok(listed) = listed else { return };
        let now = Timestamp::now();
        for lease in listed.items {
            if tether_runtime::leases::valid(&lease, now) {
                continue;
            }
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            let started = Instant::now();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.metadata.resource_version.clone(),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            let deleted = self.api.delete(&name, &params).await;
            let (status, reason) = tether_runtime::kube_client::outcome(&deleted);
            self.metrics
                .lease_call(LeaseCall::Delete, status, &reason, started.elapsed());
            if deleted.is_ok() {
                self.metrics.culled_leases.inc();
                tracing::info!(lease = name, "deleted an expired server lease");
            }
        }
    }
}
