//! A container's own network namespace: its address moves with it.
//!
//! A container started with an address gets a namespace `HOSTNS-c-ID` with `eth0`
//! holding that address, the peer end (`vcHASH`) on the host's bridge, so the
//! container sits directly on the host's link. A destination prepares the same
//! namespace with the same address before CRIU restores into it (CRIU treats a
//! namespace joined by path as external); the source removes its copy only after the
//! migration commits. The address and gateway travel as container labels.
//!
//! Two ways to attach the namespace:
//! * **bridged**: `eth0` holds the address with its prefix, the peer end is on the
//!   host's bridge, so the container sits directly on the host's link; it moves by
//!   gratuitous ARP (source and destination must share the link);
//! * **routed**: `eth0` holds the address as a /32 with a default route to the
//!   link-local gateway 169.254.1.1, which the host side of the veth holds; the host
//!   routes the /32 to the veth. The namespace is the same on every host, so it moves
//!   anywhere; the first host is the address's home agent and tunnels its traffic to
//!   wherever the container runs (see [`crate::handover`]).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use xfer_net::{Ipv4Cidr, NetOps, Netlink, Ns};

use crate::error::AgentError;

/// Label holding a container's address (CIDR).
pub const ADDRESS_LABEL: &str = "io.xfer.address";
/// Label holding its gateway.
pub const GATEWAY_LABEL: &str = "io.xfer.gateway";
/// Label holding the attachment: `bridged` (default) or `routed`.
pub const NET_LABEL: &str = "io.xfer.net";
/// Label holding a routed container's home agent address.
pub const HOME_AGENT_LABEL: &str = "io.xfer.home-agent";
/// Label asking for a reverse tunnel (`true`).
pub const REVERSE_LABEL: &str = "io.xfer.reverse-tunnel";
/// The gateway a routed container's namespace uses (held by the host side of its veth).
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// How a container's own address is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// On the host's bridge, with this gateway.
    Bridged {
        address: Ipv4Cidr,
        gateway: Ipv4Addr,
    },
    /// A routed /32 whose home agent is `home_agent`.
    Routed {
        home: Ipv4Addr,
        home_agent: Ipv4Addr,
        reverse_tunnel: bool,
    },
}

impl Attachment {
    /// The container's address.
    pub fn ip(&self) -> Ipv4Addr {
        match self {
            Attachment::Bridged { address, .. } => address.addr(),
            Attachment::Routed { home, .. } => *home,
        }
    }

    /// The labels that describe it.
    pub fn labels(&self) -> Vec<(String, String)> {
        match self {
            Attachment::Bridged { address, gateway } => vec![
                (ADDRESS_LABEL.into(), address.to_string()),
                (GATEWAY_LABEL.into(), gateway.to_string()),
            ],
            Attachment::Routed {
                home,
                home_agent,
                reverse_tunnel,
            } => {
                let mut l = vec![
                    (ADDRESS_LABEL.into(), format!("{home}/32")),
                    (NET_LABEL.into(), "routed".into()),
                    (HOME_AGENT_LABEL.into(), home_agent.to_string()),
                ];
                if *reverse_tunnel {
                    l.push((REVERSE_LABEL.into(), "true".into()));
                }
                l
            }
        }
    }
}

/// Where this host attaches container namespaces.
#[derive(Debug, Clone)]
pub struct ContainerNet {
    /// The host's network namespace name (e.g. `xl-h1`).
    pub host_ns: String,
    /// The bridge in it that carries the host's link (e.g. `br0`).
    pub bridge: String,
}

fn net_err(what: String) -> impl FnOnce(xfer_net::NetError) -> AgentError {
    move |source| AgentError::Net {
        what,
        source: Box::new(source),
    }
}

/// The host-side interface name of a container's veth: short and stable.
pub fn host_if(id: &str) -> String {
    let h = xfer_store::Digest::of(id.as_bytes()).to_hex();
    format!("vc{}", &h[..10])
}

impl ContainerNet {
    /// The namespace name of container `id` on this host.
    pub fn netns_name(&self, id: &str) -> String {
        format!("{}-c-{id}", self.host_ns)
    }

    /// Its path, as the OCI spec names it.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        xfer_net::netns_path(&self.netns_name(id))
    }

    /// Creates the container's namespace as `how` says. Removes what it made on
    /// failure.
    pub async fn attach(&self, id: &str, how: &Attachment) -> Result<PathBuf, AgentError> {
        let r = match *how {
            Attachment::Bridged { address, gateway } => {
                self.attach_inner(id, address, gateway).await
            }
            Attachment::Routed { home, .. } => self.attach_routed(id, home).await,
        };
        if r.is_err() {
            let _ = self.detach(id).await;
        }
        r
    }

    async fn attach_inner(
        &self,
        id: &str,
        address: Ipv4Cidr,
        gateway: Ipv4Addr,
    ) -> Result<PathBuf, AgentError> {
        let (net, ns, hif) = self.veth_pair(id).await?;
        net.set_master(Ns::Named(&self.host_ns), &hif, &self.bridge)
            .await
            .map_err(net_err(format!("attach {hif} to {}", self.bridge)))?;
        net.set_link_up(Ns::Named(&self.host_ns), &hif)
            .await
            .map_err(net_err(format!("set {hif} up")))?;
        container_side(&net, &ns, address).await?;
        net.add_default_route(Ns::Named(&ns), gateway)
            .await
            .map_err(net_err(format!("default route in {ns}")))?;
        Ok(self.netns_path(id))
    }

    /// The container's namespace and its veth pair (`eth0` inside, down).
    async fn veth_pair(&self, id: &str) -> Result<(Netlink, String, String), AgentError> {
        let net = Netlink::new().map_err(net_err("open rtnetlink".into()))?;
        let ns = self.netns_name(id);
        let hif = host_if(id);
        net.create_netns(&ns)
            .await
            .map_err(net_err(format!("create namespace {ns}")))?;
        net.create_veth(Ns::Named(&self.host_ns), &hif, "eth0", Ns::Named(&ns))
            .await
            .map_err(net_err(format!("create veth {hif}")))?;
        Ok((net, ns, hif))
    }

    async fn attach_routed(&self, id: &str, home: Ipv4Addr) -> Result<PathBuf, AgentError> {
        let (net, ns, hif) = self.veth_pair(id).await?;
        let host = Ns::Named(&self.host_ns);
        let gw = Ipv4Cidr::new(ROUTED_GATEWAY, 32).expect("/32 is valid");
        net.add_address(host, &hif, gw)
            .await
            .map_err(net_err(format!("gateway address on {hif}")))?;
        net.set_link_up(host, &hif)
            .await
            .map_err(net_err(format!("set {hif} up")))?;
        container_side(&net, &ns, Ipv4Cidr::new(home, 32).expect("/32 is valid")).await?;
        let default = xfer_net::RouteSpec {
            destination: Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"),
            via: xfer_net::RouteVia::Gateway {
                gateway: ROUTED_GATEWAY,
                dev: Some("eth0".into()),
                onlink: true,
            },
            table: xfer_net::TABLE_MAIN,
            metric: None,
            source: None,
        };
        net.add_route(Ns::Named(&ns), &default)
            .await
            .map_err(net_err(format!("default route in {ns}")))?;
        // Replaces a home agent's tunnel route when the container comes home.
        net.replace_route(
            host,
            &xfer_net::RouteSpec::host(home, xfer_net::RouteVia::Device(hif.clone())),
        )
        .await
        .map_err(net_err(format!("route {home} to {hif}")))?;
        Ok(self.netns_path(id))
    }

    /// Cuts the container off the network (deletes its veth pair; the namespace stays
    /// until [`ContainerNet::detach`]). Nothing it sends after this leaves the host.
    pub async fn cut(&self, id: &str) {
        let hif = host_if(id);
        match Netlink::new() {
            Ok(net) => {
                if let Err(e) = net.delete_link(Ns::Named(&self.host_ns), &hif).await {
                    if !e.is_not_found() {
                        tracing::warn!(link = %hif, error = %e, "cutting a container off the network");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "open rtnetlink"),
        }
    }

    /// Removes the container's namespace (its veth goes with it). Missing is fine.
    pub async fn detach(&self, id: &str) -> Result<(), AgentError> {
        let ns = self.netns_name(id);
        match xfer_net::netns_exists(&ns) {
            Ok(true) => {
                xfer_net::delete_netns(&ns).map_err(net_err(format!("delete namespace {ns}")))
            }
            _ => Ok(()),
        }
    }
}

/// Inside the container's namespace: `lo` and `eth0` up, `address` on `eth0`.
async fn container_side(net: &Netlink, ns: &str, address: Ipv4Cidr) -> Result<(), AgentError> {
    net.loopback_up(ns)
        .await
        .map_err(net_err(format!("lo up in {ns}")))?;
    net.set_link_up(Ns::Named(ns), "eth0")
        .await
        .map_err(net_err(format!("eth0 up in {ns}")))?;
    net.add_address(Ns::Named(ns), "eth0", address)
        .await
        .map_err(net_err(format!("address {address} in {ns}")))
}

/// Parses the network labels of a container, if it has its own address.
pub fn from_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<Option<Attachment>, AgentError> {
    let Some(a) = labels.get(ADDRESS_LABEL) else {
        return Ok(None);
    };
    let addr: Ipv4Cidr = a.parse().map_err(|_| {
        AgentError::Refused(format!("label {ADDRESS_LABEL}={a:?} is not an IPv4 CIDR"))
    })?;
    match labels.get(NET_LABEL).map(String::as_str) {
        None | Some("bridged") => {}
        Some("routed") => {
            let ha = labels.get(HOME_AGENT_LABEL).ok_or_else(|| {
                AgentError::Refused(format!("routed container has no {HOME_AGENT_LABEL} label"))
            })?;
            let home_agent = ha.parse().map_err(|_| {
                AgentError::Refused(format!(
                    "label {HOME_AGENT_LABEL}={ha:?} is not an IPv4 address"
                ))
            })?;
            return Ok(Some(Attachment::Routed {
                home: addr.addr(),
                home_agent,
                reverse_tunnel: labels.get(REVERSE_LABEL).is_some_and(|v| v == "true"),
            }));
        }
        Some(other) => {
            return Err(AgentError::Refused(format!(
                "label {NET_LABEL}={other:?}: expected bridged or routed"
            )))
        }
    }
    let gw: Ipv4Addr = labels
        .get(GATEWAY_LABEL)
        .ok_or_else(|| {
            AgentError::Refused(format!(
                "container has {ADDRESS_LABEL} but no {GATEWAY_LABEL}"
            ))
        })?
        .parse()
        .map_err(|_| {
            AgentError::Refused(format!("label {GATEWAY_LABEL} is not an IPv4 address"))
        })?;
    Ok(Some(Attachment::Bridged {
        address: addr,
        gateway: gw,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn names_fit_interface_limits() {
        let n = host_if("a-very-long-container-name-that-goes-on");
        assert!(n.len() <= 15);
        assert_eq!(n, host_if("a-very-long-container-name-that-goes-on"));
        assert_ne!(n, host_if("other"));
    }

    #[test]
    fn labels_parse() {
        let mut l = HashMap::new();
        assert!(from_labels(&l).expect("none").is_none());
        l.insert(ADDRESS_LABEL.to_string(), "10.1.2.200/24".to_string());
        assert!(from_labels(&l).is_err(), "gateway missing");
        l.insert(GATEWAY_LABEL.to_string(), "10.1.2.254".to_string());
        let Some(Attachment::Bridged { address, gateway }) = from_labels(&l).expect("parse") else {
            panic!("bridged expected");
        };
        assert_eq!(address.to_string(), "10.1.2.200/24");
        assert_eq!(gateway, Ipv4Addr::new(10, 1, 2, 254));
        l.insert(ADDRESS_LABEL.to_string(), "nonsense".to_string());
        assert!(from_labels(&l).is_err());
    }

    #[test]
    fn routed_labels_round_trip() {
        let how = Attachment::Routed {
            home: Ipv4Addr::new(10, 9, 8, 7),
            home_agent: Ipv4Addr::new(10, 1, 0, 1),
            reverse_tunnel: true,
        };
        let l: HashMap<String, String> = how.labels().into_iter().collect();
        assert_eq!(from_labels(&l).expect("parse"), Some(how));
        let mut bad = l.clone();
        bad.remove(HOME_AGENT_LABEL);
        assert!(from_labels(&bad).is_err(), "home agent missing");
        let mut bad = l;
        bad.insert(NET_LABEL.into(), "teleported".into());
        let e = from_labels(&bad).expect_err("unknown mode");
        assert!(e.to_string().contains("bridged or routed"), "{e}");
    }
}
