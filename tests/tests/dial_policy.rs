//! The agent's dial policy end to end: a control plane that asks the agent for the cloud
//! metadata address (bound inside the node's namespace, with a listener there) is refused with
//! the policy's words, and the destination sees nothing; the operator's allow rule opens it.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use tether_tests::frontend::{Target, http_connect};
use tether_tests::guard_site::{Site, metric_in};

const METADATA: &str = "169.254.169.254:80";

#[tokio::test(flavor = "multi_thread")]
async fn a_dial_to_the_metadata_address_is_refused_with_the_policys_error() {
    let site = Site::new("dp");
    site.node
        .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])
        .unwrap();
    let metadata = site
        .node
        .run(|| TcpListener::bind(METADATA))
        .unwrap()
        .unwrap();
    metadata.set_nonblocking(true).unwrap();
    let target = Target::Uds(site.socket.clone());

    // The built-in rules alone (an unrelated deny keeps the harness from adding its own).
    let agent = site.agent(&["--guard-mode=off", "--dial-deny=198.51.100.0/24"]);
    let response = http_connect(&target, METADATA)
        .await
        .unwrap()
        .err()
        .expect("the metadata address was reached through the tunnel");
    assert!(
        response.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
            && response.ends_with(
                "dial tcp 169.254.169.254:80: denied by tether-agent's dial policy: deny 169.254.0.0/16 (default: link-local, which holds cloud metadata endpoints)"
            ),
        "{response:?}"
    );
    assert!(
        metadata.accept().is_err(),
        "the metadata listener saw a connection"
    );
    assert_eq!(
        metric_in(
            &site.node,
            agent.health_port,
            r#"tether_agent_dial_refused_total{reason="policy"}"#
        ),
        Some(1)
    );
    drop(agent);

    // An operator's rule, more specific than the default, lets it through: the policy was the
    // only thing in the way.
    let _agent = site.agent(&[
        "--guard-mode=off",
        "--dial-allow=169.254.169.254/32:80,0.0.0.0/0",
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http_connect(&target, METADATA).await.unwrap() {
            Ok(_) => break,
            // The stopped agent's stream may still be the one picked for a moment.
            Err(response) if Instant::now() < deadline => {
                assert!(!response.contains("dial policy"), "{response}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(response) => panic!("allowed, yet refused: {response}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while metadata.accept().is_err() {
        assert!(Instant::now() < deadline, "the allowed dial never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
}
