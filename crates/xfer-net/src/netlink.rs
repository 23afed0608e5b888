//! [`Netlink`]: the rtnetlink implementation of [`NetOps`].

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::pin;
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::error::{nl_io, NetError, NsLabel};
use crate::names::{validate_ifname, Ipv4Cidr};
use crate::netns::{self, run_in_netns_async};
use crate::route::{LinkStats, RouteInfo, RouteSpec, RuleInfo, RuleSpec};
use crate::shape::{htb_commands, run_tc, tc_command};
use crate::tunnel::{TunnelKind, TunnelSpec};
use crate::{NetOps, Ns};

/// The real [`NetOps`]: rtnetlink connections, one kept for the root
/// namespace and one opened per operation in a named namespace (see the
/// crate docs).
#[derive(Debug, Clone)]
pub struct Netlink {
    root: Handle,
    /// The root namespace, for moving a veth peer there.
    root_ns: Arc<File>,
}

fn connect_here() -> io::Result<(
    impl std::future::Future<Output = ()> + Send + 'static,
    Handle,
)> {
    let (connection, handle, _unsolicited) = rtnetlink::new_connection()?;
    Ok((connection, handle))
}

impl Netlink {
    /// Open a rtnetlink connection in the calling thread's network namespace
    /// (the "root" one for [`Ns::Root`]) and spawn its task on the current
    /// tokio runtime, which must have I/O enabled. Fails outside a runtime.
    pub fn new() -> Result<Self, NetError> {
        let err = |source| NetError::Connect {
            ns: NsLabel(None),
            source,
        };
        tokio::runtime::Handle::try_current()
            .map_err(|e| err(io::Error::other(format!("not inside a tokio runtime: {e}"))))?;
        let root_ns = File::open("/proc/thread-self/ns/net").map_err(err)?;
        let (connection, root) = connect_here().map_err(err)?;
        tokio::spawn(connection);
        Ok(Netlink {
            root,
            root_ns: Arc::new(root_ns),
        })
    }

    /// A rtnetlink handle for `ns`: the kept root one, or a new connection
    /// opened inside the named namespace (by a short-lived thread that
    /// `setns()`s there; the socket stays bound to that namespace). The
    /// connection task runs on the current runtime until the handle and all
    /// its clones are dropped.
    ///
    /// Use this for operations `NetOps` does not offer (yet).
    pub async fn handle(&self, ns: Ns<'_>) -> Result<Handle, NetError> {
        let name = match ns {
            Ns::Root => return Ok(self.root.clone()),
            Ns::Named(name) => name,
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| NetError::Connect {
            ns: ns.into(),
            source: io::Error::other(format!("not inside a tokio runtime: {e}")),
        })?;
        let connected = run_in_netns_async(name, move || {
            // The socket registers with the reactor of the runtime entered
            // here; the thread exits right after.
            let _entered = runtime.enter();
            connect_here()
        })
        .await?;
        let (connection, handle) = connected.map_err(|source| NetError::Connect {
            ns: ns.into(),
            source,
        })?;
        tokio::spawn(connection);
        Ok(handle)
    }
}

/// The index of link `name`, or a "not found" error naming it.
pub(crate) async fn link_index(handle: &Handle, name: &str) -> io::Result<u32> {
    let links = handle.link().get().match_name(name.to_owned()).execute();
    let mut links = pin!(links);
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(no_such_link(name)),
        Err(e) => {
            let e = nl_io(e);
            if e.raw_os_error() == Some(libc::ENODEV) {
                Err(no_such_link(name))
            } else {
                Err(e)
            }
        }
    }
}

fn no_such_link(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no link named {name}"))
}

/// Delete the root qdisc of link `index` if it has one of its own (a
/// non-zero handle; the default `noqueue`/`pfifo_fast` ones have handle 0).
async fn delete_root_qdisc(handle: &Handle, index: u32) -> io::Result<()> {
    let ifindex = i32::try_from(index).map_err(io::Error::other)?;
    let qdiscs = handle.qdisc().get().index(ifindex).execute();
    let mut qdiscs = pin!(qdiscs);
    let mut root = None;
    while let Some(qdisc) = qdiscs.try_next().await.map_err(nl_io)? {
        let header = &qdisc.header;
        if header.index == ifindex && header.parent == TcHandle::ROOT && header.handle.major != 0 {
            root = Some(header.handle);
        }
    }
    if let Some(qdisc_handle) = root {
        let mut request = handle.qdisc().del(ifindex);
        request.message_mut().header.parent = TcHandle::ROOT;
        request.message_mut().header.handle = qdisc_handle;
        request.execute().await.map_err(nl_io)?;
    }
    Ok(())
}

impl Netlink {
    async fn unshape_with(&self, handle: &Handle, link: &str) -> io::Result<()> {
        let index = link_index(handle, link).await?;
        delete_root_qdisc(handle, index).await
    }
}

/// Run a quick blocking namespace operation off the async thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("blocking namespace task cancelled: {e}"),
        },
    }
}

impl NetOps for Netlink {
    async fn create_netns(&self, name: &str) -> Result<(), NetError> {
        let name = name.to_owned();
        blocking(move || netns::create_netns(&name)).await
    }

    async fn delete_netns(&self, name: &str) -> Result<(), NetError> {
        let name = name.to_owned();
        blocking(move || netns::delete_netns(&name)).await
    }

    async fn list_netns(&self) -> Result<Vec<String>, NetError> {
        blocking(netns::list_netns).await
    }

    async fn netns_exists(&self, name: &str) -> Result<bool, NetError> {
        netns::netns_exists(name)
    }

    async fn create_bridge(&self, ns: Ns<'_>, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        let handle = self.handle(ns).await?;
        // LinkBridge::new also sets IFF_UP.
        handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(|e| NetError::CreateLink {
                name: name.to_owned(),
                ns: ns.into(),
                source: nl_io(e),
            })?;
        tracing::debug!(bridge = name, ?ns, "created bridge");
        Ok(())
    }

    async fn create_veth(
        &self,
        ns: Ns<'_>,
        name: &str,
        peer: &str,
        peer_ns: Ns<'_>,
    ) -> Result<(), NetError> {
        validate_ifname(name)?;
        validate_ifname(peer)?;
        let handle = self.handle(ns).await?;
        // The peer's IFLA_NET_NS_FD makes the kernel create it inside that
        // namespace under its final name (names are per namespace).
        let peer_fd = match peer_ns {
            _ if peer_ns == ns => None,
            Ns::Root => Some(Arc::clone(&self.root_ns)),
            Ns::Named(peer_netns) => Some(Arc::new(netns::open_netns(peer_netns)?)),
        };
        let mut peer_msg = LinkUnspec::new_with_name(peer).build();
        if let Some(fd) = &peer_fd {
            use std::os::fd::AsRawFd;
            peer_msg
                .attributes
                .push(LinkAttribute::NetNsFd(fd.as_raw_fd()));
        }
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_owned())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        let result = handle.link().add(message).execute().await;
        drop(peer_fd); // kept open until the kernel has used it
        result.map_err(|e| NetError::CreateLink {
            name: format!("{name} (veth peer {peer}{})", NsLabel::from(peer_ns)),
            ns: ns.into(),
            source: nl_io(e),
        })?;
        tracing::debug!(veth = name, peer, ?ns, ?peer_ns, "created veth pair");
        Ok(())
    }

    async fn set_link_up(&self, ns: Ns<'_>, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::SetLinkUp {
            name: name.to_owned(),
            ns: ns.into(),
            source,
        };
        let index = link_index(&handle, name).await.map_err(err)?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))
    }

    async fn set_mac(&self, ns: Ns<'_>, name: &str, mac: [u8; 6]) -> Result<(), NetError> {
        validate_ifname(name)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::SetMac {
            name: name.to_owned(),
            ns: ns.into(),
            source,
        };
        let index = link_index(&handle, name).await.map_err(err)?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))
    }

    async fn set_mtu(&self, ns: Ns<'_>, name: &str, mtu: u32) -> Result<(), NetError> {
        validate_ifname(name)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::SetMtu {
            name: name.to_owned(),
            mtu,
            ns: ns.into(),
            source,
        };
        let index = link_index(&handle, name).await.map_err(err)?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))
    }

    async fn set_master(&self, ns: Ns<'_>, name: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        validate_ifname(bridge)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::SetMaster {
            name: name.to_owned(),
            master: bridge.to_owned(),
            ns: ns.into(),
            source,
        };
        let index = link_index(&handle, name).await.map_err(err)?;
        let master = link_index(&handle, bridge).await.map_err(err)?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).controller(master).build())
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))
    }

    async fn delete_link(&self, ns: Ns<'_>, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::DeleteLink {
            name: name.to_owned(),
            ns: ns.into(),
            source,
        };
        let index = link_index(&handle, name).await.map_err(err)?;
        handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))?;
        tracing::debug!(link = name, ?ns, "deleted link");
        Ok(())
    }

    async fn list_links(&self, ns: Ns<'_>) -> Result<Vec<String>, NetError> {
        let handle = self.handle(ns).await?;
        let links = handle.link().get().execute();
        let mut links = pin!(links);
        let mut names = Vec::new();
        while let Some(link) = links.try_next().await.map_err(|e| NetError::ListLinks {
            ns: ns.into(),
            source: nl_io(e),
        })? {
            names.extend(link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            }));
        }
        names.sort();
        Ok(names)
    }

    async fn add_address(&self, ns: Ns<'_>, link: &str, addr: Ipv4Cidr) -> Result<(), NetError> {
        validate_ifname(link)?;
        let handle = self.handle(ns).await?;
        let err = |source| NetError::AddAddress {
            addr,
            link: link.to_owned(),
            ns: ns.into(),
            source,
        };
        let index = link_index(&handle, link).await.map_err(err)?;
        handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix())
            .execute()
            .await
            .map_err(|e| err(nl_io(e)))
    }

    async fn add_default_route(&self, ns: Ns<'_>, gateway: Ipv4Addr) -> Result<(), NetError> {
        let handle = self.handle(ns).await?;
        handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetError::AddRoute {
                gateway,
                ns: ns.into(),
                source: nl_io(e),
            })
    }

    async fn shape(&self, ns: Ns<'_>, link: &str, rate_bits_per_sec: u64) -> Result<(), NetError> {
        validate_ifname(link)?;
        let err = |source| NetError::Shape {
            link: link.to_owned(),
            ns: ns.into(),
            source,
        };
        let commands = htb_commands(link, rate_bits_per_sec).map_err(err)?;
        let handle = self.handle(ns).await?;
        self.unshape_with(&handle, link).await.map_err(err)?;
        for args in &commands {
            let cmd = tc_command(ns, args)?;
            if let Err(e) = run_tc(cmd).await {
                // Do not leave a half-built htb (a qdisc whose default class
                // is missing) behind.
                let _ = self.unshape_with(&handle, link).await;
                return Err(err(e));
            }
        }
        tracing::debug!(link, ?ns, rate_bits_per_sec, "shaped link");
        Ok(())
    }

    async fn unshape(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError> {
        validate_ifname(link)?;
        let handle = self.handle(ns).await?;
        self.unshape_with(&handle, link)
            .await
            .map_err(|source| NetError::Unshape {
                link: link.to_owned(),
                ns: ns.into(),
                source,
            })
    }

    // Tunnels, routes, rules, counters, ARP: implemented in forwarding.rs.

    async fn create_tunnel(&self, ns: Ns<'_>, spec: &TunnelSpec) -> Result<(), NetError> {
        self.create_tunnel_impl(ns, spec).await
    }

    async fn probe_tunnel_kinds(&self, ns: Ns<'_>) -> Result<Vec<TunnelKind>, NetError> {
        self.probe_tunnel_kinds_impl(ns).await
    }

    async fn add_route(&self, ns: Ns<'_>, route: &RouteSpec) -> Result<(), NetError> {
        self.install_route_impl(ns, route, false).await
    }

    async fn replace_route(&self, ns: Ns<'_>, route: &RouteSpec) -> Result<(), NetError> {
        self.install_route_impl(ns, route, true).await
    }

    async fn delete_route(&self, ns: Ns<'_>, route: &RouteSpec) -> Result<(), NetError> {
        self.delete_route_impl(ns, route).await
    }

    async fn list_routes(
        &self,
        ns: Ns<'_>,
        table: Option<u32>,
    ) -> Result<Vec<RouteInfo>, NetError> {
        self.list_routes_impl(ns, table).await
    }

    async fn add_rule(&self, ns: Ns<'_>, rule: &RuleSpec) -> Result<(), NetError> {
        self.add_rule_impl(ns, rule).await
    }

    async fn delete_rule(&self, ns: Ns<'_>, rule: &RuleSpec) -> Result<(), NetError> {
        self.delete_rule_impl(ns, rule).await
    }

    async fn list_rules(&self, ns: Ns<'_>) -> Result<Vec<RuleInfo>, NetError> {
        self.list_rules_impl(ns).await
    }

    async fn link_stats(&self, ns: Ns<'_>, link: &str) -> Result<LinkStats, NetError> {
        self.link_stats_impl(ns, link).await
    }

    async fn link_mac(&self, ns: Ns<'_>, link: &str) -> Result<[u8; 6], NetError> {
        self.link_mac_impl(ns, link).await
    }

    async fn send_gratuitous_arp(
        &self,
        ns: Ns<'_>,
        link: &str,
        ip: Ipv4Addr,
        mac: Option<[u8; 6]>,
    ) -> Result<(), NetError> {
        self.send_gratuitous_arp_impl(ns, link, ip, mac).await
    }
}
