//! Per-namespace IPv4 settings (`/proc/sys/net/ipv4/...`): forwarding for a host that
//! routes its containers, loose reverse-path filtering on a tunnel end that receives
//! traffic whose source is reached another way.
//!
//! `/proc/sys/net` shows the settings of the network namespace of the thread that
//! opens the file, so a named namespace is written from a thread that entered it.

use std::io;
use std::path::PathBuf;

use crate::error::{NetError, NsLabel};
use crate::names::validate_ifname;
use crate::netns::run_in_netns;
use crate::Ns;

/// An IPv4 setting this crate may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv4Setting {
    /// `net.ipv4.ip_forward`.
    Forwarding,
    /// `net.ipv4.conf.DEV.rp_filter` (0 off, 1 strict, 2 loose).
    RpFilter(String),
    /// `net.ipv4.conf.DEV.proxy_arp`.
    ProxyArp(String),
}

impl Ipv4Setting {
    fn path(&self) -> Result<PathBuf, NetError> {
        let base = PathBuf::from("/proc/sys/net/ipv4");
        Ok(match self {
            Ipv4Setting::Forwarding => base.join("ip_forward"),
            Ipv4Setting::RpFilter(dev) => {
                validate_ifname(dev)?;
                base.join("conf").join(dev).join("rp_filter")
            }
            Ipv4Setting::ProxyArp(dev) => {
                validate_ifname(dev)?;
                base.join("conf").join(dev).join("proxy_arp")
            }
        })
    }

    /// The sysctl name, for messages.
    pub fn name(&self) -> String {
        match self {
            Ipv4Setting::Forwarding => "net.ipv4.ip_forward".into(),
            Ipv4Setting::RpFilter(d) => format!("net.ipv4.conf.{d}.rp_filter"),
            Ipv4Setting::ProxyArp(d) => format!("net.ipv4.conf.{d}.proxy_arp"),
        }
    }
}

fn in_ns<T: Send>(ns: Ns<'_>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    match ns {
        Ns::Root => f(),
        Ns::Named(name) => run_in_netns(name, f).map_err(io::Error::other)?,
    }
}

/// Writes `value` to `setting` in `ns` (blocking, quick).
pub fn set_ipv4(ns: Ns<'_>, setting: &Ipv4Setting, value: u32) -> Result<(), NetError> {
    let path = setting.path()?;
    in_ns(ns, || std::fs::write(&path, format!("{value}\n"))).map_err(|source| NetError::Sysctl {
        name: setting.name(),
        ns: ns.into(),
        source,
    })
}

/// Reads `setting` in `ns` (blocking, quick).
pub fn get_ipv4(ns: Ns<'_>, setting: &Ipv4Setting) -> Result<u32, NetError> {
    let path = setting.path()?;
    let err = |source| NetError::Sysctl {
        name: setting.name(),
        ns: NsLabel::from(ns),
        source,
    };
    let text = in_ns(ns, || std::fs::read_to_string(&path)).map_err(err)?;
    text.trim()
        .parse()
        .map_err(|_| err(io::Error::new(io::ErrorKind::InvalidData, text.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(Ipv4Setting::Forwarding.name(), "net.ipv4.ip_forward");
        let p = Ipv4Setting::RpFilter("xc0".into()).path().expect("path");
        assert_eq!(p, PathBuf::from("/proc/sys/net/ipv4/conf/xc0/rp_filter"));
        assert!(Ipv4Setting::ProxyArp("../../x".into()).path().is_err());
    }

    #[test]
    fn reads_this_namespace() {
        let v = get_ipv4(Ns::Root, &Ipv4Setting::Forwarding).expect("read ip_forward");
        assert!(v <= 1);
    }
}
