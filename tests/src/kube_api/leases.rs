//! coordination.k8s.io/v1 Leases as kube-apiserver keeps them, enough for client-go's lease
//! controller and informer and for kube-rs: create, get, update with resourceVersion
//! conflicts, delete with preconditions, list and watch by label selector (watches replay
//! from a resourceVersion, or send the initial state ending in the bookmark that WatchList
//! clients wait for).
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is how a failed check reports"
)]

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const API_VERSION: &str = "coordination.k8s.io/v1";
const PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// Every Lease, and every change in the order it happened.
#[derive(Default)]
pub struct Leases {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    version: u64,
    /// (namespace, name) → the stored object.
    stored: BTreeMap<(String, String), Value>,
    /// (resourceVersion, event type, object) for watches that resume.
    log: Vec<(u64, &'static str, Value)>,
}

/// A reply: status code and body.
pub type Reply = (u16, Value);

fn status(code: u16, reason: &str, message: String, name: &str) -> Reply {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason,
            "details": {"name": name, "group": "coordination.k8s.io", "kind": "leases"},
            "code": code}),
    )
}

fn not_found(name: &str) -> Reply {
    status(
        404,
        "NotFound",
        format!("leases.coordination.k8s.io \"{name}\" not found"),
        name,
    )
}

fn conflict(name: &str) -> Reply {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
        ),
        name,
    )
}

/// `k=v`, `k==v`, `k!=v` and bare `k`, comma-joined: the forms tether and upstream send.
pub fn selects(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                labels[key.trim()].as_str() != Some(value.trim())
            } else if let Some((key, value)) = term.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                labels[key.trim()].as_str() == Some(value.trim())
            } else {
                labels.get(term).is_some()
            }
        })
}

fn query_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Leases {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `lease` (its metadata names it) as a client's update would, bumping its version.
    pub fn put(&self, namespace: &str, mut lease: Value) {
        let name = lease["metadata"]["name"].as_str().unwrap().to_owned();
        let mut state = self.state();
        state.version += 1;
        let version = state.version;
        lease["metadata"]["namespace"] = json!(namespace);
        lease["metadata"]["resourceVersion"] = json!(version.to_string());
        lease["apiVersion"] = json!(API_VERSION);
        lease["kind"] = json!("Lease");
        let kind = if state
            .stored
            .insert((namespace.to_owned(), name), lease.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.log.push((version, kind, lease));
        self.changed.notify_all();
    }

    /// The Leases stored in `namespace`.
    pub fn list(&self, namespace: &str) -> Vec<Value> {
        self.state()
            .stored
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, lease)| lease.clone())
            .collect()
    }

    fn remove(&self, state: &mut State, namespace: &str, name: &str) -> Option<Value> {
        let mut lease = state
            .stored
            .remove(&(namespace.to_owned(), name.to_owned()))?;
        state.version += 1;
        lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.log.push((state.version, "DELETED", lease.clone()));
        self.changed.notify_all();
        Some(lease)
    }

    /// Deletes a Lease as if its holder were gone and something collected it.
    pub fn delete(&self, namespace: &str, name: &str) -> bool {
        let mut state = self.state();
        self.remove(&mut state, namespace, name).is_some()
    }

    /// Answers a request under `/apis/coordination.k8s.io/v1/namespaces/`; `None` when the
    /// path is not a Lease's. Watches are streamed to `out` and answered with `Some(None)`.
    pub fn answer(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
        out: &mut dyn Write,
    ) -> Option<Option<Reply>> {
        let rest = path.strip_prefix(PREFIX)?;
        let (namespace, rest) = rest.split_once('/')?;
        let name = match rest.strip_prefix("leases") {
            Some("") => None,
            Some(name) => Some(name.strip_prefix('/')?),
            None => return None,
        };
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let selector = query_value(query, "labelSelector").unwrap_or("");
        let reply = match (method, name) {
            ("GET", None)
                if query_value(query, "watch").is_some_and(|w| w == "true" || w == "1") =>
            {
                self.watch(namespace, selector, query, out);
                return Some(None);
            }
            ("GET", None) => {
                let state = self.state();
                let items: Vec<Value> = state
                    .stored
                    .iter()
                    .filter(|((ns, _), lease)| {
                        ns == namespace && selects(selector, &lease["metadata"]["labels"])
                    })
                    .map(|(_, lease)| lease.clone())
                    .collect();
                (
                    200,
                    json!({"kind": "LeaseList", "apiVersion": API_VERSION,
                        "metadata": {"resourceVersion": state.version.to_string()},
                        "items": items}),
                )
            }
            ("POST", None) => self.create(namespace, body),
            ("GET", Some(name)) => self
                .state()
                .stored
                .get(&(namespace.to_owned(), name.to_owned()))
                .map_or_else(|| not_found(name), |lease| (200, lease.clone())),
            ("PUT", Some(name)) => self.update(namespace, name, body),
            ("DELETE", Some(name)) => {
                let mut state = self.state();
                let key = (namespace.to_owned(), name.to_owned());
                match state.stored.get(&key) {
                    None => not_found(name),
                    Some(lease)
                        if body["preconditions"]["resourceVersion"]
                            .as_str()
                            .is_some_and(|want| {
                                lease["metadata"]["resourceVersion"].as_str() != Some(want)
                            }) =>
                    {
                        conflict(name)
                    }
                    Some(_) => {
                        let lease = self.remove(&mut state, namespace, name).unwrap();
                        (200, lease)
                    }
                }
            }
            _ => return None,
        };
        Some(Some(reply))
    }

    fn create(&self, namespace: &str, mut lease: Value) -> Reply {
        let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
            return status(422, "Invalid", "metadata.name: Required value".into(), "");
        };
        let mut state = self.state();
        let key = (namespace.to_owned(), name.clone());
        if state.stored.contains_key(&key) {
            return status(
                409,
                "AlreadyExists",
                format!("leases.coordination.k8s.io \"{name}\" already exists"),
                &name,
            );
        }
        state.version += 1;
        let version = state.version;
        lease["apiVersion"] = json!(API_VERSION);
        lease["kind"] = json!("Lease");
        let metadata = &mut lease["metadata"];
        metadata["namespace"] = json!(namespace);
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["uid"] = json!(format!("00000000-0000-4000-8000-{version:012}"));
        metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        state.stored.insert(key, lease.clone());
        state.log.push((version, "ADDED", lease.clone()));
        self.changed.notify_all();
        (201, lease)
    }

    fn update(&self, namespace: &str, name: &str, mut lease: Value) -> Reply {
        let mut state = self.state();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(current) = state.stored.get(&key) else {
            return not_found(name);
        };
        let asked = lease["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !asked.is_empty() && current["metadata"]["resourceVersion"].as_str() != Some(asked) {
            return conflict(name);
        }
        let (uid, created) = (
            current["metadata"]["uid"].clone(),
            current["metadata"]["creationTimestamp"].clone(),
        );
        state.version += 1;
        let version = state.version;
        lease["apiVersion"] = json!(API_VERSION);
        lease["kind"] = json!("Lease");
        let metadata = &mut lease["metadata"];
        metadata["namespace"] = json!(namespace);
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["uid"] = uid;
        metadata["creationTimestamp"] = created;
        state.stored.insert(key, lease.clone());
        state.log.push((version, "MODIFIED", lease.clone()));
        self.changed.notify_all();
        (200, lease)
    }

    /// Streams watch events as chunks until `timeoutSeconds` (at most ten minutes) or the
    /// client hangs up.
    fn watch(
        &self,
        namespace: &str,
        selector: &str,
        query: &[(String, String)],
        out: &mut dyn Write,
    ) {
        let timeout = query_value(query, "timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(600u64)
            .min(600);
        let deadline = Instant::now() + Duration::from_secs(timeout);
        let from: u64 = query_value(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let initial = from == 0 || query_value(query, "sendInitialEvents") == Some("true");
        let mut events = Vec::new();
        let mut cursor = {
            let state = self.state();
            if initial {
                for ((ns, _), lease) in &state.stored {
                    if ns == namespace && selects(selector, &lease["metadata"]["labels"]) {
                        events.push(json!({"type": "ADDED", "object": lease}));
                    }
                }
                if query_value(query, "sendInitialEvents") == Some("true") {
                    events.push(json!({"type": "BOOKMARK", "object": {
                        "kind": "Lease", "apiVersion": API_VERSION,
                        "metadata": {"resourceVersion": state.version.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"}}}}));
                }
                state.log.len()
            } else {
                state
                    .log
                    .partition_point(|(version, _, _)| *version <= from)
            }
        };
        if write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .is_err()
        {
            return;
        }
        loop {
            for event in events.drain(..) {
                let line = format!("{event}\n");
                if write!(out, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                    return;
                }
            }
            if out.flush().is_err() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                let _ = write!(out, "0\r\n\r\n");
                let _ = out.flush();
                return;
            }
            let state = self.state();
            let (state, _) = self
                .changed
                .wait_timeout_while(state, (deadline - now).min(Duration::from_secs(1)), |s| {
                    s.log.len() == cursor
                })
                .unwrap_or_else(|p| p.into_inner());
            for (_, kind, lease) in &state.log[cursor..] {
                if lease["metadata"]["namespace"] == namespace
                    && selects(selector, &lease["metadata"]["labels"])
                {
                    events.push(json!({"type": kind, "object": lease}));
                }
            }
            cursor = state.log.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_as_the_api_server_matches() {
        let labels = json!({"k8s-app": "konnectivity-server", "tier": "cp"});
        assert!(selects("k8s-app=konnectivity-server", &labels));
        assert!(selects("k8s-app==konnectivity-server,tier", &labels));
        assert!(!selects("k8s-app=konnectivity-server,tier!=cp", &labels));
        assert!(!selects("k8s-app=other", &labels));
        assert!(!selects("missing", &labels));
        assert!(selects("", &labels));
    }

    #[test]
    fn an_update_from_a_stale_version_conflicts() {
        let leases = Leases::default();
        let lease = json!({"metadata": {"name": "a"}, "spec": {"holderIdentity": "x"}});
        let mut sink = Vec::new();
        let create = serde_json::to_vec(&lease).unwrap();
        let (code, created) = leases
            .answer(
                "POST",
                &format!("{PREFIX}ns/leases"),
                &[],
                &create,
                &mut sink,
            )
            .unwrap()
            .unwrap();
        assert_eq!(code, 201);
        let again = leases
            .answer(
                "POST",
                &format!("{PREFIX}ns/leases"),
                &[],
                &create,
                &mut sink,
            )
            .unwrap()
            .unwrap();
        assert_eq!(again.0, 409);
        let update = serde_json::to_vec(&created).unwrap();
        let path = format!("{PREFIX}ns/leases/a");
        assert_eq!(
            leases
                .answer("PUT", &path, &[], &update, &mut sink)
                .unwrap()
                .unwrap()
                .0,
            200
        );
        assert_eq!(
            leases
                .answer("PUT", &path, &[], &update, &mut sink)
                .unwrap()
                .unwrap()
                .0,
            409,
            "the second update names a version that is gone"
        );
        let stale = json!({"preconditions": {"resourceVersion": "1"}}).to_string();
        assert_eq!(
            leases
                .answer("DELETE", &path, &[], stale.as_bytes(), &mut sink)
                .unwrap()
                .unwrap()
                .0,
            409
        );
        assert_eq!(
            leases
                .answer("DELETE", &path, &[], b"", &mut sink)
                .unwrap()
                .unwrap()
                .0,
            200
        );
        assert!(leases.list("ns").is_empty());
    }
}
