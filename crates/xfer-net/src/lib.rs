//! xfer-net: network namespaces, links, addresses, routes and rate shaping
//! for xfer's lab (`xfer lab up/down`) and, later, its Mobile-IP-style
//! handover.
//!
//! # The API
//!
//! * [`NetOps`] is the trait the rest of xfer programs against (generic
//!   `N: NetOps`; its methods return `Send` futures). [`Netlink`] is the real
//!   implementation, built on the `rtnetlink` crate (no `ip` subprocesses).
//!   Every link, address and route operation takes an [`Ns`] first: the root
//!   namespace (the one the process runs in) or a named one.
//! * Named network namespaces are iproute2-compatible: `/run/netns/<name>`
//!   bind mounts, so `ip netns list` and `ip netns exec <name> …` work on
//!   them, and the other way round. The free functions [`create_netns`],
//!   [`delete_netns`], [`list_netns`], [`netns_exists`] do the work and are
//!   blocking but quick; the trait methods wrap them.
//! * Programs: [`spawn_in_netns`] starts a `std::process::Command` in a named
//!   network namespace only (not a new mount namespace as `ip netns exec`
//!   does, so daemons like containerd share the host's mounts);
//!   [`command_in_netns`] prepares a command for that (also usable through
//!   `tokio::process::Command::from`). [`pids_in_netns`] finds every process
//!   that has a thread in a namespace, to kill what a lab host left behind.
//! * Code: [`run_in_netns`] runs a closure on a fresh thread that has entered
//!   a namespace. Sockets stay bound to the namespace they were created in,
//!   so a `TcpListener` created there can be handed back and used anywhere.
//! * Shaping: [`NetOps::shape`] / [`NetOps::unshape`] install or remove an
//!   htb root qdisc limiting a link's *egress*. Shaping the root-side end of
//!   a veth pair limits what flows into the namespace; shaping the end inside
//!   the namespace limits what flows out. The htb qdisc and class are made
//!   by running `tc` (rtnetlink has no htb support), inside the namespace
//!   for [`Ns::Named`], in the caller's for [`Ns::Root`].
//! * Errors: one [`NetError`] enum, a variant per operation, each with the
//!   object's name and the OS/netlink cause as `source()`.
//!
//! # How netlink reaches a named namespace
//!
//! A netlink socket belongs to the network namespace it was created in,
//! whichever thread uses it later. [`Netlink`] holds one connection opened in
//! the root namespace at [`Netlink::new`]. For an operation in a named
//! namespace, [`Netlink::handle`] spawns a short-lived std thread that
//! `setns()`s into `/run/netns/<name>`, creates the rtnetlink socket there
//! (entering the caller's tokio runtime so the socket registers with its
//! reactor) and exits; the connection task then runs on the caller's runtime
//! and ends when the returned handle is dropped. No runtime thread ever
//! changes namespace, and nothing is cached, so a namespace that is deleted
//! and re-created under the same name is never confused with the old one
//! (a cached socket would also keep a deleted namespace alive).
//!
//! # Handover forwarding
//!
//! * Tunnels: [`NetOps::create_vxlan`] (point-to-point, fixed remote),
//!   [`NetOps::create_ipip`] and [`NetOps::create_gre`] for kernels that
//!   have them, [`NetOps::create_tunnel`] for any [`TunnelSpec`]; they are
//!   deleted with [`NetOps::delete_link`]. [`NetOps::probe_tunnel_kinds`]
//!   creates and deletes a throwaway link of each [`TunnelKind`] (best in a
//!   scratch namespace: [`NetOps::probe_tunnel_kinds_in_scratch`]) and
//!   [`TunnelKind::pick`] chooses the one with the least overhead.
//! * Routes in any table, via a device or a gateway ([`RouteSpec`]):
//!   [`NetOps::add_route`], [`NetOps::replace_route`] (atomic re-pointing),
//!   [`NetOps::delete_route`], [`NetOps::list_routes`]; policy rules
//!   ([`RuleSpec`], `ip rule`): [`NetOps::add_rule`],
//!   [`NetOps::delete_rule`], [`NetOps::list_rules`].
//! * Counters: [`NetOps::link_stats`] ([`LinkStats`]) tells whether a tunnel
//!   still carries traffic; [`NetOps::link_mac`] reads a link's MAC.
//! * Gratuitous ARP with pnet: [`send_gratuitous_arp`] (blocking) and
//!   [`NetOps::send_gratuitous_arp`], from inside a named namespace.
//!
//! Everything needs root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`), a tokio
//! runtime with I/O enabled, and for shaping the `tc` program (iproute2).
//!
//! # Example
//!
//! One lab host: a namespace `h1` whose `eth0` hangs off bridge `xl-br` in
//! the root namespace, reachable at 10.254.1.2, with 10 Mbit/s towards it.
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use std::process::Command;
//! use xfer_net::{spawn_in_netns, Netlink, NetOps, Ns};
//!
//! # async fn lab() -> Result<(), Box<dyn std::error::Error>> {
//! let net = Netlink::new()?;
//! net.create_netns("h1").await?;
//! net.create_bridge(Ns::Root, "xl-br").await?;
//! net.create_veth(Ns::Root, "xl-h1", "eth0", Ns::Named("h1")).await?;
//! net.set_master(Ns::Root, "xl-h1", "xl-br").await?;
//! net.set_link_up(Ns::Root, "xl-h1").await?;
//! net.loopback_up("h1").await?;
//! net.set_link_up(Ns::Named("h1"), "eth0").await?;
//! net.add_address(Ns::Named("h1"), "eth0", "10.254.1.2/24".parse()?).await?;
//! net.add_default_route(Ns::Named("h1"), Ipv4Addr::new(10, 254, 1, 1)).await?;
//! net.shape(Ns::Root, "xl-h1", 10_000_000).await?;
//!
//! let mut daemon = spawn_in_netns("h1", Command::new("sleep"))?;
//! daemon.kill()?;
//! daemon.wait()?;
//!
//! net.delete_link(Ns::Root, "xl-br").await?;
//! net.delete_netns("h1").await?; // also destroys the veth pair
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::Ipv4Addr;

mod arp;
mod error;
mod forwarding;
mod names;
mod netlink;
mod netns;
mod route;
mod shape;
mod sysctl;
mod tunnel;

pub use arp::{gratuitous_arp_frame, send_gratuitous_arp, GarpKind, ARP_FRAME_LEN};
pub use error::{NameKind, NetError, NsLabel};
pub use names::{
    validate_ifname, validate_netns_name, CidrError, Ipv4Cidr, NameError, MAX_IFNAME_LEN,
    MAX_NETNS_NAME_LEN,
};
pub use netlink::Netlink;
pub use netns::{
    command_in_netns, create_netns, delete_netns, list_netns, netns_exists, netns_path, open_netns,
    pids_in_netns, run_in_netns, spawn_in_netns, NETNS_RUN_DIR,
};
pub use route::{LinkStats, RouteInfo, RouteSpec, RouteVia, RuleInfo, RuleSpec, TABLE_MAIN};
pub use rtnetlink;
pub use shape::{htb_commands, MAX_RATE_BITS_PER_SEC};
pub use sysctl::{get_ipv4, set_ipv4, Ipv4Setting};
pub use tunnel::{IpTunnelSpec, TunnelKind, TunnelSpec, VxlanSpec, VXLAN_PORT};

/// The network namespace an operation acts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ns<'a> {
    /// The namespace of the process (for [`Netlink`]: of the thread that
    /// called [`Netlink::new`]), normally the host's.
    Root,
    /// A named namespace, `/run/netns/<name>`.
    Named(&'a str),
}

/// Network operations used by the lab and the handover. Implemented for
/// real by [`Netlink`]; a fake can implement it for tests.
///
/// The futures are `Send`, so `N: NetOps` can be used from spawned tasks.
/// (Methods return `impl Future`, so the trait is used generically, not as
/// `dyn NetOps`.)
pub trait NetOps: Send + Sync {
    /// Create a named network namespace, like `ip netns add NAME`. Fails if
    /// it exists.
    fn create_netns(&self, name: &str) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Delete a named network namespace, like `ip netns delete NAME`
    /// ([`NetError::is_not_found`] if there is none).
    fn delete_netns(&self, name: &str) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Names of all named network namespaces, sorted.
    fn list_netns(&self) -> impl Future<Output = Result<Vec<String>, NetError>> + Send;

    /// Whether the named network namespace exists.
    fn netns_exists(&self, name: &str) -> impl Future<Output = Result<bool, NetError>> + Send;

    /// Create a bridge `name` in `ns`; it is created up.
    fn create_bridge(
        &self,
        ns: Ns<'_>,
        name: &str,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Create a veth pair: `name` in `ns` and its peer `peer` directly in
    /// `peer_ns` (created there atomically under that name, e.g. `eth0`, so
    /// no temporary name or rename is needed). Both ends start down.
    fn create_veth(
        &self,
        ns: Ns<'_>,
        name: &str,
        peer: &str,
        peer_ns: Ns<'_>,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Set link `name` in `ns` up.
    fn set_link_up(
        &self,
        ns: Ns<'_>,
        name: &str,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Set the MAC address of link `name` in `ns`. A bridge given an explicit address
    /// keeps it, instead of taking the lowest address among its ports, which changes
    /// whenever a port comes or goes (and leaves neighbours with a stale ARP entry).
    fn set_mac(
        &self,
        ns: Ns<'_>,
        name: &str,
        mac: [u8; 6],
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Set the MTU of link `name` in `ns` (a tunnel's must leave room for its
    /// encapsulation, or every full-size packet is fragmented on the underlay).
    fn set_mtu(
        &self,
        ns: Ns<'_>,
        name: &str,
        mtu: u32,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Bring `lo` up in the named namespace.
    fn loopback_up(&self, netns: &str) -> impl Future<Output = Result<(), NetError>> + Send {
        self.set_link_up(Ns::Named(netns), "lo")
    }

    /// Attach link `name` to bridge `bridge` (both in `ns`), like
    /// `ip link set NAME master BRIDGE`.
    fn set_master(
        &self,
        ns: Ns<'_>,
        name: &str,
        bridge: &str,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Delete link `name` in `ns` (for a veth, both ends go).
    /// [`NetError::is_not_found`] if there is none.
    fn delete_link(
        &self,
        ns: Ns<'_>,
        name: &str,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Names of all links in `ns`, sorted (e.g. to clean up leftovers by
    /// prefix).
    fn list_links(&self, ns: Ns<'_>) -> impl Future<Output = Result<Vec<String>, NetError>> + Send;

    /// Add an IPv4 address with prefix to link `link` in `ns`.
    fn add_address(
        &self,
        ns: Ns<'_>,
        link: &str,
        addr: Ipv4Cidr,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Add a default route via `gateway` in `ns`.
    fn add_default_route(
        &self,
        ns: Ns<'_>,
        gateway: Ipv4Addr,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Limit the egress of link `link` in `ns` to `rate_bits_per_sec`
    /// (htb; replaces any root qdisc the link had, so it can be called again
    /// to change the rate).
    fn shape(
        &self,
        ns: Ns<'_>,
        link: &str,
        rate_bits_per_sec: u64,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Remove the root qdisc of link `link` in `ns` (back to the default);
    /// nothing to do if it has none.
    fn unshape(&self, ns: Ns<'_>, link: &str) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Create the tunnel `spec` in `ns`, down (set it up once addressed);
    /// [`NetOps::delete_link`] deletes it. Fails with
    /// [`NetError::CreateLink`] (for a kind the kernel lacks: "operation not
    /// supported").
    fn create_tunnel(
        &self,
        ns: Ns<'_>,
        spec: &TunnelSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Create a point-to-point VXLAN device (see [`VxlanSpec`]).
    fn create_vxlan(
        &self,
        ns: Ns<'_>,
        spec: &VxlanSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send {
        async move {
            self.create_tunnel(ns, &TunnelSpec::Vxlan(spec.clone()))
                .await
        }
    }

    /// Create an IPIP tunnel (kernels with the `ipip` module).
    fn create_ipip(
        &self,
        ns: Ns<'_>,
        spec: &IpTunnelSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send {
        async move {
            self.create_tunnel(ns, &TunnelSpec::Ipip(spec.clone()))
                .await
        }
    }

    /// Create a GRE tunnel (kernels with the `ip_gre` module).
    fn create_gre(
        &self,
        ns: Ns<'_>,
        spec: &IpTunnelSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send {
        async move { self.create_tunnel(ns, &TunnelSpec::Gre(spec.clone())).await }
    }

    /// The tunnel kinds the kernel can create in `ns`, in
    /// [`TunnelKind::ALL`] order: a throwaway link of each kind (named
    /// `xprb<pid><letter>`, between TEST-NET addresses, never up) is
    /// created and deleted at once. A kind that fails to create is left out
    /// (loading a tunnel module creates fallback devices such as `tunl0` in
    /// every namespace: probe in a scratch namespace, see
    /// [`NetOps::probe_tunnel_kinds_in_scratch`]). Fails only when the probe
    /// cannot work (no privileges).
    fn probe_tunnel_kinds(
        &self,
        ns: Ns<'_>,
    ) -> impl Future<Output = Result<Vec<TunnelKind>, NetError>> + Send;

    /// [`NetOps::probe_tunnel_kinds`] in a new namespace `scratch`, which is
    /// deleted afterwards (also when the probe fails).
    fn probe_tunnel_kinds_in_scratch(
        &self,
        scratch: &str,
    ) -> impl Future<Output = Result<Vec<TunnelKind>, NetError>> + Send {
        async move {
            self.create_netns(scratch).await?;
            let kinds = self.probe_tunnel_kinds(Ns::Named(scratch)).await;
            let deleted = self.delete_netns(scratch).await;
            let kinds = kinds?;
            deleted?;
            Ok(kinds)
        }
    }

    /// Add a route (see [`RouteSpec`]); fails if it exists.
    fn add_route(
        &self,
        ns: Ns<'_>,
        route: &RouteSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Add a route or replace the one with the same destination, table and
    /// metric, atomically (`ip route replace`): re-points a home address
    /// from one tunnel to another without a gap.
    fn replace_route(
        &self,
        ns: Ns<'_>,
        route: &RouteSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Delete a route ([`NetError::is_not_found`] if there is none).
    fn delete_route(
        &self,
        ns: Ns<'_>,
        route: &RouteSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// The IPv4 unicast routes in `ns`, of table `table` or of all tables.
    fn list_routes(
        &self,
        ns: Ns<'_>,
        table: Option<u32>,
    ) -> impl Future<Output = Result<Vec<RouteInfo>, NetError>> + Send;

    /// Add a policy rule (`ip rule add`).
    fn add_rule(
        &self,
        ns: Ns<'_>,
        rule: &RuleSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// Delete the first policy rule matching every field of `rule` (`ip rule
    /// del`; [`NetError::is_not_found`] if none does).
    fn delete_rule(
        &self,
        ns: Ns<'_>,
        rule: &RuleSpec,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// The IPv4 policy rules in `ns`, by priority.
    fn list_rules(
        &self,
        ns: Ns<'_>,
    ) -> impl Future<Output = Result<Vec<RuleInfo>, NetError>> + Send;

    /// The counters of link `link` in `ns`.
    fn link_stats(
        &self,
        ns: Ns<'_>,
        link: &str,
    ) -> impl Future<Output = Result<LinkStats, NetError>> + Send;

    /// The MAC address of link `link` in `ns`.
    fn link_mac(
        &self,
        ns: Ns<'_>,
        link: &str,
    ) -> impl Future<Output = Result<[u8; 6], NetError>> + Send;

    /// Announce that `ip` is at `mac` (the link's own when `None`) on link
    /// `link` in `ns` with a gratuitous ARP (see [`send_gratuitous_arp`]).
    fn send_gratuitous_arp(
        &self,
        ns: Ns<'_>,
        link: &str,
        ip: Ipv4Addr,
        mac: Option<[u8; 6]>,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
}
