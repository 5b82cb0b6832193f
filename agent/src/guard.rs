//! The guard's lifecycle in the agent: fills in the defaults an operator left out (interfaces
//! from the default routes, the control plane from the proxy server's address), puts the XDP
//! program in place over whatever an earlier agent pinned, and keeps its logs and drop events
//! flowing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use tether_agent_common::Mode;

use crate::dataplane::{
    Attached, Cidr, Counters, Dataplane, DataplaneError, PinnedGuard, Pins, Policy,
};

/// The guard flags, validated.
#[derive(Clone, Debug)]
pub struct GuardSettings {
    pub mode: Mode,
    /// Empty: the interfaces that carry the default routes.
    pub interfaces: Vec<String>,
    /// Empty: the resolved addresses of the proxy server.
    pub control_plane: Vec<Cidr>,
    pub protected_ports: Vec<u16>,
    pub allowed: Vec<Cidr>,
    /// IP protocols dropped from the control plane as tunnels.
    pub tunnel_protocols: Vec<u8>,
    /// UDP ports dropped from the control plane as tunnels.
    pub tunnel_ports: Vec<u16>,
    pub bpffs_root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "no default route to guard: this network namespace has no default route (v4 or v6); \
         name the interfaces with --guard-interface"
    )]
    NoDefaultRoute,
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
    Dataplane(#[from] DataplaneError),
}

/// A running guard. Dropping it stops the log and event forwarding; the XDP program stays in
/// place through its pins.
pub struct Guard {
    counters: Option<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Guard {
    /// The counters, for the one place that exports them.
    pub fn take_counters(&mut self) -> Option<Counters> {
        self.counters.take()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Puts the guard in place. With `--guard-mode=off` nothing is loaded: a guard an earlier agent
/// pinned is switched off (it then passes everything and counts nothing), and `None` is
/// returned when there is none.
pub async fn start(
    settings: &GuardSettings,
    server_host: &str,
    server_port: u16,
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
    let interfaces = if settings.interfaces.is_empty() {
        default_route_interfaces()
    } else {
        settings.interfaces.clone()
    };
    if interfaces.is_empty() {
        return Err(GuardError::NoDefaultRoute);
    }
    let control_plane = if settings.control_plane.is_empty() {
        resolve(server_host, server_port).await?
    } else {
        settings.control_plane.clone()
    };
    let policy = Policy {
        control_plane,
        protected_ports: settings.protected_ports.clone(),
        allowed: settings.allowed.clone(),
        tunnel_protocols: settings.tunnel_protocols.clone(),
        tunnel_ports: settings.tunnel_ports.clone(),
    };
    let mode = refuse_enforce_on_control_plane(settings.mode, &policy.control_plane);
    let (mut dataplane, logs) = Dataplane::load(Some(pins))?;
    let adopted = !dataplane.maps_are_new();
    // Policy before mode: a fresh program starts inert (mode 0 = off) and must never enforce
    // a half-written policy.
    dataplane.set_policy(&policy)?;
    dataplane.set_mode(mode)?;
    let texts = |cidrs: &[Cidr]| cidrs.iter().map(ToString::to_string).collect::<Vec<_>>();
    for interface in &interfaces {
        let attached = dataplane.attach(interface)?;
        tracing::info!(
            interface,
            attach = attached.label(),
            mode = mode.label(),
            control_plane = ?texts(&policy.control_plane),
            protected_ports = ?policy.protected_ports,
            allowed = ?texts(&policy.allowed),
            "XDP guard attached"
        );
        if attached == Attached::Generic {
            tracing::warn!(
                interface,
                "the driver has no native XDP: the guard runs in generic mode, after the kernel allocated the packet"
            );
        }
    }
    for interface in dataplane.release_other_interfaces(&interfaces)? {
        tracing::info!(
            interface,
            "XDP guard detached: no longer a guarded interface"
        );
    }
    dataplane.count_interfaces(&interfaces)?;
    if adopted {
        tracing::info!(bpffs_root = %settings.bpffs_root.display(), "adopted the pinned guard: policy and counters carried over");
    } else if let Some(replaced) = dataplane.commit_pins()? {
        tracing::warn!(
            bpffs_root = %settings.bpffs_root.display(),
            found = replaced,
            "replaced an incompatible pinned guard: the new program took over its links without a gap; counters start from zero"
        );
    }
    let counters = dataplane.counters_handle()?;
    let events = dataplane.drop_events()?;
    let report = |what: &'static str| {
        move |result: Result<(), DataplaneError>| {
            if let Err(err) = result {
                tracing::error!(error = %tether_runtime::error_chain(&err), "guard {what} stopped");
            }
        }
    };
    let tasks = vec![
        tokio::spawn(async move { report("drop events")(events.forward().await) }),
        tokio::spawn(async move {
            // The dataplane stays loaded as long as the task: its program fd backs the pin.
            let _dataplane = dataplane;
            report("kernel logs")(logs.forward().await)
        }),
    ];
    Ok(Some(Guard {
        counters: Some(counters),
        tasks,
    }))
}

async fn resolve(host: &str, port: u16) -> Result<Vec<Cidr>, GuardError> {
    let resolved = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| GuardError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let addresses: BTreeSet<IpAddr> = resolved.map(|a| a.ip()).collect();
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
    let inside: Vec<String> = node_addresses()
        .into_iter()
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

/// Every address on an interface of this network namespace, loopback aside.
fn node_addresses() -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|a| {
            let address = a.address?;
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(address.as_sockaddr_in6()?.ip())
            };
            (!ip.is_loopback()).then_some(ip)
        })
        .collect()
}

/// Interfaces of the default routes in this network namespace, v4 and v6, sorted.
fn default_route_interfaces() -> Vec<String> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let mut names = BTreeSet::new();
    names.extend(default_v4(&read("/proc/net/route")));
    names.extend(default_v6(&read("/proc/net/ipv6_route")));
    names.into_iter().collect()
}

/// `/proc/net/route`: Iface, Destination, Gateway, Flags, …, Mask (columns 0, 1, 3, 7).
fn default_v4(table: &str) -> Vec<String> {
    const RTF_UP: u32 = 0x1;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let up = cols
                .get(3)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|f| f & RTF_UP != 0);
            (up && cols.get(1) == Some(&"00000000") && cols.get(7) == Some(&"00000000"))
                .then(|| cols[0].to_owned())
        })
        .collect()
}

/// `/proc/net/ipv6_route`: destination, prefix length, …, flags, interface (columns 0, 1, 8, 9).
/// The kernel lists an unreachable default on `lo`; that one guards nothing.
fn default_v6(table: &str) -> Vec<String> {
    const RTF_UP: u32 = 0x1;
    table
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let up = cols
                .get(8)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|f| f & RTF_UP != 0);
            let default = cols.first().is_some_and(|d| d.bytes().all(|b| b == b'0'))
                && cols.get(1) == Some(&"00");
            let interface = cols.get(9).filter(|i| **i != "lo")?;
            (up && default).then(|| (*interface).to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_default_route_is_found_and_others_are_not() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t00000000\t0100000B\t0002\t0\t0\t0\t00000000\t0\t0\t0\n";
        // eth1's default is not up.
        assert_eq!(default_v4(table), ["eth0"]);
    }

    #[test]
    fn v6_default_route_skips_the_unreachable_one_on_lo() {
        let zero = "00000000000000000000000000000000";
        let table = format!(
            "{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 ens5\n\
             fd000000000000000000000000000000 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001 ens5\n\
             {zero} 00 {zero} 00 {zero} ffffffff 00000001 00000000 00200200 lo\n"
        );
        assert_eq!(default_v6(&table), ["ens5"]);
    }
}
