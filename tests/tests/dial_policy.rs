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
    let metadata = metadata_listener(&site);
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

/// `connect()` to `addr` from a process in the node's namespace, optionally inside `cgroup`:
/// the errno's name, or "connected".
fn connect_from(
    site: &Site,
    cgroup: Option<&tether_tests::cgroup::TestCgroup>,
    addr: &str,
) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = format!(
        "import socket, errno\n\
         s = socket.socket()\n\
         s.settimeout(3)\n\
         try:\n    s.connect(('{host}', {port})); print('connected')\n\
         except OSError as e:\n    print(errno.errorcode.get(e.errno, e))\n"
    );
    let out = python_in_node(site, cgroup, &script);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs a Python `script` in the node's namespace, inside `cgroup` when given.
fn python_in_node(
    site: &Site,
    cgroup: Option<&tether_tests::cgroup::TestCgroup>,
    script: &str,
) -> std::process::Output {
    let mut cmd = match cgroup {
        Some(cgroup) => cgroup.command(std::path::Path::new("nsenter")),
        None => std::process::Command::new("nsenter"),
    };
    cmd.arg(format!("--net={}", site.node.path()))
        .args(["python3", "-c", script])
        .output()
        .unwrap()
}

/// What an operator runs to ask the live agent: `tether-agent dial-policy check TARGET`, in
/// the node's namespace; its output and errors.
fn policy_check(site: &Site, agent: &tether_tests::procs::Agent, target: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", site.node.path()))
        .arg(tether_tests::procs::built("tether-agent").unwrap())
        .args(["dial-policy", "check", target])
        .arg(format!("--admin-server-port={}", agent.admin_port))
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The cloud metadata address, bound in the node's namespace, with a listener.
fn metadata_listener(site: &Site) -> TcpListener {
    site.node
        .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"])
        .unwrap();
    site.node
        .run(|| TcpListener::bind(METADATA))
        .unwrap()
        .unwrap()
}

/// The kernel enforces the same policy on anything in the agent's cgroup: a helper placed
/// there that calls connect() itself, bypassing the agent's code, gets EPERM for the metadata
/// address and connects elsewhere; outside the cgroup nothing changes.
#[test]
fn a_process_in_the_agents_cgroup_cannot_connect_where_the_policy_denies() {
    let site = Site::new("dk");
    let _metadata = metadata_listener(&site);
    let cgroup = tether_tests::cgroup::TestCgroup::new("dk").unwrap();
    let mut extra: Vec<String> = vec![
        "--guard-mode=off".into(),
        "--dial-deny=198.51.100.0/24".into(),
    ];
    extra.push("--worker-threads=2".into());
    let agent = site.agent_in_cgroup(&cgroup, None, &extra);
    let on_cgroup = format!("of cgroup {}\n", cgroup.dir().display());
    let enforced = policy_check(&site, &agent, METADATA);
    assert!(
        enforced.contains(&on_cgroup),
        "not on the agent's own cgroup: {enforced}"
    );

    assert_eq!(connect_from(&site, Some(&cgroup), METADATA), "EPERM");
    // The proxy server is allowed (the agent needs it), and so is what no rule names.
    let server = format!(
        "{}:{}",
        tether_tests::guard_site::CP,
        site.server.agent_port
    );
    assert_eq!(connect_from(&site, Some(&cgroup), &server), "connected");
    assert_eq!(
        connect_from(&site, None, METADATA),
        "connected",
        "a process outside the agent's cgroup was policed"
    );

    let denied = metric_in(
        &site.node,
        agent.health_port,
        r#"tether_agent_dial_policy_decisions_total{rule="deny 169.254.0.0/16 (default: link-local, which holds cloud metadata endpoints)",decision="deny"}"#,
    );
    assert_eq!(denied, Some(1));

    let check = |target: &str| policy_check(&site, &agent, target);
    assert_eq!(
        check(METADATA),
        format!(
            "169.254.169.254:80: deny\n\
             rule: deny 169.254.0.0/16 (default: link-local, which holds cloud metadata endpoints)\n\
             enforced: by the agent and in the kernel on the connect() and sendmsg() {on_cgroup}\
             kernel decisions by this rule so far: 1\n"
        )
    );
    let report = check(&server);
    assert!(
        report.starts_with(&format!(
            "{server}: allow\nrule: allow {}",
            tether_tests::guard_site::CP
        )),
        "{report}"
    );
    assert!(check("metadata:80").contains("is not IP:PORT"));

    // The hooks are pinned: an agent killed outright leaves its cgroup policed...
    agent
        .logged
        .process
        .signal(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(cgroup.dir().join("cgroup.procs"))
        .unwrap()
        .trim()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the killed agent stayed in its cgroup"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        connect_from(&site, Some(&cgroup), METADATA),
        "EPERM",
        "the hooks ended with the agent"
    );
    // ...and the next agent takes them over, attaching its own before removing the old.
    let again = site.agent_in_cgroup(&cgroup, None, &extra);
    // The log line is the subject: only it says how many hooks the agent took over.
    let enforced = again
        .logged
        .logs
        .wait_for("dial policy enforced in the kernel", Duration::from_secs(5))
        .unwrap();
    assert!(enforced.contains(r#""replaced":6"#), "{enforced}");
    assert_eq!(connect_from(&site, Some(&cgroup), METADATA), "EPERM");
    let pins = std::fs::read_dir(site.bpffs.root().join("dial-links"))
        .unwrap()
        .count();
    assert_eq!(pins, 6, "one pinned link per hook");
    drop(again);
}

/// A backend in the node's namespace that answers every connection with its name.
fn named_backend(site: &Site, addr: &str, name: &'static str) {
    let listener = site.node.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = std::io::Write::write_all(&mut stream, name.as_bytes());
        }
    });
}

/// backend-1 to backend-3 on 10.244.0.1 to .3, port 8080, in the node's namespace.
fn three_backends(site: &Site) {
    for (ip, name) in [
        ("10.244.0.1", "backend-1"),
        ("10.244.0.2", "backend-2"),
        ("10.244.0.3", "backend-3"),
    ] {
        site.node
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .unwrap();
        named_backend(site, &format!("{ip}:8080"), name);
    }
}

/// 300 dials to the Service through the tunnel reach each of the three backends within 10%.
async fn assert_spread_evenly(target: &Target) {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..300 {
        *counts.entry(through_service(target).await).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (name, count) in &counts {
        assert!(
            (90..=110).contains(count),
            "{name} got {count} of 300 dials: {counts:?}"
        );
    }
}

/// Dials the Service through the tunnel and returns the name of the backend that answered.
async fn through_service(target: &Target) -> String {
    use tokio::io::AsyncReadExt;
    let mut io = http_connect(target, "10.96.0.10:80")
        .await
        .unwrap()
        .unwrap_or_else(|response| panic!("the Service dial failed: {response}"));
    let mut name = String::new();
    io.read_to_string(&mut name).await.unwrap();
    name
}

/// What a process in `cgroup` that connects to `host` port 80 itself sees: the peer address
/// `getpeername()` reports (address and port) and what the other end sent; or the error.
fn peer_and_answer(site: &Site, cgroup: &tether_tests::cgroup::TestCgroup, host: &str) -> String {
    let script = format!(
        "import socket\ns = socket.create_connection(('{host}', 80), 3)\nprint(s.getpeername()[:2], s.recv(64).decode())\n"
    );
    let out = python_in_node(site, Some(cgroup), &script);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Service steering without kube-proxy: dials to a ClusterIP that no address, route or
/// iptables rule in the node's namespace knows are rewritten in the kernel to its backends,
/// in turn; getpeername() still shows the Service; a backend taken out of the map gets no new
/// connections.
#[tokio::test(flavor = "multi_thread")]
async fn dials_to_a_service_reach_its_backends_evenly_without_kube_proxy() {
    let site = Site::new("sv");
    three_backends(&site);
    let rules = site
        .node
        .run(|| std::process::Command::new("iptables-save").output())
        .unwrap()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("10.96.0.10"),
        "kube-proxy-style rules exist"
    );
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("services");
    std::fs::write(
        &map,
        "# the Service and its three ready backends\n10.96.0.10:80/tcp 10.244.0.1:8080 10.244.0.2:8080 10.244.0.3:8080\n",
    )
    .unwrap();
    let cgroup = tether_tests::cgroup::TestCgroup::new("sv").unwrap();
    let mut extra: Vec<String> = vec![
        "--guard-mode=off".into(),
        "--dial-deny=198.51.100.0/24".into(),
    ];
    extra.push(format!("--service-map-file={}", map.display()));
    let agent = site.agent_in_cgroup(&cgroup, None, &extra);
    let target = Target::Uds(site.socket.clone());

    assert_spread_evenly(&target).await;
    assert_eq!(
        metric_in(
            &site.node,
            agent.health_port,
            r#"tether_agent_service_connects_total{service="10.96.0.10:80/tcp"}"#
        ),
        Some(300)
    );

    // A process in the agent's cgroup sees the address it dialled, not the backend's.
    let said = peer_and_answer(&site, &cgroup, "10.96.0.10");
    assert!(said.starts_with("('10.96.0.10', 80) backend-"), "{said}");

    // backend-3 leaves the map: no new connection goes to it.
    std::fs::write(&map, "10.96.0.10:80/tcp 10.244.0.1:8080 10.244.0.2:8080\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent
        .logged
        .logs
        .lines()
        .iter()
        .any(|l| l.contains("service map applied") && l.contains(r#""backends":2"#))
    {
        assert!(Instant::now() < deadline, "the changed map was not applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..30 {
        let name = through_service(&target).await;
        assert_ne!(name, "backend-3", "a removed backend got a new connection");
    }
    let report = policy_check(&site, &agent, "10.96.0.10:80");
    assert!(
        report.contains(
            "service 10.96.0.10:80/tcp: steered in turn to 10.244.0.1:8080, 10.244.0.2:8080\n"
        ),
        "{report}"
    );
    drop(agent);
}

/// Just enough of kube-apiserver for the agent's Services watch: lists of Services and
/// EndpointSlices, and watches that stay open; the test pushes EndpointSlice events into them.
struct ApiServer {
    kubeconfig: std::path::PathBuf,
    watchers: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

const WEB_SERVICE: &str = r#"{"metadata":{"name":"web","namespace":"default","resourceVersion":"1"},"spec":{"clusterIP":"10.96.0.10","clusterIPs":["10.96.0.10"],"ports":[{"name":"http","port":80,"protocol":"TCP"}]}}"#;

fn web_slice(addresses: &[&str], version: u32) -> String {
    let endpoints: Vec<String> = addresses
        .iter()
        .map(|a| format!(r#"{{"addresses":["{a}"],"conditions":{{"ready":true}}}}"#))
        .collect();
    format!(
        r#"{{"metadata":{{"name":"web-1","namespace":"default","resourceVersion":"{version}","labels":{{"kubernetes.io/service-name":"web"}}}},"addressType":"IPv4","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],"endpoints":[{}]}}"#,
        endpoints.join(",")
    )
}

impl ApiServer {
    fn start(site: &Site, dir: &std::path::Path, slice: String) -> ApiServer {
        use std::io::{BufRead, Write};
        let cp = tether_tests::guard_site::CP;
        let listener = site.cp.run(|| TcpListener::bind((cp, 0))).unwrap().unwrap();
        let port = listener.local_addr().unwrap().port();
        let watchers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = watchers.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (shared, slice) = (shared.clone(), slice.clone());
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                    let mut request = String::new();
                    reader.read_line(&mut request).unwrap();
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 2 {
                        line.clear();
                    }
                    let mut stream = stream;
                    let is_slices = request.contains("/endpointslices");
                    if request.contains("watch=true") {
                        write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
                        if is_slices {
                            shared.lock().unwrap().push(stream);
                        } else {
                            std::thread::sleep(Duration::from_secs(60));
                        }
                        return;
                    }
                    let body = if is_slices {
                        format!(
                            r#"{{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{{"resourceVersion":"1"}},"items":[{slice}]}}"#
                        )
                    } else {
                        format!(
                            r#"{{"kind":"ServiceList","apiVersion":"v1","metadata":{{"resourceVersion":"1"}},"items":[{WEB_SERVICE}]}}"#
                        )
                    };
                    // One request per connection, said so: a client that reused this one
                    // for its watch would find it closed.
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                });
            }
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{cp}:{port}\nusers:\n- name: agent\n  user:\n    token: agent-credential\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: agent\ncurrent-context: stand-in\n"
            ),
        )
        .unwrap();
        ApiServer {
            kubeconfig,
            watchers,
        }
    }

    /// Sends a watch event to every open EndpointSlice watch.
    fn slice_event(&self, kind: &str, slice: &str) {
        use std::io::Write;
        let event = format!("{{\"type\":\"{kind}\",\"object\":{slice}}}\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.watchers.lock().unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the agent never watched EndpointSlices"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for stream in self.watchers.lock().unwrap().iter_mut() {
            write!(stream, "{:x}\r\n{event}\r\n", event.len()).unwrap();
            stream.flush().unwrap();
        }
    }
}

/// Waits for the agent's log to say a service map with `backends` backends was applied.
fn wait_applied(agent: &tether_tests::procs::Agent, backends: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let needle = format!(r#""backends":{backends}"#);
    while !agent
        .logged
        .logs
        .lines()
        .iter()
        .any(|l| l.contains("service map applied") && l.contains(&needle))
    {
        assert!(
            Instant::now() < deadline,
            "no service map with {backends} backends was applied: {:?}",
            agent.logged.logs.lines()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The three backends, and a stand-in API whose EndpointSlice lists them all.
fn three_backends_behind_the_api(site: &Site, dir: &std::path::Path) -> ApiServer {
    three_backends(site);
    ApiServer::start(
        site,
        dir,
        web_slice(&["10.244.0.1", "10.244.0.2", "10.244.0.3"], 1),
    )
}

/// backend-3 leaves the EndpointSlice by a watch event: once the agent applies the map, no
/// new connection goes to it.
async fn remove_backend_3(api: &ApiServer, agent: &tether_tests::procs::Agent, target: &Target) {
    api.slice_event("MODIFIED", &web_slice(&["10.244.0.1", "10.244.0.2"], 2));
    wait_applied(agent, 2);
    for _ in 0..30 {
        assert_ne!(
            through_service(target).await,
            "backend-3",
            "a backend removed from the slice got a new connection"
        );
    }
}

/// The Service map from the Kubernetes API (a stand-in for kube-apiserver): the Service's
/// EndpointSlice spreads dials over its three backends, and a backend removed from the slice
/// by a watch event gets no new connection.
#[tokio::test(flavor = "multi_thread")]
async fn services_and_endpointslices_from_the_api_steer_dials() {
    let site = Site::new("kb");
    let dir = tempfile::tempdir().unwrap();
    let api = three_backends_behind_the_api(&site, dir.path());
    let cgroup = tether_tests::cgroup::TestCgroup::new("kb").unwrap();
    let mut extra: Vec<String> = vec![
        "--guard-mode=off".into(),
        "--dial-deny=198.51.100.0/24".into(),
    ];
    extra.push("--services-from-kubernetes".into());
    extra.push(format!(
        "--services-kubeconfig={}",
        api.kubeconfig.display()
    ));
    let agent = site.agent_in_cgroup(&cgroup, None, &extra);
    wait_applied(&agent, 3);
    let target = Target::Uds(site.socket.clone());

    assert_spread_evenly(&target).await;
    remove_backend_3(&api, &agent, &target).await;
    drop(agent);
}

/// On a plain host the agent's cgroup holds other processes, which are not the agent's to
/// police: it creates a child cgroup, joins it and puts its hooks there.
#[test]
fn beside_other_processes_the_agent_polices_only_a_child_cgroup_of_its_own() {
    let site = Site::new("dc");
    let _metadata = metadata_listener(&site);
    let cgroup = tether_tests::cgroup::TestCgroup::new("dc").unwrap();
    let mut neighbour = cgroup
        .command(std::path::Path::new("sleep"))
        .arg("30")
        .spawn()
        .unwrap();
    let agent = site.agent_in_cgroup(
        &cgroup,
        None,
        &[
            "--guard-mode=off".into(),
            "--dial-deny=198.51.100.0/24".into(),
        ],
    );
    let child = cgroup.dir().join("tether-agent");
    let enforced = policy_check(&site, &agent, METADATA);
    assert!(
        enforced.contains(&format!("of cgroup {}\n", child.display())),
        "not on a child cgroup: {enforced}"
    );
    let members = std::fs::read_to_string(child.join("cgroup.procs")).unwrap();
    assert_eq!(
        members.trim(),
        agent.logged.process.pid().to_string(),
        "the agent alone joined the child"
    );
    assert_eq!(
        connect_from(&site, Some(&cgroup), METADATA),
        "connected",
        "a neighbour in the agent's former cgroup was policed"
    );
    drop(agent);
    let _ = neighbour.kill();
    let _ = neighbour.wait();
}

/// The DaemonSet's agent under exactly its capabilities (BPF, NET_ADMIN, PERFMON): the guard,
/// the dial hooks on the agent's cgroup, and Services from the API as an operator turns them
/// on (`--services-from-kubernetes`). The hooks attach,
/// the kernel refuses a denied connect(), and after the agent gives up its capabilities a
/// watch event still reaches the Service map.
#[tokio::test(flavor = "multi_thread")]
async fn the_dial_hooks_run_with_only_the_daemonsets_capabilities() {
    let site = Site::new("dq");
    let _metadata = metadata_listener(&site);
    let dir = tempfile::tempdir().unwrap();
    let api = three_backends_behind_the_api(&site, dir.path());
    let cgroup = tether_tests::cgroup::TestCgroup::new("dq").unwrap();
    let extra = [
        "--guard-interface=eth0".to_owned(),
        format!("--control-plane-cidr={}/32", tether_tests::guard_site::CP),
        "--dial-deny=198.51.100.0/24".to_owned(),
        "--services-from-kubernetes".to_owned(),
        format!("--services-kubeconfig={}", api.kubeconfig.display()),
    ];
    let agent = site.agent_in_cgroup(&cgroup, Some(&["bpf", "net_admin", "perfmon"]), &extra);
    // Started (which Agent waits for): the guard is attached, the hooks are in place and every
    // other capability is given up.
    assert_eq!(
        tether_tests::guard_site::xdp_attach_mode(&site.node, "eth0"),
        Some("native")
    );
    // The bounding set is the DaemonSet's: CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.logged.process.pid())).unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap();
    assert_eq!(
        u64::from_str_radix(bounding.trim(), 16).unwrap(),
        (1 << 12) | (1 << 38) | (1 << 39)
    );
    wait_applied(&agent, 3);
    assert_eq!(connect_from(&site, Some(&cgroup), METADATA), "EPERM");

    let target = Target::Uds(site.socket.clone());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(through_service(&target).await);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    remove_backend_3(&api, &agent, &target).await;
    assert!(
        !agent.logged.logs.contains("Operation not permitted"),
        "{:?}",
        agent.logged.logs.lines()
    );
}

/// For each `(how, address)`, what a process in the node's namespace (inside `cgroup`) gets
/// from the kernel at once: "EPERM" when a hook refuses, "went ahead" when the call did (sent,
/// in progress, or no route out of the namespace), and any other error as Python shows it.
/// `how` is `tcp` (a non-blocking connect), `udp` (an unconnected sendto) or `udp-connect`.
fn kernel_says(
    site: &Site,
    cgroup: &tether_tests::cgroup::TestCgroup,
    calls: &[(&str, &str)],
) -> Vec<String> {
    let script = "import errno, socket, sys\n\
         for line in sys.stdin.read().splitlines():\n\
         \x20   how, addr = line.split(' ', 1)\n\
         \x20   host, port = addr.rsplit(':', 1)\n\
         \x20   host = host.strip('[]')\n\
         \x20   family = socket.AF_INET6 if ':' in host else socket.AF_INET\n\
         \x20   kind = socket.SOCK_STREAM if how == 'tcp' else socket.SOCK_DGRAM\n\
         \x20   s = socket.socket(family, kind)\n\
         \x20   s.setblocking(False)\n\
         \x20   try:\n\
         \x20       if how == 'udp':\n\
         \x20           s.sendto(b'x', (host, int(port)))\n\
         \x20       else:\n\
         \x20           s.connect((host, int(port)))\n\
         \x20       print('went ahead')\n\
         \x20   except OSError as e:\n\
         \x20       went = {errno.EINPROGRESS, errno.ENETUNREACH, errno.EHOSTUNREACH}\n\
         \x20       print('EPERM' if e.errno == errno.EPERM else 'went ahead' if e.errno in went else repr(e))\n\
         \x20   s.close()\n";
    let mut child = cgroup
        .command(std::path::Path::new("nsenter"))
        .arg(format!("--net={}", site.node.path()))
        .args(["python3", "-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = calls
        .iter()
        .map(|(how, addr)| format!("{how} {addr}\n"))
        .collect();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        said.len(),
        calls.len(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// The kernel hooks and the agent's own policy decide alike, across IPv4 and IPv6, port
/// ranges, overlapping prefixes, a tie (deny wins), IPv4 reached through mapped IPv6 and an
/// IPv4 rule written as a mapped prefix, the defaults, and what no rule names under an allow
/// list; for TCP and UDP connect() and unconnected UDP sendto(). Each destination is also
/// checked against the decision the rules were written for.
#[test]
fn the_kernel_and_the_agent_decide_every_destination_alike() {
    let site = Site::new("dm");
    let cgroup = tether_tests::cgroup::TestCgroup::new("dm").unwrap();
    let extra: Vec<String> = [
        "--guard-mode=off",
        "--dial-allow=10.1.0.0/16:80-90",
        "--dial-deny=10.1.2.0/24",
        "--dial-allow=10.1.2.3:85",
        "--dial-allow=10.1.2.4:85",
        "--dial-deny=10.1.2.4:85",
        "--dial-deny=[::ffff:10.1.3.0/120]",
        "--dial-allow=[fd00:1::/64]:443",
        "--dial-deny=[fd00:1::/64]:443-444",
        "--dial-allow=[fd00:1::/64]:440-449",
        "--dial-deny=fd00:1::5",
    ]
    .map(str::to_owned)
    .to_vec();
    // Started (which Agent waits for): the hooks are in place.
    let agent = site.agent_in_cgroup(&cgroup, None, &extra);

    let (allow, deny) = ("allow", "deny");
    let cases = [
        ("tcp", "10.1.0.1:80", allow),
        ("tcp", "10.1.0.1:91", deny), // no rule: an allow list was given
        ("tcp", "10.1.2.3:85", allow), // a /32 before the /24's deny
        ("tcp", "10.1.2.3:86", deny),
        ("tcp", "10.1.2.4:85", deny), // the same rule both ways: deny wins
        ("tcp", "10.1.5.5:90", allow),
        ("tcp", "10.1.3.5:85", deny), // the mapped prefix is the IPv4 one
        ("tcp", "169.254.169.254:80", deny),
        ("tcp", "127.0.0.1:10250", deny),
        ("tcp", "192.0.2.1:80", deny),
        ("tcp", "[fd00:1::1]:443", allow), // one port before its range
        ("tcp", "[fd00:1::1]:444", deny),  // the narrower range before the wider
        ("tcp", "[fd00:1::1]:445", allow),
        ("tcp", "[fd00:1::5]:443", deny), // a /128 before the /64
        ("tcp", "[fd00:2::1]:443", deny),
        ("tcp", "[::1]:80", deny),
        ("tcp", "[::ffff:10.1.0.1]:80", allow), // IPv4 through an IPv6 socket
        ("tcp", "[::ffff:10.1.2.3]:86", deny),
        ("tcp", "[::ffff:169.254.169.254]:80", deny),
        ("udp", "10.1.0.1:80", allow),
        ("udp", "10.1.2.3:86", deny),
        ("udp", "169.254.169.254:53", deny),
        ("udp", "[fd00:1::1]:444", deny),
        ("udp", "[fd00:1::1]:443", allow),
        ("udp-connect", "10.1.2.4:85", deny),
        ("udp-connect", "[fd00:1::1]:445", allow),
    ];
    let calls: Vec<(&str, &str)> = cases.iter().map(|(how, addr, _)| (*how, *addr)).collect();
    let kernel = kernel_says(&site, &cgroup, &calls);
    for ((how, addr, intended), kernel) in cases.iter().zip(&kernel) {
        assert!(
            kernel == "EPERM" || kernel == "went ahead",
            "{how} {addr}: {kernel}"
        );
        let report = policy_check(&site, &agent, addr);
        let agent_says = report
            .lines()
            .next()
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_default();
        assert_eq!(agent_says, *intended, "agent on {addr}: {report}");
        let refused = kernel == "EPERM";
        assert_eq!(
            refused,
            *intended == deny,
            "kernel on {how} {addr}: {kernel}; agent: {report}"
        );
    }
}

/// Destinations the kernel turns into the node itself, and cloud metadata endpoints outside
/// link-local: none is reachable through the tunnel or from the agent's cgroup under the
/// built-in rules. Linux connects an unspecified destination (`0.0.0.0`, `::`, and `::` or
/// `0.0.0.0` written as mapped or compatible IPv6) to the local host, where a listener bound
/// only to loopback takes it; AWS's IPv6 and Alibaba Cloud's metadata addresses are bound in
/// the node's namespace with listeners of their own.
#[tokio::test(flavor = "multi_thread")]
async fn unspecified_destinations_and_cloud_metadata_are_refused() {
    let site = Site::new("du");
    let cgroup = tether_tests::cgroup::TestCgroup::new("du").unwrap();
    // Loopback-only listeners: what 0.0.0.0 and :: reach.
    let local4 = site
        .node
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let port = local4.local_addr().unwrap().port();
    let local6 = site
        .node
        .run(|| TcpListener::bind(("::1", port)))
        .unwrap()
        .unwrap();
    let mut metadata = Vec::new();
    for (address, len) in [("fd00:ec2::254", 128), ("100.100.100.200", 32)] {
        site.node
            .ip(&["addr", "add", &format!("{address}/{len}"), "dev", "lo"])
            .unwrap();
        let listener = site
            .node
            .run(|| TcpListener::bind((address, 80)))
            .unwrap()
            .unwrap();
        metadata.push(listener);
    }
    let listeners: Vec<&TcpListener> = [&local4, &local6].into_iter().chain(&metadata).collect();
    for listener in &listeners {
        listener.set_nonblocking(true).unwrap();
    }

    // The built-in rules alone (an unrelated deny keeps the harness from adding its own).
    let extra = ["--guard-mode=off", "--dial-deny=198.51.100.0/24"].map(str::to_owned);
    let agent = site.agent_in_cgroup(&cgroup, None, &extra);
    let target = Target::Uds(site.socket.clone());
    let unspecified = [
        format!("0.0.0.0:{port}"),
        format!("0.1.2.3:{port}"),
        format!("[::]:{port}"),
        format!("[::ffff:0.0.0.0]:{port}"),
        format!("[::0.0.0.0]:{port}"),
        format!("[::127.0.0.1]:{port}"),
    ];
    let cloud = ["[fd00:ec2::254]:80", "100.100.100.200:80"].map(str::to_owned);
    for destination in unspecified.iter().chain(&cloud) {
        let response = http_connect(&target, destination)
            .await
            .unwrap()
            .err()
            .unwrap_or_else(|| panic!("{destination} was reached through the tunnel"));
        assert!(
            response.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
                && response.contains("denied by tether-agent's dial policy: deny"),
            "{destination}: {response:?}"
        );
    }

    // A process in the agent's cgroup that calls connect() and sendto() itself.
    let calls: Vec<(&str, &str)> = unspecified
        .iter()
        .chain(&cloud)
        .flat_map(|a| [("tcp", a.as_str()), ("udp", a.as_str())])
        .collect();
    for ((how, addr), kernel) in calls.iter().zip(kernel_says(&site, &cgroup, &calls)) {
        assert_eq!(kernel, "EPERM", "{how} {addr} from the agent's cgroup");
    }
    for listener in listeners {
        assert!(
            listener.accept().is_err(),
            "{} saw a connection",
            listener.local_addr().unwrap()
        );
    }
    drop(agent);
}

/// Service steering has no gap an IPv6 socket or a large cluster opens: a dial to the
/// IPv4-mapped form of a Service address (`[::ffff:VIP]:port`) is steered like the address
/// itself (left alone, whatever steers next would pick a backend the policy never judged),
/// and a map past the hooks' limits steers all that fits, says what did not, and keeps
/// following changes.
#[tokio::test(flavor = "multi_thread")]
async fn mapped_service_addresses_are_steered_and_an_oversized_map_keeps_what_fits() {
    let site = Site::new("sm");
    three_backends(&site);
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("services");
    // 4 097 Services (the hooks hold 4 096): the Service under test sorts first, the last of
    // the filler does not fit.
    let write_map = |backends: &str| {
        let mut text = format!("10.96.0.10:80/tcp {backends}\n");
        for i in 0..4096u32 {
            let [_, _, c, d] = (0x0a61_0000 + i).to_be_bytes();
            text.push_str(&format!("10.97.{c}.{d}:80/tcp 10.244.0.1:8080\n"));
        }
        std::fs::write(&map, text).unwrap();
    };
    write_map("10.244.0.1:8080 10.244.0.2:8080 10.244.0.3:8080");
    let cgroup = tether_tests::cgroup::TestCgroup::new("sm").unwrap();
    let extra: Vec<String> = vec![
        "--guard-mode=off".into(),
        "--dial-deny=198.51.100.0/24".into(),
        format!("--service-map-file={}", map.display()),
    ];
    let agent = site.agent_in_cgroup(&cgroup, None, &extra);
    let target = Target::Uds(site.socket.clone());
    let not_steered = || {
        metric_in(
            &site.node,
            agent.health_port,
            "tether_agent_services_not_steered",
        )
    };
    assert_eq!(not_steered(), Some(1));

    let through_mapped = || async {
        use tokio::io::AsyncReadExt;
        let mut io = http_connect(&target, "[::ffff:10.96.0.10]:80")
            .await
            .unwrap()
            .unwrap_or_else(|response| panic!("the mapped Service dial failed: {response}"));
        let mut name = String::new();
        io.read_to_string(&mut name).await.unwrap();
        name
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(through_mapped().await);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["backend-1", "backend-2", "backend-3"]
    );
    // An IPv6 socket in the agent's cgroup sees the mapped Service address it dialled.
    let said = peer_and_answer(&site, &cgroup, "::ffff:10.96.0.10");
    assert!(
        said.starts_with("('::ffff:10.96.0.10', 80) backend-"),
        "{said}"
    );

    // Still too large, and changed: the change is steered.
    write_map("10.244.0.1:8080");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !policy_check(&site, &agent, "10.96.0.10:80")
        .contains("service 10.96.0.10:80/tcp: steered in turn to 10.244.0.1:8080\n")
    {
        assert!(
            Instant::now() < deadline,
            "the changed map was not applied: {}",
            policy_check(&site, &agent, "10.96.0.10:80")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..10 {
        assert_eq!(through_mapped().await, "backend-1");
    }
    assert_eq!(not_steered(), Some(1));
}
