//! Agents authenticated by service-account token (upstream's `--agent-namespace` mode).
//!
//! kube-apiserver does not run on this machine, so a stand-in plays its part of the contract: it
//! answers `POST /apis/authentication.k8s.io/v1/tokenreviews` the way kube-apiserver does for
//! a few known tokens, and records what it was asked.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tether_tests::cluster::{Cluster, Mode, Transport};
use tether_tests::destination;
use tether_tests::fake_agent::{self, FakeAgent};
use tether_tests::frontend::http_connect;
use tether_tests::kube_api::read_request;
use tether_tests::peers::metric;
use tether_tests::process::wait_until;
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
    let agent = "system:serviceaccount:kube-system:konnectivity-agent";
    match token {
        "agent-token" if for_us => user(agent),
        // A projected token bound to a pod on node-a, as Kubernetes 1.30+ describes it.
        "node-a-token" if for_us => {
            json!({"authenticated": true, "audiences": [AUDIENCE], "user": {
                "username": agent,
                "extra": {
                    "authentication.kubernetes.io/node-name": ["node-a"],
                    "authentication.kubernetes.io/pod-name": ["konnectivity-agent-x1"],
                },
            }})
        }
        // A projected token of a pod on the rogue node, which lists node-a's address as its own.
        "rogue-token" if for_us => {
            json!({"authenticated": true, "audiences": [AUDIENCE], "user": {
                "username": agent,
                "extra": {"authentication.kubernetes.io/node-name": ["rogue"]},
            }})
        }
        // A projected token of a pod on a node that lists node-c's address in its IPv4-mapped
        // IPv6 form.
        "mapper-token" if for_us => {
            json!({"authenticated": true, "audiences": [AUDIENCE], "user": {
                "username": agent,
                "extra": {"authentication.kubernetes.io/node-name": ["mapper"]},
            }})
        }
        "named-as-address-token" if for_us => {
            json!({"authenticated": true, "audiences": [AUDIENCE], "user": {
                "username": agent,
                "extra": {"authentication.kubernetes.io/node-name": ["10.0.0.11"]},
            }})
        }
        // JWT-shaped tokens carry their expiry.
        jwt if for_us && jwt.starts_with("e30.") => user(agent),
        "slow-token" => {
            std::thread::sleep(Duration::from_secs(3));
            json!({"authenticated": false})
        }
        "default-token" if for_us => user("system:serviceaccount:kube-system:default"),
        // The agent's account, authenticated by an authenticator that ignores the requested
        // audience (none in the answer), and one checked for the API's own audience.
        "audience-unaware-token" => json!({"authenticated": true, "user": {"username": agent}}),
        "api-audience-token" => json!({"authenticated": true, "user": {"username": agent},
            "audiences": ["https://kubernetes.default.svc.cluster.local"]}),
        "expired-token" => json!({"authenticated": false, "error": "token has expired"}),
        _ => json!({"authenticated": false}),
    }
}

fn answer(stream: std::net::TcpStream, asked: &Mutex<Vec<Asked>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some(request) = read_request(&mut reader) else {
        return;
    };
    let request_line = request.line.clone();
    let authorization = request.header("authorization").unwrap_or("").to_owned();
    let body = request.body;
    if request_line.starts_with("GET /api/v1/nodes") {
        answer_nodes(stream, &request_line, asked);
        return;
    }
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

/// The cluster's Nodes: node-a, and a rogue node whose kubelet wrote node-a's address into
/// its own status (NodeRestriction lets a kubelet write its Node's status); node-c, and a
/// node whose kubelet wrote node-c's address in its IPv4-mapped IPv6 form, the same address
/// to the kernel that dials it; node-d, and a node named by node-d's address.
fn node(name: &str) -> Option<Value> {
    let addresses: &[&str] = match name {
        "node-a" => &["10.0.0.5"],
        "rogue" => &["10.0.0.5", "10.0.0.7"],
        "node-c" => &["10.0.0.6"],
        "mapper" => &["::ffff:10.0.0.6", "10.0.0.8"],
        "node-d" => &["10.0.0.11"],
        // A node whose kubelet joined under a name that is node-d's address.
        "10.0.0.11" => &["10.0.0.10"],
        _ => return None,
    };
    let mut listed: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    // The node named by an address writes a hostname of its own, which a kubelet may.
    let hostname = if name == "10.0.0.11" { "sly" } else { name };
    listed.push(json!({"type": "Hostname", "address": hostname}));
    Some(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "1"},
        "status": {"addresses": listed}}))
}

/// GET of one Node, the list of them, or a watch, which stays open without an event.
fn answer_nodes(mut stream: std::net::TcpStream, request_line: &str, asked: &Mutex<Vec<Asked>>) {
    let path = request_line.split(' ').nth(1).unwrap_or_default();
    asked.lock().unwrap().push(Asked {
        review: json!({"nodes": path}),
        authorization: String::new(),
    });
    if path.contains("watch=") {
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        std::thread::sleep(Duration::from_secs(300));
        return;
    }
    let body = match path.trim_start_matches("/api/v1/nodes").split('?').next() {
        Some("") => {
            json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"},
            "items": [node("node-a"), node("rogue"), node("node-c"), node("mapper"), node("node-d"), node("10.0.0.11")]})
        }
        Some(name) => match node(name.trim_start_matches('/')) {
            Some(node) => node,
            None => {
                let _ = write!(
                    stream,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                return;
            }
        },
        None => return,
    }
    .to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
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

    let addr = destination::hello().await.to_string();
    let mut stream = http_connect(&cluster.target, &addr).await.unwrap().unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: destination\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.ends_with("hello from destination"), "{out}");

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
        (
            Some("audience-unaware-token"),
            r#"TokenReview authenticated the token but not for audience \"system:konnectivity-server\" (its audiences: [])"#,
        ),
        (
            Some("api-audience-token"),
            r#"not for audience \"system:konnectivity-server\" (its audiences: [\"https://kubernetes.default.svc.cluster.local\"])"#,
        ),
        (None, "no authorization metadata"),
    ];
    for (token, expected) in cases {
        let mut extra = vec!["--agent-id=intruder".to_owned()];
        extra.extend(token.map(|t| token_file(dir.path(), t)));
        let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let agent = Agent::start(&cluster.agent_args(&extra_refs)).unwrap();
        // The rejections an operator reads are the subject.
        let line = logs
            .wait_for(expected, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no rejection saying {expected:?}"));
        assert!(line.contains("rejected agent stream"), "{line}");
        // The agent says the same (the subject again), and counts it.
        let line = agent
            .logged
            .logs
            .wait_for(
                "the proxy server refused the stream (Unauthenticated)",
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("the agent did not report its refusal ({expected:?})"));
        assert!(line.contains(expected), "{line}");
        assert!(
            wait_until(Duration::from_secs(10), || metric(
                agent.health_port,
                r#"tether_agent_server_connect_failures_total{reason="unauthenticated"} "#
            )
            .is_some_and(|n| n >= 1.0)),
            "the agent did not count the refusal"
        );
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
    assert!(rejected >= 6, "{rejected} rejections counted");
    // Only the agents with tokens reached kube-apiserver.
    let tokens: Vec<String> = api
        .asked()
        .iter()
        .map(|a| a.review["spec"]["token"].as_str().unwrap().to_owned())
        .collect();
    assert!(!tokens.is_empty());
    assert!(
        tokens.iter().all(|t| [
            "default-token",
            "expired-token",
            "unknown-token",
            "audience-unaware-token",
            "api-audience-token"
        ]
        .contains(&t.as_str())),
        "{tokens:?}"
    );
}

/// An agent stream with `token` on its own connection.
async fn connect_with(
    cluster: &Cluster,
    agent_id: &str,
    token: &str,
    identifiers: &str,
) -> anyhow::Result<FakeAgent> {
    let channel = fake_agent::channel(cluster.server.agent_port, &cluster.pki.ca()).await?;
    let bearer = format!("Bearer {token}");
    let mut metadata = vec![("authorization", bearer.as_str())];
    if !identifiers.is_empty() {
        metadata.push(("agentidentifiers", identifiers));
    }
    FakeAgent::open_with(channel, agent_id, &metadata).await
}

fn token_server(api: &ApiServer, extra: &[&str]) -> Cluster {
    let mut args = api.server_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Cluster::server_only(Mode::HttpConnect, Transport::Uds, &refs).unwrap()
}

fn times_asked(api: &ApiServer, token: &str) -> usize {
    api.asked()
        .iter()
        .filter(|a| a.review["spec"]["token"] == token)
        .count()
}

/// A JWT-shaped token that expires `seconds` from now.
fn jwt(seconds: u64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + seconds;
    let claims = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        format!("{{\"exp\":{exp}}}"),
    );
    format!("e30.{claims}.c2ln")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successful_review_is_reused_until_the_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let cluster = token_server(&api, &[]);
    for _ in 0..3 {
        drop(
            connect_with(&cluster, "a", "agent-token", "")
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        times_asked(&api, "agent-token"),
        1,
        "reviews were not reused"
    );

    let short = jwt(2);
    drop(connect_with(&cluster, "b", &short, "").await.unwrap());
    drop(connect_with(&cluster, "b", &short, "").await.unwrap());
    assert_eq!(times_asked(&api, &short), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(connect_with(&cluster, "b", &short, "").await.unwrap());
    assert_eq!(
        times_asked(&api, &short),
        2,
        "a review was reused past the token's expiry"
    );
    let (_, metrics) = http_get(cluster.server.health_port, "/metrics").unwrap();
    assert!(
        metrics.contains("tether_server_token_reviews_total{outcome=\"cached\"} 3"),
        "{metrics}"
    );
    drop(cluster);

    // --token-review-cache-ttl bounds how long a revoked token still gets in; 0 reviews every
    // stream.
    let uncached = token_server(&api, &["--token-review-cache-ttl=0s"]);
    let before = times_asked(&api, "agent-token");
    for _ in 0..2 {
        drop(
            connect_with(&uncached, "a", "agent-token", "")
                .await
                .unwrap(),
        );
    }
    assert_eq!(times_asked(&api, "agent-token"), before + 2);
}

/// Entries in the `--token-review-cache-file` at `path`, once it exists.
fn entries_kept(path: &Path) -> usize {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|file| file["entries"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_lets_agents_back_in_on_answers_from_its_cache_file() {
    use nix::sys::signal::Signal;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let file = dir.path().join("reviews.json");
    let keep = format!("--token-review-cache-file={}", file.display());
    let (lasting, brief) = (jwt(3600), jwt(3));

    let first = token_server(&api, &[&keep]);
    for token in ["agent-token", &lasting, &brief] {
        drop(connect_with(&first, "a", token, "").await.unwrap());
    }
    assert!(
        wait_until(Duration::from_secs(10), || entries_kept(&file) == 3),
        "the answers never reached {}",
        file.display()
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("agent-token") && !text.contains(&lasting),
        "a token in the file: {text}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // Killed outright: what was written before is all there is.
    first.server.logged.process.signal(Signal::SIGKILL).unwrap();
    drop(first);

    let mut second = token_server(&api, &[&keep]);
    for token in ["agent-token", &lasting] {
        drop(connect_with(&second, "a", token, "").await.unwrap());
        assert_eq!(
            times_asked(&api, token),
            1,
            "the restarted server asked kube-apiserver again"
        );
    }
    let (_, metrics) = http_get(second.server.health_port, "/metrics").unwrap();
    assert!(
        metrics.contains("tether_server_token_reviews_total{outcome=\"cached\"} 2"),
        "{metrics}"
    );
    // A graceful stop writes the file as well; the brief token's answer expires meanwhile.
    second
        .server
        .logged
        .process
        .signal(Signal::SIGTERM)
        .unwrap();
    second
        .server
        .logged
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    drop(second);
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let third = token_server(&api, &[&keep]);
    drop(connect_with(&third, "a", &brief, "").await.unwrap());
    assert_eq!(
        times_asked(&api, &brief),
        2,
        "an answer was reused past the token's expiry across a restart"
    );
    drop(connect_with(&third, "a", &lasting, "").await.unwrap());
    assert_eq!(times_asked(&api, &lasting), 1);
    drop(third);

    // Others may not read a file that lets its writer pass tokens off as any agent's.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut args = api.server_args();
    args.push(keep.clone());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &refs)
        .err()
        .expect("the server started with a cache file others can read");
    let why = format!("{refused:#}");
    assert!(
        why.contains("--token-review-cache-file") && why.contains("chmod 600"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_review_whose_turn_is_past_the_deadline_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    // One review per 20 s after the first.
    let cluster = token_server(&api, &["--kubeconfig-qps=0.05", "--kubeconfig-burst=1"]);
    let first = connect_with(&cluster, "a", "unknown-1", "").await;
    assert!(format!("{:#}", first.err().unwrap()).contains("did not authenticate"));
    let started = std::time::Instant::now();
    let second = connect_with(&cluster, "a", "unknown-2", "").await;
    let err = format!("{:#}", second.err().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(err.contains("too many TokenReviews waiting"), "{err}");
    assert_eq!(times_asked(&api, "unknown-2"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_that_give_up_hand_their_turn_back() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    // A turn every 2 s after the first.
    let cluster = token_server(&api, &["--kubeconfig-qps=0.5", "--kubeconfig-burst=1"]);
    let _ = connect_with(&cluster, "a", "unknown-0", "").await;
    for round in 0..3 {
        let mut impatient = Vec::new();
        for i in 0..3 {
            let token = format!("unknown-{round}-{i}");
            impatient.push(tokio::time::timeout(
                Duration::from_millis(300),
                connect_with(&cluster, "a", leak(token), ""),
            ));
        }
        for attempt in impatient {
            assert!(attempt.await.is_err(), "a queued review answered early");
        }
    }
    // Nine abandoned turns do not stand in the way: one turn's wait, not ten.
    let started = std::time::Instant::now();
    let agent = connect_with(&cluster, "a", "agent-token", "").await;
    assert!(agent.is_ok(), "{:#}", agent.err().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the agent waited {:?} behind callers that had gone",
        started.elapsed()
    );
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_has_a_bounded_share_of_reviews() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let cluster = token_server(&api, &[]);
    let started = std::time::Instant::now();
    let (port, ca) = (cluster.server.agent_port, cluster.pki.ca());
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let ca = ca.clone();
        attempts.spawn(async move {
            let channel = fake_agent::channel(port, &ca).await.unwrap();
            let result =
                FakeAgent::open_with(channel, "a", &[("authorization", "Bearer slow-token")]).await;
            (result.err().map(|e| format!("{e:#}")), started.elapsed())
        });
    }
    let mut refused_at_once = 0;
    while let Some(joined) = attempts.join_next().await {
        let (err, after) = joined.unwrap();
        let err = err.expect("a slow-token agent got in");
        if err.contains("TokenReviews from this address are already queued or in flight") {
            assert!(after < Duration::from_secs(2), "refused after {after:?}");
            refused_at_once += 1;
        }
    }
    assert_eq!(refused_at_once, 4);
    assert_eq!(times_asked(&api, "slow-token"), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_agent_may_claim_only_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let cluster = token_server(&api, &["--bind-agent-identity=token"]);
    let refused = [
        (
            "node-b",
            "node-a-token",
            "",
            "is not a name of the agent's node node-a",
        ),
        (
            "node-a",
            "node-a-token",
            "ipv4=10.0.0.9",
            "identifier 10.0.0.9 is not an address of the agent's node node-a",
        ),
        (
            "node-a",
            "agent-token",
            "",
            "the agent's token is not bound to a pod on a node",
        ),
    ];
    for (id, token, identifiers, why) in refused {
        let err = connect_with(&cluster, id, token, identifiers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{id} with {token} claiming {identifiers:?} got in"));
        assert!(format!("{err:#}").contains(why), "{err:#}");
    }
    let agent = connect_with(
        &cluster,
        "node-a",
        "node-a-token",
        "host=node-a&ipv4=10.0.0.5",
    )
    .await;
    assert!(agent.is_ok(), "{:#}", agent.err().unwrap());
}

/// The first DIAL_REQ `agent` receives within `limit`: its address.
async fn dial_seen(agent: &mut FakeAgent, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let packet = tokio::time::timeout_at(deadline, agent.from_server.message())
            .await
            .ok()?
            .ok()??;
        if let tether_proto::Message::DialRequest(dial) = packet.into_message() {
            return Some(dial.address);
        }
    }
}

/// What the CONNECT frontend answers for a dial to `address`, within a second (a dial an
/// agent received but never answered yields `None`).
async fn connect_refusal(cluster: &Cluster, address: &str) -> Option<String> {
    tokio::time::timeout(
        Duration::from_secs(1),
        http_connect(&cluster.target, address),
    )
    .await
    .ok()?
    .unwrap()
    .err()
}

/// A dial to `address` is served, by `agent`.
async fn assert_reaches(cluster: &Cluster, agent: &mut FakeAgent, address: &str) {
    assert_eq!(connect_refusal(cluster, address).await, None);
    assert_eq!(
        dial_seen(agent, Duration::from_secs(2)).await.as_deref(),
        Some(address)
    );
}

/// A server binding agents to their tokens' nodes, handing unclaimed dials to `default`,
/// once it has listed the Nodes (the claims the tests make are judged on them, so a server
/// that never lists them goes on and fails there).
fn bound_server(api: &ApiServer, extra: &[&str]) -> Cluster {
    let mut args = vec![
        "--bind-agent-identity=token",
        "--proxy-strategies=destHost,default",
    ];
    args.extend_from_slice(extra);
    let cluster = token_server(api, &args);
    wait_until(Duration::from_secs(5), || {
        api.asked()
            .iter()
            .any(|a| a.review["nodes"] == "/api/v1/nodes?")
    });
    cluster
}

/// A node whose kubelet lists another node's address in its own Node status, and whose agent
/// registers first claiming it, receives none of that node's dials: an address two Nodes list
/// is served by no agent (dials to it fail, naming both), dials by the node's name still reach
/// its own agent, and when that agent is away its dials fail rather than go to another
/// node's agent through `default`.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_listing_anothers_address_receives_none_of_its_dials() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let cluster = bound_server(&api, &[]);
    let mut rogue = connect_with(
        &cluster,
        "rogue",
        "rogue-token",
        "host=rogue&ipv4=10.0.0.5&ipv4=10.0.0.7",
    )
    .await
    .unwrap();
    let refusal = connect_refusal(&cluster, "10.0.0.5:10250")
        .await
        .expect("the contested address was dialled through an agent");
    assert!(
        refusal.ends_with(
            "No agent available: 10.0.0.5 is claimed by node node-a and node rogue; tether-server serves a node's address only when one node claims it"
        ),
        "{refusal}"
    );
    let mut victim = connect_with(
        &cluster,
        "node-a",
        "node-a-token",
        "host=node-a&ipv4=10.0.0.5",
    )
    .await
    .unwrap();
    assert!(connect_refusal(&cluster, "10.0.0.5:10250").await.is_some());
    assert_eq!(
        dial_seen(&mut rogue, Duration::from_millis(300)).await,
        None
    );

    // By name, the victim's own agent; the rogue's own address, the rogue.
    assert_reaches(&cluster, &mut victim, "node-a:10250").await;
    assert_reaches(&cluster, &mut rogue, "10.0.0.7:22").await;

    // The victim's agent goes away: its dials are not handed to the rogue's through default.
    drop(victim);
    // The server notices the stream's end shortly; until then the dial still finds it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let refusal = connect_refusal(&cluster, "node-a:10250")
            .await
            .unwrap_or_default();
        if refusal.ends_with("No agent available: node-a belongs to node node-a, whose agent is not connected; tether-server does not hand a node's dials to another node's agent") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{refusal:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        dial_seen(&mut rogue, Duration::from_millis(300)).await,
        None
    );
    let (_, metrics) = http_get(cluster.server.health_port, "/metrics").unwrap();
    for series in [
        r#"tether_server_address_conflicts_total{reason="nodes"}"#,
        r#"tether_server_dials_withheld_total{reason="ambiguous_address"}"#,
        r#"tether_server_dials_withheld_total{reason="node_agent_absent"}"#,
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(series)),
            "{series} missing:\n{metrics}"
        );
    }
}

/// The same rogue, writing the victim's address in another form of it: `::ffff:10.0.0.6` is
/// 10.0.0.6 to the kernel that dials it, so it is the same contested address. With the
/// victim's agent away (restarting, say), the rogue's agent claiming the mapped form must
/// not receive the victim's dials by either spelling.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_listing_anothers_address_in_mapped_form_receives_none_of_its_dials() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    // Refused at once rather than held for node-c's agent to come back.
    let cluster = bound_server(&api, &["--hold-dials-after-start=0s"]);
    let mut mapper = connect_with(
        &cluster,
        "mapper",
        "mapper-token",
        "host=mapper&ipv6=::ffff:10.0.0.6&ipv4=10.0.0.8",
    )
    .await
    .unwrap();
    for (address, host) in [
        ("[::ffff:10.0.0.6]:10250", "::ffff:10.0.0.6"),
        ("10.0.0.6:10250", "10.0.0.6"),
    ] {
        let refusal = connect_refusal(&cluster, address).await.unwrap_or_else(|| {
            panic!("a dial to {address} went to an agent of a node that wrote the address in mapped form")
        });
        assert!(
            refusal.ends_with(&format!(
                "No agent available: {host} is claimed by node mapper and node node-c; tether-server serves a node's address only when one node claims it"
            )),
            "{address}: {refusal}"
        );
    }
    assert_eq!(
        dial_seen(&mut mapper, Duration::from_millis(300)).await,
        None
    );
    // Its own address still reaches it.
    assert_reaches(&cluster, &mut mapper, "10.0.0.8:22").await;
}

/// A kubelet picks its Node's name when it joins. One that named itself `10.0.0.11`, node-d's
/// address, may claim `host=10.0.0.11` as its name, but a host name that is an address serves
/// dials to that address: the claim is refused unless its Node lists the address, and with
/// node-d's agent away its dials fail rather than reach this agent.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_named_as_anothers_address_cannot_claim_it_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    // Refused at once rather than held for an agent to come back.
    let cluster = bound_server(&api, &["--hold-dials-after-start=0s"]);
    let claim = connect_with(
        &cluster,
        "10.0.0.11",
        "named-as-address-token",
        "host=10.0.0.11",
    )
    .await;
    let err = format!("{:#}", claim.err().expect("the claim by name got in"));
    assert!(
        err.contains("identifier 10.0.0.11 is not an address of the agent's node 10.0.0.11"),
        "{err}"
    );
    // Without the name as a claim it gets in, and node-d's dials still do not reach it.
    let mut named = connect_with(
        &cluster,
        "10.0.0.11",
        "named-as-address-token",
        "ipv4=10.0.0.10",
    )
    .await
    .unwrap();
    // Nor under default, in either spelling of the address.
    for (address, host) in [
        ("10.0.0.11:10250", "10.0.0.11"),
        ("[::ffff:10.0.0.11]:10250", "::ffff:10.0.0.11"),
    ] {
        let refusal = connect_refusal(&cluster, address)
            .await
            .unwrap_or_else(|| panic!("{address}, node-d's, was dialled through an agent"));
        assert!(
            refusal.ends_with(&format!("No agent available: {host} belongs to node node-d, whose agent is not connected; tether-server does not hand a node's dials to another node's agent")),
            "{refusal}"
        );
    }
    assert_eq!(
        dial_seen(&mut named, Duration::from_millis(300)).await,
        None
    );
}

/// Junk tokens from sixteen addresses, four streams at a time each, for as long as the test
/// lasts: they cannot keep out an agent that proved itself before and comes back with a
/// fresh token (its pod restarted), and the server's memory stays bounded. Strangers only
/// ever queue a short way for a review, a source whose tokens keep failing is held back, and
/// unproven connections are capped per address.
#[tokio::test(flavor = "multi_thread")]
async fn junk_token_floods_from_many_addresses_do_not_keep_an_honest_agent_out() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let cluster = token_server(&api, &[]);
    let port = cluster.server.agent_port;
    let pid = cluster.server.logged.process.pid();
    drop(
        connect_with(&cluster, "honest", &jwt(3600), "")
            .await
            .unwrap(),
    );
    let rss_before = tether_tests::process::rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for source in 1..=16u8 {
        for lane in 0..4u32 {
            let (stop, attempts, ca) = (stop.clone(), attempts.clone(), cluster.pki.ca());
            flood.push(tokio::spawn(async move {
                let from = std::net::Ipv4Addr::new(127, 0, 3, source);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(channel) = fake_agent::channel_from(from, port, &ca).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // Stream after stream on one connection, each with a token never seen.
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let bearer = format!("Bearer junk-{source}-{lane}-{n}");
                        let opened = FakeAgent::open_with(
                            channel.clone(),
                            "junk",
                            &[("authorization", bearer.as_str())],
                        )
                        .await;
                        if opened.is_ok() {
                            panic!("a junk token got in");
                        }
                        let transport = opened
                            .err()
                            .is_some_and(|e| format!("{e:#}").contains("transport"));
                        if transport {
                            break;
                        }
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The honest agent comes back with a fresh token, retrying as an agent does.
    let started = std::time::Instant::now();
    let mut refusals = Vec::new();
    loop {
        match connect_with(&cluster, "honest", &jwt(3601), "").await {
            Ok(_) => break,
            Err(err) => refusals.push(format!("{err:#}")),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the honest agent is kept out: {} refusals, the last {:?}",
            refusals.len(),
            refusals.last()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    let rss_during = tether_tests::process::rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        let _ = task.await;
    }
    let junk_reviews = api
        .asked()
        .iter()
        .filter(|a| {
            a.review["spec"]["token"]
                .as_str()
                .is_some_and(|t| t.starts_with("junk-"))
        })
        .count();
    assert!(
        took < Duration::from_secs(4),
        "the honest agent took {took:?} to get back in ({} refusals, the last {:?})",
        refusals.len(),
        refusals.last()
    );
    assert!(
        rss_during < rss_before + 64 * 1024,
        "the server grew from {rss_before} KiB to {rss_during} KiB under the flood"
    );
    // Each address fails eight reviews, then one per five seconds.
    let elapsed = 3 + took.as_secs();
    assert!(
        junk_reviews as u64 <= 16 * (8 + elapsed / 5 + 1),
        "{junk_reviews} junk tokens reached kube-apiserver in about {elapsed} s ({} attempts)",
        attempts.load(Ordering::Relaxed)
    );
}

/// kube-apiserver's serving certificate as kubeadm makes it: the Service names, the Service
/// IP, the advertise address and the host name; not 127.0.0.1, where the shipped kubeconfig
/// points.
const KUBEADM_APISERVER_SANS: [&str; 7] = [
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.96.0.1",
    "192.0.2.10",
    "cp-1",
];

/// The shipped `konnectivity-server.kubeconfig`, pointed at a stand-in kube-apiserver that
/// presents a certificate with kubeadm's names, its files swapped for the test's: the
/// server's TokenReviews get through TLS, and an agent gets in with its token.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_kubeconfig_trusts_a_kubeadm_apiserver_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start(dir.path());
    let plain: String = std::fs::read_to_string(&api.kubeconfig).unwrap();
    let plain_port: u16 = plain
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|port| port.parse().ok())
        .unwrap();
    // kube-apiserver's TLS in front of the stand-in.
    let pki = tether_tests::pki::Pki::new(&[]).unwrap();
    let serving = pki
        .server_for("kubeadm-apiserver", &KUBEADM_APISERVER_SANS)
        .unwrap();
    let client = pki.client("system:konnectivity-server", &[]).unwrap();
    let identity = tether_runtime::tls::Identity::load(
        tether_runtime::tls::PemFile::new("apiserver-cert", &serving.cert),
        tether_runtime::tls::PemFile::new("apiserver-key", &serving.key),
    )
    .unwrap();
    let tls = tether_runtime::tls::server_config(&identity, None, &[b"http/1.1"], false).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", plain_port)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/control-plane/konnectivity-server.kubeconfig"),
    )
    .unwrap();
    let kubeconfig = dir.path().join("konnectivity-server.conf");
    std::fs::write(
        &kubeconfig,
        shipped
            .replace(
                "https://127.0.0.1:6443",
                &format!("https://127.0.0.1:{tls_port}"),
            )
            .replace(
                "/etc/kubernetes/pki/ca.crt",
                &pki.ca().display().to_string(),
            )
            .replace(
                "/etc/kubernetes/pki/konnectivity-server.crt",
                &client.cert.display().to_string(),
            )
            .replace(
                "/etc/kubernetes/pki/konnectivity-server.key",
                &client.key.display().to_string(),
            ),
    )
    .unwrap();
    let mut args = api.server_args();
    args.retain(|a| !a.starts_with("--kubeconfig="));
    args.push(format!("--kubeconfig={}", kubeconfig.display()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::server_only(Mode::HttpConnect, Transport::Uds, &refs).unwrap();
    let agent = connect_with(&cluster, "a", "agent-token", "").await;
    assert!(
        agent.is_ok(),
        "the shipped kubeconfig did not reach a kubeadm apiserver: {:#}",
        agent.err().unwrap()
    );
    assert_eq!(times_asked(&api, "agent-token"), 1);
}
