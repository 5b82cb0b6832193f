//! What `deploy/` ships is checked against the binaries it runs: the systemd unit verifies
//! with systemd's own checker, and the flags it passes parse.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use tether_tests::manifests::{
    self, Mount, Placement, cluster_env, container_args, deploy, expand, flag_value, mounts,
    pod_spec, read_yaml,
};
use tether_tests::procs::built;

/// The agent's flags in the example environment file, split as systemd splits `$VAR`.
fn example_args() -> Vec<String> {
    let env = std::fs::read_to_string(deploy("systemd/agent.env.example")).unwrap();
    let line = env
        .lines()
        .find_map(|l| l.strip_prefix("TETHER_AGENT_ARGS="))
        .expect("no TETHER_AGENT_ARGS line");
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(deploy("systemd/tether-agent.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("agent.env");
    std::fs::copy(deploy("systemd/agent.env.example"), &env).unwrap();
    // Where this checkout's binary and env file are; verify checks that both exist.
    let agent = built("tether-agent").unwrap();
    let local = unit
        .replace("/usr/local/bin/tether-agent", &agent.display().to_string())
        .replace("/etc/tether/agent.env", &env.display().to_string());
    assert_ne!(
        local, unit,
        "the unit no longer names the paths this test replaces"
    );
    let path = dir.path().join("tether-agent.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains(&*path.display().to_string()),
        "systemd-analyze has remarks on the unit:\n{stderr}"
    );
}

#[test]
fn the_systemd_example_flags_parse() {
    let mut args = vec!["tether-agent".to_owned()];
    args.extend(example_args());
    if let Err(err) = tether_agent::config::Args::try_parse_from(&args) {
        panic!("{args:?}: {err}");
    }
}

/// The Kubernetes API objects under deploy/kubernetes, each validated against the schemas.
const API_MANIFESTS: &[&str] = &[
    "kubernetes/agent-serviceaccount.yaml",
    "kubernetes/agent-rbac.yaml",
    "kubernetes/agent-daemonset.yaml",
    "kubernetes/server-rbac.yaml",
    "kubernetes/control-plane/konnectivity-server.yaml",
    "kubernetes/uninstall/guard-uninstall.yaml",
];

/// Configuration files that are not API objects (kustomize's, kube-apiserver's, a
/// kubeconfig): no schema validates them; the consistency test reads them.
const OTHER_YAML: &[&str] = &[
    "kubernetes/kustomization.yaml",
    "kubernetes/uninstall/kustomization.yaml",
    "kubernetes/control-plane/egress-selector-grpc.yaml",
    "kubernetes/control-plane/egress-selector-http-connect.yaml",
    "kubernetes/control-plane/konnectivity-server.kubeconfig",
    "kubernetes/control-plane/kubeadm-apiserver.yaml",
];

/// The oldest supported Kubernetes (1.30: projected tokens name their node, which
/// --bind-agent-identity=token needs) and the newest schemas kubernetes-validate has.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn yaml_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "kubeconfig")
        ) {
            let relative = path.strip_prefix(deploy("")).unwrap();
            out.push(relative.display().to_string());
        }
    }
}

#[test]
fn every_manifest_is_either_validated_or_read_by_the_consistency_checks() {
    let mut found = Vec::new();
    yaml_files(&deploy("kubernetes"), &mut found);
    found.sort();
    let mut known: Vec<String> = API_MANIFESTS
        .iter()
        .chain(OTHER_YAML)
        .map(|s| s.to_string())
        .collect();
    known.sort();
    assert_eq!(
        found, known,
        "a manifest was added or removed: list it here"
    );
}

fn kubernetes_validate(version: &str, files: &[PathBuf]) -> std::process::Output {
    Command::new(tether_tests::python_tool("kubernetes-validate").unwrap())
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = API_MANIFESTS.iter().map(|f| deploy(f)).collect();
    for version in KUBERNETES_VERSIONS {
        let out = kubernetes_validate(version, &files);
        assert!(
            out.status.success(),
            "Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The validator catches what it must: a misspelled field in a copy of the DaemonSet.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(deploy("kubernetes/agent-daemonset.yaml")).unwrap();
    let misspelled = text.replace("hostNetwork:", "hostNetwrok:");
    assert_ne!(misspelled, text);
    std::fs::write(&broken, misspelled).unwrap();
    let out = kubernetes_validate(KUBERNETES_VERSIONS[0], &[broken]);
    assert!(
        !out.status.success(),
        "a misspelled field passed validation: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn deploy_passes_yamllint() {
    let root = deploy("..");
    let out = Command::new(tether_tests::python_tool("yamllint").unwrap())
        .current_dir(&root)
        .args([
            "--strict",
            "--config-file",
            ".yamllint.yaml",
            "deploy",
            ".yamllint.yaml",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every environment variable a command line (and its subcommands) reads.
fn env_names(command: &clap::Command) -> Vec<String> {
    let mut names: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for sub in command.get_subcommands() {
        names.extend(env_names(sub));
    }
    names
}

/// Each tether container in the manifests: its environment is read by the binary or used in
/// its arguments, every `$(VAR)` is defined, and the arguments, as a node expands them, parse.
#[test]
fn every_flag_and_env_var_in_the_manifests_is_accepted() {
    use clap::CommandFactory;
    let mut checked = 0;
    for manifest in API_MANIFESTS {
        for object in read_yaml(manifest) {
            let spec = if object["kind"] == "Pod" {
                &object["spec"]
            } else {
                &object["spec"]["template"]["spec"]
            };
            for container in spec["containers"].as_array().into_iter().flatten() {
                let command: Vec<String> = container["command"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| c.as_str().unwrap().to_owned())
                    .collect();
                let Some(binary) = command.first() else {
                    continue;
                };
                let (name, clap_command) = match binary.as_str() {
                    "/tether-agent" => ("tether-agent", tether_agent::config::Args::command()),
                    "/tether-server" => ("tether-server", tether_server::config::Args::command()),
                    other => panic!("{manifest}: unknown binary {other}"),
                };
                let placement = Placement {
                    node_name: "worker-1",
                    host_ip: "192.0.2.50",
                };
                let env = manifests::container_env(container, &placement, &cluster_env());
                let mut args: Vec<String> = command[1..].to_vec();
                args.extend(
                    container["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| a.as_str().unwrap().to_owned()),
                );
                let read = env_names(&clap_command);
                for (var, _) in &env {
                    let used = args.iter().any(|a| a.contains(&format!("$({var})")));
                    assert!(
                        used || read.contains(var),
                        "{manifest}: {name} neither reads {var} nor is it used in the arguments"
                    );
                }
                let expanded = expand(&args, &env);
                let mut argv = vec![name.to_owned()];
                argv.extend(expanded);
                let parsed = match name {
                    "tether-agent" => tether_agent::config::Args::try_parse_from(&argv)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    _ => tether_server::config::Args::try_parse_from(&argv)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                };
                if let Err(err) = parsed {
                    panic!("{manifest}: {argv:?}: {err}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3, "agent, server and uninstall containers");
}

/// The values that must agree across files: the socket kube-apiserver dials is the one the
/// server listens on, in the directory both mount; agents dial the port the server serves.
#[test]
fn the_manifests_agree_with_each_other() {
    let server = &read_yaml("kubernetes/control-plane/konnectivity-server.yaml")[0];
    let container = &server["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("the server has no --{name}"))
            .to_owned()
    };
    let socket = flag("uds-name");
    for selector in [
        "kubernetes/control-plane/egress-selector-grpc.yaml",
        "kubernetes/control-plane/egress-selector-http-connect.yaml",
    ] {
        let config = &read_yaml(selector)[0];
        assert_eq!(
            config["egressSelections"][0]["connection"]["transport"]["uds"]["udsName"], socket,
            "{selector}"
        );
        assert_eq!(
            config["egressSelections"][0]["name"], "cluster",
            "{selector}"
        );
    }
    let mounted = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| {
            socket.starts_with(m["mountPath"].as_str().unwrap()) && m["name"] == "konnectivity-uds"
        });
    assert!(mounted, "the socket's directory is not the shared hostPath");
    // kube-apiserver's flag and mounts, as kubeadm's configuration gives them: the egress
    // selector file inside a mounted directory, and the socket's directory shared.
    let kubeadm = &read_yaml("kubernetes/control-plane/kubeadm-apiserver.yaml")[0];
    let api_server = &kubeadm["apiServer"];
    let selector_file = api_server["extraArgs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "egress-selector-config-file")
        .and_then(|a| a["value"].as_str())
        .expect("kube-apiserver gets --egress-selector-config-file");
    let volumes = api_server["extraVolumes"].as_array().unwrap();
    let mounts = |path: &str| {
        volumes.iter().any(|v| {
            path.starts_with(v["mountPath"].as_str().unwrap()) && v["hostPath"] == v["mountPath"]
        })
    };
    assert!(
        mounts(selector_file),
        "{selector_file} is not mounted into kube-apiserver"
    );
    assert!(
        mounts(&socket),
        "{socket} is not shared with kube-apiserver"
    );

    let agent = &read_yaml("kubernetes/agent-daemonset.yaml")[0];
    let agent_args = agent["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    let port = format!("--proxy-server-port={}", flag("agent-port"));
    assert!(agent_args.iter().any(|a| a == &port), "agents dial {port}");
    assert!(
        agent_args
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("--agent-identifiers=")),
        "agents advertise their node"
    );
    assert_eq!(flag("proxy-strategies"), "destHost,default");

    let kubeconfig = &read_yaml("kubernetes/control-plane/konnectivity-server.kubeconfig")[0];
    assert_eq!(
        kubeconfig["users"][0]["name"], "system:konnectivity-server",
        "server-rbac.yaml binds this user"
    );
    let rbac = read_yaml("kubernetes/server-rbac.yaml");
    assert!(
        rbac.iter()
            .all(|binding| binding["kind"] != "ClusterRoleBinding"
                || binding["subjects"][0]["name"] == "system:konnectivity-server")
    );

    let kustomization = &read_yaml("kubernetes/kustomization.yaml")[0];
    for resource in kustomization["resources"].as_array().unwrap() {
        let path = format!("kubernetes/{}", resource.as_str().unwrap());
        assert!(API_MANIFESTS.contains(&path.as_str()), "{path}");
    }
    assert_eq!(
        agent["spec"]["template"]["spec"]["containers"][0]["image"],
        kustomization["images"][0]["name"],
        "the kustomization's image rewrite applies to the DaemonSet"
    );
}

/// The host's secrets stay on the host: the server's pod mounts the files it reads, one by
/// one, and serves agents with a certificate of its own rather than kube-apiserver's; the
/// agent and its uninstaller mount tether's directory of the BPF filesystem, not the
/// filesystem with every other program's pins (CNI dataplanes' maps among them).
#[test]
fn the_pods_mount_only_what_they_need() {
    let pki = Path::new("/etc/kubernetes/pki");

    let server = &read_yaml("kubernetes/control-plane/konnectivity-server.yaml")[0];
    let spec = pod_spec(server);
    let container = &spec["containers"][0];
    let mounted = mounts(spec, container);
    for mount in &mounted {
        let Some((host, kind)) = &mount.host else {
            panic!("server: {} is not a hostPath", mount.inside);
        };
        let host = Path::new(host);
        assert!(
            !pki.starts_with(host),
            "server: hostPath {} holds all of {}",
            host.display(),
            pki.display()
        );
        assert_eq!(
            mount.inside,
            host.display().to_string(),
            "server: mounted where the kubeconfig and the flags expect it"
        );
        if host.starts_with(pki) {
            assert_eq!(kind, "File", "server: {} is mounted whole", host.display());
            let name = host.file_name().unwrap().to_str().unwrap();
            assert!(
                name == "ca.crt" || name.starts_with("konnectivity-server"),
                "server: mounts {} (the cluster's, not tether's)",
                host.display()
            );
        }
        for secret in [
            "ca.key",
            "sa.key",
            "front-proxy-ca.key",
            "front-proxy-client.key",
            "apiserver.key",
            "etcd",
        ] {
            assert!(
                !host.iter().any(|part| part == secret),
                "server: mounts {}",
                host.display()
            );
        }
    }
    let within_mounts = |path: &str| {
        mounted
            .iter()
            .any(|m| Path::new(path).starts_with(Path::new(&m.inside)))
    };

    let args = container_args(container);
    let serving = (
        flag_value(&args, "cluster-cert").expect("--cluster-cert"),
        flag_value(&args, "cluster-key").expect("--cluster-key"),
    );
    assert_eq!(
        (serving.0.as_str(), serving.1.as_str()),
        (
            "/etc/kubernetes/pki/konnectivity-server-serving.crt",
            "/etc/kubernetes/pki/konnectivity-server-serving.key"
        ),
        "the agent port's own pair, not kube-apiserver's"
    );
    let mut files: Vec<String> = args
        .iter()
        .filter_map(|a| a.split_once('=').map(|(_, v)| v))
        .filter(|v| v.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert!(files.contains(&serving.0) && files.contains(&serving.1));
    // The kubeconfig names files of its own, which the server reads in the same pod.
    let kubeconfig_path = flag_value(&args, "kubeconfig").expect("--kubeconfig");
    let kubeconfig = &read_yaml("kubernetes/control-plane/konnectivity-server.kubeconfig")[0];
    files.extend(
        [
            &kubeconfig["clusters"][0]["cluster"]["certificate-authority"],
            &kubeconfig["users"][0]["user"]["client-certificate"],
            &kubeconfig["users"][0]["user"]["client-key"],
        ]
        .iter()
        .map(|v| v.as_str().unwrap().to_owned()),
    );
    assert_ne!(
        flag_value(&args, "cluster-cert"),
        kubeconfig["users"][0]["user"]["client-certificate"]
            .as_str()
            .map(str::to_owned),
        "serving and client certificates are separate pairs"
    );
    for file in files.iter().chain([&kubeconfig_path]) {
        assert!(within_mounts(file), "server: {file} is not mounted");
    }

    for (manifest, what) in [
        ("kubernetes/agent-daemonset.yaml", "agent"),
        ("kubernetes/uninstall/guard-uninstall.yaml", "uninstall"),
    ] {
        let object = &read_yaml(manifest)[0];
        let spec = pod_spec(object);
        let container = &spec["containers"][0];
        let mounted = mounts(spec, container);
        let root = flag_value(&container_args(container), "bpffs-root")
            .unwrap_or_else(|| "/sys/fs/bpf/tether".to_owned());
        let bpffs: Vec<&Mount> = mounted
            .iter()
            .filter(|m| {
                m.host.as_ref().is_some_and(|(host, _)| {
                    let host = Path::new(host);
                    host.starts_with("/sys/fs/bpf") || Path::new("/sys/fs/bpf").starts_with(host)
                })
            })
            .collect();
        assert_eq!(
            bpffs
                .iter()
                .map(|m| m.host.clone().unwrap().0)
                .collect::<Vec<_>>(),
            ["/sys/fs/bpf/tether"],
            "{what}: the BPF filesystem's hostPaths"
        );
        assert_eq!(bpffs[0].inside, root, "{what}: --bpffs-root is the mount");
        // The container's /sys is a read-only sysfs where the runtime cannot create the
        // mount point: something writable is mounted at its parent.
        let parent = Path::new(&root).parent().unwrap();
        if parent.starts_with("/sys") {
            assert!(
                mounted
                    .iter()
                    .any(|m| Path::new(&m.inside) == parent && m.volume.get("emptyDir").is_some()),
                "{what}: nothing at {} to hold the mount point {root}",
                parent.display()
            );
        }
    }
}
