//! Slow and stalled readers behind a peer without per-connection flow control (upstream
//! Konnectivity; here tether with the extension off). A reader that makes progress, however
//! slowly, gets every byte; one that takes nothing for the stall timeout is closed and the
//! others move again; memory stays within the stream's buffer budget.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tether_proto::Packet;
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination::{self, Received};
use tether_tests::frontend::{Event, GrpcTunnel, grpc_client, http_connect};
use tether_tests::process::{rss_kib, wait_until};
use tether_tests::procs::http_get;
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;
const TOTAL: u64 = 64 * MIB;
const RATE: u64 = 10 * MIB;
const BUDGET: usize = 8 << 20;
/// What HTTP/2 lets a peer send on a tunnel stream that is not being read (both ends advertise
/// 8 MiB), on top of the budget.
const HTTP2_WINDOW: u64 = 8 << 20;
/// Socket, TLS and allocator slack.
const MARGIN: u64 = 4 << 20;

fn metric(port: u16, name: &str) -> f64 {
    let (_, text) = http_get(port, "/metrics").unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The highest resident size of `pid` until the returned guard is dropped.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl PeakRss {
    fn watch(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PeakRss { peak, stop }
    }

    fn kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn cluster() -> Cluster {
    let budget = format!("--stream-buffer-bytes={BUDGET}");
    Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[&budget],
        &["--flow-control=false", &budget],
    )
    .unwrap()
}

/// Checks the reader got everything, that the stream really waited for it, and that the
/// process grew by less than its buffer budget plus what HTTP/2 buffers for a stream.
fn assert_slow_reader_served(received: Received, port: u16, prefix: &str, grew_kib: u64) {
    assert_eq!(
        received,
        Received {
            bytes: TOTAL,
            intact: true
        }
    );
    assert!(
        metric(port, &format!("{prefix}_stream_pauses_total")) > 0.0,
        "the stream never had to wait: the reader was not slow"
    );
    assert_eq!(metric(port, &format!("{prefix}_stalled_closes_total")), 0.0);
    let allowed = (BUDGET as u64 + HTTP2_WINDOW + MARGIN) / 1024;
    assert!(
        grew_kib <= allowed,
        "resident memory grew by {grew_kib} KiB, more than the {BUDGET}-byte budget allows"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_to_a_slow_destination_arrives_whole() {
    let cluster = cluster();
    let agent = cluster.agent.as_ref().unwrap();
    let (sink, report) = destination::slow_sink(RATE, None).await;
    let mut stream = http_connect(&cluster.target, &sink.to_string())
        .await
        .unwrap()
        .unwrap();
    let before = rss_kib(agent.logged.process.pid());
    let peak = PeakRss::watch(agent.logged.process.pid());
    destination::write_pattern(&mut stream, TOTAL)
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let received = tokio::time::timeout(Duration::from_secs(60), report)
        .await
        .unwrap()
        .unwrap();
    let grew = peak.kib().saturating_sub(before);
    assert_slow_reader_served(received, agent.health_port, "tether_agent", grew);
}

#[tokio::test(flavor = "multi_thread")]
async fn download_to_a_slow_frontend_arrives_whole() {
    let cluster = cluster();
    let source = destination::pattern_source(TOTAL).await;
    let mut stream = http_connect(&cluster.target, &source.to_string())
        .await
        .unwrap()
        .unwrap();
    let pid = cluster.server.logged.process.pid();
    let before = rss_kib(pid);
    let peak = PeakRss::watch(pid);
    let received = tokio::time::timeout(
        Duration::from_secs(60),
        destination::read_pattern_throttled(&mut stream, RATE),
    )
    .await
    .unwrap()
    .unwrap();
    let grew = peak.kib().saturating_sub(before);
    assert_slow_reader_served(received, cluster.server.health_port, "tether_server", grew);
    assert_eq!(
        metric(
            cluster.server.health_port,
            "konnectivity_network_proxy_server_full_receive_channels{service_method=\"Connect\"}"
        ),
        0.0,
        "the agent stream is read again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_reads_nothing_is_closed_after_the_stall_timeout() {
    let cluster = Cluster::start(
        Mode::Grpc,
        Transport::Uds,
        &[],
        &[
            "--flow-control=false",
            "--conn-queue-bytes=65536",
            "--stall-timeout=1s",
        ],
    )
    .unwrap();
    let agent_port = cluster.agent.as_ref().unwrap().health_port;
    let echo = destination::echo().await.to_string();
    let hole = destination::black_hole().await.to_string();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let mut interactive = GrpcTunnel::dial(&mut client, &echo).await.unwrap().unwrap();
    let baseline = tether_tests::rtt::grpc_rtt(&mut interactive, 20)
        .await
        .unwrap();
    let mut stuck = GrpcTunnel::dial(&mut client, &hole).await.unwrap().unwrap();
    // Far more than the kernel's socket buffers plus the queue: the stream has to wait.
    let (tx, id) = (stuck.sender(), stuck.connect_id);
    let filler = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![0u8; 32 * 1024]);
        while tx.send(Packet::data(id, chunk.clone())).await.is_ok() {}
    });
    let closed = tokio::time::timeout(Duration::from_secs(20), stuck.next())
        .await
        .expect("the stalled connection was never closed")
        .unwrap();
    filler.abort();
    match closed {
        Some(Event::Closed(error)) => {
            assert_eq!(error, "tether-agent: destination read nothing for 1s")
        }
        other => panic!("expected CLOSE_RSP, got {other:?}"),
    }
    assert_eq!(metric(agent_port, "tether_agent_stalled_closes_total"), 1.0);
    assert!(metric(agent_port, "tether_agent_stream_pauses_total") >= 1.0);
    let after = tether_tests::rtt::grpc_rtt(&mut interactive, 20)
        .await
        .unwrap();
    assert!(
        after <= baseline + Duration::from_millis(100),
        "round trip went from {baseline:?} to {after:?} after the stalled connection closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frontend_that_reads_nothing_is_closed_after_the_stall_timeout() {
    let cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--frontend-queue-bytes=65536", "--stall-timeout=1s"],
        &["--flow-control=false"],
    )
    .unwrap();
    let port = cluster.server.health_port;
    let echo = destination::echo().await.to_string();
    let flood = destination::flood().await.to_string();
    let mut interactive = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    let baseline = tether_tests::rtt::connect_rtt(&mut interactive, 20)
        .await
        .unwrap();
    // This client never reads: the agent stream waits for it, then gives up on it.
    let _stalled = http_connect(&cluster.target, &flood)
        .await
        .unwrap()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            port,
            "tether_server_stalled_closes_total"
        ) == 1.0),
        "the stalled frontend was not closed"
    );
    assert!(metric(port, "tether_server_stream_pauses_total") >= 1.0);
    let after = tether_tests::rtt::connect_rtt(&mut interactive, 20)
        .await
        .unwrap();
    assert!(
        after <= baseline + Duration::from_millis(100),
        "round trip went from {baseline:?} to {after:?} after the stalled frontend closed"
    );
}

/// rustls takes what the socket cannot and holds it until the next write or a flush. Bytes a
/// slow client has not read yet must still reach it when the destination then goes quiet with
/// the tunnel open (found with upstream's agent, whose 4 KiB packets made it likely).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_tls_client_gets_the_last_bytes_while_the_tunnel_stays_open() {
    let cluster = Cluster::start(Mode::HttpConnect, Transport::Mtls, &[], &[]).unwrap();
    // Past what the sockets buffer, so writes find the socket full.
    for len in [12 * MIB + 4321, 16 * MIB + 17] {
        let source = destination::pattern_source_then_hold(len).await;
        let mut stream = http_connect(&cluster.target, &source.to_string())
            .await
            .unwrap()
            .unwrap();
        let received = tokio::time::timeout(
            Duration::from_secs(20),
            destination::read_pattern_exactly(&mut stream, 16 * MIB, len),
        )
        .await
        .expect("the last bytes never came")
        .unwrap();
        assert_eq!(
            received,
            Received {
                bytes: len,
                intact: true
            }
        );
    }
}
