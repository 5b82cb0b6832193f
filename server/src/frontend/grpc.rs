//! `ProxyService/Proxy`: kube-apiserver's gRPC frontend. One dial per stream; many streams per
//! HTTP/2 connection.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use tether_proto::proxy::proxy_service_server::ProxyService;
use tether_proto::{Message, Packet};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{DialCause, FrontendConn, ToFrontend};
use crate::backends::{Backend, Backends};
use crate::metrics::Metrics;

pub struct Frontends {
    pub backends: Arc<Backends>,
    pub metrics: Arc<Metrics>,
    pub queue_bytes: usize,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

#[tonic::async_trait]
impl ProxyService for Frontends {
    type ProxyStream = PacketStream;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
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
        let tcp = dial.protocol.is_empty() || dial.protocol == "tcp";
        let backend = if tcp {
            self.backends.pick(&dial.address)
        } else {
            None
        };
        let conn = Arc::new(FrontendConn::new(
            dial.random,
            self.queue_bytes,
            backend.as_ref().map(|b| b.budget()),
        ));
        let refuse = |error: String| {
            let _ = conn.mailbox.push_control(ToFrontend::DialFailed {
                error,
                cause: DialCause::Refused,
            });
            conn.close();
        };
        if !tcp {
            self.metrics.reject("dial_protocol");
            refuse(format!(
                "unsupported protocol {:?}: only tcp is tunnelled",
                dial.protocol
            ));
            tokio::spawn(discard(inbound, self.metrics.clone()));
        } else if let Some(backend) = backend {
            let session = Session {
                backend,
                conn: conn.clone(),
                metrics: self.metrics.clone(),
            };
            tokio::spawn(session.run(dial.address, inbound));
        } else {
            self.metrics.dial_failure("no_agent");
            tracing::info!(address = dial.address, "no agent available for dial");
            refuse("No agent available".into());
            tokio::spawn(discard(inbound, self.metrics.clone()));
        }
        Ok(Response::new(Box::pin(outbound(
            conn,
            self.metrics.clone(),
        ))))
    }
}

/// Decrements the open-streams gauge when the response stream goes away.
struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The response stream: the connection's mailbox as packets, ending after the last event.
fn outbound(
    conn: Arc<FrontendConn>,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<Packet, Status>> + Send {
    let open = metrics.grpc_connections("Proxy");
    open.inc();
    // h2 asks for the next packet once it has taken the last one and the client's window has
    // room: the time between is how long writing a packet to this frontend took.
    futures_util::stream::unfold(
        (conn, metrics, Open(open), None::<Instant>),
        |(conn, metrics, open, handed)| async move {
            if let Some(handed) = handed {
                metrics
                    .frontend_write_duration
                    .observe(handed.elapsed().as_secs_f64());
            }
            let mut event = conn.mailbox.pop().await?;
            // A gRPC frontend has no half-close: the agent's FIN (empty DATA) becomes a close.
            while matches!(&event, ToFrontend::Data(data) if data.is_empty()) {
                conn.finish_without_half_close();
                event = conn.mailbox.pop().await?;
            }
            let packet = match event {
                ToFrontend::DialOk { connect_id } => {
                    Packet::dial_response(conn.random, connect_id, "")
                }
                ToFrontend::DialFailed { error, .. } => {
                    Packet::dial_response(conn.random, 0, error)
                }
                ToFrontend::Data(data) => {
                    // h2 asks for the next packet only when the client's window has room.
                    conn.progress.wrote(data.len());
                    conn.delivered(data.len());
                    Packet::data(conn.connect_id(), data)
                }
                ToFrontend::Closed { error } => Packet::close_response(conn.connect_id(), error),
                ToFrontend::DialClosed => Packet::close_dial(conn.random),
            };
            metrics.packet("to_client", packet.type_name());
            Some((Ok(packet), (conn, metrics, open, Some(Instant::now()))))
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

/// One dialled connection: forwards the frontend's packets to the agent.
struct Session {
    backend: Arc<Backend>,
    conn: Arc<FrontendConn>,
    metrics: Arc<Metrics>,
}

impl Session {
    async fn run(self, address: String, mut inbound: Streaming<Packet>) {
        let Ok(dial_id) = self.backend.dial(&address, &self.conn).await else {
            let _ = self.conn.mailbox.push_control(ToFrontend::DialFailed {
                error: "agent stream closed before the dial was sent".into(),
                cause: DialCause::Backend,
            });
            self.conn.close();
            return discard(inbound, self.metrics.clone()).await;
        };
        let mut closing = false;
        while let Some(packet) = next_packet(&mut inbound, &self.metrics).await {
            let message = packet.into_message();
            self.metrics.packet("from_client", message.type_name());
            if closing {
                continue;
            }
            match message {
                Message::Data(data) => {
                    let connect_id = self.conn.connect_id();
                    if data.connect_id == 0 {
                        self.metrics.reject("frontend_data_connect_id_zero");
                        continue;
                    }
                    if connect_id == 0 || data.connect_id != connect_id {
                        self.metrics.reject("frontend_data_mismatched_connect_id");
                        tracing::warn!(
                            frontend = self.conn.id,
                            expected = connect_id,
                            got = data.connect_id,
                            "frontend sent DATA for another connection; closing the stream"
                        );
                        let _ = self.conn.mailbox.push_control(ToFrontend::Closed {
                            error: "mismatched connection IDs".into(),
                        });
                        self.conn.close();
                        closing = true;
                        continue;
                    }
                    // An empty DATA would read as FIN to a tether agent; from a frontend it
                    // carries nothing, so it is not forwarded.
                    if data.data.is_empty() {
                        continue;
                    }
                    if self.backend.send_data(&self.conn, data.data).await.is_err() {
                        break;
                    }
                }
                Message::CloseRequest(_) => {
                    let connect_id = self.conn.connect_id();
                    if connect_id == 0 {
                        self.backend.cancel_dial(dial_id, "frontend_close");
                        self.conn.close();
                    } else if self.backend.close_request(connect_id).await.is_err() {
                        let _ = self.conn.mailbox.push_control(ToFrontend::Closed {
                            error: "CLOSE_REQ to backend failed".into(),
                        });
                        self.conn.close();
                    }
                    closing = true;
                }
                Message::CloseDial(_) => {
                    self.backend.cancel_dial(dial_id, "frontend_close");
                    self.conn.close();
                    closing = true;
                }
                other => {
                    self.metrics.reject("frontend_unexpected_packet");
                    tracing::debug!(
                        frontend = self.conn.id,
                        packet_type = other.type_name(),
                        "ignored packet from frontend"
                    );
                }
            }
        }
        // The frontend sends nothing more: release whatever it still held on the agent. After
        // a CLOSE_REQ the stream stays open for the agent's CLOSE_RSP, which ends it.
        let connect_id = self.conn.connect_id();
        if connect_id == 0 {
            self.backend.cancel_dial(dial_id, "frontend_close");
            self.conn.close();
        } else if !closing {
            self.backend.forget(connect_id);
            self.conn.close();
        }
    }
}
