//! The guard's lifecycle in the agent: fills in the defaults an operator left out (the control
//! plane from the proxy server's address), puts the XDP program in place over whatever an
//! earlier agent pinned, on every interface that carries the control plane's traffic, follows those
//! as they change, and keeps its logs and drop events flowing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;

use tether_agent_common::Mode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::guard_program::{
    Attached, BpfError, Cidr, Counters, GuardProgram, PinnedGuard, Pins, Policy,
};
use crate::{capabilities, interfaces, kernel};

/// The guard flags, validated.
#[derive(Clone, Debug)]
pub struct GuardSettings {
    pub mode: Mode,
    /// Guarded besides the interfaces with routes to the control plane.
    pub interfaces: Vec<String>,
    /// Empty: the resolved addresses of the proxy server.
    pub control_plane: Vec<Cidr>,
    pub protected_ports: Vec<u16>,
    pub allowed: Vec<Cidr>,
    /// IP protocols dropped from the control plane as tunnels.
    pub tunnel_protocols: Vec<u8>,
    /// UDP ports dropped from the control plane as tunnels, besides the ports of the node's
    /// tunnel devices.
    pub tunnel_ports: Vec<u16>,
    /// UDP ports the operator allowed tunnels on: never dropped as tunnels, even when a tunnel
    /// device receives on one.
    pub allowed_tunnel_ports: Vec<u16>,
    pub bpffs_root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "no interface to guard: no route in this network namespace leads to the control plane \
         (--control-plane-cidr); name the interfaces with --guard-interface"
    )]
    NoRoute,
    #[error(
        "missing {0}: grant it in the container's securityContext (capabilities.add), or run \
         with --guard-mode=off"
    )]
    MissingCapabilities(String),
    #[error(
        "the guard needs Linux {floor} or later and this kernel is {running}; upgrade the \
         kernel or run with --guard-mode=off"
    )]
    KernelTooOld {
        floor: kernel::Release,
        running: kernel::Release,
    },
    #[error(transparent)]
    Watch(#[from] interfaces::WatchError),
    #[error(
        "cannot guard --guard-interface {interface}: the guard cannot read frames of its device \
         type, {device_type} (it reads Ethernet, tun, WireGuard, ipip, sit, PPP and raw-IP \
         devices); filter it with a host firewall instead"
    )]
    UnreadableDevice {
        interface: String,
        device_type: interfaces::DeviceType,
    },
    #[error(
        "cannot resolve --proxy-server-host {host} for the default --control-plane-cidr; \
         set --control-plane-cidr"
    )]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// A running guard. Dropping it stops the log and event forwarding; the XDP program stays in
/// place through its pins.
pub struct Guard {
    counters: Option<Counters>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Guard {
    /// The counters, for the one place that exports them.
    pub fn take_counters(&mut self) -> Option<Counters> {
        self.counters.take()
    }

    /// The guard's background tasks by name, for the liveness check: none of them ends while
    /// the guard works.
    pub fn tasks(&self) -> impl Iterator<Item = (&'static str, tokio::task::AbortHandle)> + '_ {
        self.tasks
            .iter()
            .map(|(name, task)| (*name, task.abort_handle()))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

/// Puts the guard in place. With `--guard-mode=off` nothing is loaded: a guard an earlier agent
/// pinned is switched off (it then passes everything and counts nothing), and `None` is
/// returned when there is none.
pub async fn start(
    settings: &GuardSettings,
    server_hosts: &[String],
    server_port: u16,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Option<Guard>, GuardError> {
    let pins = Pins::new(&settings.bpffs_root);
    if settings.mode == Mode::Off {
        let Some(pinned) = PinnedGuard::find(pins)? else {
            tracing::info!("guard off: nothing attached");
            return Ok(None);
        };
        pinned.set_mode(Mode::Off)?;
        tracing::warn!(
            bpffs_root = %settings.bpffs_root.display(),
            "guard off: the pinned guard now passes everything; `tether-agent guard detach` removes it"
        );
        return Ok(Some(Guard {
            counters: Some(pinned.counters()?),
            tasks: Vec::new(),
        }));
    }
    if let Some(running) = kernel::running()
        && running < kernel::GUARD_FLOOR
    {
        return Err(GuardError::KernelTooOld {
            floor: kernel::GUARD_FLOOR,
            running,
        });
    }
    let missing = capabilities::missing(&capabilities::GUARD);
    if !missing.is_empty() {
        let named: Vec<String> = missing
            .iter()
            .map(|c| format!("{} ({})", c.name, c.why))
            .collect();
        return Err(GuardError::MissingCapabilities(named.join(", ")));
    }
    let control_plane = if settings.control_plane.is_empty() {
        resolve(server_hosts, server_port).await?
    } else {
        settings.control_plane.clone()
    };
    // Subscribed before the first look at the routes and devices, so no change falls in
    // between.
    let changes = interfaces::Changes::subscribe()?;
    let mut tunnel_ports = TunnelPorts {
        configured: settings.tunnel_ports.clone(),
        allowed: settings.allowed_tunnel_ports.clone(),
        found: BTreeMap::new(),
    };
    let now =
        interfaces::links().map_err(|err| GuardError::Watch(interfaces::WatchError::from(err)))?;
    tunnel_ports.refresh(&now);
    let policy = Policy {
        control_plane,
        protected_ports: settings.protected_ports.clone(),
        allowed: settings.allowed.clone(),
        tunnel_protocols: settings.tunnel_protocols.clone(),
        tunnel_ports: tunnel_ports.ports(),
    };
    let mode = refuse_enforce_on_control_plane(settings.mode, &policy.control_plane);
    let mut links = Links {
        named: settings.interfaces.clone(),
        control_plane: policy.control_plane.clone(),
        guarded: BTreeMap::new(),
        refused: BTreeMap::new(),
        fallback: BTreeMap::new(),
    };
    let wanted = links.wanted(&now)?;
    if wanted.is_empty() {
        return Err(GuardError::NoRoute);
    }
    let (mut program, logs) = GuardProgram::load(Some(pins))?;
    let adopted = !program.maps_are_new();
    // Policy before mode: a fresh program starts inert (mode 0 = off) and must never enforce
    // a half-written policy.
    program.set_policy(&policy)?;
    program.set_mode(mode)?;
    let texts = |cidrs: &[Cidr]| cidrs.iter().map(ToString::to_string).collect::<Vec<_>>();
    tracing::info!(
        mode = mode.label(),
        control_plane = ?texts(&policy.control_plane),
        protected_ports = ?policy.protected_ports,
        allowed = ?texts(&policy.allowed),
        tunnels = ?policy.tunnel_protocols,
        tunnel_ports = ?policy.tunnel_ports,
        "XDP guard policy"
    );
    links.reconcile(wanted, &mut program, mode)?;
    if adopted {
        tracing::info!(bpffs_root = %settings.bpffs_root.display(), "adopted the pinned guard: policy and counters carried over");
    } else if let Some(replaced) = program.commit_pins()? {
        tracing::warn!(
            bpffs_root = %settings.bpffs_root.display(),
            found = replaced,
            "replaced an incompatible pinned guard: the new program took over its links without a gap; counters start from zero"
        );
    }
    let counters = program.counters_handle()?;
    let events = program.drop_events()?;
    let report = |what: &'static str| {
        move |result: Result<(), String>| {
            if let Err(err) = result {
                tracing::error!(error = err, "guard {what} stopped");
            }
        }
    };
    let chain = |err: &dyn std::error::Error| tether_runtime::error_chain(err);
    let spawn = |task: Pin<Box<dyn Future<Output = ()> + Send>>| {
        let stop = stop.clone();
        tracker.spawn(async move {
            stop.run_until_cancelled(task).await;
        })
    };
    let tasks = vec![
        (
            "guard drop events",
            spawn(Box::pin(async move {
                report("drop events")(events.forward().await.map_err(|e| chain(&e)))
            })),
        ),
        (
            "guard kernel logs",
            spawn(Box::pin(async move {
                report("kernel logs")(logs.forward().await.map_err(|e| chain(&e)))
            })),
        ),
        (
            "guard interface watch",
            spawn(Box::pin(async move {
                // The program stays loaded as long as this task: its fd backs the pin.
                report("interface watch")(
                    follow(changes, links, tunnel_ports, policy, program, mode)
                        .await
                        .map_err(|e| chain(&e)),
                )
            })),
        ),
    ];
    Ok(Some(Guard {
        counters: Some(counters),
        tasks,
    }))
}

/// More guarded interfaces than a node has uplinks: a control-plane CIDR that covers pods.
const MANY_INTERFACES: usize = 16;

/// The interfaces the guard is on, and how it decides which those are.
struct Links {
    named: Vec<String>,
    control_plane: Vec<Cidr>,
    /// Interface → the ifindex it had when the guard was attached: a name that comes back
    /// with another index is a new device and needs attaching again.
    guarded: BTreeMap<String, u32>,
    /// Interfaces that carry the control plane's traffic but whose frames the guard cannot
    /// read, by the ifindex they were refused at: said once per device, not per change.
    refused: BTreeMap<String, u32>,
    /// Interfaces guarded themselves because an interface their frames enter through could
    /// not take the guard, with the interfaces below them at the time.
    fallback: BTreeMap<String, BTreeSet<String>>,
}

impl Links {
    /// Which of `now` (every interface, as [`interfaces::links`] read them) to be on.
    fn wanted(
        &self,
        now: &BTreeMap<u32, interfaces::Link>,
    ) -> Result<Vec<interfaces::Wanted>, GuardError> {
        interfaces::carrying(now, &self.control_plane, &self.named)
            .map_err(|err| GuardError::Watch(interfaces::WatchError::from(err)))
    }

    /// Attaches to `wanted` (what [`Links::wanted`] read) and detaches from the interfaces
    /// that are no longer in it. Failing on an interface the operator named is an error; on one found
    /// by its routes it is logged, and the rest are still guarded. Where an interface below
    /// another (a bridge's port, a macvlan's device) cannot take the guard, the one above it
    /// gets it instead, as before the guard went below.
    fn reconcile(
        &mut self,
        wanted: Vec<interfaces::Wanted>,
        program: &mut GuardProgram,
        mode: Mode,
    ) -> Result<(), GuardError> {
        let mut readable = Vec::new();
        let mut refused = BTreeMap::new();
        // The interfaces below each upper one, and the upper one itself.
        let mut below: BTreeMap<String, (interfaces::Link, BTreeSet<String>)> = BTreeMap::new();
        for want in &wanted {
            if let Some(upper) = &want.upper {
                below
                    .entry(upper.name.clone())
                    .or_insert_with(|| (upper.clone(), BTreeSet::new()))
                    .1
                    .insert(want.name.clone());
            }
        }
        // An upper interface guarded in place of those below it stays so while it and they
        // stay the same: they cannot take the guard while it has it (XDP refuses a device whose
        // upper device has a program), so trying again would only open a gap.
        let standing: BTreeMap<String, BTreeSet<String>> = self
            .fallback
            .iter()
            .filter(|(upper, entries)| {
                below.get(*upper).is_some_and(|(link, now)| {
                    now == *entries && self.guarded.get(*upper) == Some(&link.index)
                })
            })
            .map(|(upper, entries)| (upper.clone(), entries.clone()))
            .collect();
        let uppers: BTreeMap<String, String> = wanted
            .iter()
            .filter_map(|want| Some((want.name.clone(), want.upper.as_ref()?.name.clone())))
            .collect();
        let named = |interface: &String| self.named.contains(interface);
        for want in wanted {
            let stood_for = want
                .upper
                .as_ref()
                .is_some_and(|upper| standing.contains_key(&upper.name));
            if stood_for && !self.guarded.contains_key(&want.name) {
                continue;
            }
            let Some(link) = want.link else {
                if named(&want.name) {
                    return Err(BpfError::NoSuchInterface {
                        interface: want.name,
                    }
                    .into());
                }
                continue;
            };
            match link.layout() {
                Ok(layout) => readable.push((want.name, link.index, layout)),
                Err(device_type) if named(&want.name) => {
                    return Err(GuardError::UnreadableDevice {
                        interface: want.name,
                        device_type,
                    });
                }
                Err(device_type) => {
                    if self.refused.get(&want.name) != Some(&link.index) {
                        tracing::error!(
                            interface = want.name,
                            device_type = %device_type,
                            "cannot guard an interface that carries the control plane's traffic: the guard cannot read \
                             frames of its device type, so traffic arriving on it is NOT guarded; route the \
                             control plane through another interface or filter this one with a host firewall"
                        );
                    }
                    refused.insert(want.name, link.index);
                }
            }
        }
        self.refused = refused;
        let attaching: Vec<&String> = readable
            .iter()
            .filter(|(interface, index, _)| self.guarded.get(interface) != Some(index))
            .map(|(interface, _, _)| interface)
            .collect();
        // Counter slots before attaching: a packet dropped on an interface just after its
        // attach is counted against it too. What is guarded keeps its slot; the call after the
        // attaches settles the slots on what ended up guarded.
        if !attaching.is_empty() {
            let claim: Vec<String> = self
                .guarded
                .keys()
                .filter(|i| crate::guard_program::interface_index(i).is_ok())
                .chain(attaching)
                .cloned()
                .collect();
            if let Err(err) = program.count_interfaces(&claim) {
                tracing::warn!(error = %tether_runtime::error_chain(&err), "cannot claim drop counters before attaching; counting starts once attached");
            }
        }
        // What is no longer wanted loses its guard before anything new gets one: a bridge
        // whose uplink port just joined it gives way to the port, and XDP refuses a device
        // whose upper device has a program.
        let wanted_names: Vec<String> = readable
            .iter()
            .map(|(name, _, _)| name.clone())
            .chain(standing.keys().cloned())
            .collect();
        for interface in program.release_other_interfaces(&wanted_names)? {
            self.guarded.remove(&interface);
            tracing::info!(
                interface,
                "XDP guard detached: no longer an interface the control plane's traffic enters through"
            );
        }
        let mut now = BTreeMap::new();
        for (interface, index, layout) in readable {
            if self.guarded.get(&interface) == Some(&index) {
                now.insert(interface, index);
                continue;
            }
            match program.attach(&interface, layout) {
                Ok(attached) => {
                    tracing::info!(
                        interface,
                        attach = attached.label(),
                        layout = layout.label(),
                        mode = mode.label(),
                        named = named(&interface),
                        below = uppers.get(&interface).map(String::as_str),
                        "XDP guard attached"
                    );
                    if attached == Attached::Generic {
                        tracing::warn!(
                            interface,
                            "the driver has no native XDP: the guard runs in generic mode, after the kernel allocated the packet"
                        );
                    }
                    now.insert(interface, index);
                }
                Err(err) if !named(&interface) => {
                    tracing::error!(
                        interface,
                        error = %tether_runtime::error_chain(&err),
                        "cannot guard an interface that carries the control plane's traffic: traffic arriving on it is not guarded"
                    );
                }
                Err(err) => return Err(err.into()),
            }
        }
        let mut fallback = BTreeMap::new();
        for (upper, (link, entries)) in below {
            if let Some(entries) = standing.get(&upper) {
                now.insert(upper.clone(), link.index);
                fallback.insert(upper, entries.clone());
                continue;
            }
            let failed: Vec<&String> = entries.iter().filter(|e| !now.contains_key(*e)).collect();
            if failed.is_empty() {
                continue;
            }
            // Bridges, VRFs and the stacked devices are all Ethernet.
            let Ok(layout) = link.layout() else {
                continue;
            };
            match program.attach(&upper, layout) {
                Ok(attached) => {
                    tracing::warn!(
                        interface = upper,
                        attach = attached.label(),
                        mode = mode.label(),
                        instead_of = ?failed,
                        "XDP guard attached to the interface itself: the ones its frames enter through could not take \
                         it, so what arrives through them for others (bridged or macvlan pods) is NOT guarded"
                    );
                    now.insert(upper.clone(), link.index);
                    fallback.insert(upper, entries);
                }
                Err(err) if !named(&upper) => {
                    tracing::error!(
                        interface = upper,
                        error = %tether_runtime::error_chain(&err),
                        "cannot guard an interface that carries the control plane's traffic, nor the ones its frames enter through"
                    );
                }
                Err(err) => return Err(err.into()),
            }
        }
        self.fallback = fallback;
        if now.len() > MANY_INTERFACES && self.guarded.len() <= MANY_INTERFACES {
            tracing::warn!(
                interfaces = now.len(),
                "the guard is on this many interfaces because routes to --control-plane-cidr lead \
                 through them all (pod routes inside it?); narrow it to the control plane's own \
                 addresses"
            );
        }
        let keep: Vec<String> = now.keys().cloned().collect();
        // A pinned link whose interface could not take the guard again would otherwise keep
        // an earlier program there.
        for interface in program.release_other_interfaces(&keep)? {
            tracing::warn!(
                interface,
                "XDP guard detached: the guard could not be put on this interface again"
            );
        }
        for interface in program.count_interfaces(&keep)? {
            tracing::warn!(
                interface,
                "this interface's drops are counted only in the totals: another guarded interface holds its counter slot"
            );
        }
        self.guarded = now;
        Ok(())
    }
}

/// The UDP ports dropped from the control plane as tunnels: the configured ones and the ones
/// the node's tunnel devices receive on, less the ones the operator allowed.
struct TunnelPorts {
    configured: Vec<u16>,
    allowed: Vec<u16>,
    /// Ports of tunnel devices, with a device that receives on each.
    found: BTreeMap<u16, String>,
}

impl TunnelPorts {
    /// Takes the tunnel devices among `now`; returns whether the ports changed.
    fn refresh(&mut self, now: &BTreeMap<u32, interfaces::Link>) -> bool {
        let mut found = interfaces::udp_tunnel_ports(now);
        found.retain(|port, _| !self.allowed.contains(port));
        for (port, interface) in &found {
            if !self.found.contains_key(port) && !self.configured.contains(port) {
                tracing::info!(
                    port,
                    interface,
                    "a tunnel device receives on this UDP port: dropped from the control plane as a tunnel"
                );
            }
        }
        let changed = !found.keys().eq(self.found.keys());
        self.found = found;
        changed
    }

    fn ports(&self) -> Vec<u16> {
        let ports: BTreeSet<u16> = self
            .configured
            .iter()
            .chain(self.found.keys())
            .copied()
            .collect();
        ports.into_iter().collect()
    }
}

/// Keeps the guard on the right interfaces, and its tunnel ports on the node's tunnel devices,
/// as links and routes change, for as long as the agent runs.
async fn follow(
    mut changes: interfaces::Changes,
    mut links: Links,
    mut tunnel_ports: TunnelPorts,
    mut policy: Policy,
    mut program: GuardProgram,
    mode: Mode,
) -> Result<(), GuardError> {
    loop {
        changes.next().await?;
        let now = match interfaces::links() {
            Ok(now) => now,
            Err(err) => {
                let err = GuardError::Watch(interfaces::WatchError::from(err));
                tracing::error!(error = %tether_runtime::error_chain(&err), "cannot update the guarded interfaces");
                continue;
            }
        };
        let result = links
            .wanted(&now)
            .and_then(|wanted| links.reconcile(wanted, &mut program, mode));
        if let Err(err) = result {
            tracing::error!(error = %tether_runtime::error_chain(&err), "cannot update the guarded interfaces");
        }
        if tunnel_ports.refresh(&now) {
            policy.tunnel_ports = tunnel_ports.ports();
            match program.set_policy(&policy) {
                Ok(()) => {
                    tracing::info!(tunnel_ports = ?policy.tunnel_ports, "XDP guard tunnel ports")
                }
                Err(err) => {
                    tracing::error!(error = %tether_runtime::error_chain(&err), "cannot update the guard's tunnel ports")
                }
            }
        }
    }
}

async fn resolve(hosts: &[String], port: u16) -> Result<Vec<Cidr>, GuardError> {
    let mut addresses: BTreeSet<IpAddr> = BTreeSet::new();
    for host in hosts {
        let resolved = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| GuardError::Resolve {
                host: host.clone(),
                source,
            })?;
        addresses.extend(resolved.map(|a| a.ip()));
    }
    Ok(addresses
        .into_iter()
        .map(|addr| Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        })
        .collect())
}

/// A node that is itself inside the control plane (a control-plane node) must not enforce:
/// its etcd peers and the other apiservers would be dropped as control-plane connections.
/// It runs in monitor mode instead, and says so at every start.
fn refuse_enforce_on_control_plane(mode: Mode, control_plane: &[Cidr]) -> Mode {
    if mode != Mode::Enforce {
        return mode;
    }
    let inside: Vec<String> = interfaces::addresses()
        .into_iter()
        .map(|(_, address)| address)
        .filter(|address| !address.is_loopback())
        .filter_map(|address| {
            let cidr = control_plane.iter().find(|c| c.contains(address))?;
            Some(format!("{address} in {cidr}"))
        })
        .collect();
    if inside.is_empty() {
        return mode;
    }
    tracing::error!(
        addresses = ?inside,
        "this node is inside --control-plane-cidr, so it is a control-plane node: enforcing \
         would drop its etcd peers and the other control-plane members. The guard runs in \
         MONITOR mode here (counts and logs, drops nothing). Keep tether-agent off \
         control-plane nodes, or narrow --control-plane-cidr to the apiservers' source addresses"
    );
    Mode::Monitor
}
