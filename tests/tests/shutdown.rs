//! Signals: the first SIGTERM drains (open tunnels continue, new ones are refused), the
//! deadline or the last tunnel ending finishes the process.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tether_tests::backend;
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::frontend::http_connect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo_once(stream: &mut Box<dyn tether_tests::frontend::Io>, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_drain_keeps_open_tunnels_refuses_new_ones_and_exits_when_they_end() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--drain-timeout=30s"],
    )
    .unwrap();
    let echo = backend::echo().await.to_string();
    let mut open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    echo_once(&mut open, b"before").await;

    let agent = cluster.agent.as_mut().unwrap();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    assert!(
        cluster
            .server
            .logged
            .logs
            .wait_for("agent is draining", Duration::from_secs(5))
            .is_some(),
        "server never received DRAIN"
    );
    let refused = http_connect(&cluster.target, &echo)
        .await
        .unwrap()
        .err()
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 502 Bad Gateway"), "{refused}");
    assert!(refused.contains("draining"), "{refused}");
    echo_once(&mut open, b"during drain").await;

    drop(open);
    let agent = cluster.agent.as_mut().unwrap();
    let status = agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
    // It ended its stream before leaving, instead of dropping the connection under it.
    let gone = cluster
        .server
        .logged
        .logs
        .wait_for("agent disconnected", Duration::from_secs(5))
        .expect("server never saw the agent leave");
    assert!(gone.contains("agent closed the stream"), "{gone}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_drain_deadline_closes_what_is_left() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--drain-timeout=1s"],
    )
    .unwrap();
    let echo = backend::echo().await.to_string();
    let mut open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    echo_once(&mut open, b"x").await;
    let agent = cluster.agent.as_mut().unwrap();
    let start = Instant::now();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(status.success());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "exited after {took:?}"
    );
    assert!(agent.logged.logs.contains("drain deadline reached"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_stops_the_agent_at_once() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &[],
        &["--drain-timeout=60s"],
    )
    .unwrap();
    let echo = backend::echo().await.to_string();
    let _open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    let agent = cluster.agent.as_mut().unwrap();
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    assert!(
        agent
            .logged
            .logs
            .wait_for("draining", Duration::from_secs(5))
            .is_some()
    );
    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    let status = agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(3))
        .unwrap();
    assert!(!status.success(), "a forced stop reports failure");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_graceful_shutdown_lets_open_tunnels_finish() {
    let mut cluster = Cluster::start(
        Mode::HttpConnect,
        Transport::Uds,
        &["--graceful-shutdown-timeout=20s"],
        &[],
    )
    .unwrap();
    let echo = backend::echo().await.to_string();
    let mut open = http_connect(&cluster.target, &echo).await.unwrap().unwrap();
    cluster
        .server
        .logged
        .process
        .signal(Signal::SIGTERM)
        .unwrap();
    assert!(
        cluster
            .server
            .logged
            .logs
            .wait_for("shutting down", Duration::from_secs(5))
            .is_some()
    );
    echo_once(&mut open, b"still flowing").await;
    drop(open);
    let status = cluster
        .server
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "server exited with {status}");
}
