//! Agents authenticated by service-account token (upstream's `--agent-namespace` mode).
//!
//! kube-apiserver does not run on this machine, so a stand-in plays its part of the contract: it
//! answers `POST /apis/authentication.k8s.io/v1/tokenreviews` the way kube-apiserver does for
//! a few known tokens, and records what it was asked.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::backend;
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::frontend::http_connect;
use tether_tests::procs::{Agent, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AUDIENCE: &str = "system:konnectivity-server";

/// One TokenReview request: the review's body and the server's own credential.
#[derive(Clone, Debug)]
struct Asked {
    review: Value,
    authorization: String,
}

struct ApiServer {
    kubeconfig: PathBuf,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl ApiServer {
    fn start(dir: &Path) -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || answer(stream, &log));
            }
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: konnectivity-server\n  user:\n    token: server-credential\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: konnectivity-server\ncurrent-context: stand-in\n"
            ),
        )
        .unwrap();
        ApiServer { kubeconfig, asked }
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--agent-namespace=kube-system".into(),
            "--agent-service-account=konnectivity-agent".into(),
            format!("--authentication-audience={AUDIENCE}"),
            format!("--kubeconfig={}", self.kubeconfig.display()),
        ]
    }

    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

/// What kube-apiserver would say about each token the tests use.
fn review_status(token: &str, audiences: &Value) -> Value {
    let for_us = audiences
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == AUDIENCE));
    let user = |name: &str| json!({"authenticated": true, "user": {"username": name}, "audiences": [AUDIENCE]});
    match token {
        "agent-token" if for_us => user("system:serviceaccount:kube-system:konnectivity-agent"),
        "default-token" if for_us => user("system:serviceaccount:kube-system:default"),
        "expired-token" => json!({"authenticated": false, "error": "token has expired"}),
        _ => json!({"authenticated": false}),
    }
}

fn answer(stream: std::net::TcpStream, asked: &Mutex<Vec<Asked>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    let mut authorization = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "authorization" => value.trim().clone_into(&mut authorization),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let mut review: Value = serde_json::from_slice(&body).unwrap();
    asked.lock().unwrap().push(Asked {
        review: review.clone(),
        authorization,
    });
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    review["status"] = review_status(&token, &review["spec"]["audiences"]);
    let reply = review.to_string();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}

fn token_file(dir: &Path, token: &str) -> String {
    let path = dir.join(format!("{token}.jwt"));
    std::fs::write(&path, token).unwrap();
    format!("--service-account-token-path={}", path.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_service_account_gets_in_and_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let server_args = api.server_args();
    let server_refs: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let token = token_file(dir.path(), "agent-token");
    let cluster =
        Cluster::start(Mode::HttpConnect, Transport::Uds, &server_refs, &[&token]).unwrap();

    let addr = backend::hello().await.to_string();
    let mut stream = http_connect(&cluster.target, &addr).await.unwrap().unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.ends_with("hello from backend"), "{out}");

    let asked = api.asked();
    let first = asked
        .first()
        .expect("the server never asked for a TokenReview");
    assert_eq!(first.review["kind"], "TokenReview");
    assert_eq!(first.review["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(first.review["spec"]["token"], "agent-token");
    assert_eq!(first.review["spec"]["audiences"], json!([AUDIENCE]));
    assert_eq!(first.authorization, "Bearer server-credential");
}

#[test]
fn other_accounts_missing_tokens_and_review_errors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let server_args = api.server_args();
    let server_refs: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let cluster = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &server_refs).unwrap();
    let logs = &cluster.server.logged.logs;

    let cases = [
        (
            Some("default-token"),
            r#"token belongs to \"system:serviceaccount:kube-system:default\", not system:serviceaccount:kube-system:konnectivity-agent"#,
        ),
        (Some("expired-token"), "TokenReview says: token has expired"),
        (
            Some("unknown-token"),
            r#"kube-apiserver did not authenticate the token for audience \"system:konnectivity-server\""#,
        ),
        (None, "no authorization metadata"),
    ];
    for (token, expected) in cases {
        let mut extra = vec!["--agent-id=intruder".to_owned()];
        extra.extend(token.map(|t| token_file(dir.path(), t)));
        let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let _agent = Agent::start(&cluster.agent_args(&extra_refs)).unwrap();
        let line = logs
            .wait_for(expected, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no rejection saying {expected:?}"));
        assert!(line.contains("rejected agent stream"), "{line}");
    }
    let (status, _) = http_get(cluster.server.health_port, "/readyz").unwrap();
    assert_eq!(status, 500, "a refused agent made the server ready");
    let (_, metrics) = http_get(cluster.server.health_port, "/metrics").unwrap();
    let rejected: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"tether_server_rejected_total{reason="agent_auth"} "#))
        .expect("no agent_auth rejections counted")
        .trim()
        .parse()
        .unwrap();
    assert!(rejected >= 4, "{rejected} rejections counted");
    // Only the three agents with tokens reached kube-apiserver.
    let tokens: Vec<String> = api
        .asked()
        .iter()
        .map(|a| a.review["spec"]["token"].as_str().unwrap().to_owned())
        .collect();
    assert!(!tokens.is_empty());
    assert!(
        tokens
            .iter()
            .all(|t| ["default-token", "expired-token", "unknown-token"].contains(&t.as_str())),
        "{tokens:?}"
    );
}
