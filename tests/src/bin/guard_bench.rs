//! `cargo xtask bench guard`: what the XDP guard costs.
//!
//! 1. Per packet, with BPF_PROG_TEST_RUN, IPv4 and IPv6: established traffic from outside the
//!    control plane, the control plane's return traffic on a real connection of the node's
//!    (the socket-lookup path), and the SYN-drop path, against a no-op XDP program (the
//!    floor), as CPU time of the calling thread per run (the kernel's own average is in whole
//!    nanoseconds, too coarse for a few-nanosecond floor).
//! 2. Drop rate on a veth pair between two namespaces: an in-kernel generator
//!    (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on an `XDP_TX` program) pinned to CPU 0
//!    sends control-plane SYNs; the receiver's threaded NAPI, pinned to CPU 1, runs the guard,
//!    a no-op `XDP_DROP`, an `XDP_DROP` after reading the headers a SYN filter reads, or a
//!    no-op `XDP_PASS` followed by one iptables raw rule. The four are interleaved round by
//!    round and compared by median, as rates and as the receiver's CPU time per packet (its
//!    NAPI thread's run time over the packets it took).
//!
//!    The rig charges a receiver for falling behind. Frames the generator cannot hand over
//!    (the receiver's ring is full) go back to the generator's page pool through the same
//!    spin-locked ring that every frame the receiver drops goes back through, so the two CPUs
//!    spin on that lock in proportion to the frames the receiver missed: a slower receiver
//!    pays more per packet, up to twice its usual cost when most rounds fall into that regime.
//!    A NIC drops what overflows its ring in hardware, so a node never pays this. The share of
//!    the sent frames each receiver took is printed so that the regime shows.
//!
//! Policy for both: 16 IPv4 and 8 IPv6 control-plane prefixes, 6 protected ports.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use tether_agent::guard_program::{Cidr, GuardProgram, Policy};
use tether_agent_common::Mode;
use tether_tests::netns::{Netns, veth};
use tether_tests::packets::{ACK, ETH_IP, ETH_IPV6, SYN, TCP, ethernet, frame, ipv4, ipv6, tcp};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const CONTROL_PLANE: [u8; 4] = [10, 88, 0, 1];
const NODE: [u8; 4] = [10, 88, 0, 2];
/// `packets::ethernet` addresses frames to this MAC; the receiver takes it so the stack accepts
/// them in the iptables case.
const RECEIVER_MAC: &str = "02:00:00:00:00:01";

struct Sizes {
    rounds: usize,
    test_run_repeat: u32,
    live_frames: u32,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut quick = false;
    let mut object = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--bench-object" => object = args.next().map(PathBuf::from),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let object = object.context("--bench-object <path to tether-bench-ebpf> is required")?;
    let sizes = if quick {
        Sizes {
            rounds: 2,
            test_run_repeat: 1_000_000,
            live_frames: 1_000_000,
        }
    } else {
        Sizes {
            rounds: 9,
            test_run_repeat: 5_000_000,
            live_frames: 5_000_000,
        }
    };
    let mut bench = Ebpf::load_file(&object).with_context(|| {
        format!(
            "loading {} (cargo xtask build-ebpf --release)",
            object.display()
        )
    })?;
    for name in ["bench_pass", "bench_drop", "bench_read_drop", "bench_tx"] {
        xdp(&mut bench, name)?
            .load()
            .with_context(|| format!("loading {name}"))?;
    }
    per_packet(&mut bench, &sizes)?;
    drop_rate(&mut bench, &sizes)
}

fn xdp<'a>(bench: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let program = bench
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?;
    Ok(program.try_into()?)
}

fn policy() -> Policy {
    let mut control_plane: Vec<Cidr> = vec![Cidr {
        addr: CONTROL_PLANE.into(),
        len: 32,
    }];
    control_plane.extend((0..15u8).map(|i| Cidr {
        addr: [172, 16 + i, 0, 0].into(),
        len: 16,
    }));
    control_plane.extend((0..8u16).map(|i| Cidr {
        addr: std::net::Ipv6Addr::new(0xfd00, i, 0, 0, 0, 0, 0, 0).into(),
        len: 32,
    }));
    Policy {
        control_plane,
        protected_ports: vec![10250, 10255, 22, 2379, 2380, 4194],
        allowed: Vec::new(),
        tunnel_protocols: vec![4, 41, 47, 50],
        tunnel_ports: vec![4789, 6081, 8472, 51820, 51871],
    }
}

fn guard() -> Result<GuardProgram> {
    let (mut program, _logs) = GuardProgram::load(None)?;
    program.set_policy(&policy())?;
    program.set_mode(Mode::Enforce)?;
    Ok(program)
}

/// A TCP segment from the control plane to the kubelet port with `flags`.
fn segment(flags: u8) -> Vec<u8> {
    frame(&[
        &ethernet(&[], ETH_IP),
        &ipv4(CONTROL_PLANE, NODE, TCP, 20, 0, 0),
        &tcp(10250, flags, 0),
    ])
}

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// CPU nanoseconds per run of `run`, which makes `repeat` runs and returns the XDP action.
fn cpu_per_run(repeat: u32, run: impl FnOnce() -> Result<u32>, want: u32) -> Result<f64> {
    let start = thread_cpu();
    let action = run()?;
    let spent = thread_cpu() - start;
    if action != want {
        bail!("XDP action {action}, expected {want}");
    }
    Ok(spent.as_nanos() as f64 / f64::from(repeat))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One per-packet measurement: a frame and the action the guard must take on it.
struct Case {
    name: &'static str,
    packet: Vec<u8>,
    action: u32,
}

/// Addresses for the per-packet cases: the control plane's (inside its prefixes), the node's,
/// and a source outside every prefix.
const ELSEWHERE: [u8; 4] = [192, 168, 7, 7];
const CONTROL_PLANE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd88, 0, 0, 0, 0, 0, 0, 2);
const ELSEWHERE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);

fn cases(local4: u16, local6: u16) -> Vec<Case> {
    let v4 = |src: [u8; 4], port: u16, flags: u8| {
        frame(&[
            &ethernet(&[], ETH_IP),
            &ipv4(src, NODE, TCP, 20, 0, 0),
            &tcp(port, flags, 0),
        ])
    };
    let v6 = |src: Ipv6Addr, port: u16, flags: u8| {
        frame(&[
            &ethernet(&[], ETH_IPV6),
            &ipv6(src.octets(), NODE6.octets(), TCP, 20),
            &tcp(port, flags, 0),
        ])
    };
    vec![
        Case {
            name: "v4 established, from elsewhere",
            packet: v4(ELSEWHERE, 10250, ACK),
            action: XDP_PASS,
        },
        Case {
            name: "v4 established, control plane (lookup)",
            packet: v4(CONTROL_PLANE, local4, ACK),
            action: XDP_PASS,
        },
        Case {
            name: "v4 control-plane SYN (drop)",
            packet: v4(CONTROL_PLANE, 10250, SYN),
            action: XDP_DROP,
        },
        Case {
            name: "v6 established, from elsewhere",
            packet: v6(ELSEWHERE6, 10250, ACK),
            action: XDP_PASS,
        },
        Case {
            name: "v6 established, control plane (lookup)",
            packet: v6(CONTROL_PLANE6, local6, ACK),
            action: XDP_PASS,
        },
        Case {
            name: "v6 control-plane SYN (drop)",
            packet: v6(CONTROL_PLANE6, 10250, SYN),
            action: XDP_DROP,
        },
    ]
}

/// A connection from the node to the control plane's port 40000 (the source port of every
/// built segment), so the control plane's ACKs are the return traffic of a real socket the
/// guard's lookup finds. Returns the node's local port and the sockets to keep.
fn own_connection(node: IpAddr, cp: IpAddr) -> Result<(u16, [TcpStream; 2], TcpListener)> {
    let listener = TcpListener::bind((cp, 40000))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(SocketAddr::new(node, 0)),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(node, 0).into())?;
    socket.connect(&SocketAddr::new(cp, 40000).into())?;
    let client = TcpStream::from(socket);
    let (server, _) = listener.accept()?;
    Ok((client.local_addr()?.port(), [client, server], listener))
}

fn per_packet(bench: &mut Ebpf, sizes: &Sizes) -> Result<()> {
    // In a namespace of its own, where the node's connections to the control plane exist:
    // BPF_PROG_TEST_RUN looks sockets up in the caller's namespace.
    let ns = Netns::new("bench-pp")?;
    for address in ["10.88.0.1/32", "10.88.0.2/32", "fd00::1/128", "fd88::2/128"] {
        ns.ip(&["addr", "add", address, "dev", "lo", "nodad"])?;
    }
    ns.run(|| per_packet_here(bench, sizes))?
}

fn per_packet_here(bench: &mut Ebpf, sizes: &Sizes) -> Result<()> {
    pin_to_cpu(0)?;
    let (local4, _v4, _l4) = own_connection(NODE.into(), CONTROL_PLANE.into())?;
    let (local6, _v6, _l6) = own_connection(NODE6.into(), CONTROL_PLANE6.into())?;
    let cases = cases(local4, local6);
    let floor_packet = &cases[0].packet;
    let mut program = guard()?;
    let repeat = sizes.test_run_repeat;
    let mut floor = Vec::new();
    let mut samples: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..sizes.rounds {
        let noop = xdp(bench, "bench_pass")?;
        floor.push(cpu_per_run(
            repeat,
            || {
                let result = noop.test_run(TestRunOptions {
                    data_in: Some(floor_packet),
                    repeat,
                    ..TestRunOptions::new()
                })?;
                Ok(result.return_value)
            },
            XDP_PASS,
        )?);
        for (case, samples) in cases.iter().zip(&mut samples) {
            samples.push(
                cpu_per_run(
                    repeat,
                    || Ok(program.time_packet(&case.packet, repeat)?.0),
                    case.action,
                )
                .with_context(|| case.name)?,
            );
        }
    }
    // Each round's ratio pairs measurements taken moments apart, so drift in the machine's
    // speed between rounds cancels out.
    let ratio = |samples: &[f64]| {
        let mut ratios: Vec<f64> = samples.iter().zip(&floor).map(|(s, f)| s / f).collect();
        median(&mut ratios)
    };
    println!(
        "\n== per packet: BPF_PROG_TEST_RUN x {repeat}, {} rounds interleaved; median CPU ns per run, median of each round's ratio to the floor",
        sizes.rounds
    );
    println!("   {:<44}{:>10}{:>12}", "program", "ns/packet", "x floor");
    println!(
        "   {:<44}{:>10.1}{:>12.2}",
        "no-op XDP_PASS (floor)",
        median(&mut floor.clone()),
        1.0
    );
    for (case, samples) in cases.iter().zip(&mut samples) {
        let r = ratio(samples);
        println!(
            "   {:<44}{:>10.1}{r:>12.2}",
            format!("guard, {}", case.name),
            median(samples)
        );
    }
    Ok(())
}

/// Two namespaces joined by a veth: `tgen0` (the control plane's side) and `trx0` (the node's).
struct Link {
    generator: Netns,
    receiver: Netns,
    generator_index: u32,
}

impl Link {
    fn new() -> Result<Self> {
        let generator = Netns::new("bench-gen")?;
        let receiver = Netns::new("bench-rx")?;
        veth(
            &generator,
            "tgen0",
            "10.88.0.1/24",
            &receiver,
            "trx0",
            "10.88.0.2/24",
        )?;
        receiver.ip(&["link", "set", "trx0", "address", RECEIVER_MAC])?;
        let generator_index = link_json(&generator, "tgen0")?["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .context("no ifindex for tgen0")?;
        Ok(Link {
            generator,
            receiver,
            generator_index,
        })
    }

    /// Packets the receiver's driver handed to XDP so far.
    fn received(&self) -> Result<u64> {
        link_json(&self.receiver, "trx0")?["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packet count for trx0")
    }

    /// Runs the receiver's NAPI in its own kernel thread on CPU 1 (the generator has CPU 0).
    /// The thread is created with the NAPI instance, i.e. when an XDP program is attached.
    /// Returns the threads' ids.
    fn pin_receiver(&self) -> Result<Vec<i32>> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.receiver.name(), "sh", "-c"])
            .arg("echo 1 > /sys/class/net/trx0/threaded")
            .output()?;
        if !out.status.success() {
            bail!(
                "enabling threaded NAPI on trx0: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut pinned = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.starts_with("napi/trx0-") {
                let mut cpu = CpuSet::new();
                cpu.set(1)?;
                sched_setaffinity(Pid::from_raw(pid), &cpu)?;
                pinned.push(pid);
            }
        }
        if pinned.is_empty() {
            bail!("no threaded NAPI kernel thread for trx0");
        }
        Ok(pinned)
    }

    /// Sends `frames` copies of `packet` from the generator; returns the wall time, the
    /// packets the receiver got and the CPU time its NAPI `threads` spent on them.
    fn blast(&self, tx: &mut Xdp, packet: &[u8], frames: u32, threads: &[i32]) -> Result<Blast> {
        let before = self.received()?;
        let cpu_before = run_time(threads)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let len = u32::try_from(packet.len())?;
        let md: Vec<u8> = [0, len, 0, self.generator_index, 0, 0]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect();
        let elapsed = self.generator.run(|| -> Result<Duration> {
            pin_to_cpu(0)?;
            let start = Instant::now();
            // Live-frame runs report no return value; the receiver's count shows they went.
            tx.test_run(TestRunOptions {
                data_in: Some(packet),
                ctx_in: Some(&md),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::new()
            })?;
            Ok(start.elapsed())
        })??;
        // The receiver drains its ring after the generator returns.
        std::thread::sleep(Duration::from_millis(100));
        let received = self.received()? - before;
        if received == 0 {
            bail!("the receiver got none of the {frames} frames sent");
        }
        Ok(Blast {
            elapsed,
            received,
            receiver_cpu: run_time(threads)? - cpu_before,
        })
    }
}

struct Blast {
    elapsed: Duration,
    received: u64,
    receiver_cpu: Duration,
}

/// Time the threads have spent on a CPU (the first field of their schedstat).
fn run_time(threads: &[i32]) -> Result<Duration> {
    let mut total = 0;
    for thread in threads {
        let path = format!("/proc/{thread}/schedstat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("no run time in {path}: {stat:?}"))?;
    }
    Ok(Duration::from_nanos(total))
}

fn link_json(ns: &Netns, name: &str) -> Result<serde_json::Value> {
    let out = ns.ip(&["-s", "-j", "link", "show", name])?;
    let mut value: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(value[0].take())
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

fn iptables(ns: &Netns, action: &str) -> Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", ns.name(), "iptables", "-t", "raw", action])
        .args(["PREROUTING", "-i", "trx0", "-s", "10.88.0.1", "-p", "tcp"])
        .args(["--syn", "-j", "DROP"])
        .status()?;
    if !status.success() {
        bail!("iptables {action} failed: {status}");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    NoopDrop,
    ReadDrop,
    Guard,
    Iptables,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::NoopDrop => "no-op XDP_DROP",
            Variant::ReadDrop => "read headers, XDP_DROP",
            Variant::Guard => "guard (enforce)",
            Variant::Iptables => "iptables raw rule",
        }
    }
}

/// What runs on the receiver for one measurement.
enum Receiver {
    Guard(GuardProgram),
    Program(&'static str, XdpLinkId),
}

fn attach(bench: &mut Ebpf, link: &Link, variant: Variant) -> Result<Receiver> {
    let program = match variant {
        Variant::Guard => {
            let mut guard = guard()?;
            link.receiver
                .run(|| guard.attach("trx0", tether_agent::guard_program::Layout::Ethernet))??;
            return Ok(Receiver::Guard(guard));
        }
        Variant::NoopDrop => "bench_drop",
        Variant::ReadDrop => "bench_read_drop",
        Variant::Iptables => {
            iptables(&link.receiver, "-A")?;
            // XDP_PASS only gives the veth a NAPI instance to receive XDP frames with; the
            // rule does the dropping.
            "bench_pass"
        }
    };
    let xdp = xdp(bench, program)?;
    let id = link
        .receiver
        .run(|| xdp.attach("trx0", XdpMode::Driver))??;
    Ok(Receiver::Program(program, id))
}

fn drop_rate(bench: &mut Ebpf, sizes: &Sizes) -> Result<()> {
    let link = Link::new()?;
    let syn = segment(SYN);
    let variants = [
        Variant::NoopDrop,
        Variant::ReadDrop,
        Variant::Guard,
        Variant::Iptables,
    ];
    const GUARD: usize = 2;
    // Per variant, one sample per round: the rate the receiver took packets at, the CPU time
    // it spent per packet, and the share of the sent frames it took.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut took: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut sent = Vec::new();
    for _ in 0..sizes.rounds {
        for (i, variant) in variants.iter().enumerate() {
            let receiver = attach(bench, &link, *variant)?;
            let threads = link.pin_receiver()?;
            let blast = link.blast(xdp(bench, "bench_tx")?, &syn, sizes.live_frames, &threads)?;
            let seconds = blast.elapsed.as_secs_f64();
            rates[i].push(blast.received as f64 / seconds / 1e6);
            cpu[i].push(blast.receiver_cpu.as_nanos() as f64 / blast.received as f64);
            took[i].push(blast.received as f64 / f64::from(sizes.live_frames));
            sent.push(f64::from(sizes.live_frames) / seconds / 1e6);
            match receiver {
                Receiver::Guard(guard) => {
                    let dropped: u64 = guard.counters()?.iter().map(|c| c.dropped.packets).sum();
                    // The veth also carries the kernel's own few packets (IPv6 neighbour
                    // discovery), which pass.
                    if dropped < blast.received - blast.received / 100 {
                        bail!("the guard dropped {dropped} of {} packets", blast.received);
                    }
                }
                Receiver::Program(name, id) => {
                    xdp(bench, name)?.detach(id)?;
                    if *variant == Variant::Iptables {
                        iptables(&link.receiver, "-D")?;
                    }
                }
            }
        }
    }
    println!(
        "\n== drop rate: control-plane SYNs over veth, {} frames per run, {} rounds interleaved",
        sizes.live_frames, sizes.rounds
    );
    println!(
        "   generator (XDP_TX live frames, CPU 0) sent a median {:.2} Mpps",
        median(&mut sent)
    );
    // Ratios per round, as for the per-packet figures: neighbouring runs share the machine's
    // mood. For CPU time the ratio is inverted, so that both columns read as the guard's
    // capacity over the other receiver's.
    let per_round = |numerator: &[f64], denominator: &[f64]| {
        let mut ratios: Vec<f64> = numerator
            .iter()
            .zip(denominator)
            .map(|(n, d)| n / d)
            .collect();
        median(&mut ratios)
    };
    println!(
        "   {:<24}{:>12}{:>14}{:>14}{:>14}{:>10}",
        "receiver (CPU 1)", "median Mpps", "guard / this", "CPU ns/pkt", "guard / this", "took"
    );
    for (i, variant) in variants.iter().enumerate() {
        println!(
            "   {:<24}{:>12.2}{:>14.2}{:>14.1}{:>14.2}{:>10.2}",
            variant.label(),
            median(&mut rates[i].clone()),
            per_round(&rates[GUARD], &rates[i]),
            median(&mut cpu[i].clone()),
            per_round(&cpu[i], &cpu[GUARD]),
            median(&mut took[i]),
        );
    }
    Ok(())
}
