//! The guard end to end in network namespaces: a control-plane namespace running tether-server,
//! a node namespace running tether-agent (with its guard) and a kubelet stand-in. Through the
//! tunnel the kubelet answers; directly it does not (enforce), or does and is counted (monitor),
//! or does and is not counted (off). The node's own outbound connections keep working, and the
//! guard outlives the agent: a graceful exit or a SIGKILL leaves no window for a direct hit.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is how a failed check reports"
)]

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tether_agent_common::PIN_LAYOUT;
use tether_tests::bpffs::Bpffs;
use tether_tests::guard_site::{CP, DirectProbe, NODE, Site, log_field, xdp_attach_mode};
use tether_tests::netns::Netns;
use tether_tests::pki::Pki;
use tether_tests::process::wait_until;
use tether_tests::procs::{Agent, built, spawn_logged};
use tether_tests::require_root;

#[test]
fn enforce_drops_the_direct_path_keeps_the_tunnel_and_detaches_cleanly() {
    let site = Site::new("enf");
    let agent = site.agent(&[
        "--guard-interface=eth0",
        &format!("--control-plane-cidr={CP}/32"),
    ]);
    assert_eq!(xdp_attach_mode(&site.node, "eth0"), Some("native"));

    assert!(site.through_tunnel().ends_with("hello"));
    assert!(site.outbound_works(), "node -> control plane was broken");
    assert!(
        site.direct(Duration::from_secs(1)).is_err(),
        "direct connection to the kubelet succeeded under enforce"
    );
    assert!(site.through_tunnel().ends_with("hello"));

    let dropped = site
        .guard_packets(&agent, "control_plane_syn", "drop")
        .unwrap();
    assert!(dropped >= 1, "the dropped SYN was not counted: {dropped}");
    assert_eq!(
        site.guard_packets(&agent, "control_plane_syn", "pass"),
        Some(0)
    );
    // Drop events are log lines: the line is the subject.
    let event = agent
        .logged
        .logs
        .wait_for("guard drop", Duration::from_secs(5))
        .expect("no drop event logged");
    assert_eq!(log_field(&event, "reason"), "control_plane_syn");
    assert_eq!(log_field(&event, "action"), "dropped");
    assert!(log_field(&event, "source").starts_with(&format!("{CP}:")));
    assert_eq!(log_field(&event, "destination"), format!("{NODE}:10250"));
    assert_eq!(log_field(&event, "protocol"), "tcp");

    let (code, status) = site.guard_cli("status");
    assert_eq!(code, 0, "{status}");
    for expected in [
        "mode:                enforce",
        "interfaces:          eth0 (program ",
        &format!("control-plane CIDRs: {CP}/32"),
        "protected ports:     10250, 10255",
        "allowed CIDRs:       none",
    ] {
        assert!(
            status.contains(expected),
            "{expected:?} missing in\n{status}"
        );
    }
    let syn_row = status
        .lines()
        .find(|l| l.starts_with("control_plane_syn"))
        .unwrap();
    let dropped_in_status: u64 = syn_row.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(dropped_in_status >= dropped, "{syn_row}");

    // Detach works while the agent still runs: the link's only holder is its pin.
    let (code, out) = site.guard_cli("detach");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("detached from eth0"), "{out}");
    assert!(!site.bpffs.root().exists(), "pins left behind");
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "still dropped after guard detach"
    );
    let (code, out) = site.guard_cli("status");
    assert_ne!(code, 0, "status after detach: {out}");
}

/// The DaemonSet grants CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON and nothing else: with exactly
/// those the agent attaches, stays up, drops the direct path and reports its counters (it
/// once exited here: it reopened the counters map by ID, which needs CAP_SYS_ADMIN).
#[test]
fn the_guard_runs_with_only_the_daemonsets_capabilities() {
    let site = Site::new("cap");
    let agent = site.agent_with(
        Some(&["bpf", "net_admin", "perfmon"]),
        &[
            "--guard-interface=eth0",
            &format!("--control-plane-cidr={CP}/32"),
            // Capabilities are per thread: several threads must each give them up.
            "--worker-threads=3",
        ],
    );
    assert!(
        xdp_attach_mode(&site.node, "eth0").is_some(),
        "{:?}",
        agent.logged.logs.lines()
    );
    assert!(site.through_tunnel().ends_with("hello"));
    assert!(site.direct(Duration::from_secs(1)).is_err());
    let dropped = site.guard_packets(&agent, "control_plane_syn", "drop");
    assert!(dropped.is_some_and(|n| n >= 1), "{dropped:?}");
    assert!(
        !agent.logged.logs.contains("Operation not permitted"),
        "{:?}",
        agent.logged.logs.lines()
    );

    // Attached, the agent gives up CAP_PERFMON on every thread and keeps only what following
    // interfaces needs, with no_new_privs so that nothing can bring the rest back (before it
    // says it is up, which Agent waits for).
    // CAP_NET_ADMIN, and before Linux 6.5 CAP_BPF too (every bpf() command needed it).
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .trim()
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap(), numbers.next().unwrap());
    let kept: u64 = if (major, minor) >= (6, 5) {
        1 << 12
    } else {
        (1 << 39) | (1 << 12)
    };
    let tasks = format!("/proc/{}/task", agent.logged.process.pid());
    let mut threads = 0;
    for task in std::fs::read_dir(&tasks).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        for set in ["CapPrm:", "CapEff:"] {
            assert_eq!(
                u64::from_str_radix(&field(set), 16).unwrap(),
                kept,
                "{set} of a thread:\n{status}"
            );
        }
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        threads += 1;
    }
    assert!(threads > 3, "the runtime's threads were not all checked");
    // ... and with those it still guards an interface to the control plane that appears now.
    let second_cp = Netns::new("gcap-cp2").unwrap();
    tether_tests::netns::veth(
        &second_cp,
        "eth0",
        "10.87.0.1/24",
        &site.node,
        "eth1",
        "10.87.0.2/24",
    )
    .unwrap();
    site.node
        .ip(&[
            "route",
            "add",
            &format!("{CP}/32"),
            "dev",
            "eth1",
            "metric",
            "50",
        ])
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || xdp_attach_mode(
            &site.node, "eth1"
        )
        .is_some()),
        "with the capabilities it kept, the agent did not guard a new interface: {:?}",
        agent.logged.logs.lines()
    );
    assert!(
        site.guard_packets(&agent, "control_plane_syn", "drop")
            .is_some_and(|n| n >= 1),
        "the counters are no longer readable without the dropped capabilities"
    );
    drop(agent);
    drop(second_cp);

    // The uninstall DaemonSet's capabilities are enough to detach the pinned guard, and its
    // mounts too: it mounts only tether's directory of the BPF filesystem, so --bpffs-root is
    // a mount point there, which cannot be removed.
    let root = site.bpffs.root();
    let bound = Command::new("mount")
        .args(["--bind"])
        .args([&root, &root])
        .status()
        .unwrap();
    assert!(bound.success());
    let out = Command::new("nsenter")
        .arg(format!("--net={}", site.node.path()))
        .arg("setpriv")
        .args([
            "--bounding-set=-all,+bpf,+net_admin",
            "--inh-caps=-all,+bpf,+net_admin",
        ])
        .arg(built("tether-agent").unwrap())
        .args(["guard", "detach"])
        .arg(format!("--bpffs-root={}", site.bpffs.root().display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("guard detached from eth0, eth1"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One capability fewer, each in turn: the agent refuses to start and names it.
    let args = site.agent_args(&["--guard-interface=eth0"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    for missing in ["bpf", "net_admin", "perfmon"] {
        let caps: Vec<&str> = ["bpf", "net_admin", "perfmon"]
            .into_iter()
            .filter(|c| *c != missing)
            .collect();
        let err = match Agent::start_in_with_caps(&site.node, &caps, &refs) {
            Ok(_) => panic!("the agent started without CAP_{missing}"),
            Err(err) => format!("{err:#}"),
        };
        assert!(
            err.contains(&format!("missing CAP_{}", missing.to_uppercase())),
            "{err}"
        );
    }
}

#[test]
fn monitor_passes_the_direct_path_and_counts_it() {
    let site = Site::new("mon");
    let agent = site.agent(&[
        "--guard-mode=monitor",
        "--guard-interface=eth0",
        &format!("--control-plane-cidr={CP}/32"),
    ]);
    assert!(site.through_tunnel().ends_with("hello"));
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "monitor mode dropped a connection"
    );
    assert_eq!(
        site.guard_packets(&agent, "control_plane_syn", "drop"),
        Some(0)
    );
    let would_drop = site
        .guard_packets(&agent, "control_plane_syn", "pass")
        .unwrap();
    assert!(
        would_drop >= 1,
        "monitor did not count the SYN it would have dropped"
    );
    // Drop events are log lines: the line is the subject.
    let event = agent
        .logged
        .logs
        .wait_for("guard drop", Duration::from_secs(5))
        .expect("no event for what monitor would drop");
    assert_eq!(log_field(&event, "action"), "would drop (monitor)");
}

/// On a node whose own address is inside the control-plane range (a control-plane node),
/// enforcing would cut it off from its peers: the agent refuses, says so, and monitors.
#[test]
fn a_control_plane_node_is_monitored_not_enforced() {
    let site = Site::new("cpn");
    let agent = site.agent(&[
        "--guard-interface=eth0",
        "--control-plane-cidr=10.77.0.0/24",
    ]);
    // The log line is the subject: it tells the operator why the guard only monitors.
    let refusal = agent
        .logged
        .logs
        .wait_for("so it is a control-plane node", Duration::from_secs(5))
        .expect("no refusal logged");
    assert!(
        refusal.contains(r#"\"10.77.0.2 in 10.77.0.0/24\""#),
        "{refusal}"
    );
    let (_, status) = site.guard_cli("status");
    assert!(status.contains("mode:                monitor"), "{status}");
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "a control-plane peer was dropped"
    );
    assert_eq!(
        site.guard_packets(&agent, "control_plane_syn", "drop"),
        Some(0)
    );
}

/// The guard stays after a graceful exit; a later agent with `--guard-mode=off` switches the
/// pinned program off through its map (no reload): everything passes, nothing is counted.
#[test]
fn guard_outlives_the_agent_and_off_switches_it_off() {
    let site = Site::new("off");
    // Defaults: the default route's interface, the proxy server's address as control plane.
    let mut agent = site.agent(&[]);
    assert!(xdp_attach_mode(&site.node, "eth0").is_some());
    let (_, status) = site.guard_cli("status");
    assert!(status.contains("on eth0"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("control-plane CIDRs:") && l.contains(&format!("{CP}/32"))),
        "{status}"
    );
    assert!(site.direct(Duration::from_millis(500)).is_err());

    agent.logged.process.signal(Signal::SIGTERM).unwrap();
    agent
        .logged
        .process
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(
        site.direct(Duration::from_millis(500)).is_err(),
        "the guard went away with the agent"
    );

    let agent = site.agent(&["--guard-mode=off"]);
    assert!(
        agent
            .logged
            .logs
            .contains("the pinned guard now passes everything")
    );
    let before: Vec<Option<u64>> = ["pass", "drop"]
        .iter()
        .map(|action| site.guard_packets(&agent, "control_plane_syn", action))
        .collect();
    assert!(before[1].unwrap() >= 2, "{before:?}");
    assert!(
        site.direct(Duration::from_secs(2)).is_ok(),
        "off mode dropped a connection"
    );
    assert!(site.through_tunnel().ends_with("hello"));
    let after: Vec<Option<u64>> = ["pass", "drop"]
        .iter()
        .map(|action| site.guard_packets(&agent, "control_plane_syn", action))
        .collect();
    assert_eq!(before, after, "off mode counted packets");
    assert_eq!(
        site.guard_cli("status").1.lines().nth(1).unwrap(),
        "mode:                off"
    );
}

/// The agent is SIGKILLed and restarted while probers keep trying the direct path: the pinned
/// link keeps the old program until the new one replaces it atomically.
#[test]
fn sigkill_and_restart_leave_no_gap() {
    let site = Site::new("kill");
    let mut first = site.guarded_agent();
    let program_before = site.guard_cli("status").1;

    let probe = DirectProbe::start(&site);
    std::thread::sleep(Duration::from_millis(200));
    first.logged.process.signal(Signal::SIGKILL).unwrap();
    first
        .logged
        .process
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    let second = site.guarded_agent();
    // The log line is the subject: only it says the pinned link was reused, not made anew.
    let attached = second
        .logged
        .logs
        .wait_for("XDP guard attached", Duration::from_secs(1))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (attempts, successes) = probe.finish();
    assert!(attempts >= 20, "only {attempts} direct attempts were made");
    assert_eq!(
        successes, 0,
        "a direct connection got through during the restart ({attempts} attempts)"
    );
    assert_eq!(log_field(&attached, "attach"), "replaced on pinned link");
    assert!(second.logged.logs.contains("adopted the pinned guard"));
    // The new program runs on the same link, and the counters carried over.
    let program_after = site.guard_cli("status").1;
    let program = |status: &str| {
        status
            .lines()
            .find(|l| l.starts_with("interfaces:"))
            .unwrap()
            .to_owned()
    };
    assert_ne!(program(&program_before), program(&program_after));
    let dropped = site
        .guard_packets(&second, "control_plane_syn", "drop")
        .unwrap();
    assert!(
        dropped >= attempts,
        "{dropped} drops for {attempts} attempts"
    );
    assert!(site.through_tunnel().ends_with("hello"));
}

/// A guard pinned by a release with another layout (here: the first release's, maps straight
/// under the root) or a map of another shape under this layout's name is not adopted: the
/// new agent loads fresh maps, moves its program onto the pinned links, and only then
/// replaces the pins. Direct connections are refused throughout.
#[test]
fn an_incompatible_pinned_guard_is_replaced_without_a_gap() {
    let site = Site::new("layout");
    let root = site.bpffs.root();
    let kill = |mut agent: Agent| {
        agent.logged.process.signal(Signal::SIGKILL).unwrap();
        agent
            .logged
            .process
            .wait_timeout(Duration::from_secs(5))
            .unwrap();
    };
    let restart_under_probe = || {
        let probe = DirectProbe::start(&site);
        std::thread::sleep(Duration::from_millis(100));
        let agent = site.guarded_agent();
        std::thread::sleep(Duration::from_millis(200));
        let (attempts, successes) = probe.finish();
        assert!(attempts >= 10, "only {attempts} direct attempts were made");
        assert_eq!(successes, 0, "a direct connection got through the swap");
        agent
    };
    kill(site.guarded_agent());

    // This release's pins, under `v<PIN_LAYOUT>/`.
    let current = |path: &str| root.join(format!("v{PIN_LAYOUT}/{path}"));
    // The first release's layout: no version directory.
    std::fs::rename(current("maps"), root.join("maps")).unwrap();
    std::fs::rename(current("program"), root.join("program")).unwrap();
    // It had no program for IP-first devices.
    std::fs::remove_file(current("tether_guard_ip")).unwrap();
    std::fs::remove_dir(current("")).unwrap();
    let (code, _) = site.guard_cli("status");
    assert_ne!(code, 0, "status read a guard of another layout");
    let second = restart_under_probe();
    // The log line is the subject: it tells the operator what was replaced.
    let replaced = second
        .logged
        .logs
        .wait_for(
            "replaced an incompatible pinned guard",
            Duration::from_secs(2),
        )
        .expect("the replacement was not logged");
    assert_eq!(
        log_field(&replaced, "found"),
        format!("pin layout v1 (this agent uses v{PIN_LAYOUT})")
    );
    assert!(!second.logged.logs.contains("adopted the pinned guard"));
    assert!(!root.join("maps").exists() && !root.join("program").exists());
    assert!(current("maps/COUNTERS").exists());
    let (code, after) = site.guard_cli("status");
    assert_eq!(code, 0, "{after}");
    assert!(after.contains("mode:                enforce"), "{after}");
    kill(second);

    // Same layout number, but PORTS is pinned as an LPM trie: a release that changed a map
    // and forgot to bump the layout.
    std::fs::hard_link(current("maps/CP_V4"), current("maps/odd")).unwrap();
    std::fs::rename(current("maps/odd"), current("maps/PORTS")).unwrap();
    let third = restart_under_probe();
    // The log line is the subject, as above.
    let replaced = third
        .logged
        .logs
        .wait_for(
            "replaced an incompatible pinned guard",
            Duration::from_secs(2),
        )
        .expect("the replacement was not logged");
    assert!(
        log_field(&replaced, "found")
            .starts_with(&format!("pin layout v{PIN_LAYOUT} whose map PORTS differs")),
        "{replaced}"
    );
    assert!(site.direct(Duration::from_millis(500)).is_err());
    assert!(site.through_tunnel().ends_with("hello"));
    // A guard from this release is adopted as before: its maps stay the pinned ones, where a
    // replacement pins new ones.
    let maps = std::fs::metadata(current("maps/COUNTERS")).unwrap().ino();
    kill(third);
    let _fourth = site.guarded_agent();
    assert_eq!(
        std::fs::metadata(current("maps/COUNTERS")).unwrap().ino(),
        maps,
        "the pinned maps were replaced, not adopted"
    );
}

/// What an operator gets wrong first: pins outside a BPF filesystem, a mistyped interface.
/// Each fails at start with one line that says what to fix.
#[test]
fn bad_guard_setups_fail_with_the_fix() {
    require_root();
    let pki = Pki::new(&[CP]).unwrap();
    let ns = Netns::new("gbad").unwrap();
    let bpffs = Bpffs::mount().unwrap();
    let start = |guard: &[String]| {
        let mut args = vec![
            format!("--proxy-server-host={CP}"),
            format!("--ca-cert={}", pki.ca().display()),
        ];
        args.extend(guard.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match Agent::start_in(&ns, &refs) {
            Ok(_) => panic!("agent started with {guard:?}"),
            Err(err) => format!("{err:#}"),
        }
    };
    let off_bpffs = pki.dir().join("pins");
    let err = start(&[
        "--guard-interface=lo".into(),
        format!("--bpffs-root={}", off_bpffs.display()),
    ]);
    assert!(
        err.contains("is not on a BPF filesystem") && err.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{err}"
    );
    assert!(!off_bpffs.exists(), "created pins outside bpffs");

    let err = start(&[
        "--guard-interface=nosuch0".into(),
        format!("--bpffs-root={}", bpffs.root().display()),
    ]);
    assert!(
        err.contains(r#"network interface \"nosuch0\" does not exist"#)
            || err.contains(r#"network interface "nosuch0" does not exist"#),
        "{err}"
    );

    // Root without capabilities, like a pod that was not granted CAP_BPF.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path()))
        .args(["setpriv", "--bounding-set=-all", "--inh-caps=-all"])
        .arg(built("tether-agent").unwrap())
        .args([
            "--log-format=json",
            "--health-server-port=0",
            "--admin-server-port=0",
            "--guard-interface=lo",
        ])
        .arg(format!("--proxy-server-host={CP}"))
        .arg(format!("--ca-cert={}", pki.ca().display()))
        .arg(format!("--bpffs-root={}", bpffs.root().display()));
    let mut agent = spawn_logged("agent", &mut cmd).unwrap();
    let status = agent.process.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(!status.success(), "started without capabilities");
    // The error an operator reads is the subject.
    assert!(
        agent
            .logs
            .wait_for(
                "missing CAP_BPF (to create the guard's maps and load its program), CAP_PERFMON",
                Duration::from_secs(2)
            )
            .is_some(),
        "{:#?}",
        agent.logs.lines()
    );
}
