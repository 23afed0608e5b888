//! The rtnetlink side of the handover's forwarding for [`Netlink`]:
//! tunnels and the tunnel probe, routes in any table, policy rules, link
//! counters and MAC addresses. The [`crate::NetOps`] methods of the same
//! names delegate here.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::pin::pin;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteHeader, RouteProtocol};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::error::{nl_io, NetError, NsLabel};
use crate::names::validate_ifname;
use crate::netlink::{blocking, link_index, Netlink};
use crate::route::{
    route_delete_message, route_info, route_message, rule_info, rule_message, LinkStats, RouteInfo,
    RouteSpec, RuleInfo, RuleSpec,
};
use crate::tunnel::{probe_spec, tunnel_message, TunnelKind, TunnelSpec};
use crate::Ns;

/// The link message of link `name`, or a "not found" error.
async fn link_message(handle: &Handle, name: &str) -> io::Result<LinkMessage> {
    let index = link_index(handle, name).await?;
    let links = handle.link().get().match_index(index).execute();
    let mut links = pin!(links);
    links
        .try_next()
        .await
        .map_err(nl_io)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link named {name}")))
}

/// Interface index -> name, for everything in the namespace of `handle`.
async fn link_names(handle: &Handle) -> io::Result<HashMap<u32, String>> {
    let links = handle.link().get().execute();
    let mut links = pin!(links);
    let mut names = HashMap::new();
    while let Some(link) = links.try_next().await.map_err(nl_io)? {
        if let Some(name) = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        }) {
            names.insert(link.header.index, name);
        }
    }
    Ok(names)
}

/// Whether a failed probe creation means the probe itself cannot work
/// (no privileges), rather than "this kernel cannot create that kind".
fn is_permission_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

impl Netlink {
    pub(crate) async fn create_tunnel_impl(
        &self,
        ns: Ns<'_>,
        spec: &TunnelSpec,
    ) -> Result<(), NetError> {
        validate_ifname(spec.name())?;
        if let Some(dev) = spec.underlay_dev() {
            validate_ifname(dev)?;
        }
        let handle = self.handle(ns).await?;
        let err = |source| NetError::CreateLink {
            name: format!("{} ({} tunnel)", spec.name(), spec.kind()),
            ns: ns.into(),
            source,
        };
        let underlay = match spec.underlay_dev() {
            Some(dev) => Some(link_index(&handle, dev).await.map_err(err)?),
            None => None,
        };
        handle
            .link()
            .add(tunnel_message(spec, underlay))
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))?;
        tracing::debug!(tunnel = spec.name(), kind = %spec.kind(), ?ns, "created tunnel");
        Ok(())
    }

    pub(crate) async fn probe_tunnel_kinds_impl(
        &self,
        ns: Ns<'_>,
    ) -> Result<Vec<TunnelKind>, NetError> {
        let handle = self.handle(ns).await?;
        let err = |source| NetError::ProbeTunnels {
            ns: ns.into(),
            source,
        };
        let delete = |name: String| {
            let handle = handle.clone();
            async move {
                let index = link_index(&handle, &name).await?;
                handle.link().del(index).execute().await.map_err(nl_io)
            }
        };
        let mut kinds = Vec::new();
        for kind in TunnelKind::ALL {
            let spec = probe_spec(kind);
            // A leftover of an earlier probe by a process with the same pid.
            let _ = delete(spec.name().to_owned()).await;
            match handle
                .link()
                .add(tunnel_message(&spec, None))
                .execute()
                .await
            {
                Ok(()) => {
                    delete(spec.name().to_owned()).await.map_err(err)?;
                    kinds.push(kind);
                }
                Err(e) => {
                    let e = nl_io(e);
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        // The kernel knows the kind (it got as far as a
                        // conflict check, e.g. a VXLAN with that VNI).
                        kinds.push(kind);
                    } else if is_permission_error(&e) {
                        return Err(err(e));
                    } else {
                        tracing::debug!(%kind, ?ns, error = %e, "tunnel kind unavailable");
                    }
                }
            }
        }
        tracing::debug!(?kinds, ?ns, "probed tunnel kinds");
        Ok(kinds)
    }

    pub(crate) async fn install_route_impl(
        &self,
        ns: Ns<'_>,
        spec: &RouteSpec,
        replace: bool,
    ) -> Result<(), NetError> {
        if let Some(dev) = spec.via.dev() {
            validate_ifname(dev)?;
        }
        let handle = self.handle(ns).await?;
        let err = |source| NetError::InstallRoute {
            route: spec.to_string(),
            replace,
            ns: ns.into(),
            source,
        };
        let oif = match spec.via.dev() {
            Some(dev) => Some(link_index(&handle, dev).await.map_err(err)?),
            None => None,
        };
        let mut request = handle.route().add(route_message(spec, oif));
        if replace {
            request = request.replace();
        }
        request.execute().await.map_err(|e| err(nl_io(e)))?;
        tracing::debug!(route = %spec, ?ns, replace, "installed route");
        Ok(())
    }

    pub(crate) async fn delete_route_impl(
        &self,
        ns: Ns<'_>,
        spec: &RouteSpec,
    ) -> Result<(), NetError> {
        if let Some(dev) = spec.via.dev() {
            validate_ifname(dev)?;
        }
        let handle = self.handle(ns).await?;
        let err = |source| NetError::DeleteRoute {
            route: spec.to_string(),
            ns: ns.into(),
            source,
        };
        let oif = match spec.via.dev() {
            Some(dev) => Some(link_index(&handle, dev).await.map_err(err)?),
            None => None,
        };
        handle
            .route()
            .del(route_delete_message(spec, oif))
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))?;
        tracing::debug!(route = %spec, ?ns, "deleted route");
        Ok(())
    }

    pub(crate) async fn list_routes_impl(
        &self,
        ns: Ns<'_>,
        table: Option<u32>,
    ) -> Result<Vec<RouteInfo>, NetError> {
        let handle = self.handle(ns).await?;
        let err = |source| NetError::ListRoutes {
            ns: ns.into(),
            source,
        };
        let names = link_names(&handle).await.map_err(err)?;
        let mut filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        filter.header.table = RouteHeader::RT_TABLE_UNSPEC;
        filter.header.protocol = RouteProtocol::Unspec;
        let routes = handle.route().get(filter).execute();
        let mut routes = pin!(routes);
        let mut out = Vec::new();
        while let Some(msg) = routes.try_next().await.map_err(|e| err(nl_io(e)))? {
            if let Some(info) = route_info(&msg, |i| names.get(&i).cloned()) {
                if table.is_none_or(|t| t == info.table) {
                    out.push(info);
                }
            }
        }
        Ok(out)
    }

    pub(crate) async fn add_rule_impl(&self, ns: Ns<'_>, spec: &RuleSpec) -> Result<(), NetError> {
        if let Some(iif) = &spec.iif {
            validate_ifname(iif)?;
        }
        let handle = self.handle(ns).await?;
        let mut request = handle.rule().add();
        *request.message_mut() = rule_message(spec);
        request.execute().await.map_err(|e| NetError::AddRule {
            rule: spec.to_string(),
            ns: ns.into(),
            source: nl_io(e),
        })?;
        tracing::debug!(rule = %spec, ?ns, "added rule");
        Ok(())
    }

    pub(crate) async fn delete_rule_impl(
        &self,
        ns: Ns<'_>,
        spec: &RuleSpec,
    ) -> Result<(), NetError> {
        let handle = self.handle(ns).await?;
        handle
            .rule()
            .del(rule_message(spec))
            .execute()
            .await
            .map_err(|e| NetError::DeleteRule {
                rule: spec.to_string(),
                ns: ns.into(),
                source: nl_io(e),
            })?;
        tracing::debug!(rule = %spec, ?ns, "deleted rule");
        Ok(())
    }

    pub(crate) async fn list_rules_impl(&self, ns: Ns<'_>) -> Result<Vec<RuleInfo>, NetError> {
        let handle = self.handle(ns).await?;
        let rules = handle.rule().get(IpVersion::V4).execute();
        let mut rules = pin!(rules);
        let mut out = Vec::new();
        while let Some(msg) = rules.try_next().await.map_err(|e| NetError::ListRules {
            ns: ns.into(),
            source: nl_io(e),
        })? {
            out.extend(rule_info(&msg));
        }
        out.sort_by_key(|r| r.priority);
        Ok(out)
    }

    pub(crate) async fn link_stats_impl(
        &self,
        ns: Ns<'_>,
        link: &str,
    ) -> Result<LinkStats, NetError> {
        validate_ifname(link)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::LinkStats {
            link: link.to_owned(),
            ns: ns.into(),
            source,
        };
        let msg = link_message(&handle, link).await.map_err(err)?;
        let mut stats = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Stats64(s) => {
                    stats = Some(LinkStats {
                        rx_packets: s.rx_packets,
                        tx_packets: s.tx_packets,
                        rx_bytes: s.rx_bytes,
                        tx_bytes: s.tx_bytes,
                        rx_errors: s.rx_errors,
                        tx_errors: s.tx_errors,
                        rx_dropped: s.rx_dropped,
                        tx_dropped: s.tx_dropped,
                    });
                }
                // 32-bit counters only if there are no 64-bit ones.
                LinkAttribute::Stats(s) if stats.is_none() => {
                    stats = Some(LinkStats {
                        rx_packets: u64::from(s.rx_packets),
                        tx_packets: u64::from(s.tx_packets),
                        rx_bytes: u64::from(s.rx_bytes),
                        tx_bytes: u64::from(s.tx_bytes),
                        rx_errors: u64::from(s.rx_errors),
                        tx_errors: u64::from(s.tx_errors),
                        rx_dropped: u64::from(s.rx_dropped),
                        tx_dropped: u64::from(s.tx_dropped),
                    });
                }
                _ => {}
            }
        }
        stats.ok_or_else(|| err(io::Error::other("the kernel sent no link statistics")))
    }

    pub(crate) async fn link_mac_impl(&self, ns: Ns<'_>, link: &str) -> Result<[u8; 6], NetError> {
        validate_ifname(link)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::LinkMac {
            link: link.to_owned(),
            ns: ns.into(),
            source,
        };
        let msg = link_message(&handle, link).await.map_err(err)?;
        msg.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| err(io::Error::other("the link has no 6-byte hardware address")))
    }

    pub(crate) async fn send_gratuitous_arp_impl(
        &self,
        ns: Ns<'_>,
        link: &str,
        ip: Ipv4Addr,
        mac: Option<[u8; 6]>,
    ) -> Result<(), NetError> {
        let netns = NsLabel::from(ns).0;
        let link = link.to_owned();
        blocking(move || {
            let ns = netns.as_deref().map_or(Ns::Root, Ns::Named);
            crate::arp::send_gratuitous_arp(ns, &link, ip, mac)
        })
        .await
    }
}
