//! The server's handling of one agent stream, fed what a hostile or broken agent could send
//! (answers to dials real and invented, DATA, CLOSE_RSP, DIAL_CLS, WINDOW, DRAIN, raw
//! packets) while frontends dial, send, half-close, close, leave and read. Whatever comes, the
//! server must not panic or send an agent's packet types, and once the stream ends no connection
//! is left and every frontend hears that its connection is over.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tether_proto::identifiers::Identifiers;
use tether_proto::{Message, Packet};
use tether_server::agent_stream::AgentStream;
use tether_server::connection::{Connection, Connections, End, Settings, ToFrontend};
use tether_server::metrics::Metrics;
use tether_server::outbox::{CONTROL_LIMIT, Outbox};
use tokio_stream::StreamExt;

#[derive(Arbitrary, Debug)]
enum Op {
    // A frontend's doing; connections are picked by index, modulo how many there are.
    Open,
    Send(u8, Vec<u8>),
    Fin(u8),
    Close(u8),
    Leave(u8),
    /// The frontend takes one event and reports what it delivered.
    Take(u8),
    // The agent's doing; IDs are small so that they hit real ones.
    DialResponse {
        dial_id: u8,
        connect_id: u8,
        error: Option<String>,
    },
    Data(u8, Vec<u8>),
    CloseResponse(u8, String),
    CloseDial(u8),
    Window(u8, i64),
    Drain,
    Raw(Vec<u8>),
    Settle,
}

#[derive(Arbitrary, Debug)]
struct Input {
    flow_control: bool,
    ops: Vec<Op>,
}

const STEP: Duration = Duration::from_millis(1);

fn pick(connections: &[Arc<Connection>], index: u8) -> Option<&Arc<Connection>> {
    (!connections.is_empty()).then(|| &connections[usize::from(index) % connections.len()])
}

async fn run(input: Input) {
    let metrics = Arc::new(Metrics::new());
    let (outbox, mut to_agent) = Outbox::new(16, CONTROL_LIMIT);
    let settings = Settings {
        queue_bytes: 8192,
        buffer_bytes: 32 * 1024,
        stall_timeout: Duration::from_millis(20),
        dial_timeout: Some(Duration::from_millis(50)),
        flow_control: input.flow_control,
    };
    let connections = Connections::new(
        outbox.clone(),
        settings,
        metrics.clone(),
        tokio_util::task::TaskTracker::new(),
    );
    let agent_stream = AgentStream::new(
        "fuzz-agent".into(),
        Identifiers::default(),
        "agent fuzz-agent".into(),
        outbox,
        connections,
        metrics,
    );
    let sent = tokio::spawn(async move {
        let mut sent = Vec::new();
        while let Some(packet) = to_agent.next().await {
            sent.push(packet);
        }
        sent
    });
    let mut open: Vec<Arc<Connection>> = Vec::new();
    for op in input.ops {
        let from_agent = match op {
            Op::Open => {
                let connection = agent_stream.open(open.len() as i64 + 1);
                let _ = tokio::time::timeout(STEP, connection.dial("10.0.0.1:10250")).await;
                open.push(connection);
                continue;
            }
            Op::Send(i, data) => {
                if let Some(t) = pick(&open, i) {
                    let _ = tokio::time::timeout(STEP, t.send_data(Bytes::from(data))).await;
                }
                continue;
            }
            Op::Fin(i) => {
                if let Some(t) = pick(&open, i) {
                    let _ = tokio::time::timeout(STEP, t.send_fin()).await;
                }
                continue;
            }
            Op::Close(i) => {
                if let Some(t) = pick(&open, i) {
                    let _ =
                        tokio::time::timeout(STEP, t.end_from_frontend(End::FrontendClose)).await;
                }
                continue;
            }
            Op::Leave(i) => {
                if let Some(t) = pick(&open, i) {
                    let _ =
                        tokio::time::timeout(STEP, t.end_from_frontend(End::FrontendGone)).await;
                }
                continue;
            }
            Op::Take(i) => {
                if let Some(t) = pick(&open, i)
                    && let Ok(Some(ToFrontend::Data(bytes))) =
                        tokio::time::timeout(STEP, t.mailbox.pop()).await
                {
                    t.delivered(bytes.len());
                }
                continue;
            }
            Op::DialResponse {
                dial_id,
                connect_id,
                error,
            } => Packet::dial_response(
                i64::from(dial_id),
                i64::from(connect_id),
                error.unwrap_or_default(),
            ),
            Op::Data(id, data) => Packet::data(i64::from(id), Bytes::from(data)),
            Op::CloseResponse(id, error) => Packet::close_response(i64::from(id), error),
            Op::CloseDial(id) => Packet::close_dial(i64::from(id)),
            Op::Window(id, bytes) => Packet::window(i64::from(id), bytes),
            Op::Drain => Packet::drain(),
            Op::Raw(bytes) => match Packet::decode(&bytes[..]) {
                Ok(packet) => packet,
                Err(_) => continue,
            },
            Op::Settle => {
                tokio::time::sleep(STEP).await;
                continue;
            }
        };
        if let Some(pressure) = agent_stream.handle(from_agent) {
            let _ = tokio::time::timeout(STEP * 5, agent_stream.relieve(pressure)).await;
        }
    }
    agent_stream.shut_down();
    assert_eq!(
        agent_stream.connections(),
        0,
        "connections outlived their agent stream"
    );
    for connection in &open {
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(event) = connection.mailbox.pop().await {
                if matches!(
                    event,
                    ToFrontend::Closed { .. } | ToFrontend::DialFailed { .. }
                ) {
                    break;
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "a frontend was never told its connection ended"
        );
    }
    for packet in sent.await.expect("collector") {
        let message = packet.into_message();
        assert!(
            !matches!(
                message,
                Message::DialResponse(_) | Message::CloseResponse(_) | Message::Drain
            ),
            "the server sent an agent's packet: {message:?}"
        );
    }
}

fuzz_target!(|input: Input| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(input));
});
