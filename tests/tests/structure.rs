//! The binaries' code keeps the shape docs/architecture.md describes: every task is spawned on
//! a tracker that shutdown waits for, and no two modules of a crate depend on each other. And
//! the tests wait on state, not on log lines, unless the line is what they test.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: [&str; 2] = ["agent", "server"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's code without its unit tests (the `#[cfg(test)]` module each file ends with).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

/// Every task runs on a `TaskTracker` (the crate's own, stopped by its cancellation token and
/// waited for at exit), never on a bare `tokio::spawn` nothing waits for.
#[test]
fn no_task_is_spawned_outside_a_tracker() {
    let mut bare = Vec::new();
    for name in CRATES {
        let mut files = Vec::new();
        sources(&crate_src(name), &mut files);
        for file in files {
            for (n, line) in code(&file).lines().enumerate() {
                if line.contains("tokio::spawn(") || line.contains("tokio::task::spawn(") {
                    bare.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(bare.is_empty(), "untracked spawns:\n{}", bare.join("\n"));
}

/// The crate's top-level modules and which others each names (`crate::other`).
fn module_graph(name: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = crate_src(name);
    let mut files = Vec::new();
    sources(&src, &mut files);
    let module_of = |file: &Path| {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        first.to_string_lossy().trim_end_matches(".rs").to_owned()
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = code(file);
        let uses = graph.entry(module.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let other: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !other.is_empty() && other != module {
                uses.insert(other);
            }
        }
        // `use crate::{a, b::c}`.
        for (at, _) in text.match_indices("use crate::{") {
            let list = &text[at + "use crate::{".len()..];
            let list = &list[..list.find("};").unwrap_or(0)];
            for item in list.split(',') {
                let other = item.trim().split("::").next().unwrap_or("").trim();
                if !other.is_empty() && other != module && other != "self" {
                    uses.insert(other.to_owned());
                }
            }
        }
    }
    graph
}

/// A cycle through `module`, if any, as the path around it.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, module: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![module.to_owned()];
    walk(graph, module, module, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let mut cycles = Vec::new();
    for name in CRATES {
        let graph = module_graph(name);
        assert!(graph.len() > 8, "{name}: {graph:?}");
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                cycles.push(format!("{name}: {}", cycle.join(" → ")));
            }
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, uses)| (m.to_owned(), uses.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        cycle_from(&graph, "a"),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(cycle_from(&graph, "d"), None);
}

/// The comment lines of the function around line `at` of `lines` (its body above `at`, and the
/// doc comment above the function).
fn comments_before(lines: &[&str], at: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = at;
    while i > 0 {
        i -= 1;
        let line = lines[i].trim_start();
        if line.starts_with("//") {
            out.push(line.to_owned());
        }
        if line.starts_with("fn ") || line.starts_with("async fn ") || line.starts_with("pub fn ") {
            while i > 0 && lines[i - 1].trim_start().starts_with(['/', '#']) {
                i -= 1;
                out.push(lines[i].trim_start().to_owned());
            }
            break;
        }
    }
    out
}

/// A test that waits for a log line to learn that something is true breaks when the line is
/// reworded, and races when the line comes before the state. Tests wait on the state itself
/// (readiness, metrics, the kernel's view, pins, the listen-addresses file); a wait on a log
/// line is for lines that are themselves the subject (an error an operator reads, a drop
/// event), and a comment says so.
#[test]
fn tests_wait_on_log_lines_only_where_the_line_is_the_subject() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files = Vec::new();
    sources(&dir, &mut files);
    let mut unexplained = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (at, line) in lines.iter().enumerate() {
            if line.contains(".wait_for(")
                && !comments_before(&lines, at)
                    .iter()
                    .any(|c| c.contains("subject"))
            {
                unexplained.push(format!("{}:{}", file.display(), at + 1));
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "waits on log lines with no comment saying the line is the subject: {unexplained:#?}"
    );
}
