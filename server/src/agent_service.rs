//! `AgentService/Connect`: one call per agent stream. Validates the agent's metadata, answers
//! with `serverid`/`servercount` headers at once (before any packet, as upstream agents wait
//! for them), registers the stream and runs its receive loop.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;
use tether_proto::Packet;
use tether_proto::agent::agent_service_server::AgentService;
use tether_proto::identifiers::Identifiers;
use tether_proto::metadata;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::agent_stream::AgentStream;
use crate::connection::{Connections, Settings};
use crate::identity::{self, Binding, StreamLimit, Vouched};
use crate::listen::ConnInfo;
use crate::metrics::Metrics;
use crate::outbox::{CONTROL_LIMIT, Outbox};
use crate::registry::Registry;
use crate::token_auth::TokenAuth;

/// How long a stopping server gives an agent stream to take its last packets.
const FINISH: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Agents {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub server_id: String,
    pub server_count: u32,
    /// DATA packets that may wait toward one agent.
    pub queue_packets: usize,
    /// Every agent stream's connections work with these (flow control as each agent offers).
    pub settings: Settings,
    /// Set when agents authenticate with service-account tokens.
    pub token_auth: Option<Arc<TokenAuth>>,
    /// What agents' claims are checked against.
    pub binding: Binding,
    /// Agent streams per identity.
    pub streams: StreamLimit,
    /// Each agent stream's receive loop is tracked, so a drain can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the server stops: receive loops end and their connections close.
    pub shutdown: CancellationToken,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Agents {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let peer = conn.as_ref().map(|c| c.peer);
        let (agent_id, identifiers) = self.validate(&request).inspect_err(|status| {
            self.metrics.reject("agent_metadata");
            tracing::warn!(peer = ?peer, error = status.message(), "rejected agent stream");
        })?;
        // Before any response header: an agent learns nothing about the server until it is in.
        let mut node = None;
        if let Some(auth) = &self.token_auth {
            match auth
                .authenticate(request.metadata(), peer.map(|p| p.ip()))
                .await
            {
                Ok(who) => {
                    tracing::debug!(agent = %agent_id, user = who.user, node = ?who.node, "agent token authenticated");
                    node = who.node;
                }
                Err(err) if err.is_overload() => {
                    self.metrics.reject("agent_auth_busy");
                    tracing::warn!(peer = ?peer, agent = %agent_id, error = %err, "agent stream refused for now");
                    return Err(Status::unavailable(err.to_string()));
                }
                Err(err) => {
                    self.metrics.reject("agent_auth");
                    tracing::warn!(peer = ?peer, agent = %agent_id, error = %tether_runtime::error_chain(&err), "rejected agent stream");
                    return Err(Status::unauthenticated(err.to_string()));
                }
            }
        }
        let refused = |status: Status| {
            self.metrics.reject("agent_identity");
            tracing::warn!(peer = ?peer, agent = %agent_id, error = status.message(), "rejected agent stream: its claims do not match its credential");
            status
        };
        let vouched = self
            .vouch(conn.as_ref(), node.as_deref())
            .map_err(refused)?;
        let identity = vouched
            .as_ref()
            .map_or_else(|| format!("agent {agent_id}"), |v| v.label.clone());
        // Before any further call to kube-apiserver: an identity at its limit costs nothing.
        let Some(slot) = self.streams.take(&identity) else {
            self.metrics.reject("agent_identity_streams");
            tracing::warn!(peer = ?peer, agent = %agent_id, identity, limit = self.streams.max(), "rejected agent stream: its identity holds its limit of streams");
            return Err(Status::resource_exhausted(format!(
                "{identity} already holds {} agent streams (--max-agent-streams-per-identity)",
                self.streams.max()
            )));
        };
        if let Some(vouched) = vouched {
            self.check_claims(&agent_id, &identifiers, vouched, node.as_deref())
                .await
                .map_err(refused)?;
        }
        let flow_control = request
            .metadata()
            .get(metadata::FLOW_CONTROL)
            .is_some_and(|v| v == "1");
        let (outbox, outbound) = Outbox::new(self.queue_packets, CONTROL_LIMIT);
        let connections = Connections::new(
            outbox.clone(),
            Settings {
                flow_control,
                ..self.settings
            },
            self.metrics.clone(),
            self.tracker.clone(),
        );
        for (address, others) in self.registry.conflicts(&identity, &identifiers) {
            let nodes = others.iter().any(|o| o.starts_with("node "));
            self.metrics
                .address_conflict(if nodes { "nodes" } else { "identities" });
            tracing::warn!(
                peer = ?peer,
                agent = %agent_id,
                identity,
                %address,
                also_claimed_by = ?others,
                "an agent claims an address that is not its node's alone: dials to it are served by no agent until one claim is withdrawn (a node may write addresses into its own Node status)"
            );
        }
        let agent_stream = AgentStream::new(
            agent_id,
            identifiers,
            identity,
            outbox,
            connections,
            self.metrics.clone(),
        );
        tracing::info!(
            agent_stream = agent_stream.id,
            agent = %agent_stream.agent_id,
            peer = ?peer,
            identifiers = ?agent_stream.identifiers,
            "agent connected"
        );
        self.registry.add(agent_stream.clone());
        if let Some(conn) = &conn {
            conn.prove();
        }
        let gauge = self.metrics.grpc_connections("Connect");
        gauge.inc();

        let mut inbound = request.into_inner();
        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        let receiver = agent_stream.clone();
        let shutdown = self.shutdown.clone();
        // The connection counts as busy (not idle) while this stream lives.
        let busy = conn.map(|c| c.stream());
        self.tracker.spawn(async move {
            let _held = (busy, slot);
            // Made once, not per packet: each registers a waiter, and re-making them would
            // lock and unlock twice for every packet.
            let closed = receiver.wait_closed();
            let stopping = shutdown.cancelled();
            tokio::pin!(closed, stopping);
            let end = loop {
                let message = tokio::select! {
                    biased;
                    message = inbound.message() => message,
                    () = &mut closed => {
                        break "disconnected: it did not read what it was sent".to_owned();
                    }
                    () = &mut stopping => {
                        receiver.finish(FINISH).await;
                        break "the server is shutting down".to_owned();
                    }
                };
                match message {
                    Ok(Some(packet)) => {
                        if let Some(pressure) = receiver.handle(packet) {
                            receiver.relieve(pressure).await;
                        }
                    }
                    Ok(None) => break "agent closed the stream".to_owned(),
                    Err(status) => {
                        metrics.reject("agent_stream_error");
                        metrics.stream_error("from_agent", status.code());
                        break format!("{} ({:?})", status.message(), status.code());
                    }
                }
            };
            tracing::info!(agent_stream = receiver.id, agent = %receiver.agent_id, reason = end, "agent disconnected");
            registry.remove(receiver.id);
            receiver.shut_down();
            gauge.dec();
        });

        let metrics = self.metrics.clone();
        let outbound = outbound.map(move |packet: Packet| {
            metrics.packet("to_agent", packet.type_name());
            Ok(packet)
        });
        let mut response = Response::new(Box::pin(outbound) as PacketStream);
        let headers = response.metadata_mut();
        headers.insert(
            metadata::SERVER_ID,
            MetadataValue::try_from(self.server_id.as_str())
                .map_err(|_| Status::internal("server ID is not a valid header value"))?,
        );
        headers.insert(
            metadata::SERVER_COUNT,
            MetadataValue::from(self.server_count),
        );
        // Accepting the offer is what turns WINDOW accounting on at both ends.
        if flow_control {
            headers.insert(metadata::FLOW_CONTROL, MetadataValue::from_static("1"));
        }
        Ok(response)
    }
}

impl Agents {
    /// What the agent's credential vouches for, as far as it is known without asking
    /// kube-apiserver (a token-bound node's addresses come later); `None` when claims are
    /// not bound.
    fn vouch(
        &self,
        conn: Option<&ConnInfo>,
        node: Option<&str>,
    ) -> Result<Option<Vouched>, Status> {
        match self.binding {
            Binding::Off => Ok(None),
            Binding::Certificate => {
                let Some(names) = conn.and_then(|c| c.client.as_deref()) else {
                    return Err(Status::permission_denied(
                        "--bind-agent-identity=certificate: the agent presented no client certificate",
                    ));
                };
                Ok(Some(Vouched::certificate(names)))
            }
            Binding::Token => {
                let Some(node) = node else {
                    return Err(Status::permission_denied(
                        "--bind-agent-identity=token: the agent's token is not bound to a pod on a node (use a projected service-account token; Kubernetes 1.30+ names the node)",
                    ));
                };
                Ok(Some(Vouched::node(node, Vec::new())))
            }
        }
    }

    /// Checks the agent's claims against what its credential vouches for, reading a
    /// token-bound node's addresses when it claims any.
    async fn check_claims(
        &self,
        agent_id: &str,
        identifiers: &Identifiers,
        mut vouched: Vouched,
        node: Option<&str>,
    ) -> Result<(), Status> {
        if let (Binding::Token, Some(auth), Some(node)) = (self.binding, &self.token_auth, node)
            && identity::claims_addresses(identifiers)
        {
            vouched.addresses = auth
                .node_addresses(node)
                .await
                .map_err(|err| Status::unavailable(err.to_string()))?;
        }
        identity::check(agent_id, identifiers, &vouched)
            .map_err(|mismatch| Status::permission_denied(mismatch.to_string()))
    }

    fn validate(
        &self,
        request: &Request<Streaming<Packet>>,
    ) -> Result<(String, Identifiers), Status> {
        let md = request.metadata();
        let ids: Vec<_> = md.get_all(metadata::AGENT_ID).iter().collect();
        let [agent_id] = ids.as_slice() else {
            return Err(Status::unknown(format!(
                "expected one agent ID in the context, got {}",
                ids.len()
            )));
        };
        let agent_id = agent_id
            .to_str()
            .map_err(|_| Status::unknown("agent ID is not printable ASCII"))?
            .to_owned();
        let idents: Vec<_> = md.get_all(metadata::AGENT_IDENTIFIERS).iter().collect();
        let identifiers = match idents.as_slice() {
            [] => Identifiers::default(),
            [one] => {
                let text = one
                    .to_str()
                    .map_err(|_| Status::unknown("agent identifiers are not printable ASCII"))?;
                Identifiers::parse(text).map_err(|err| Status::unknown(err.to_string()))?
            }
            more => {
                return Err(Status::unknown(format!(
                    "expected at most one set of agent identifiers, got {}",
                    more.len()
                )));
            }
        };
        Ok((agent_id, identifiers))
    }
}
