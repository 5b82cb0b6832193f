//! The agent's demultiplexer fed what a hostile or broken server could send: dials (to a real
//! loopback echo server the dial policy allows, or anywhere else, which it refuses), DATA,
//! FINs, WINDOW grants, CLOSE_REQs and DIAL_CLS for IDs real and invented, and raw packets.
//! Whatever comes, the agent must not panic; each dial it answers once; each connection it
//! established it closes at most once, sends nothing on after closing, and none survives the
//! stream's end.
#![no_main]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tether_agent::dial_plane::policy::{DialPolicy, Ports, Target};
use tether_agent::metrics::Metrics;
use tether_agent::tunnel::scheduler::Scheduler;
use tether_agent::tunnel::server_stream::{Limits, ServerStream};
use tether_proto::cidr::Cidr;
use tether_proto::{Message, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Arbitrary, Debug)]
enum Op {
    /// To the echo server when `to_echo`, else to `address` as written (never a DNS name).
    Dial {
        to_echo: bool,
        address: String,
        random: u8,
        tcp: bool,
    },
    CloseDial(u8),
    Data(u8, Vec<u8>),
    /// An empty DATA: a half-close toward the destination when flow control is on.
    Fin(u8),
    Window(u8, i64),
    CloseRequest(u8),
    Raw(Vec<u8>),
    /// Lets dials, destinations and the stream make progress.
    Settle,
}

#[derive(Arbitrary, Debug)]
struct Input {
    flow_control: bool,
    ops: Vec<Op>,
}

/// Reads a little of what each connection sends and echoes it, then closes: real
/// destinations that answer, finish and go away.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                if let Ok(n @ 1..) = stream.read(&mut buf).await {
                    let _ = stream.write_all(&buf[..n]).await;
                }
            });
        }
    });
    addr
}

/// Addresses the fuzzer writes reach the dial policy only as literals: a name would go to DNS.
fn literal_or_unresolvable(address: String) -> String {
    if address.parse::<SocketAddr>().is_ok() || !address.contains(':') {
        address
    } else {
        "unresolvable".to_owned()
    }
}

async fn run(input: Input) {
    let echo = echo_server().await;
    let allow = Target {
        prefix: Cidr {
            addr: echo.ip(),
            len: 32,
        },
        ports: Ports {
            first: echo.port(),
            last: echo.port(),
        },
    };
    let limits = Arc::new(Limits {
        dial_timeout: Duration::from_millis(200),
        conn_queue_bytes: 4096,
        stream_buffer_bytes: 16 * 1024,
        stall_timeout: Duration::from_millis(20),
        max_pending_dials: 4,
        max_connections: 8,
        dial_policy: Arc::new(DialPolicy::new(&[allow], &[], Vec::new())),
    });
    let scheduler = Arc::new(Scheduler::new());
    let stream = ServerStream::new(
        "fuzz".into(),
        input.flow_control,
        scheduler.clone(),
        Arc::new(AtomicBool::new(false)),
        limits,
        Arc::new(Metrics::new()),
        tokio_util::task::TaskTracker::new(),
    );
    let sent = tokio::spawn({
        let scheduler = scheduler.clone();
        async move {
            let mut sent = Vec::new();
            while let Some(packet) = scheduler.next().await {
                sent.push(packet);
            }
            sent
        }
    });
    let mut randoms: HashMap<i64, usize> = HashMap::new();
    for op in input.ops {
        let packet = match op {
            Op::Dial {
                to_echo,
                address,
                random,
                tcp,
            } => {
                let address = if to_echo {
                    echo.to_string()
                } else {
                    literal_or_unresolvable(address)
                };
                *randoms.entry(i64::from(random)).or_default() += 1;
                let mut packet = Packet::dial_request(address, i64::from(random));
                if !tcp && let Some(tether_proto::Payload::DialRequest(req)) = &mut packet.payload {
                    req.protocol = "udp".into();
                }
                packet
            }
            Op::CloseDial(random) => Packet::close_dial(i64::from(random)),
            Op::Data(id, data) => Packet::data(i64::from(id), Bytes::from(data)),
            Op::Fin(id) => Packet::data(i64::from(id), Bytes::new()),
            Op::Window(id, bytes) => Packet::window(i64::from(id), bytes),
            Op::CloseRequest(id) => Packet::close_request(i64::from(id)),
            Op::Raw(bytes) => match Packet::decode(&bytes[..]) {
                Ok(packet) => {
                    if let Message::DialRequest(_) = packet.clone().into_message() {
                        // Its address could be a name; the typed dial covers dials.
                        continue;
                    }
                    packet
                }
                Err(_) => continue,
            },
            Op::Settle => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
        };
        if let Some(pressure) = stream.handle(packet) {
            stream.relieve(pressure).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    stream.shut_down();
    assert_eq!(
        stream.open_connections(),
        0,
        "connections outlived the stream"
    );
    let sent = sent.await.expect("collector");
    check(&sent, &randoms);
}

/// What the agent sent must make sense to any server.
fn check(sent: &[Packet], randoms: &HashMap<i64, usize>) {
    let mut answers: HashMap<i64, usize> = HashMap::new();
    let mut established: HashMap<i64, bool> = HashMap::new();
    for packet in sent {
        match packet.clone().into_message() {
            Message::DialResponse(rsp) => {
                *answers.entry(rsp.random).or_default() += 1;
                if rsp.connect_id != 0 {
                    assert!(rsp.error.is_empty(), "a refused dial carries a connect ID");
                    let again = established.insert(rsp.connect_id, false);
                    assert!(
                        again.is_none(),
                        "connect ID {} issued twice",
                        rsp.connect_id
                    );
                } else {
                    assert!(!rsp.error.is_empty(), "a failed dial without an error");
                }
            }
            Message::Data(data) => {
                if let Some(closed) = established.get(&data.connect_id) {
                    assert!(
                        !closed,
                        "DATA on connection {} after its CLOSE_RSP",
                        data.connect_id
                    );
                }
            }
            Message::CloseResponse(rsp) => {
                if let Some(closed) = established.get_mut(&rsp.connect_id) {
                    if !rsp.error.eq_ignore_ascii_case("unknown connectID") {
                        assert!(!*closed, "connection {} closed twice", rsp.connect_id);
                    }
                    *closed = true;
                }
            }
            Message::DialRequest(_) | Message::CloseRequest(_) => {
                panic!("the agent sent a server's packet: {packet:?}")
            }
            _ => {}
        }
    }
    for (random, count) in answers {
        assert!(
            randoms.contains_key(&random),
            "answered dial {random}, which was never asked"
        );
        if randoms.get(&random) == Some(&1) {
            assert_eq!(count, 1, "dial {random} answered {count} times");
        }
    }
}

fuzz_target!(|input: Input| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(input));
});
