//! A container's own network namespace: its address moves with it.
//!
//! A container started with an address gets a namespace `HOSTNS-c-ID` with `eth0`
//! holding that address, the peer end (`vcHASH`) on the host's bridge, so the
//! container sits directly on the host's link. A destination prepares the same
//! namespace with the same address before CRIU restores into it (CRIU treats a
//! namespace joined by path as external); the source removes its copy only after the
//! migration commits. The address and gateway travel as container labels.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use xfer_net::{Ipv4Cidr, NetOps, Netlink, Ns};

use crate::error::AgentError;

/// Label holding a container's address (CIDR).
pub const ADDRESS_LABEL: &str = "io.xfer.address";
/// Label holding its gateway.
pub const GATEWAY_LABEL: &str = "io.xfer.gateway";

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

    /// Creates the container's namespace with `address` on `eth0`, bridged onto the
    /// host's link, default route via `gateway`. Removes what it made on failure.
    pub async fn attach(
        &self,
        id: &str,
        address: Ipv4Cidr,
        gateway: Ipv4Addr,
    ) -> Result<PathBuf, AgentError> {
        let r = self.attach_inner(id, address, gateway).await;
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
        let net = Netlink::new().map_err(net_err("open rtnetlink".into()))?;
        let ns = self.netns_name(id);
        let hif = host_if(id);
        net.create_netns(&ns)
            .await
            .map_err(net_err(format!("create namespace {ns}")))?;
        net.create_veth(Ns::Named(&self.host_ns), &hif, "eth0", Ns::Named(&ns))
            .await
            .map_err(net_err(format!("create veth {hif}")))?;
        net.set_master(Ns::Named(&self.host_ns), &hif, &self.bridge)
            .await
            .map_err(net_err(format!("attach {hif} to {}", self.bridge)))?;
        net.set_link_up(Ns::Named(&self.host_ns), &hif)
            .await
            .map_err(net_err(format!("set {hif} up")))?;
        net.loopback_up(&ns)
            .await
            .map_err(net_err(format!("lo up in {ns}")))?;
        net.set_link_up(Ns::Named(&ns), "eth0")
            .await
            .map_err(net_err(format!("eth0 up in {ns}")))?;
        net.add_address(Ns::Named(&ns), "eth0", address)
            .await
            .map_err(net_err(format!("address {address} in {ns}")))?;
        net.add_default_route(Ns::Named(&ns), gateway)
            .await
            .map_err(net_err(format!("default route in {ns}")))?;
        Ok(self.netns_path(id))
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

/// Parses the address and gateway labels of a container, if it has its own address.
pub fn from_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<Option<(Ipv4Cidr, Ipv4Addr)>, AgentError> {
    let Some(a) = labels.get(ADDRESS_LABEL) else {
        return Ok(None);
    };
    let addr: Ipv4Cidr = a.parse().map_err(|_| {
        AgentError::Refused(format!("label {ADDRESS_LABEL}={a:?} is not an IPv4 CIDR"))
    })?;
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
    Ok(Some((addr, gw)))
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
        let (a, g) = from_labels(&l).expect("parse").expect("some");
        assert_eq!(a.to_string(), "10.1.2.200/24");
        assert_eq!(g, Ipv4Addr::new(10, 1, 2, 254));
        l.insert(ADDRESS_LABEL.to_string(), "nonsense".to_string());
        assert!(from_labels(&l).is_err());
    }
}
