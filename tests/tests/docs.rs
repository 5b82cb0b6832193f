//! The documentation that is generated from the binaries matches them, and README and docs/
//! link only files that exist in the repository.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::path::{Path, PathBuf};

use tether_tests::docs;
use tether_tests::procs::built;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_flag_reference_is_the_binaries_help() {
    let bin_dir = built("tether-agent")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let generated = docs::flag_reference(&bin_dir).unwrap();
    let committed = std::fs::read_to_string(root().join("docs/flags.md")).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/flags.md is stale: run `cargo xtask docs` and commit the result"
    );
}

/// Relative links in a markdown file: `[text](target)`, without a scheme or an anchor-only
/// target.
fn relative_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        if !target.contains("://") && !target.starts_with('#') && !target.starts_with("mailto:") {
            links.push(target.split('#').next().unwrap().to_owned());
        }
        rest = &rest[end..];
    }
    links
}

#[test]
fn readme_and_docs_link_only_files_in_the_repository() {
    let mut files = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for link in relative_links(&text) {
            let target = file.parent().unwrap().join(&link);
            assert!(
                target.exists(),
                "{} links {link}, which does not exist",
                file.display()
            );
            let inside = target.canonicalize().unwrap();
            assert!(
                inside.starts_with(root().canonicalize().unwrap()),
                "{} links {link}, outside the repository",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 10,
        "only {checked} links found: the link parser is broken"
    );
}

/// `(name, type)` of each metric family a `/metrics` page shows.
fn families(page: &str) -> Vec<(String, String)> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// Every family is named in docs/metrics.md as it is scraped, with its type.
fn assert_documented(who: &str, page: &str) {
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let found = families(page);
    assert!(found.len() > 10, "{who}: no metrics page?\n{page}");
    for (name, kind) in found {
        assert!(
            doc.lines()
                .any(|l| l.starts_with(&format!("| `{name}` | {kind} |"))),
            "{who}'s {name} ({kind}) is not in docs/metrics.md with that type"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_binaries_show_is_documented() {
    use tether_tests::cluster::{Cluster, Mode, Transport};
    use tether_tests::frontend::{GrpcTunnel, grpc_client};
    let cluster = Cluster::start(Mode::Grpc, Transport::Uds, &[], &[]).unwrap();
    // Traffic, so that families with labels have series: a dial that works and one that fails.
    let echo = tether_tests::destination::echo().await.to_string();
    let (_refusing, closed) = tether_tests::destination::refusing_port();
    let closed = closed.to_string();
    let mut client = grpc_client(&cluster.target).await.unwrap();
    let tunnel = GrpcTunnel::dial(&mut client, &echo).await.unwrap().unwrap();
    tunnel.send(b"ping").await.unwrap();
    tunnel.close().await.unwrap();
    assert!(
        GrpcTunnel::dial(&mut client, &closed)
            .await
            .unwrap()
            .is_err()
    );

    let agent = cluster.agent.as_ref().unwrap();
    assert_documented(
        "tether-agent",
        &tether_tests::peers::metrics_page(agent.health_port).unwrap(),
    );
    assert_documented(
        "tether-server",
        &tether_tests::peers::metrics_page(cluster.server.health_port).unwrap(),
    );

    // The guard's families, from an agent with the guard on.
    let site = tether_tests::guard_site::Site::new("docs");
    let guarded = site.guarded_agent();
    let port = guarded.health_port;
    let page = site
        .node
        .run(|| tether_tests::peers::metrics_page(port))
        .unwrap()
        .unwrap();
    assert!(page.contains("tether_agent_guard_packets"), "{page}");
    assert_documented("tether-agent with its guard", &page);
}

/// Each hidden flag of `command` (upstream's flags kept so they get a precise answer) that
/// `refused` turns away, given a value.
fn refused_flags(
    command: &clap::Command,
    refused: impl Fn(&[String]) -> Option<String>,
) -> Vec<String> {
    command
        .get_arguments()
        .filter(|a| a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter_map(|flag| {
            let argv = vec![command.get_name().to_owned(), format!("--{flag}=1")];
            refused(&argv)
        })
        .collect()
}

/// A klog flag refused where klog would act on it: with logs to a file.
fn klog_refusal(argv: &[String]) -> Option<String> {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Only {
        #[command(flatten)]
        klog: tether_runtime::flags::Klog,
    }
    let mut argv = argv.to_vec();
    argv.push("--logtostderr=false".into());
    match Only::try_parse_from(&argv).ok()?.klog.output() {
        Err(tether_runtime::flags::ConfigError::Unsupported { flag, .. }) => Some(flag.to_owned()),
        _ => None,
    }
}

/// Every upstream flag tether refuses is in the operator guide's migration table, with why.
#[test]
fn the_migration_table_names_every_refused_upstream_flag() {
    use clap::{CommandFactory, Parser};
    use tether_runtime::flags::ConfigError;
    let refusal = |err: ConfigError| match err {
        ConfigError::Unsupported { flag, .. } => Some(flag.to_owned()),
        _ => None,
    };
    let mut refused = refused_flags(&tether_agent::config::Args::command(), |argv| {
        let args = tether_agent::config::Args::try_parse_from(argv).ok()?;
        klog_refusal(argv).or_else(|| {
            tether_agent::config::Config::from_args(&args.run)
                .err()
                .and_then(refusal)
        })
    });
    refused.extend(refused_flags(
        &tether_server::config::Args::command(),
        |argv| {
            let args = tether_server::config::Args::try_parse_from(argv).ok()?;
            klog_refusal(argv).or_else(|| {
                tether_server::config::Config::from_args(&args)
                    .err()
                    .and_then(refusal)
            })
        },
    ));
    assert!(refused.len() > 5, "{refused:?}");
    let guide = std::fs::read_to_string(root().join("docs/operator-guide.md")).unwrap();
    let table = guide
        .split("### Upstream's flags tether reads differently or refuses")
        .nth(1)
        .expect("no migration table in the operator guide");
    for flag in refused {
        assert!(
            table.lines().any(|row| row.starts_with('|')
                && row.contains(&format!("`--{flag}`"))
                && row.contains("refused")),
            "--{flag} is refused but no row of the migration table says so"
        );
    }
}
