//! Routes in any table, policy rules (`ip rule`), and link counters: what
//! the home agent needs to steer a home address into a tunnel and to tell
//! whether the tunnel still carries traffic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use crate::names::Ipv4Cidr;

/// The main routing table (`ip route` without `table`).
pub const TABLE_MAIN: u32 = 254;

/// How a route reaches its destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteVia {
    /// Directly out of a device (`dev NAME`, scope link): the destination
    /// is on the link, or the device is a point-to-point tunnel.
    Device(String),
    /// Through a gateway (`via GW [dev NAME] [onlink]`).
    Gateway {
        /// The next hop.
        gateway: Ipv4Addr,
        /// The device, if it must be pinned.
        dev: Option<String>,
        /// Treat the gateway as on-link even without a matching prefix on
        /// the device.
        onlink: bool,
    },
}

impl RouteVia {
    /// The device named, if any.
    pub fn dev(&self) -> Option<&str> {
        match self {
            RouteVia::Device(dev) => Some(dev),
            RouteVia::Gateway { dev, .. } => dev.as_deref(),
        }
    }
}

/// An IPv4 unicast route: `ip route add DEST VIA [table T] [metric M]
/// [src S]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteSpec {
    /// The destination prefix (host bits are ignored: the network address
    /// is used).
    pub destination: Ipv4Cidr,
    /// Device or gateway.
    pub via: RouteVia,
    /// The table ([`TABLE_MAIN`] by default).
    pub table: u32,
    /// The metric (priority), if any.
    pub metric: Option<u32>,
    /// The preferred source address, if any.
    pub source: Option<Ipv4Addr>,
}

impl RouteSpec {
    /// A /32 route to `host` in the main table.
    pub fn host(host: Ipv4Addr, via: RouteVia) -> Self {
        RouteSpec {
            destination: Ipv4Cidr::new(host, 32).expect("32 is a valid prefix length"),
            via,
            table: TABLE_MAIN,
            metric: None,
            source: None,
        }
    }

    /// The same route in table `table`.
    pub fn in_table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dest = self.destination;
        write!(f, "{}/{}", dest.network(), dest.prefix())?;
        match &self.via {
            RouteVia::Device(dev) => write!(f, " dev {dev}")?,
            RouteVia::Gateway {
                gateway,
                dev,
                onlink,
            } => {
                write!(f, " via {gateway}")?;
                if let Some(dev) = dev {
                    write!(f, " dev {dev}")?;
                }
                if *onlink {
                    f.write_str(" onlink")?;
                }
            }
        }
        if self.table != TABLE_MAIN {
            write!(f, " table {}", self.table)?;
        }
        if let Some(metric) = self.metric {
            write!(f, " metric {metric}")?;
        }
        if let Some(src) = self.source {
            write!(f, " src {src}")?;
        }
        Ok(())
    }
}

/// A route as read back from the kernel ([`crate::NetOps::list_routes`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteInfo {
    /// The destination prefix.
    pub destination: Ipv4Cidr,
    /// The gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// The output device, if any.
    pub dev: Option<String>,
    /// The table.
    pub table: u32,
    /// The metric, if any.
    pub metric: Option<u32>,
    /// The preferred source, if any.
    pub source: Option<Ipv4Addr>,
}

/// A policy routing rule: `ip rule add [from F] [to T] [iif I] lookup
/// TABLE [pref P]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleSpec {
    /// Source selector.
    pub from: Option<Ipv4Cidr>,
    /// Destination selector.
    pub to: Option<Ipv4Cidr>,
    /// Input interface selector (`lo` matches locally generated traffic).
    pub iif: Option<String>,
    /// The table to look up.
    pub table: u32,
    /// The priority (lower first); the kernel picks one if `None`.
    pub priority: Option<u32>,
}

impl RuleSpec {
    /// `lookup table` for everything (add selectors to the fields).
    pub fn lookup(table: u32) -> Self {
        RuleSpec {
            from: None,
            to: None,
            iif: None,
            table,
            priority: None,
        }
    }
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cidr = |c: &Ipv4Cidr| format!("{}/{}", c.network(), c.prefix());
        if let Some(p) = self.priority {
            write!(f, "pref {p} ")?;
        }
        match &self.from {
            Some(from) => write!(f, "from {}", cidr(from))?,
            None => f.write_str("from all")?,
        }
        if let Some(to) = &self.to {
            write!(f, " to {}", cidr(to))?;
        }
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        write!(f, " lookup {}", self.table)
    }
}

/// A rule as read back from the kernel ([`crate::NetOps::list_rules`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// The priority.
    pub priority: u32,
    /// Source selector.
    pub from: Option<Ipv4Cidr>,
    /// Destination selector.
    pub to: Option<Ipv4Cidr>,
    /// Input interface selector.
    pub iif: Option<String>,
    /// The table looked up (for `lookup` rules).
    pub table: u32,
    /// The action (`ToTable` for `lookup` rules).
    pub action: RuleAction,
}

/// A link's counters (`ip -s link`), from the kernel's 64-bit statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LinkStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets dropped on transmit.
    pub tx_dropped: u64,
}

impl LinkStats {
    /// Whether any packet went either way between `earlier` and `self`
    /// (the home agent's "is the tunnel still used" check).
    pub fn moved_since(&self, earlier: &LinkStats) -> bool {
        self.rx_packets != earlier.rx_packets || self.tx_packets != earlier.tx_packets
    }
}

/// Table id for a message: values up to 255 go in the header, larger ones
/// in `RTA_TABLE` / `FRA_TABLE` (the header then says `RT_TABLE_UNSPEC`).
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// The `RTM_NEWROUTE` message for `spec`; `oif` is the index of the
/// device it names (resolved by the caller).
pub(crate) fn route_message(spec: &RouteSpec, oif: Option<u32>) -> RouteMessage {
    let dest = spec.destination;
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest.network(), dest.prefix())
        .table_id(spec.table);
    match &spec.via {
        RouteVia::Device(_) => builder = builder.scope(RouteScope::Link),
        RouteVia::Gateway {
            gateway, onlink, ..
        } => {
            builder = builder.gateway(*gateway);
            if *onlink {
                builder = builder.onlink();
            }
        }
    }
    if let Some(index) = oif {
        builder = builder.output_interface(index);
    }
    if let Some(metric) = spec.metric {
        builder = builder.priority(metric);
    }
    if let Some(src) = spec.source {
        builder = builder.pref_source(src);
    }
    let mut msg = builder.build();
    // Like iproute2: a table above 255 travels in RTA_TABLE only.
    msg.header.table = header_table(spec.table);
    msg
}

/// The `RTM_DELROUTE` message for `spec`: the add message with scope
/// "nowhere" and protocol "unspec", which the kernel treats as wildcards
/// (as `ip route del` does), so it matches whatever scope the route got.
pub(crate) fn route_delete_message(spec: &RouteSpec, oif: Option<u32>) -> RouteMessage {
    let mut msg = route_message(spec, oif);
    msg.header.scope = RouteScope::NoWhere;
    msg.header.protocol = RouteProtocol::Unspec;
    msg
}

/// Read a dumped IPv4 unicast route; `None` for other kinds (local,
/// broadcast, …) and other families. `dev_name` maps an interface index to
/// its name.
pub(crate) fn route_info(
    msg: &RouteMessage,
    dev_name: impl Fn(u32) -> Option<String>,
) -> Option<RouteInfo> {
    let h = &msg.header;
    if h.address_family != AddressFamily::Inet || h.kind != RouteType::Unicast {
        return None;
    }
    let mut info = RouteInfo {
        destination: Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, h.destination_prefix_length).ok()?,
        gateway: None,
        dev: None,
        table: u32::from(h.table),
        metric: None,
        source: None,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                info.destination = Ipv4Cidr::new(*a, h.destination_prefix_length).ok()?;
            }
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => info.gateway = Some(*a),
            RouteAttribute::PrefSource(RouteAddress::Inet(a)) => info.source = Some(*a),
            RouteAttribute::Oif(index) => info.dev = dev_name(*index),
            RouteAttribute::Table(t) => info.table = *t,
            RouteAttribute::Priority(p) => info.metric = Some(*p),
            _ => {}
        }
    }
    Some(info)
}

/// The rule message for `spec` (`RTM_NEWRULE` or `RTM_DELRULE`: the kernel
/// deletes the first rule matching every field given).
pub(crate) fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.action = RuleAction::ToTable;
    msg.header.table = header_table(spec.table);
    if spec.table > 255 {
        msg.attributes.push(RuleAttribute::Table(spec.table));
    }
    if let Some(from) = spec.from {
        msg.header.src_len = from.prefix();
        msg.attributes
            .push(RuleAttribute::Source(IpAddr::V4(from.network())));
    }
    if let Some(to) = spec.to {
        msg.header.dst_len = to.prefix();
        msg.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(to.network())));
    }
    if let Some(iif) = &spec.iif {
        msg.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some(p) = spec.priority {
        msg.attributes.push(RuleAttribute::Priority(p));
    }
    msg
}

/// Read a dumped IPv4 rule.
pub(crate) fn rule_info(msg: &RuleMessage) -> Option<RuleInfo> {
    let h = &msg.header;
    if h.family != AddressFamily::Inet {
        return None;
    }
    let mut info = RuleInfo {
        priority: 0,
        from: None,
        to: None,
        iif: None,
        table: u32::from(h.table),
        action: h.action,
    };
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Source(IpAddr::V4(a)) => info.from = Ipv4Cidr::new(*a, h.src_len).ok(),
            RuleAttribute::Destination(IpAddr::V4(a)) => {
                info.to = Ipv4Cidr::new(*a, h.dst_len).ok();
            }
            RuleAttribute::Iifname(name) => info.iif = Some(name.clone()),
            RuleAttribute::Table(t) => info.table = *t,
            RuleAttribute::Priority(p) => info.priority = *p,
            _ => {}
        }
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("valid cidr")
    }

    #[test]
    fn route_specs_print_like_iproute2() {
        let r = RouteSpec::host(Ipv4Addr::new(10, 77, 0, 5), RouteVia::Device("vx0".into()));
        assert_eq!(r.to_string(), "10.77.0.5/32 dev vx0");
        let r = RouteSpec {
            destination: cidr("10.77.1.9/24"),
            via: RouteVia::Gateway {
                gateway: Ipv4Addr::new(10, 253, 0, 2),
                dev: Some("vx0".into()),
                onlink: true,
            },
            table: 100,
            metric: Some(5),
            source: Some(Ipv4Addr::new(10, 253, 0, 1)),
        };
        assert_eq!(
            r.to_string(),
            "10.77.1.0/24 via 10.253.0.2 dev vx0 onlink table 100 metric 5 src 10.253.0.1"
        );
        let mut rule = RuleSpec::lookup(100);
        assert_eq!(rule.to_string(), "from all lookup 100");
        rule.from = Some(cidr("10.0.0.1/32"));
        rule.to = Some(cidr("10.77.0.0/16"));
        rule.iif = Some("lo".into());
        rule.priority = Some(1000);
        assert_eq!(
            rule.to_string(),
            "pref 1000 from 10.0.0.1/32 to 10.77.0.0/16 iif lo lookup 100"
        );
    }

    #[test]
    fn route_messages_round_trip_through_route_info() {
        let spec = RouteSpec {
            destination: cidr("10.77.0.5/32"),
            via: RouteVia::Gateway {
                gateway: Ipv4Addr::new(10, 253, 0, 2),
                dev: None,
                onlink: false,
            },
            table: 1000,
            metric: Some(7),
            source: None,
        };
        let msg = route_message(&spec, Some(4));
        assert_eq!(msg.header.table, RouteHeader::RT_TABLE_UNSPEC);
        assert_eq!(msg.header.scope, RouteScope::Universe);
        let info = route_info(&msg, |i| Some(format!("if{i}"))).expect("unicast");
        assert_eq!(
            info,
            RouteInfo {
                destination: cidr("10.77.0.5/32"),
                gateway: Some(Ipv4Addr::new(10, 253, 0, 2)),
                dev: Some("if4".into()),
                table: 1000,
                metric: Some(7),
                source: None,
            }
        );
        let dev_route = route_message(
            &RouteSpec::host(Ipv4Addr::new(10, 77, 0, 5), RouteVia::Device("x".into())),
            Some(2),
        );
        assert_eq!(dev_route.header.scope, RouteScope::Link);
        assert_eq!(dev_route.header.table, 254);
        let del = route_delete_message(
            &RouteSpec::host(Ipv4Addr::new(10, 77, 0, 5), RouteVia::Device("x".into())),
            Some(2),
        );
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        assert_eq!(del.header.protocol, RouteProtocol::Unspec);
    }

    #[test]
    fn rule_messages_round_trip_through_rule_info() {
        let spec = RuleSpec {
            from: Some(cidr("10.0.0.7/32")),
            to: Some(cidr("10.77.0.9/16")),
            iif: Some("lo".into()),
            table: 300,
            priority: Some(99),
        };
        let msg = rule_message(&spec);
        let info = rule_info(&msg).expect("ipv4");
        assert_eq!(
            info,
            RuleInfo {
                priority: 99,
                from: Some(cidr("10.0.0.7/32")),
                to: Some(cidr("10.77.0.0/16")),
                iif: Some("lo".into()),
                table: 300,
                action: RuleAction::ToTable,
            }
        );
        let small = rule_message(&RuleSpec::lookup(100));
        assert_eq!(small.header.table, 100);
        assert!(small.attributes.is_empty());
    }

    #[test]
    fn stats_movement() {
        let a = LinkStats::default();
        let mut b = a;
        assert!(!b.moved_since(&a));
        b.rx_bytes = 10; // bytes alone do not count, packets do
        assert!(!b.moved_since(&a));
        b.tx_packets = 1;
        assert!(b.moved_since(&a));
    }
}
