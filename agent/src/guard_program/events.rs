//! Sampled drop events from the guard's ring buffer (rate-limited in the kernel), as log lines.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use tether_agent_common::{DropEvent, Reason};
use tokio::io::unix::AsyncFd;

use super::BpfError;

pub struct DropEvents {
    ring: RingBuf<MapData>,
}

/// One packet the guard dropped, or would have dropped in monitor mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardEvent {
    pub reason: Option<Reason>,
    pub dropped: bool,
    /// `None` when the packet was too short to carry its IP header.
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
    /// "tcp", "udp", or "" when the transport header was not parsed.
    pub protocol: &'static str,
    pub source_port: u16,
    pub destination_port: u16,
    /// Drops this CPU left out of the events on the same interface since its previous one
    /// (rate limit).
    pub suppressed: u32,
}

impl GuardEvent {
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<DropEvent>() {
            return None;
        }
        // SAFETY: the kernel wrote a whole DropEvent (length checked above), every bit pattern
        // is a valid DropEvent, and read_unaligned makes no alignment assumption.
        let raw: DropEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let address = |bytes: [u8; 16]| match raw.family {
            4 => Some(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
            _ => None,
        };
        Some(GuardEvent {
            reason: Reason::try_from(raw.reason).ok(),
            dropped: raw.dropped != 0,
            source: address(raw.source),
            destination: address(raw.destination),
            protocol: match raw.protocol {
                6 => "tcp",
                17 => "udp",
                _ => "",
            },
            source_port: raw.source_port,
            destination_port: raw.destination_port,
            suppressed: raw.suppressed,
        })
    }

    fn log(&self) {
        let endpoint = |addr: Option<IpAddr>, port: u16| match (addr, port) {
            (None, _) => "unknown".to_owned(),
            (Some(addr), 0) => addr.to_string(),
            (Some(addr), port) => std::net::SocketAddr::new(addr, port).to_string(),
        };
        tracing::info!(
            reason = self.reason.map_or("unknown", Reason::label),
            action = if self.dropped {
                "dropped"
            } else {
                "would drop (monitor)"
            },
            source = endpoint(self.source, self.source_port),
            destination = endpoint(self.destination, self.destination_port),
            protocol = self.protocol,
            suppressed = self.suppressed,
            "guard drop"
        );
    }
}

impl DropEvents {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        DropEvents { ring }
    }

    /// Events waiting in the ring now.
    pub fn drain(&mut self) -> Vec<GuardEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            events.extend(GuardEvent::decode(&item));
        }
        events
    }

    /// Logs events as they arrive, until the task is dropped.
    pub async fn forward(self) -> Result<(), BpfError> {
        // SAFETY: the ring owns its map fd; it stays open and unchanged for as long as the
        // AsyncFd owns the ring.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(self.ring, tokio::io::Interest::READABLE) }
                .map_err(|err| BpfError::Events(err.into()))?;
        loop {
            let mut ready = fd.readable_mut().await.map_err(BpfError::Events)?;
            let ring = ready.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = GuardEvent::decode(&item) {
                    event.log();
                }
            }
            ready.clear_ready();
        }
    }
}
