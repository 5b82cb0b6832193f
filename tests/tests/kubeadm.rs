//! A kubeadm-shaped cluster built from what an operator has: kubeadm's PKI and file layout,
//! the operator guide's commands for the server's certificates, the shipped static pod and
//! DaemonSet with their exact arguments, environment, mounts and capabilities, and a stand-in
//! kube-apiserver presenting kubeadm's apiserver certificate.
//!
//! What is remapped, and why: the static pod's host paths (`/etc/kubernetes/…`) live under a
//! test root, since this machine's own /etc is not the test's; the agent runs in a mount
//! namespace of its own where its pod's paths are real (its projected token and CA under
//! /var/run/secrets, the in-cluster API token, a BPF filesystem at /sys/fs/bpf), so its
//! arguments are the DaemonSet's as the kubelet expands them.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tether_tests::cgroup::TestCgroup;
use tether_tests::guard_site::kubelet;
use tether_tests::kube_api::{self, KubeApi, TokenOwner};
use tether_tests::manifests::{
    Placement, cluster_env, container_args, container_env, expand, mounts, pod_spec, read_yaml,
};
use tether_tests::netns::{Netns, control_plane_and_node};
use tether_tests::process::wait_until;
use tether_tests::procs::{Logged, built, http_get, spawn_logged};
use tether_tests::require_root;

/// The control-plane node's advertise address, and the worker's.
const CP: &str = "10.79.0.1";
const NODE: &str = "10.79.0.2";
/// The `kubernetes` Service's ClusterIP in kubeadm's default Service range.
const KUBERNETES_SERVICE: &str = "10.96.0.1";
const AGENT: &str = "system:serviceaccount:kube-system:konnectivity-agent";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/etc/kubernetes/pki` as `kubeadm init` leaves it, as far as tether touches it: the cluster
/// CA and kube-apiserver's serving certificate with kubeadm's names (its host name, the
/// `kubernetes` Service's names and ClusterIP, the advertise address; no 127.0.0.1).
fn kubeadm_pki(pki: &Path) {
    std::fs::create_dir_all(pki).unwrap();
    run(Command::new("openssl").current_dir(pki).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=kubernetes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
    ]));
    let names = format!(
        "subjectAltName=DNS:cp-1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:{KUBERNETES_SERVICE},IP:{CP}\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    );
    std::fs::write(pki.join("apiserver.ext"), names).unwrap();
    run(Command::new("openssl").current_dir(pki).args([
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
    ]));
    run(Command::new("openssl").current_dir(pki).args([
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "365",
        "-out",
        "apiserver.crt",
        "-extfile",
        "apiserver.ext",
    ]));
}

/// The operator guide's step 2, run as written but in `pki` and for the name agents dial here.
fn guide_certificates(pki: &Path) {
    let guide = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-guide.md"),
    )
    .unwrap();
    let step = guide
        .split("## 2. ")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap();
    assert!(step.contains("cd /etc/kubernetes/pki"), "{step}");
    let script = step
        .replace("cd /etc/kubernetes/pki", &format!("cd {}", pki.display()))
        .replace("DNS:cp.example.com,IP:192.0.2.10", &format!("IP:{CP}"));
    run(Command::new("bash").args(["-euo", "pipefail", "-c", &script]));
}

/// The static pod's arguments and environment with each mounted path under `root` (every
/// mount is a hostPath at the same path inside and out); makes the directories of
/// `DirectoryOrCreate` mounts there, as the kubelet would.
fn server_command(root: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let pod = &read_yaml("kubernetes/control-plane/konnectivity-server.yaml")[0];
    let spec = pod_spec(pod);
    let container = &spec["containers"][0];
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(container["securityContext"]["capabilities"]["add"].is_null());
    let placement = Placement {
        node_name: "cp-1",
        host_ip: CP,
    };
    let env = container_env(container, &placement, &cluster_env());
    let mut args = expand(&container_args(container), &env);
    assert_eq!(args.remove(0), "/tether-server");
    let mut mounted: Vec<(String, String)> = mounts(spec, container)
        .into_iter()
        .map(|m| {
            let (host, kind) = m.host.unwrap();
            assert_eq!(host, m.inside, "a hostPath mounted elsewhere");
            let under_root = root.join(host.trim_start_matches('/'));
            if kind == "DirectoryOrCreate" {
                std::fs::create_dir_all(&under_root).unwrap();
            }
            (m.inside, under_root.display().to_string())
        })
        .collect();
    mounted.sort_by_key(|(inside, _)| std::cmp::Reverse(inside.len()));
    let remapped = args
        .iter()
        .map(|arg| {
            mounted
                .iter()
                .find(|(inside, _)| arg.contains(inside.as_str()))
                .map_or(arg.clone(), |(inside, host)| {
                    arg.replace(inside.as_str(), host)
                })
        })
        .collect();
    (remapped, env)
}

/// The DaemonSet's arguments and environment as the kubelet makes them on `node-1`, with
/// cluster.env's values for this cluster, and the capabilities its container adds.
fn agent_command() -> (Vec<String>, Vec<(String, String)>, Vec<String>) {
    let daemonset = &read_yaml("kubernetes/agent-daemonset.yaml")[0];
    let container = &pod_spec(daemonset)["containers"][0];
    let mut config = cluster_env();
    config.insert("PROXY_SERVER_HOST".into(), CP.into());
    config.insert("CONTROL_PLANE_CIDR".into(), format!("{CP}/32"));
    let placement = Placement {
        node_name: "node-1",
        host_ip: NODE,
    };
    let env = container_env(container, &placement, &config);
    let mut args = expand(&container_args(container), &env);
    assert_eq!(args.remove(0), "/tether-agent");
    let caps = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_ascii_lowercase())
        .collect();
    (args, env, caps)
}

/// What the agent's pod sees under /var/run/secrets: the projected token and cluster CA, and
/// the in-cluster API token and CA.
fn pod_secrets(stage: &Path, pki: &Path) {
    let tokens = stage.join("tokens");
    let account = stage.join("serviceaccount");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::create_dir_all(&account).unwrap();
    std::fs::write(tokens.join("konnectivity-agent-token"), "projected-node-1").unwrap();
    std::fs::copy(pki.join("ca.crt"), tokens.join("ca.crt")).unwrap();
    std::fs::write(account.join("token"), "api-node-1").unwrap();
    std::fs::copy(pki.join("ca.crt"), account.join("ca.crt")).unwrap();
    std::fs::write(account.join("namespace"), "kube-system").unwrap();
}

fn start_agent(
    node: &Netns,
    cgroup: &TestCgroup,
    stage: &Path,
    caps: &[String],
    args: &[String],
    env: Vec<(String, String)>,
) -> Logged {
    let keep: String = caps.iter().map(|c| format!(",+{c}")).collect();
    // The pod's mounts, in a mount namespace of the agent's own: nothing of it reaches the
    // host's /run or its BPF filesystem, and it goes with the agent.
    let pod = r#"set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/secrets/tokens /run/secrets/kubernetes.io/serviceaccount
cp "$0"/tokens/* /run/secrets/tokens/
cp "$0"/serviceaccount/* /run/secrets/kubernetes.io/serviceaccount/
mount -t bpf bpf /sys/fs/bpf
mkdir /sys/fs/bpf/tether
echo $$ > "$1/cgroup.procs"
shift 2
exec setpriv "$@""#;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.path()))
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            pod,
        ])
        .arg(stage)
        .arg(cgroup.dir())
        .arg(format!("--bounding-set=-all{keep}"))
        .arg(format!("--inh-caps=-all{keep}"))
        .arg(built("tether-agent").unwrap())
        .args(args)
        .envs(env)
        // What the kubelet puts in every container's environment.
        .env("KUBERNETES_SERVICE_HOST", KUBERNETES_SERVICE)
        .env("KUBERNETES_SERVICE_PORT", "443");
    spawn_logged("agent", &mut cmd).unwrap()
}

fn ready(ns: &Netns, port: u16, path: &str) -> bool {
    ns.run(|| {
        wait_until(Duration::from_secs(20), || {
            http_get(port, path).is_ok_and(|(status, _)| status == 200)
        })
    })
    .unwrap()
}

/// A Service with one ready backend, as the API lists it.
fn web() -> (serde_json::Value, serde_json::Value) {
    (
        json!({"metadata": {"name": "web", "namespace": "default", "resourceVersion": "1"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        json!({"metadata": {"name": "web-1", "namespace": "default", "resourceVersion": "1",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}}]}),
    )
}

/// Following the operator guide on a kubeadm control plane ends in a working tunnel: the
/// server's TokenReviews pass kubeadm's apiserver certificate, the agent gets in with its
/// projected token and may claim its node, kube-apiserver's probe through the socket reaches
/// the kubelet, and the agent's opt-in Service map loads through the `kubernetes` Service.
#[test]
fn the_guide_on_a_kubeadm_control_plane_gives_a_working_tunnel() {
    require_root();
    let (cp, node) = control_plane_and_node("kadm", CP, NODE).unwrap();
    // kube-proxy's part: the `kubernetes` Service's ClusterIP leads to the apiserver.
    cp.ip(&[
        "addr",
        "add",
        &format!("{KUBERNETES_SERVICE}/32"),
        "dev",
        "lo",
    ])
    .unwrap();

    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/kubernetes");
    let pki = etc.join("pki");
    kubeadm_pki(&pki);
    guide_certificates(&pki);
    // Step 2's kubeconfig, at its place under the root.
    let kubeconfig = std::fs::read_to_string(tether_tests::manifests::deploy(
        "kubernetes/control-plane/konnectivity-server.kubeconfig",
    ))
    .unwrap()
    .replace("/etc/kubernetes", &etc.display().to_string());
    std::fs::write(etc.join("konnectivity-server.conf"), kubeconfig).unwrap();

    let (service, slice) = web();
    let cluster = kube_api::Cluster {
        tokens: vec![TokenOwner {
            token: "projected-node-1".into(),
            username: AGENT.into(),
            audiences: vec!["system:konnectivity-server".into()],
            node: Some("node-1".into()),
        }],
        nodes: vec![("node-1".into(), vec![NODE.into()])],
        services: vec![service],
        endpoint_slices: vec![slice],
    };
    let api = KubeApi::start(
        cluster,
        &pki.join("apiserver.crt"),
        &pki.join("apiserver.key"),
        &[
            (&cp, "127.0.0.1:6443".parse::<SocketAddr>().unwrap()),
            (&cp, format!("{KUBERNETES_SERVICE}:443").parse().unwrap()),
        ],
    );

    let (server_args, server_env) = server_command(root.path());
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", cp.path()))
        .args(["setpriv", "--bounding-set=-all", "--inh-caps=-all"])
        .arg(built("tether-server").unwrap())
        .args(&server_args)
        .envs(server_env);
    let server = spawn_logged("server", &mut cmd).unwrap();
    assert!(ready(&cp, 8134, "/healthz"), "the server never came up");

    kubelet(&node, NODE, "kubelet on node-1");
    let (mut agent_args, agent_env, caps) = agent_command();
    // The guide's opt-in for Services (step 6).
    agent_args.push("--services-from-kubernetes".into());
    let stage = tempfile::tempdir().unwrap();
    pod_secrets(stage.path(), &pki);
    let cgroup = TestCgroup::new("kadm").unwrap();
    let agent = start_agent(&node, &cgroup, stage.path(), &caps, &agent_args, agent_env);
    assert!(
        ready(&node, 8134, "/readyz") && ready(&cp, 8134, "/readyz"),
        "the agent never connected:\n{}\n{}",
        agent.logs.lines().join("\n"),
        server.logs.lines().join("\n")
    );

    let asked = api.asked();
    assert!(api.token_reviews() > 0, "{asked:?}");
    assert!(
        asked.iter().any(|a| a.path == "/api/v1/nodes/node-1"),
        "the agent's claim to node-1 was not checked: {asked:?}"
    );

    // Step 7: kube-apiserver's way in, through the socket its egress selector names.
    let socket = etc.join("konnectivity-server/konnectivity-server.socket");
    let probe = run(Command::new("nsenter")
        .arg(format!("--net={}", cp.path()))
        .arg(built("tether-server").unwrap())
        .args(["probe", "--uds-name"])
        .arg(&socket)
        .arg(format!("{NODE}:10250")));
    assert!(
        probe.contains("reachable: yes") && probe.contains("node-1"),
        "{probe}"
    );

    // The Service map came through the `kubernetes` Service with the in-cluster token.
    let explained = wait_until(Duration::from_secs(10), || {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", node.path()))
            .arg(built("tether-agent").unwrap())
            .args([
                "dial-policy",
                "check",
                "10.96.0.10:80",
                "--admin-server-port=8133",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .contains("service 10.96.0.10:80/tcp: steered in turn to 10.244.1.5:8080")
    });
    assert!(
        explained,
        "no Service map:\n{}",
        agent.logs.lines().join("\n")
    );
    assert!(
        api.asked().iter().any(|a| a
            .path
            .starts_with("/apis/discovery.k8s.io/v1/endpointslices")),
        "{:?}",
        api.asked()
    );
    drop(agent);
    drop(server);
}
