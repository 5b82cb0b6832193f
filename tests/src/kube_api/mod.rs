//! A stand-in for kube-apiserver over TLS: what tether's binaries ask of it (TokenReviews,
//! Nodes, Services, EndpointSlices and Leases), answered the way kube-apiserver answers, one
//! request per connection. Nodes, Services and EndpointSlices are fixed when it starts and their
//! watches stay open without events; Leases change as clients write them (see [`leases`]).
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is how a failed check reports"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::netns::Netns;

pub mod leases;
pub use leases::Leases;

/// Who a token is, as a TokenReview says.
pub struct TokenOwner {
    pub token: String,
    pub username: String,
    pub audiences: Vec<String>,
    /// The node a projected token is bound to (`authentication.kubernetes.io/node-name`).
    pub node: Option<String>,
}

/// What the stand-in serves.
#[derive(Default)]
pub struct Cluster {
    pub tokens: Vec<TokenOwner>,
    /// Node name → its InternalIP addresses.
    pub nodes: Vec<(String, Vec<String>)>,
    pub services: Vec<Value>,
    pub endpoint_slices: Vec<Value>,
}

/// One request: its method, path and query.
#[derive(Clone, Debug)]
pub struct Asked {
    pub method: String,
    pub path: String,
    pub query: String,
}

pub struct KubeApi {
    asked: Arc<Mutex<Vec<Asked>>>,
    pub leases: Arc<Leases>,
}

impl KubeApi {
    /// Serves `cluster` with the certificate `cert`/`key` on each address, each bound inside
    /// its namespace.
    pub fn start(cluster: Cluster, cert: &Path, key: &Path, at: &[(&Netns, SocketAddr)]) -> Self {
        let listeners = at
            .iter()
            .map(|(netns, address)| netns.run(|| TcpListener::bind(address)).unwrap().unwrap())
            .collect();
        Self::serve(cluster, cert, key, listeners)
    }

    /// Serves `cluster` on an ephemeral port of 127.0.0.1 in this process's namespace; returns
    /// the port too.
    pub fn start_on_loopback(cluster: Cluster, cert: &Path, key: &Path) -> (Self, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        (Self::serve(cluster, cert, key, vec![listener]), port)
    }

    fn serve(cluster: Cluster, cert: &Path, key: &Path, listeners: Vec<TcpListener>) -> Self {
        let identity = tether_runtime::tls::Identity::load(
            tether_runtime::tls::PemFile::new("apiserver-cert", cert),
            tether_runtime::tls::PemFile::new("apiserver-key", key),
        )
        .unwrap();
        let tls =
            tether_runtime::tls::server_config(&identity, None, &[b"http/1.1"], false).unwrap();
        let cluster = Arc::new(cluster);
        let asked = Arc::new(Mutex::new(Vec::new()));
        let leases = Arc::new(Leases::default());
        for listener in listeners {
            let (tls, cluster, asked, leases) =
                (tls.clone(), cluster.clone(), asked.clone(), leases.clone());
            std::thread::spawn(move || {
                for tcp in listener.incoming().flatten() {
                    let (tls, cluster, asked, leases) =
                        (tls.clone(), cluster.clone(), asked.clone(), leases.clone());
                    std::thread::spawn(move || {
                        let Ok(conn) = rustls::ServerConnection::new(tls) else {
                            return;
                        };
                        let stream = rustls::StreamOwned::new(conn, tcp);
                        answer(stream, &cluster, &asked, &leases);
                    });
                }
            });
        }
        KubeApi { asked, leases }
    }

    /// Writes a kubeconfig that reaches this stand-in at `https://127.0.0.1:port`, trusting
    /// `ca`, with a bearer token (the stand-in does not check it).
    pub fn kubeconfig(dir: &Path, port: u16, ca: &Path) -> std::path::PathBuf {
        let path = dir.join(format!("kubeconfig-{port}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: stand-in\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: user\ncurrent-context: stand-in\n",
                ca.display()
            ),
        )
        .unwrap();
        path
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }

    /// How many TokenReviews it has been asked for.
    pub fn token_reviews(&self) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.method == "POST" && a.path.ends_with("/tokenreviews"))
            .count()
    }
}

type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// One HTTP/1.1 request as a stand-in reads it.
pub struct Request {
    pub line: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a request line, headers and a Content-Length body; `None` when the client hung up.
pub fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        line,
        headers,
        body,
    })
}

fn answer(stream: Tls, cluster: &Cluster, asked: &Mutex<Vec<Asked>>, leases: &Leases) {
    let mut reader = BufReader::new(stream);
    let Some(Request {
        line: request_line,
        body,
        ..
    }) = read_request(&mut reader)
    else {
        return;
    };
    let mut stream = reader.into_inner();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let (route, query) = path.split_once('?').unwrap_or((&path, ""));
    asked.lock().unwrap().push(Asked {
        method: method.clone(),
        path: route.to_owned(),
        query: query.to_owned(),
    });
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let lease_reply = leases.answer(&method, route, &pairs, &body, &mut stream);
    if let Some(None) = lease_reply {
        return;
    }
    if lease_reply.is_none()
        && query
            .split('&')
            .any(|q| q == "watch=true" || q == "watch=1")
    {
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let _ = stream.flush();
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let list = |kind: &str, api_version: &str, items: &[Value]| {
        Some((
            200,
            json!({"kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": "1"}, "items": items}),
        ))
    };
    let reply = match (method.as_str(), route) {
        _ if lease_reply.is_some() => lease_reply.flatten(),
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => serde_json::from_slice(&body)
            .ok()
            .map(|review| (201, reviewed(review, cluster))),
        ("GET", "/api/v1/nodes") => {
            let items: Vec<Value> = cluster.nodes.iter().map(node).collect();
            list("NodeList", "v1", &items)
        }
        ("GET", "/api/v1/services") => list("ServiceList", "v1", &cluster.services),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices") => list(
            "EndpointSliceList",
            "discovery.k8s.io/v1",
            &cluster.endpoint_slices,
        ),
        ("GET", route) => route
            .strip_prefix("/api/v1/nodes/")
            .and_then(|name| cluster.nodes.iter().find(|(n, _)| n == name))
            .map(|n| (200, node(n))),
        _ => None,
    };
    let (status, body) = reply.unwrap_or_else(|| {
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404}),
        )
    });
    let body = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        match status {
            404 => "Not Found",
            409 => "Conflict",
            422 => "Unprocessable Entity",
            _ => "OK",
        },
        body.len()
    );
    let _ = stream.flush();
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

fn reviewed(mut review: Value, cluster: &Cluster) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked_for: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let owner = cluster.tokens.iter().find(|o| {
        o.token == token
            && (asked_for.is_empty() || asked_for.iter().any(|a| o.audiences.contains(a)))
    });
    review["status"] = match owner {
        Some(owner) => {
            let mut user = json!({"username": owner.username});
            if let Some(node) = &owner.node {
                user["extra"] = json!({"authentication.kubernetes.io/node-name": [node]});
            }
            json!({"authenticated": true, "user": user, "audiences": owner.audiences})
        }
        None => json!({"authenticated": false}),
    };
    review
}

fn node((name, addresses): &(String, Vec<String>)) -> Value {
    let mut listed: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    listed.push(json!({"type": "Hostname", "address": name}));
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "1"},
        "status": {"addresses": listed}})
}
