//! How a dial picks an agent: `--proxy-strategies`, tried in order.

use tether_proto::identifiers::Identifiers;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Any agent, at random.
    Default,
    /// The agent whose identifiers (host, ipv4, ipv6, cidr) match the dial's host.
    DestHost,
    /// Any agent that declared `default-route=true`, at random.
    DefaultRoute,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [
        Strategy::Default,
        Strategy::DestHost,
        Strategy::DefaultRoute,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Strategy::Default),
            "destHost" => Some(Strategy::DestHost),
            "defaultRoute" => Some(Strategy::DefaultRoute),
            _ => None,
        }
    }

    /// The name as `--proxy-strategies` and the `proxy_strategy` metric label spell it.
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Default => "default",
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
        }
    }

    /// Whether an agent with `ids` counts for this strategy at all (the `ready_backends`
    /// gauge, and readiness). Under default and defaultRoute every agent counted serves any
    /// dial; under destHost, those whose identifiers name the dial's host
    /// (`Identifiers::serves_destination`).
    pub fn counts(self, ids: &Identifiers) -> bool {
        match self {
            Strategy::Default => true,
            Strategy::DestHost => ids.names_destinations(),
            Strategy::DefaultRoute => ids.default_route,
        }
    }
}
