//! Bad configuration fails at start with one precise message and a non-zero exit.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::process::Command;
use std::time::Duration;

use tether_tests::pki::Pki;
use tether_tests::procs::{bin, spawn_logged};

/// Runs `binary args…` to exit; returns its status code and the error line it logged.
fn fails(binary: &str, args: &[String]) -> (i32, String) {
    let mut cmd = Command::new(bin(binary));
    cmd.args(["--log-format", "text"]).args(args);
    let mut logged = spawn_logged(binary, &mut cmd).unwrap();
    let status = logged
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(logged.logs.wait_ended(Duration::from_secs(5)));
    let errors: Vec<String> = logged
        .logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error line, got {errors:#?}"
    );
    (status.code().unwrap_or(-1), errors[0].clone())
}

fn server_args(pki: &Pki, extra: &[&str]) -> Vec<String> {
    let pair = pki.pair("server");
    let uds = pki.dir().join("s.sock");
    let mut args = vec![
        format!("--cluster-cert={}", pair.cert.display()),
        format!("--cluster-key={}", pair.key.display()),
        "--allow-unauthenticated-agents".into(),
        format!("--uds-name={}", uds.display()),
        "--server-port=0".into(),
        "--agent-port=0".into(),
        "--health-port=0".into(),
        "--admin-port=0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn missing_certificate_file_is_named() {
    let pki = Pki::new(&[]).unwrap();
    let (code, line) = fails(
        "tether-server",
        &server_args(&pki, &["--cluster-cert=/nonexistent/cert.pem"]),
    );
    assert_ne!(code, 0);
    assert!(
        line.contains("--cluster-cert: cannot read /nonexistent/cert.pem"),
        "{line}"
    );
}

#[test]
fn key_that_does_not_match_the_certificate_is_refused() {
    let pki = Pki::new(&[]).unwrap();
    let other_key = pki.pair("agent").key;
    let (code, line) = fails(
        "tether-server",
        &server_args(&pki, &[&format!("--cluster-key={}", other_key.display())]),
    );
    assert_ne!(code, 0);
    assert!(
        line.contains("does not belong to the certificate in --cluster-cert"),
        "{line}"
    );
}

#[test]
fn port_in_use_is_named() {
    let pki = Pki::new(&[]).unwrap();
    let busy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (code, line) = fails(
        "tether-server",
        &server_args(&pki, &[&format!("--agent-port={port}")]),
    );
    assert_ne!(code, 0);
    assert!(
        line.contains(&format!("--agent-port: cannot listen on :{port}")),
        "{line}"
    );
    assert!(
        line.to_lowercase().contains("address already in use"),
        "{line}"
    );
}

#[test]
fn unix_socket_in_a_missing_directory_is_named() {
    let pki = Pki::new(&[]).unwrap();
    let (code, line) = fails(
        "tether-server",
        &server_args(&pki, &["--uds-name=/nonexistent-dir/s.sock"]),
    );
    assert_ne!(code, 0);
    assert!(
        line.contains("--uds-name: cannot listen on /nonexistent-dir/s.sock"),
        "{line}"
    );
}

#[test]
fn a_listen_addresses_file_that_cannot_be_written_is_named() {
    let pki = Pki::new(&[]).unwrap();
    let (code, line) = fails(
        "tether-server",
        &server_args(
            &pki,
            &["--listen-addresses-file=/nonexistent-dir/addresses.json"],
        ),
    );
    assert_ne!(code, 0);
    assert!(
        line.contains("--listen-addresses-file: cannot write it")
            && line.contains("/nonexistent-dir/addresses.json"),
        "{line}"
    );
}

#[test]
fn unsupported_upstream_flags_are_refused_by_name() {
    let pki = Pki::new(&[]).unwrap();
    let (code, line) = fails("tether-server", &server_args(&pki, &["--enable-profiling"]));
    assert_eq!(code, 2);
    assert!(
        line.contains("--enable-profiling is not supported"),
        "{line}"
    );

    let (code, line) = fails(
        "tether-agent",
        &[
            format!("--ca-cert={}", pki.ca().display()),
            "--enable-profiling".into(),
        ],
    );
    assert_eq!(code, 2);
    assert!(
        line.contains("--enable-profiling is not supported"),
        "{line}"
    );
}

#[test]
fn lease_flags_that_cannot_work_are_refused_by_name() {
    let pki = Pki::new(&[]).unwrap();
    let (code, line) = fails(
        "tether-server",
        &server_args(
            &pki,
            &["--enable-lease-controller", "--lease-label=k8s-app"],
        ),
    );
    assert_eq!(code, 2);
    assert!(
        line.contains("--lease-label=\"k8s-app\"") && line.contains("k=v"),
        "{line}"
    );
    let (code, line) = fails(
        "tether-server",
        &server_args(
            &pki,
            &["--enable-lease-controller", "--lease-renew-interval=30s"],
        ),
    );
    assert_eq!(code, 2);
    assert!(
        line.contains("--lease-renew-interval") && line.contains("shorter than --lease-duration"),
        "{line}"
    );

    let agent = |extra: &str| {
        fails(
            "tether-agent",
            &[
                format!("--ca-cert={}", pki.ca().display()),
                "--count-server-leases".into(),
                extra.into(),
            ],
        )
    };
    let (code, line) = agent("--server-count-source=min");
    assert_eq!(code, 2);
    assert!(
        line.contains("--server-count-source=\"min\"") && line.contains("default or max"),
        "{line}"
    );
    let (code, line) = agent("--kubeconfig=/nonexistent/kubeconfig");
    assert_eq!(code, 2);
    assert!(
        line.contains("--kubeconfig=\"/nonexistent/kubeconfig\": no such file"),
        "{line}"
    );
}

#[test]
fn agent_without_a_ca_bundle_says_which_flag() {
    let (code, line) = fails("tether-agent", &[]);
    assert_eq!(code, 2);
    assert!(line.contains("--ca-cert is required"), "{line}");
    let (code, line) = fails(
        "tether-agent",
        &[
            "--ca-cert=/etc/hostname".into(),
            "--agent-identifiers=uid=1".into(),
        ],
    );
    assert_eq!(code, 2);
    assert!(line.contains("--ca-cert: /etc/hostname"), "{line}");
}

#[test]
fn klog_flags_from_upstream_manifests_are_accepted() {
    let pki = Pki::new(&[]).unwrap();
    let mut args = server_args(
        &pki,
        &[
            "--logtostderr=true",
            "--v=4",
            "--log-file-max-size=0",
            "--alsologtostderr",
        ],
    );
    args.extend(["--log-format".to_string(), "json".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = tether_tests::procs::Server::start(&refs).unwrap();
    assert!(server.health_port > 0);
}

#[test]
fn token_authentication_flags_are_checked_together() {
    let pki = Pki::new(&[]).unwrap();
    let token = [
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
    ];
    let (code, line) = fails("tether-server", &server_args(&pki, &token));
    assert_eq!(code, 2);
    assert!(
        line.contains("--authentication-audience is required with --agent-namespace"),
        "{line}"
    );

    let (code, line) = fails(
        "tether-server",
        &server_args(
            &pki,
            &["--authentication-audience=system:konnectivity-server"],
        ),
    );
    assert_eq!(code, 2);
    assert!(line.contains("--agent-namespace is required"), "{line}");

    let mut all = token.to_vec();
    all.push("--authentication-audience=system:konnectivity-server");
    let ca = format!("--cluster-ca-cert={}", pki.ca().display());
    let mut with_ca = all.clone();
    with_ca.push(&ca);
    let (code, line) = fails("tether-server", &server_args(&pki, &with_ca));
    assert_eq!(code, 2);
    assert!(line.contains("exclude each other"), "{line}");

    let mut missing = all.clone();
    missing.push("--kubeconfig=/nonexistent/kubeconfig");
    let (code, line) = fails("tether-server", &server_args(&pki, &missing));
    assert_eq!(code, 2);
    assert!(
        line.contains(r#"--kubeconfig="/nonexistent/kubeconfig": no such file"#),
        "{line}"
    );

    // Outside a pod, without --kubeconfig, there is no way to reach kube-apiserver.
    let (code, line) = fails("tether-server", &server_args(&pki, &all));
    assert_ne!(code, 0);
    assert!(line.contains("set --kubeconfig"), "{line}");
}

/// Upstream's own server manifest logs with `--logtostderr=false --log-file=…`: lines are
/// appended to the file (an earlier run's stay), not written to stderr. `-v=4` is accepted as
/// pflag accepts it.
#[test]
fn log_file_is_appended_to_as_klog_does() {
    let pki = Pki::new(&[]).unwrap();
    let log = pki.dir().join("server.log");
    std::fs::write(&log, "line from an earlier run\n").unwrap();
    let mut args = server_args(&pki, &["--logtostderr=false", "-v=4", "--log-format=json"]);
    args.push(format!("--log-file={}", log.display()));
    let mut cmd = Command::new(bin("tether-server"));
    cmd.args(&args);
    let mut logged = spawn_logged("tether-server", &mut cmd).unwrap();
    let started = tether_tests::process::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("tether-server listening"))
    });
    assert!(started, "no startup line in {}", log.display());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("line from an earlier run\n"), "{text}");
    logged
        .process
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    logged
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(logged.logs.wait_ended(Duration::from_secs(5)));
    assert_eq!(
        logged.logs.lines(),
        Vec::<String>::new(),
        "stderr got log lines"
    );
}

#[test]
fn a_session_ticket_key_file_that_is_missing_exposed_or_short_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new(&[]).unwrap();
    let path = pki.dir().join("tickets.key");
    let flag = format!("--session-ticket-key-file={}", path.display());
    let refused = |why: &str| {
        let (code, line) = fails("tether-server", &server_args(&pki, &[&flag]));
        assert_ne!(code, 0);
        assert!(
            line.contains("--session-ticket-key-file") && line.contains(why),
            "{line}"
        );
    };
    refused("No such file");
    std::fs::write(&path, [7u8; 32]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused("group or others may read it (mode 644)");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, [7u8; 16]).unwrap();
    refused("16 bytes; it needs at least 32");
}

#[test]
fn a_session_ticket_lifetime_tls_cannot_carry_is_refused_by_name() {
    let pki = Pki::new(&[]).unwrap();
    for lifetime in ["0s", "169h"] {
        let flag = format!("--session-ticket-lifetime={lifetime}");
        let (code, line) = fails("tether-server", &server_args(&pki, &[&flag]));
        assert_ne!(code, 0);
        assert!(
            line.contains("--session-ticket-lifetime") && line.contains("a week at most"),
            "{line}"
        );
    }
}

#[test]
fn a_token_review_cache_file_without_tokens_a_directory_or_privacy_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new(&[]).unwrap();
    let path = pki.dir().join("reviews.json");
    let flag = format!("--token-review-cache-file={}", path.display());
    let token = [
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--authentication-audience=system:konnectivity-server",
        "--kubeconfig=/dev/null",
    ];
    let refused = |extra: &[&str], why: &str| {
        let (code, line) = fails("tether-server", &server_args(&pki, extra));
        assert_eq!(code, 2, "{line}");
        assert!(line.contains(why), "{line}");
    };
    refused(
        &[&flag],
        "--agent-namespace is required with --token-review-cache-file",
    );
    let mut args = token.to_vec();
    args.push(&flag);
    std::fs::write(&path, "{}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    refused(&args, "open to others (mode 640)");
    let mut uncached = args.clone();
    uncached.push("--token-review-cache-ttl=0s");
    refused(&uncached, "nothing to keep");
    let nowhere = "--token-review-cache-file=/nonexistent/tether/reviews.json";
    refused(
        &[&token[..], &[nowhere]].concat(),
        "its directory does not exist",
    );
}
