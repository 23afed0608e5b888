//! Validation of interface and namespace names, and IPv4 prefixes.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::error::{NameKind, NetError};

/// Longest Linux interface name in bytes (`IFNAMSIZ` − 1 for the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Longest namespace name in bytes (`NAME_MAX`, it is a file name).
pub const MAX_NETNS_NAME_LEN: usize = 255;

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("it is empty")]
    Empty,
    /// The name is longer than the kernel accepts.
    #[error("it is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// `.` and `..` are not usable names.
    #[error("\".\" and \"..\" are reserved")]
    Reserved,
    /// The name holds a character the kernel (or the file system) refuses.
    #[error("it contains {0:?}, which is not allowed")]
    BadChar(char),
}

fn check_common(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            len: name.len(),
            max,
        });
    }
    if name == "." || name == ".." {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// Check a Linux interface name like the kernel's `dev_valid_name` does:
/// 1 to 15 bytes, not `.`/`..`, no `/`, `:`, whitespace or NUL. `%` is also
/// refused because the kernel treats it as a template (`eth%d`).
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let invalid = |reason| NetError::InvalidName {
        kind: NameKind::Interface,
        name: name.to_owned(),
        reason,
    };
    check_common(name, MAX_IFNAME_LEN).map_err(invalid)?;
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace())
    {
        return Err(invalid(NameError::BadChar(c)));
    }
    Ok(())
}

/// Check a named network namespace name like iproute2 does: a file name
/// (1 to 255 bytes, not `.`/`..`, no `/`), and no NUL or whitespace either
/// (whitespace would make `ip netns` output ambiguous).
pub fn validate_netns_name(name: &str) -> Result<(), NetError> {
    let invalid = |reason| NetError::InvalidName {
        kind: NameKind::Netns,
        name: name.to_owned(),
        reason,
    };
    check_common(name, MAX_NETNS_NAME_LEN).map_err(invalid)?;
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '\0') || c.is_whitespace())
    {
        return Err(invalid(NameError::BadChar(c)));
    }
    Ok(())
}

/// An IPv4 address with a prefix length, e.g. `10.254.1.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why an [`Ipv4Cidr`] could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// No `/` between address and prefix length.
    #[error("{0:?} has no \"/prefix\"")]
    MissingPrefix(String),
    /// The address part is not an IPv4 address.
    #[error("{0:?} is not an IPv4 address")]
    BadAddress(String),
    /// The prefix is not a number from 0 to 32.
    #[error("prefix length {0:?} is not a number from 0 to 32")]
    BadPrefix(String),
}

impl Ipv4Cidr {
    /// `addr/prefix`; the prefix must be at most 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        if prefix > 32 {
            return Err(CidrError::BadPrefix(prefix.to_string()));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }

    /// The address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length (0–32).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(u32::from(self.addr) & mask)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::MissingPrefix(s.to_owned()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.to_owned()))?;
        // `u8::from_str` accepts a leading '+'; refuse it like iproute2 does.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::BadPrefix(prefix.to_owned()));
        }
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| CidrError::BadPrefix(prefix.to_owned()))?;
        Ipv4Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_kernel_rules() {
        for ok in ["eth0", "lo", "xl-h1", "a", "abcdefghijklmno", "veth_1.2"] {
            validate_ifname(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let long = "abcdefghijklmnop"; // 16 bytes
        let err = validate_ifname(long).expect_err("16 bytes must be refused");
        assert_eq!(
            err.to_string(),
            "invalid interface name \"abcdefghijklmnop\": it is 16 bytes long, the limit is 15"
        );
        // Bytes, not chars, count.
        assert!(validate_ifname("ééééééééé").is_err()); // 18 bytes
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "eth%d", "a\tb", "a\0"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?} accepted");
        }
        match validate_ifname("a:1") {
            Err(NetError::InvalidName {
                kind: NameKind::Interface,
                reason: NameError::BadChar(':'),
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn netns_names_follow_iproute2_rules() {
        for ok in ["h1", "xnt123a-n0", "a.b", &"n".repeat(255)] {
            validate_netns_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", ".", "..", "a/b", "a b", &"n".repeat(256)] {
            assert!(validate_netns_name(bad).is_err(), "{bad:?} accepted");
        }
        let err = validate_netns_name("../etc").expect_err("slash");
        assert_eq!(
            err.to_string(),
            "invalid network namespace name \"../etc\": it contains '/', which is not allowed"
        );
    }

    #[test]
    fn cidr_parses_and_prints() {
        let c: Ipv4Cidr = "10.254.1.2/24".parse().expect("valid");
        assert_eq!(c.addr(), Ipv4Addr::new(10, 254, 1, 2));
        assert_eq!(c.prefix(), 24);
        assert_eq!(c.network(), Ipv4Addr::new(10, 254, 1, 0));
        assert_eq!(c.to_string(), "10.254.1.2/24");
        let all: Ipv4Cidr = "0.0.0.0/0".parse().expect("valid");
        assert_eq!(all.network(), Ipv4Addr::UNSPECIFIED);
        let host: Ipv4Cidr = "1.2.3.4/32".parse().expect("valid");
        assert_eq!(host.network(), Ipv4Addr::new(1, 2, 3, 4));
    }

    #[test]
    fn cidr_rejects_garbage() {
        assert_eq!(
            "10.0.0.1".parse::<Ipv4Cidr>(),
            Err(CidrError::MissingPrefix("10.0.0.1".into()))
        );
        assert_eq!(
            "10.0.0/8".parse::<Ipv4Cidr>(),
            Err(CidrError::BadAddress("10.0.0".into()))
        );
        for p in ["33", "", "+8", "-1", "x", "256"] {
            assert_eq!(
                format!("10.0.0.1/{p}").parse::<Ipv4Cidr>(),
                Err(CidrError::BadPrefix(p.into())),
                "prefix {p:?}"
            );
        }
        assert!(Ipv4Cidr::new(Ipv4Addr::LOCALHOST, 33).is_err());
    }
}
