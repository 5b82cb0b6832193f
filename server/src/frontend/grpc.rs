//! `ProxyService/Proxy`: kube-apiserver's gRPC frontend. One dial per stream; many streams per
//! HTTP/2 connection.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use tether_proto::proxy::proxy_service_server::ProxyService;
use tether_proto::{Message, Packet};
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::connection::{Connection, End, ToFrontend};
use crate::metrics::Metrics;
use crate::registry::Registry;

pub struct Frontends {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Each client stream's task is tracked, so a drain can wait for them.
    pub tracker: TaskTracker,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

#[tonic::async_trait]
impl ProxyService for Frontends {
    type ProxyStream = PacketStream;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let probe = request
            .metadata()
            .contains_key(tether_proto::metadata::PROBE);
        let mut inbound = request.into_inner();
        // The first packet must be the dial; everything else hangs off it.
        let first = match inbound.message().await {
            Ok(Some(packet)) => packet.into_message(),
            Ok(None) => return Err(Status::cancelled("stream ended before a DIAL_REQ")),
            Err(status) => {
                self.metrics.stream_error("from_client", status.code());
                return Err(status);
            }
        };
        self.metrics.packet("from_client", first.type_name());
        let Message::DialRequest(dial) = first else {
            self.metrics.reject("frontend_first_packet_not_dial");
            return Err(Status::invalid_argument(
                "the first packet on a Proxy stream must be DIAL_REQ",
            ));
        };
        // Cancelled when the response stream is dropped: the client reset the stream or left.
        let gone = CancellationToken::new();
        let open = Open::new(&self.metrics, &gone);
        let refusal = if !(dial.protocol.is_empty() || dial.protocol == "tcp") {
            self.metrics.reject("dial_protocol");
            format!(
                "unsupported protocol {:?}: only tcp is tunnelled",
                dial.protocol
            )
        } else {
            match self.registry.pick_or_wait(&dial.address).await {
                Ok(agent_stream) => {
                    let connection = agent_stream.open(dial.random);
                    let client = ClientStream {
                        connection: connection.clone(),
                        metrics: self.metrics.clone(),
                        gone,
                    };
                    self.tracker.spawn(client.run(dial.address, inbound));
                    let mut response =
                        Response::new(Box::pin(outbound(connection, self.metrics.clone(), open))
                            as PacketStream);
                    if probe
                        && let Ok(agent) =
                            tether_proto::metadata::probe_agent_value(&agent_stream.agent_id)
                                .parse()
                    {
                        response
                            .metadata_mut()
                            .insert(tether_proto::metadata::PROBE_AGENT, agent);
                    }
                    return Ok(response);
                }
                Err(refusal) => {
                    self.metrics.dial_failure("no_agent");
                    tracing::info!(address = dial.address, reason = %refusal, "no agent available for dial");
                    refusal.to_string()
                }
            }
        };
        // Upstream answers a refused dial and then waits for the client to close the stream.
        self.tracker.spawn(discard(inbound, self.metrics.clone()));
        let answer = Packet::dial_response(dial.random, 0, refusal);
        self.metrics.packet("to_client", answer.type_name());
        let answered = futures_util::stream::once(async move {
            let _open = open;
            Ok(answer)
        });
        Ok(Response::new(Box::pin(answered)))
    }
}

/// Counts an open `Proxy` stream until it is dropped, and then tells its [`ClientStream`].
struct Open {
    gauge: Gauge,
    _gone: DropGuard,
}

impl Open {
    fn new(metrics: &Metrics, gone: &CancellationToken) -> Self {
        let gauge = metrics.grpc_connections("Proxy");
        gauge.inc();
        Open {
            gauge,
            _gone: gone.clone().drop_guard(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The response stream: the connection's events as packets, ending after the last one.
fn outbound(
    connection: Arc<Connection>,
    metrics: Arc<Metrics>,
    open: Open,
) -> impl Stream<Item = Result<Packet, Status>> + Send {
    // h2 asks for the next packet once it has taken the last one and the client's window has
    // room: the time between is how long writing a packet to this frontend took.
    futures_util::stream::unfold(
        (connection, metrics, open, None::<Instant>),
        |(connection, metrics, open, handed)| async move {
            if let Some(handed) = handed {
                metrics
                    .frontend_write_duration
                    .observe(handed.elapsed().as_secs_f64());
            }
            let mut event = connection.mailbox.pop().await?;
            // A gRPC frontend has no half-close: the agent's FIN (empty DATA) asks the agent to
            // close, so its CLOSE_RSP ends the stream as upstream's EOF would.
            while matches!(&event, ToFrontend::Data(data) if data.is_empty()) {
                connection.end_from_frontend(End::FrontendClose).await;
                event = connection.mailbox.pop().await?;
            }
            let packet = match event {
                ToFrontend::DialOk { connect_id } => {
                    Packet::dial_response(connection.random, connect_id, "")
                }
                ToFrontend::DialFailed { error, .. } => {
                    Packet::dial_response(connection.random, 0, error)
                }
                ToFrontend::Data(data) => {
                    connection.progress.wrote(data.len());
                    connection.delivered(data.len());
                    Packet::data(connection.connect_id(), data)
                }
                ToFrontend::Closed { error } => {
                    Packet::close_response(connection.connect_id(), error)
                }
                ToFrontend::DialClosed => Packet::close_dial(connection.random),
            };
            metrics.packet("to_client", packet.type_name());
            Some((
                Ok(packet),
                (connection, metrics, open, Some(Instant::now())),
            ))
        },
    )
}

/// Reads the rest of a stream and drops it, so the client sees our answer and closes.
async fn discard(mut inbound: Streaming<Packet>, metrics: Arc<Metrics>) {
    while next_packet(&mut inbound, &metrics).await.is_some() {}
}

/// The client's next packet; `None` at the end of its stream or on an error (counted).
async fn next_packet(inbound: &mut Streaming<Packet>, metrics: &Metrics) -> Option<Packet> {
    match inbound.message().await {
        Ok(packet) => packet,
        Err(status) => {
            metrics.stream_error("from_client", status.code());
            None
        }
    }
}

/// One client's `Proxy` stream, which carries one connection: forwards its packets to the agent.
struct ClientStream {
    connection: Arc<Connection>,
    metrics: Arc<Metrics>,
    /// Cancelled once the response stream is gone.
    gone: CancellationToken,
}

impl ClientStream {
    async fn run(self, address: String, mut inbound: Streaming<Packet>) {
        if self.connection.dial(&address).await.is_err() {
            return discard(inbound, self.metrics).await;
        }
        // Set once the connection was ended from this side; the rest of the stream is read and
        // dropped.
        let mut ended = false;
        while let Some(packet) = next_packet(&mut inbound, &self.metrics).await {
            let message = packet.into_message();
            self.metrics.packet("from_client", message.type_name());
            if ended {
                continue;
            }
            match message {
                Message::Data(data) if data.connect_id == 0 => {
                    self.metrics.reject("frontend_data_connect_id_zero");
                }
                Message::Data(data) => {
                    let connect_id = self.connection.connect_id();
                    if data.connect_id != connect_id {
                        self.metrics.reject("frontend_data_mismatched_connect_id");
                        tracing::warn!(
                            connection = self.connection.id,
                            expected = connect_id,
                            got = data.connect_id,
                            "frontend sent DATA for another connection; closing the stream"
                        );
                        self.connection
                            .end_from_frontend(End::FrontendError {
                                error: "mismatched connection IDs".into(),
                            })
                            .await;
                        ended = true;
                        continue;
                    }
                    // An empty DATA would read as FIN to a tether agent; from a frontend it
                    // carries nothing, so it is not forwarded.
                    if data.data.is_empty() {
                        continue;
                    }
                    // Waiting for the agent's window (its destination may have stopped
                    // reading), this reads nothing from the client: its reset is seen here.
                    let sent = tokio::select! {
                        biased;
                        sent = self.connection.send_data(data.data) => sent,
                        () = self.gone.cancelled() => break,
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                Message::CloseRequest(_) => {
                    self.connection.end_from_frontend(End::FrontendClose).await;
                    ended = true;
                }
                Message::CloseDial(_) => {
                    self.connection.end_from_frontend(End::FrontendGone).await;
                    ended = true;
                }
                other => {
                    self.metrics.reject("frontend_unexpected_packet");
                    tracing::debug!(
                        connection = self.connection.id,
                        packet_type = other.type_name(),
                        "ignored packet from frontend"
                    );
                }
            }
        }
        // The client sends nothing more. After its CLOSE_REQ the stream stays open for the
        // agent's CLOSE_RSP; otherwise the connection is released.
        if !ended {
            self.connection.end_from_frontend(End::FrontendGone).await;
        }
    }
}
