//! The crate's error type.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;

use crate::names::{Ipv4Cidr, NameError};
use crate::Ns;

/// Where an object of an error lives: the root namespace or a named one.
///
/// Displays as nothing for the root namespace and as ` in netns NAME` for a
/// named one, so that messages read "cannot set link eth0 in netns h1 up".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NsLabel(pub Option<String>);

impl From<Ns<'_>> for NsLabel {
    fn from(ns: Ns<'_>) -> Self {
        match ns {
            Ns::Root => NsLabel(None),
            Ns::Named(name) => NsLabel(Some(name.to_owned())),
        }
    }
}

impl fmt::Display for NsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => Ok(()),
            Some(name) => write!(f, " in netns {name}"),
        }
    }
}

/// What kind of name failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A network interface (link) name.
    Interface,
    /// A named network namespace (a file in `/run/netns`).
    Netns,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Interface => "interface",
            NameKind::Netns => "network namespace",
        })
    }
}

/// Errors of this crate. Every variant is named after the operation that
/// failed and carries the name of the object it failed on.
///
/// `Display` says what failed and, for the common causes (already exists,
/// not found, permission denied, busy), why; the underlying OS or netlink
/// error is always available through [`std::error::Error::source`], so print
/// the whole chain (e.g. `anyhow`'s `{:#}`) for details.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A name was rejected before anything was attempted.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// The kind of name.
        kind: NameKind,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: NameError,
    },

    /// Creating a named network namespace failed.
    #[error("cannot create network namespace {name}{}", hint(.source))]
    CreateNetns {
        /// The namespace name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Deleting a named network namespace failed.
    #[error("cannot delete network namespace {name}{}", hint(.source))]
    DeleteNetns {
        /// The namespace name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Listing `/run/netns` failed.
    #[error("cannot list network namespaces in {dir}{}", hint(.source))]
    ListNetns {
        /// The directory that was read.
        dir: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Opening or entering a named network namespace failed.
    #[error("cannot enter network namespace {name}{}", hint(.source))]
    EnterNetns {
        /// The namespace name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Opening a rtnetlink connection failed.
    #[error("cannot open a rtnetlink connection{ns}{}", hint(.source))]
    Connect {
        /// Where the connection was to be opened.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Creating a link failed.
    #[error("cannot create link {name}{ns}{}", hint(.source))]
    CreateLink {
        /// The link name (with the peer's for a veth pair).
        name: String,
        /// Where the link was to be created.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Deleting a link failed.
    #[error("cannot delete link {name}{ns}{}", hint(.source))]
    DeleteLink {
        /// The link name.
        name: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Setting a link's MAC address failed.
    #[error("cannot set the MAC address of link {name}{ns}{}", hint(.source))]
    SetMac {
        /// The link name.
        name: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Setting a link up failed.
    #[error("cannot set link {name}{ns} up{}", hint(.source))]
    SetLinkUp {
        /// The link name.
        name: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Attaching a link to a bridge failed.
    #[error("cannot attach link {name}{ns} to bridge {master}{}", hint(.source))]
    SetMaster {
        /// The link name.
        name: String,
        /// The bridge name.
        master: String,
        /// Where both live.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Listing links failed.
    #[error("cannot list links{ns}{}", hint(.source))]
    ListLinks {
        /// Where the links were listed.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Adding an address failed.
    #[error("cannot add address {addr} to link {link}{ns}{}", hint(.source))]
    AddAddress {
        /// The address.
        addr: Ipv4Cidr,
        /// The link name.
        link: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Adding a route failed.
    #[error("cannot add default route via {gateway}{ns}{}", hint(.source))]
    AddRoute {
        /// The gateway.
        gateway: Ipv4Addr,
        /// Where the route was to be added.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Installing rate shaping failed.
    #[error("cannot shape link {link}{ns}{}", hint(.source))]
    Shape {
        /// The link name.
        link: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Removing rate shaping failed.
    #[error("cannot unshape link {link}{ns}{}", hint(.source))]
    Unshape {
        /// The link name.
        link: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Adding (or replacing) a route failed.
    #[error("cannot {} route {route}{ns}{}", if *.replace { "replace" } else { "add" }, hint(.source))]
    InstallRoute {
        /// The route, as `ip route` would show it.
        route: String,
        /// Whether it was a replace.
        replace: bool,
        /// Where the route was to be added.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Deleting a route failed.
    #[error("cannot delete route {route}{ns}{}", hint(.source))]
    DeleteRoute {
        /// The route.
        route: String,
        /// Where the route lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Listing routes failed.
    #[error("cannot list routes{ns}{}", hint(.source))]
    ListRoutes {
        /// Where the routes were listed.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Adding a policy rule failed.
    #[error("cannot add rule {rule}{ns}{}", hint(.source))]
    AddRule {
        /// The rule, as `ip rule` would show it.
        rule: String,
        /// Where the rule was to be added.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Deleting a policy rule failed.
    #[error("cannot delete rule {rule}{ns}{}", hint(.source))]
    DeleteRule {
        /// The rule.
        rule: String,
        /// Where the rule lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Listing policy rules failed.
    #[error("cannot list rules{ns}{}", hint(.source))]
    ListRules {
        /// Where the rules were listed.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Reading a link's counters failed.
    #[error("cannot read the statistics of link {link}{ns}{}", hint(.source))]
    LinkStats {
        /// The link name.
        link: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Setting a link's MTU failed.
    #[error("cannot set the MTU of link {name} to {mtu}{ns}{}", hint(.source))]
    SetMtu {
        /// The link name.
        name: String,
        /// The MTU asked for.
        mtu: u32,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Reading or writing an IPv4 setting (`/proc/sys/net/ipv4`) failed.
    #[error("cannot set {name}{ns}{}", hint(.source))]
    Sysctl {
        /// The sysctl name.
        name: String,
        /// Where.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Reading a link's hardware address failed.
    #[error("cannot read the MAC address of link {link}{ns}{}", hint(.source))]
    LinkMac {
        /// The link name.
        link: String,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Probing the tunnel kinds the kernel supports failed (not: a kind is
    /// unsupported, which is a normal probe result).
    #[error("cannot probe tunnel kinds{ns}{}", hint(.source))]
    ProbeTunnels {
        /// Where the probe ran.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Sending a gratuitous ARP failed.
    #[error("cannot send gratuitous ARP for {ip} on link {link}{ns}{}", hint(.source))]
    SendArp {
        /// The link name.
        link: String,
        /// The address announced.
        ip: Ipv4Addr,
        /// Where the link lives.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Spawning a program inside a named network namespace failed.
    #[error("cannot spawn {program}{ns}{}", hint(.source))]
    Spawn {
        /// The program.
        program: String,
        /// The namespace.
        ns: NsLabel,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Scanning `/proc` for the processes of a namespace failed.
    #[error("cannot list processes in netns {name}{}", hint(.source))]
    ListPids {
        /// The namespace name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl NetError {
    /// The underlying I/O error, if any.
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            NetError::InvalidName { .. } => None,
            NetError::CreateNetns { source, .. }
            | NetError::DeleteNetns { source, .. }
            | NetError::ListNetns { source, .. }
            | NetError::EnterNetns { source, .. }
            | NetError::Connect { source, .. }
            | NetError::CreateLink { source, .. }
            | NetError::DeleteLink { source, .. }
            | NetError::SetLinkUp { source, .. }
            | NetError::SetMac { source, .. }
            | NetError::SetMaster { source, .. }
            | NetError::ListLinks { source, .. }
            | NetError::AddAddress { source, .. }
            | NetError::AddRoute { source, .. }
            | NetError::Shape { source, .. }
            | NetError::Unshape { source, .. }
            | NetError::InstallRoute { source, .. }
            | NetError::DeleteRoute { source, .. }
            | NetError::ListRoutes { source, .. }
            | NetError::AddRule { source, .. }
            | NetError::DeleteRule { source, .. }
            | NetError::ListRules { source, .. }
            | NetError::LinkStats { source, .. }
            | NetError::LinkMac { source, .. }
            | NetError::Sysctl { source, .. }
            | NetError::SetMtu { source, .. }
            | NetError::ProbeTunnels { source, .. }
            | NetError::SendArp { source, .. }
            | NetError::Spawn { source, .. }
            | NetError::ListPids { source, .. } => Some(source),
        }
    }

    /// True when the object (or one it needed) does not exist: `ENOENT`,
    /// `ENODEV`, or a lookup that found nothing. Handy for idempotent cleanup.
    pub fn is_not_found(&self) -> bool {
        self.io_source()
            .is_some_and(|e| cause(e) == Cause::NotFound)
    }

    /// True when the object already exists (`EEXIST`).
    pub fn is_already_exists(&self) -> bool {
        self.io_source().is_some_and(|e| cause(e) == Cause::Exists)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Exists,
    NotFound,
    Permission,
    Busy,
    Other,
}

fn cause(e: &io::Error) -> Cause {
    match e.raw_os_error() {
        Some(libc::EEXIST) => Cause::Exists,
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ESRCH) => Cause::NotFound,
        Some(libc::EPERM) | Some(libc::EACCES) => Cause::Permission,
        Some(libc::EBUSY) => Cause::Busy,
        Some(_) => Cause::Other,
        None => match e.kind() {
            io::ErrorKind::AlreadyExists => Cause::Exists,
            io::ErrorKind::NotFound => Cause::NotFound,
            io::ErrorKind::PermissionDenied => Cause::Permission,
            _ => Cause::Other,
        },
    }
}

/// A short reason appended to an error message for the common causes.
fn hint(e: &io::Error) -> &'static str {
    match cause(e) {
        Cause::Exists => ": it already exists",
        Cause::NotFound => ": not found",
        Cause::Permission => ": permission denied (needs root / CAP_NET_ADMIN and CAP_SYS_ADMIN)",
        Cause::Busy => ": busy",
        Cause::Other => "",
    }
}

/// Convert an rtnetlink error into an `io::Error`, keeping the errno of a
/// netlink error message (rtnetlink 0.17 does not surface extended ACK text).
pub(crate) fn nl_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_was_wrong() {
        let e = NetError::CreateLink {
            name: "xl-h1".into(),
            ns: NsLabel(None),
            source: io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert_eq!(e.to_string(), "cannot create link xl-h1: it already exists");
        assert!(e.is_already_exists());
        assert!(!e.is_not_found());

        let e = NetError::SetLinkUp {
            name: "eth0".into(),
            ns: Ns::Named("h1").into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert_eq!(
            e.to_string(),
            "cannot set link eth0 in netns h1 up: not found"
        );
        assert!(e.is_not_found());

        let e = NetError::AddRoute {
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            ns: Ns::Named("h1").into(),
            source: io::Error::from_raw_os_error(libc::ENETUNREACH),
        };
        // Uncommon causes are left to the source.
        assert_eq!(
            e.to_string(),
            "cannot add default route via 10.0.0.1 in netns h1"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
