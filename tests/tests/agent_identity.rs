//! An agent may claim only what its credential backs: with `--bind-agent-identity=certificate`
//! its agent ID and identifiers must be its client certificate's names and addresses, one
//! identity holds a bounded number of streams, and a server with no agent authentication at
//! all starts only when told to, saying so.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::time::Duration;

use tether_tests::fake_agent::FakeAgent;
use tether_tests::peers::metric;
use tether_tests::pki::Pki;
use tether_tests::procs::{Agent, Server, wait_ready};

fn server_args(pki: &Pki, extra: &[&str]) -> Vec<String> {
    let pair = pki.pair("server");
    let mut args = vec![
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        format!("--uds-name={}", pki.dir().join("s.sock").display()),
        "--server-port=0".into(),
        "--mode=http-connect".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start_server(args: &[String]) -> Server {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&refs).unwrap()
}

#[test]
fn a_certificate_bound_agent_may_claim_only_its_certificates_names() {
    let pki = Pki::new(&[]).unwrap();
    let node_a = pki.client("node-a", &["node-a", "10.0.0.5"]).unwrap();
    let server = start_server(&server_args(
        &pki,
        &[
            &format!("--cluster-ca-cert={}", pki.ca().display()),
            "--bind-agent-identity=certificate",
        ],
    ));
    let agent = |id: &str, identifiers: &str| {
        Agent::start(&[
            &format!("--proxy-server-port={}", server.agent_port),
            &format!("--ca-cert={}", pki.ca().display()),
            &format!("--agent-cert={}", node_a.cert.display()),
            &format!("--agent-key={}", node_a.key.display()),
            &format!("--agent-id={id}"),
            &format!("--agent-identifiers={identifiers}"),
            "--sync-interval=100ms",
            "--sync-interval-cap=1s",
        ])
        .unwrap()
    };
    let refused = [
        (
            "node-b",
            "",
            r#"agent ID \"node-b\" is not a name of the agent's certificate node-a"#,
        ),
        (
            "node-a",
            "host=node-b",
            "identifier host=node-b is not a name of the agent's certificate node-a",
        ),
        (
            "node-a",
            "ipv4=10.0.0.6",
            "identifier 10.0.0.6 is not an address of the agent's certificate node-a",
        ),
        (
            "node-a",
            "cidr=0.0.0.0/0",
            "identifier cidr=0.0.0.0/0 cannot be bound to a credential",
        ),
    ];
    for (id, identifiers, why) in refused {
        let agent = agent(id, identifiers);
        // Why each claim is refused, as the operator reads it, is the subject.
        let line = server
            .logged
            .logs
            .wait_for(why, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{id} claiming {identifiers:?} was not refused for {why:?}"));
        assert!(line.contains("rejected agent stream"), "{line}");
        // The agent hears why, too.
        assert!(
            agent
                .logged
                .logs
                .wait_for(why, Duration::from_secs(10))
                .is_some(),
            "the agent was not told {why:?}: {:?}",
            agent.logged.logs.lines()
        );
    }
    assert!(
        metric(
            server.health_port,
            "tether_server_rejected_total{reason=\"agent_identity\"} "
        )
        .is_some_and(|n| n >= 4.0)
    );
    assert!(!wait_ready(server.health_port, Duration::from_millis(500)));

    let _honest = agent("node-a", "host=node-a&ipv4=10.0.0.5");
    assert!(
        wait_ready(server.health_port, Duration::from_secs(10)),
        "an agent claiming its own names was not let in"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_identity_holds_at_most_its_streams() {
    let pki = Pki::new(&[]).unwrap();
    let server = start_server(&server_args(
        &pki,
        &[
            "--allow-unauthenticated-agents",
            "--max-agent-streams-per-identity=3",
        ],
    ));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            FakeAgent::connect(server.agent_port, &pki.ca(), "same")
                .await
                .unwrap(),
        );
    }
    let Err(refused) = FakeAgent::connect(server.agent_port, &pki.ca(), "same").await else {
        panic!("a fourth stream for one identity was let in");
    };
    assert!(
        format!("{refused:#}").contains("agent same already holds 3 agent streams"),
        "{refused:#}"
    );
    assert!(
        FakeAgent::connect(server.agent_port, &pki.ca(), "other")
            .await
            .is_ok()
    );
    // A stream that ends gives its place back.
    held.pop();
    let mut again = None;
    for _ in 0..50 {
        if let Ok(agent) = FakeAgent::connect(server.agent_port, &pki.ca(), "same").await {
            again = Some(agent);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the identity's slot was not given back");
}

#[test]
fn agents_are_authenticated_unless_the_operator_says_otherwise() {
    let pki = Pki::new(&[]).unwrap();
    let Err(err) = Server::start(
        &server_args(&pki, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ) else {
        panic!("the server started with no agent authentication");
    };
    let err = format!("{err:#}");
    assert!(
        err.contains("--cluster-ca-cert is required to authenticate agents")
            && err.contains("--allow-unauthenticated-agents"),
        "{err}"
    );

    let server = start_server(&server_args(&pki, &["--allow-unauthenticated-agents"]));
    assert!(
        server
            .logged
            .logs
            .contains("agents are not authenticated (--allow-unauthenticated-agents)"),
        "no warning at start"
    );
}
