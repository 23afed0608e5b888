//! Gratuitous ARP with pnet: announce "IP is at MAC" on a link, so that
//! neighbours on the same link update their ARP caches at once (RFC 5227
//! section 3 "ARP announcement", RFC 5944 section 4.6) instead of sending to
//! the old MAC until their entry times out.
//!
//! Two frames are broadcast: an ARP request and an ARP reply, both with
//! sender and target protocol address `ip` (and for the reply, sender and
//! target hardware address `mac`): Linux treats either as gratuitous and
//! overrides an existing entry for `ip` even within its lock time; other
//! stacks honour one or the other. Linux does not *create* entries from
//! gratuitous ARP unless `arp_accept` is set: hosts that never talked to
//! `ip` have nothing to update.
//!
//! The AF_PACKET socket is opened by a thread that has entered the named
//! namespace ([`crate::run_in_netns`]), so it sends on that namespace's link.

use std::io;
use std::net::Ipv4Addr;

use pnet_datalink::{Channel, Config, MacAddr, NetworkInterface};
use pnet_packet::arp::{ArpHardwareTypes, ArpOperation, ArpOperations, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet_packet::MutablePacket;

use crate::error::NetError;
use crate::names::validate_ifname;
use crate::netns::run_in_netns;
use crate::Ns;

/// Length of the frames sent: the Ethernet minimum without FCS (42 bytes
/// of header and ARP, zero padding).
pub const ARP_FRAME_LEN: usize = 60;

/// Which ARP operation a gratuitous frame uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GarpKind {
    /// An ARP request for `ip` from `ip`.
    Request,
    /// An unsolicited ARP reply `ip` is at `mac`.
    Reply,
}

/// The broadcast Ethernet frame of a gratuitous ARP announcing that `ip`
/// is at `mac` (also the frame's source address).
pub fn gratuitous_arp_frame(kind: GarpKind, mac: [u8; 6], ip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut frame = [0_u8; ARP_FRAME_LEN];
    let mac_addr = MacAddr::from(mac);
    if let Some(mut eth) = MutableEthernetPacket::new(&mut frame) {
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(mac_addr);
        eth.set_ethertype(EtherTypes::Arp);
        if let Some(mut arp) = MutableArpPacket::new(eth.payload_mut()) {
            let (op, target_mac): (ArpOperation, MacAddr) = match kind {
                GarpKind::Request => (ArpOperations::Request, MacAddr::zero()),
                GarpKind::Reply => (ArpOperations::Reply, mac_addr),
            };
            arp.set_hardware_type(ArpHardwareTypes::Ethernet);
            arp.set_protocol_type(EtherTypes::Ipv4);
            arp.set_hw_addr_len(6);
            arp.set_proto_addr_len(4);
            arp.set_operation(op);
            arp.set_sender_hw_addr(mac_addr);
            arp.set_sender_proto_addr(ip);
            arp.set_target_hw_addr(target_mac);
            arp.set_target_proto_addr(ip);
        }
    }
    frame
}

/// Send the gratuitous ARP frames on `link` from the calling thread's
/// namespace.
fn send_here(link: &str, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> io::Result<()> {
    let interface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == link)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link named {link}")))?;
    let mac = match mac.or_else(|| interface.mac.map(<[u8; 6]>::from)) {
        Some(mac) => mac,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("link {link} has no MAC address and none was given"),
            ))
        }
    };
    send_frames(&interface, mac, ip)
}

fn send_frames(interface: &NetworkInterface, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    // Send only: no promiscuous mode (pnet's default turns it on).
    let config = Config {
        read_timeout: Some(std::time::Duration::from_millis(10)),
        promiscuous: false,
        ..Config::default()
    };
    let mut tx = match pnet_datalink::channel(interface, config)? {
        Channel::Ethernet(tx, _rx) => tx,
        _ => return Err(io::Error::other("pnet opened a non-Ethernet channel")),
    };
    for kind in [GarpKind::Request, GarpKind::Reply] {
        let frame = gratuitous_arp_frame(kind, mac, ip);
        tx.send_to(&frame, None)
            .unwrap_or_else(|| Err(io::Error::other("pnet: no send result")))?;
    }
    Ok(())
}

/// Announce that `ip` is at `mac` (the link's own MAC when `None`) on link
/// `link` in `ns`, with a gratuitous ARP request and reply (module docs).
/// Blocking but quick; needs `CAP_NET_RAW`.
pub fn send_gratuitous_arp(
    ns: Ns<'_>,
    link: &str,
    ip: Ipv4Addr,
    mac: Option<[u8; 6]>,
) -> Result<(), NetError> {
    validate_ifname(link)?;
    let result = match ns {
        Ns::Root => send_here(link, ip, mac),
        Ns::Named(name) => run_in_netns(name, || send_here(link, ip, mac))?,
    };
    result.map_err(|source| NetError::SendArp {
        link: link.to_owned(),
        ip,
        ns: ns.into(),
        source,
    })?;
    tracing::debug!(link, %ip, ?ns, "sent gratuitous ARP");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_well_formed() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let ip = Ipv4Addr::new(10, 77, 0, 5);
        let req = gratuitous_arp_frame(GarpKind::Request, mac, ip);
        let expected_req: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55, // source
            0x08, 0x06, // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4, // Ethernet, IPv4
            0x00, 0x01, // request
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 10, 77, 0, 5, // sender
            0, 0, 0, 0, 0, 0, 10, 77, 0, 5, // target
        ];
        assert_eq!(req[..42], expected_req);
        assert!(req[42..].iter().all(|&b| b == 0));

        let reply = gratuitous_arp_frame(GarpKind::Reply, mac, ip);
        assert_eq!(reply[20..22], [0x00, 0x02]);
        assert_eq!(reply[32..38], mac, "target MAC = sender MAC for a reply");
        assert_eq!(reply[38..42], [10, 77, 0, 5]);
    }
}
