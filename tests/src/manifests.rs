//! deploy/'s Kubernetes manifests read as a node reads them: pods, their containers'
//! arguments and environment (with `$(VAR)` expanded), and their mounts.
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is how a failed check reports"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A path under deploy/.
pub fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every document of a YAML file under deploy/.
pub fn read_yaml(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_saphyr::from_multiple(&text).unwrap_or_else(|err| panic!("{path}: {err}"))
}

/// `KEY=value` lines of the kustomization's env file, as its configMapGenerator reads them.
pub fn cluster_env() -> BTreeMap<String, String> {
    std::fs::read_to_string(deploy("kubernetes/cluster.env"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// What the downward API tells a pod about where it runs.
pub struct Placement<'a> {
    pub node_name: &'a str,
    pub host_ip: &'a str,
}

/// What a container's environment holds on a node: literal values, the downward API's
/// fields from `placement`, ConfigMap keys from `config` (which must have them).
pub fn container_env(
    container: &Value,
    placement: &Placement,
    config: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_owned()
        } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "spec.nodeName" => placement.node_name.to_owned(),
                "status.hostIP" => placement.host_ip.to_owned(),
                other => panic!("{name}: a field this harness does not model: {other}"),
            }
        } else if let Some(key) = var["valueFrom"]["configMapKeyRef"]["key"].as_str() {
            assert_eq!(
                var["valueFrom"]["configMapKeyRef"]["name"], "tether-agent-cluster",
                "{name}: not the kustomization's generated ConfigMap"
            );
            config
                .get(key)
                .unwrap_or_else(|| panic!("{name}: cluster.env has no {key}"))
                .clone()
        } else {
            panic!("{name}: a source this harness does not model: {var}");
        };
        env.push((name, value));
    }
    env
}

/// `args` with each `$(VAR)` of `env` replaced, as the kubelet expands them; an undefined
/// variable fails.
pub fn expand(args: &[String], env: &[(String, String)]) -> Vec<String> {
    args.iter()
        .map(|arg| {
            let mut arg = arg.clone();
            for (var, value) in env {
                arg = arg.replace(&format!("$({var})"), value);
            }
            assert!(!arg.contains("$("), "undefined variable in {arg}");
            arg
        })
        .collect()
}

/// A pod's spec: a static Pod's own, a DaemonSet's template's.
pub fn pod_spec(object: &Value) -> &Value {
    if object["kind"] == "Pod" {
        &object["spec"]
    } else {
        &object["spec"]["template"]["spec"]
    }
}

/// A mount of a container: where it is inside, and the host path and type behind it when the
/// volume is a hostPath.
pub struct Mount {
    pub inside: String,
    pub host: Option<(String, String)>,
    pub volume: Value,
}

pub fn mounts(spec: &Value, container: &Value) -> Vec<Mount> {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|mount| {
            let name = mount["name"].as_str().unwrap();
            let volume = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("no volume {name}"))
                .clone();
            let host = volume["hostPath"]["path"].as_str().map(|path| {
                let kind = volume["hostPath"]["type"].as_str().unwrap_or("").to_owned();
                (path.trim_end_matches('/').to_owned(), kind)
            });
            Mount {
                inside: mount["mountPath"]
                    .as_str()
                    .unwrap()
                    .trim_end_matches('/')
                    .to_owned(),
                host,
                volume,
            }
        })
        .collect()
}

/// The container's command and arguments, as written.
pub fn container_args(container: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .flat_map(|key| container[*key].as_array().into_iter().flatten())
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

pub fn flag_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
        .map(str::to_owned)
}
