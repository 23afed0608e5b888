//! Point-to-point tunnels for the home agent: VXLAN (works everywhere,
//! including this project's kernels), IPIP and GRE (where the kernel has
//! them), and a probe that finds out which kinds the kernel can create.
//!
//! All three are created over rtnetlink. netlink-packet-route 0.24 has
//! typed attributes for VXLAN only, so the IPIP (`IFLA_IPTUN_*`) and GRE
//! (`IFLA_GRE_*`) attributes are encoded here, with the same values and
//! layout iproute2 uses (checked against its requests in the tests).
//!
//! Tunnels are created down (like veth pairs): set them up with
//! [`crate::NetOps::set_link_up`] once addressed.

use std::fmt;
use std::net::Ipv4Addr;

use rtnetlink::packet_route::link::{InfoData, InfoGreTun, InfoKind, InfoSitTun, LinkMessage};
use rtnetlink::packet_utils::nla::DefaultNla;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// A tunnel kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TunnelKind {
    /// IPv4-in-IPv4 (RFC 2003, what Mobile IP specifies): 20 bytes of
    /// overhead.
    Ipip,
    /// GRE (RFC 2784) over IPv4: 24 bytes of overhead.
    Gre,
    /// VXLAN (RFC 7348), Ethernet in UDP: 50 bytes of overhead; a layer-2
    /// device, so routes through it need a gateway or neighbour resolution
    /// on it.
    Vxlan,
}

impl TunnelKind {
    /// Every kind, in order of preference (least overhead first).
    pub const ALL: [TunnelKind; 3] = [TunnelKind::Ipip, TunnelKind::Gre, TunnelKind::Vxlan];

    /// The kernel's name for the kind (`ip link add … type NAME`).
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelKind::Ipip => "ipip",
            TunnelKind::Gre => "gre",
            TunnelKind::Vxlan => "vxlan",
        }
    }

    /// Bytes each packet grows by on an IPv4 underlay.
    pub fn overhead(self) -> u32 {
        match self {
            TunnelKind::Ipip => 20,
            TunnelKind::Gre => 24,
            TunnelKind::Vxlan => 50,
        }
    }

    /// The preferred kind among `available` (the least overhead), e.g.
    /// from [`crate::NetOps::probe_tunnel_kinds`].
    pub fn pick(available: &[TunnelKind]) -> Option<TunnelKind> {
        TunnelKind::ALL
            .into_iter()
            .find(|kind| available.contains(kind))
    }
}

impl fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point-to-point VXLAN device: `ip link add NAME type vxlan id VNI
/// local LOCAL remote REMOTE dstport PORT [dev UNDERLAY]`.
///
/// The fixed remote is the default destination of the device's forwarding
/// database, so every frame (broadcast and ARP included) goes to it. Give
/// `underlay_dev` when possible: the kernel then derives the MTU (the
/// underlay's minus 50) and binds the tunnel to that device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VxlanSpec {
    /// The device name.
    pub name: String,
    /// The VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The local underlay address (source of the outer packets).
    pub local: Ipv4Addr,
    /// The remote underlay address (the other end).
    pub remote: Ipv4Addr,
    /// The UDP destination port, normally [`VXLAN_PORT`].
    pub dst_port: u16,
    /// The underlay device, if any.
    pub underlay_dev: Option<String>,
}

/// An IPIP or GRE point-to-point tunnel: `ip link add NAME type ipip|gre
/// local LOCAL remote REMOTE [dev UNDERLAY] [ttl TTL]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpTunnelSpec {
    /// The device name.
    pub name: String,
    /// The local underlay address.
    pub local: Ipv4Addr,
    /// The remote underlay address.
    pub remote: Ipv4Addr,
    /// The underlay device, if any.
    pub underlay_dev: Option<String>,
    /// TTL of the outer header; 0 inherits the inner packet's.
    pub ttl: u8,
}

/// A tunnel of any kind, for [`crate::NetOps::create_tunnel`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TunnelSpec {
    /// VXLAN.
    Vxlan(VxlanSpec),
    /// IPIP.
    Ipip(IpTunnelSpec),
    /// GRE.
    Gre(IpTunnelSpec),
}

impl TunnelSpec {
    /// The kind.
    pub fn kind(&self) -> TunnelKind {
        match self {
            TunnelSpec::Vxlan(_) => TunnelKind::Vxlan,
            TunnelSpec::Ipip(_) => TunnelKind::Ipip,
            TunnelSpec::Gre(_) => TunnelKind::Gre,
        }
    }

    /// The device name.
    pub fn name(&self) -> &str {
        match self {
            TunnelSpec::Vxlan(s) => &s.name,
            TunnelSpec::Ipip(s) | TunnelSpec::Gre(s) => &s.name,
        }
    }

    /// The underlay device, if any.
    pub fn underlay_dev(&self) -> Option<&str> {
        match self {
            TunnelSpec::Vxlan(s) => s.underlay_dev.as_deref(),
            TunnelSpec::Ipip(s) | TunnelSpec::Gre(s) => s.underlay_dev.as_deref(),
        }
    }

    /// A tunnel of `kind` from `local` to `remote` named `name`, with the
    /// defaults (VNI `vni` and port [`VXLAN_PORT`] for VXLAN, inherited TTL
    /// otherwise).
    pub fn point_to_point(
        kind: TunnelKind,
        name: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        vni: u32,
        underlay_dev: Option<&str>,
    ) -> TunnelSpec {
        let underlay_dev = underlay_dev.map(str::to_owned);
        match kind {
            TunnelKind::Vxlan => TunnelSpec::Vxlan(VxlanSpec {
                name: name.to_owned(),
                vni,
                local,
                remote,
                dst_port: VXLAN_PORT,
                underlay_dev,
            }),
            TunnelKind::Ipip | TunnelKind::Gre => {
                let spec = IpTunnelSpec {
                    name: name.to_owned(),
                    local,
                    remote,
                    underlay_dev,
                    ttl: 0,
                };
                if kind == TunnelKind::Ipip {
                    TunnelSpec::Ipip(spec)
                } else {
                    TunnelSpec::Gre(spec)
                }
            }
        }
    }
}

// IFLA_IPTUN_* (include/uapi/linux/if_tunnel.h).
const IFLA_IPTUN_LINK: u16 = 1;
const IFLA_IPTUN_LOCAL: u16 = 2;
const IFLA_IPTUN_REMOTE: u16 = 3;
const IFLA_IPTUN_TTL: u16 = 4;
const IFLA_IPTUN_PMTUDISC: u16 = 10;

// IFLA_GRE_* (include/uapi/linux/if_tunnel.h).
const IFLA_GRE_LINK: u16 = 1;
const IFLA_GRE_LOCAL: u16 = 6;
const IFLA_GRE_REMOTE: u16 = 7;
const IFLA_GRE_TTL: u16 = 8;
const IFLA_GRE_PMTUDISC: u16 = 10;

/// The netlink attributes of an IPIP or GRE tunnel, as (type, value):
/// link (if an underlay index is given), local, remote, ttl, path MTU
/// discovery on (iproute2's default, which the kernel requires for a
/// non-inherited TTL anyway).
fn ip_tunnel_attributes(
    kind: TunnelKind,
    spec: &IpTunnelSpec,
    underlay_index: Option<u32>,
) -> Vec<DefaultNla> {
    let (link, local, remote, ttl, pmtudisc) = match kind {
        TunnelKind::Gre => (
            IFLA_GRE_LINK,
            IFLA_GRE_LOCAL,
            IFLA_GRE_REMOTE,
            IFLA_GRE_TTL,
            IFLA_GRE_PMTUDISC,
        ),
        _ => (
            IFLA_IPTUN_LINK,
            IFLA_IPTUN_LOCAL,
            IFLA_IPTUN_REMOTE,
            IFLA_IPTUN_TTL,
            IFLA_IPTUN_PMTUDISC,
        ),
    };
    let mut nlas = Vec::new();
    if let Some(index) = underlay_index {
        nlas.push(DefaultNla::new(link, index.to_ne_bytes().to_vec()));
    }
    nlas.push(DefaultNla::new(local, spec.local.octets().to_vec()));
    nlas.push(DefaultNla::new(remote, spec.remote.octets().to_vec()));
    nlas.push(DefaultNla::new(ttl, vec![spec.ttl]));
    nlas.push(DefaultNla::new(pmtudisc, vec![1]));
    nlas
}

/// The `RTM_NEWLINK` message creating `spec` (`underlay_index`: the index
/// of `spec`'s underlay device, resolved by the caller).
pub(crate) fn tunnel_message(spec: &TunnelSpec, underlay_index: Option<u32>) -> LinkMessage {
    match spec {
        TunnelSpec::Vxlan(v) => {
            let mut builder = LinkVxlan::new(&v.name, v.vni)
                .local(v.local)
                .remote(v.remote)
                .port(v.dst_port);
            if let Some(index) = underlay_index {
                builder = builder.dev(index);
            }
            builder.build()
        }
        TunnelSpec::Ipip(t) => {
            let nlas = ip_tunnel_attributes(TunnelKind::Ipip, t, underlay_index);
            LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::IpTun)
                .name(t.name.clone())
                .set_info_data(InfoData::SitTun(
                    nlas.into_iter().map(InfoSitTun::Other).collect(),
                ))
                .build()
        }
        TunnelSpec::Gre(t) => {
            let nlas = ip_tunnel_attributes(TunnelKind::Gre, t, underlay_index);
            LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::GreTun)
                .name(t.name.clone())
                .set_info_data(InfoData::GreTun(
                    nlas.into_iter().map(InfoGreTun::Other).collect(),
                ))
                .build()
        }
    }
}

/// The throwaway tunnel the probe creates for `kind`: named
/// `xprb<pid><letter>` (unique per process), between two TEST-NET-1
/// addresses (RFC 5737), never set up, so it sends nothing.
pub(crate) fn probe_spec(kind: TunnelKind) -> TunnelSpec {
    let letter = match kind {
        TunnelKind::Ipip => 'i',
        TunnelKind::Gre => 'g',
        TunnelKind::Vxlan => 'v',
    };
    let name = format!("xprb{}{letter}", std::process::id());
    TunnelSpec::point_to_point(
        kind,
        &name,
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 2),
        0xf_ffff,
        None,
    )
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::link::{InfoVxlan, LinkAttribute, LinkInfo};
    use rtnetlink::packet_utils::Emitable;

    use super::*;

    fn info(msg: &LinkMessage) -> (Option<InfoKind>, Option<InfoData>) {
        let mut kind = None;
        let mut data = None;
        for attr in &msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(d) => data = Some(d.clone()),
                        _ => {}
                    }
                }
            }
        }
        (kind, data)
    }

    fn emitted(data: &InfoData) -> Vec<u8> {
        use rtnetlink::packet_utils::nla::Nla;
        let mut buf = vec![0_u8; data.value_len()];
        data.emit_value(&mut buf);
        buf
    }

    #[test]
    fn preference_and_names() {
        assert_eq!(
            TunnelKind::pick(&[TunnelKind::Vxlan, TunnelKind::Gre]),
            Some(TunnelKind::Gre)
        );
        assert_eq!(
            TunnelKind::pick(&[TunnelKind::Vxlan]),
            Some(TunnelKind::Vxlan)
        );
        assert_eq!(TunnelKind::pick(&[]), None);
        let names: Vec<String> = TunnelKind::ALL.iter().map(|k| k.to_string()).collect();
        assert_eq!(names, ["ipip", "gre", "vxlan"]);
        for kind in TunnelKind::ALL {
            let spec = probe_spec(kind);
            assert_eq!(spec.kind(), kind);
            crate::validate_ifname(spec.name()).expect("probe names are valid");
        }
    }

    #[test]
    fn vxlan_message() {
        let spec = TunnelSpec::Vxlan(VxlanSpec {
            name: "vx0".into(),
            vni: 42,
            local: Ipv4Addr::new(10, 0, 0, 1),
            remote: Ipv4Addr::new(10, 0, 0, 2),
            dst_port: 4789,
            underlay_dev: Some("eth0".into()),
        });
        let msg = tunnel_message(&spec, Some(7));
        let (kind, data) = info(&msg);
        assert_eq!(kind, Some(InfoKind::Vxlan));
        let Some(InfoData::Vxlan(attrs)) = data else {
            panic!("no vxlan data: {msg:?}")
        };
        for want in [
            InfoVxlan::Id(42),
            InfoVxlan::Local(Ipv4Addr::new(10, 0, 0, 1)),
            InfoVxlan::Group(Ipv4Addr::new(10, 0, 0, 2)),
            InfoVxlan::Port(4789),
            InfoVxlan::Link(7),
        ] {
            assert!(attrs.contains(&want), "{want:?} missing from {attrs:?}");
        }
        assert!(msg.buffer_len() > 0);
    }

    /// Split a netlink attribute payload into (type, whole padded NLA).
    fn nlas(mut bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
            let kind = u16::from_ne_bytes([bytes[2], bytes[3]]);
            let padded = len.div_ceil(4) * 4;
            out.push((kind, bytes[..len].to_vec()));
            bytes = &bytes[padded.min(bytes.len())..];
        }
        out
    }

    /// IFLA_INFO_DATA of iproute2 6.1's `ip link add t0 type ipip local
    /// 192.0.2.1 remote 192.0.2.2`, captured with `strace -e trace=sendmsg
    /// -xx` (the request is sent even where the kernel lacks ipip).
    const IPROUTE2_IPIP: &[u8] = b"\x05\x00\x09\x00\x00\x00\x00\x00\x08\x00\x02\x00\xc0\x00\x02\x01\
        \x08\x00\x03\x00\xc0\x00\x02\x02\x05\x00\x0a\x00\x01\x00\x00\x00\x05\x00\x05\x00\x00\x00\x00\x00\
        \x05\x00\x04\x00\x00\x00\x00\x00\x08\x00\x01\x00\x00\x00\x00\x00\x08\x00\x14\x00\x00\x00\x00\x00\
        \x06\x00\x0f\x00\x00\x00\x00\x00\x06\x00\x10\x00\x00\x00\x00\x00\x06\x00\x11\x00\x00\x00\x00\x00\
        \x06\x00\x12\x00\x00\x00\x00\x00";

    /// The same for `ip link add t0 type gre local 192.0.2.1 remote
    /// 192.0.2.2 dev lo` (lo has index 1).
    const IPROUTE2_GRE: &[u8] = b"\x08\x00\x04\x00\x00\x00\x00\x00\x08\x00\x05\x00\x00\x00\x00\x00\
        \x06\x00\x02\x00\x00\x00\x00\x00\x06\x00\x03\x00\x00\x00\x00\x00\x08\x00\x06\x00\xc0\x00\x02\x01\
        \x08\x00\x07\x00\xc0\x00\x02\x02\x05\x00\x0a\x00\x01\x00\x00\x00\x05\x00\x09\x00\x00\x00\x00\x00\
        \x08\x00\x01\x00\x01\x00\x00\x00\x05\x00\x08\x00\x00\x00\x00\x00\x08\x00\x14\x00\x00\x00\x00\x00\
        \x06\x00\x0e\x00\x00\x00\x00\x00\x06\x00\x0f\x00\x00\x00\x00\x00\x06\x00\x10\x00\x00\x00\x00\x00\
        \x06\x00\x11\x00\x00\x00\x00\x00";

    /// Every IPIP/GRE attribute sent here appears, with the same type,
    /// length and value, in iproute2's request for the same tunnel (which
    /// also sends zero-valued defaults: keys, flags, tos, fwmark, encap).
    /// This kernel has neither kind, so this is how the encoding is
    /// checked here; the probe test checks it on kernels that have them.
    #[test]
    fn ip_tunnel_attributes_match_iproute2() {
        let spec = IpTunnelSpec {
            name: "t0".into(),
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(192, 0, 2, 2),
            underlay_dev: Some("lo".into()),
            ttl: 0,
        };
        #[cfg(target_endian = "little")]
        for (kind, index, theirs, name) in [
            (TunnelKind::Ipip, None, IPROUTE2_IPIP, "ipip"),
            (TunnelKind::Gre, Some(1), IPROUTE2_GRE, "gre"),
        ] {
            let spec = match kind {
                TunnelKind::Ipip => TunnelSpec::Ipip(spec.clone()),
                _ => TunnelSpec::Gre(spec.clone()),
            };
            let msg = tunnel_message(&spec, index);
            let (info_kind, data) = info(&msg);
            assert_eq!(info_kind.map(|k| k.to_string()), Some(name.to_owned()));
            let ours = nlas(&emitted(&data.expect("info data")));
            let theirs = nlas(theirs);
            assert_eq!(ours.len(), if index.is_some() { 5 } else { 4 }, "{ours:?}");
            for nla in &ours {
                assert!(
                    theirs.contains(nla),
                    "{name}: {nla:?} not in iproute2's {theirs:?}"
                );
            }
        }
    }
}
