//! Parsing a guest frame just far enough to route it to a gateway service,
//! and building the frames those services send back.
//!
//! Runs on the engine thread, on the daemon's own copy of a frame. Every
//! accessor is a smoltcp `new_checked` view, so lengths are checked before any
//! field is read; nothing here panics on guest data.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, UdpPacket, UdpRepr,
};

/// What a frame is, as far as the gateway's own services care.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A UDP datagram to port 67: for the DHCP server.
    Dhcp {
        /// The BOOTP/DHCP payload.
        payload: &'a [u8],
    },
    /// An ICMPv6 Router Solicitation that passed RFC 4861 6.1.1 checks.
    RouterSolicit,
    /// Anything else: for the IP stack.
    Other,
}

/// DHCP server port (RFC 2131 4.1).
pub const DHCP_SERVER_PORT: u16 = 67;
/// DHCP client port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// ICMPv6 type of a Router Solicitation (RFC 4861 4.1).
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
/// Neighbor Discovery messages must arrive with this hop limit (RFC 4861 6.1.1).
const NDP_HOP_LIMIT: u8 = 255;

/// Sorts a guest frame. Malformed frames are `Other`: smoltcp then drops them
/// and counts nothing twice.
pub fn classify(frame: &[u8]) -> Kind<'_> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Kind::Other;
    };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => classify_v4(eth.payload()),
        EthernetProtocol::Ipv6 => classify_v6(eth.payload()),
        _ => Kind::Other,
    }
}

fn classify_v4(packet: &[u8]) -> Kind<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Kind::Other;
    };
    if ip.next_header() != IpProtocol::Udp || !ip.verify_checksum() || ip.more_frags() {
        return Kind::Other;
    }
    let header_len = usize::from(ip.header_len());
    let total_len = usize::from(ip.total_len());
    let Some(udp_bytes) = packet.get(header_len..total_len) else {
        return Kind::Other;
    };
    let Ok(udp) = UdpPacket::new_checked(udp_bytes) else {
        return Kind::Other;
    };
    if udp.dst_port() != DHCP_SERVER_PORT {
        return Kind::Other;
    }
    let udp_len = usize::from(udp.len());
    match udp_bytes.get(8..udp_len) {
        Some(payload) => Kind::Dhcp { payload },
        None => Kind::Other,
    }
}

fn classify_v6(packet: &[u8]) -> Kind<'_> {
    let Ok(ip) = Ipv6Packet::new_checked(packet) else {
        return Kind::Other;
    };
    if ip.next_header() != IpProtocol::Icmpv6 || ip.hop_limit() != NDP_HOP_LIMIT {
        return Kind::Other;
    }
    let payload = ip.payload();
    match payload {
        [ICMPV6_ROUTER_SOLICIT, 0, ..] if payload.len() >= 8 => {
            let Ok(icmp) = smoltcp::wire::Icmpv6Packet::new_checked(payload) else {
                return Kind::Other;
            };
            if icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()) {
                Kind::RouterSolicit
            } else {
                Kind::Other
            }
        }
        _ => Kind::Other,
    }
}

/// Endpoints of a UDP/IPv4 frame.
pub struct UdpV4 {
    /// Ethernet source.
    pub src_mac: EthernetAddress,
    /// Ethernet destination.
    pub dst_mac: EthernetAddress,
    /// IP source.
    pub src_ip: Ipv4Addr,
    /// IP destination.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
}

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;

/// Builds an Ethernet/IPv4/UDP frame whose payload `fill` writes; the payload
/// is `payload_len` bytes. Checksums are filled in.
pub fn udp_v4(ends: &UdpV4, payload_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut frame = vec![0u8; ETH_LEN + IPV4_LEN + UDP_LEN + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: ends.src_mac,
        dst_addr: ends.dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let caps = ChecksumCapabilities::default();
    let ip_repr = Ipv4Repr {
        src_addr: ends.src_ip,
        dst_addr: ends.dst_ip,
        next_header: IpProtocol::Udp,
        payload_len: UDP_LEN + payload_len,
        hop_limit: 64,
    };
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip_repr.emit(&mut ip, &caps);
    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    UdpRepr {
        src_port: ends.src_port,
        dst_port: ends.dst_port,
    }
    .emit(
        &mut udp,
        &ends.src_ip.into(),
        &ends.dst_ip.into(),
        payload_len,
        fill,
        &caps,
    );
    frame
}

/// Builds an Ethernet/IPv6/ICMPv6 frame around an ICMPv6 message whose
/// checksum field is zero; fills in the checksum.
pub fn icmp_v6(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src_ip: Ipv6Addr,
    dst_ip: Ipv6Addr,
    hop_limit: u8,
    message: &[u8],
) -> Vec<u8> {
    let mut frame = vec![0u8; ETH_LEN + IPV6_LEN + message.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv6,
    }
    .emit(&mut eth);
    let mut ip = Ipv6Packet::new_unchecked(eth.payload_mut());
    smoltcp::wire::Ipv6Repr {
        src_addr: src_ip,
        dst_addr: dst_ip,
        next_header: IpProtocol::Icmpv6,
        payload_len: message.len(),
        hop_limit,
    }
    .emit(&mut ip);
    let payload = ip.payload_mut();
    payload.copy_from_slice(message);
    let mut icmp = smoltcp::wire::Icmpv6Packet::new_unchecked(payload);
    icmp.fill_checksum(&src_ip, &dst_ip);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 1, 2, 3]);
    const GW: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);

    fn dhcp_like(dst_port: u16) -> Vec<u8> {
        udp_v4(
            &UdpV4 {
                src_mac: GUEST,
                dst_mac: EthernetAddress::BROADCAST,
                src_ip: Ipv4Addr::UNSPECIFIED,
                dst_ip: Ipv4Addr::BROADCAST,
                src_port: 68,
                dst_port,
            },
            4,
            |p| p.copy_from_slice(b"abcd"),
        )
    }

    #[test]
    fn classify_table() {
        let dhcp = dhcp_like(67);
        assert_eq!(classify(&dhcp), Kind::Dhcp { payload: b"abcd" });
        assert_eq!(classify(&dhcp_like(53)), Kind::Other);
        // Every truncation of a DHCP frame is Other, never a panic.
        for cut in 0..dhcp.len() {
            assert_eq!(classify(&dhcp[..cut]), Kind::Other, "cut at {cut}");
        }
        // A corrupted IPv4 header checksum is not handed to the DHCP server.
        let mut bad = dhcp.clone();
        bad[ETH_LEN + 10] ^= 0xff;
        assert_eq!(classify(&bad), Kind::Other);

        let rs = icmp_v6(
            GUEST,
            GW,
            "fe80::1234".parse().unwrap(),
            "ff02::2".parse().unwrap(),
            255,
            &[133, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(classify(&rs), Kind::RouterSolicit);
        let low_hop = icmp_v6(
            GUEST,
            GW,
            "fe80::1234".parse().unwrap(),
            "ff02::2".parse().unwrap(),
            64,
            &[133, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(classify(&low_hop), Kind::Other);
        let mut bad_sum = rs.clone();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 1;
        assert_eq!(classify(&bad_sum), Kind::Other);
        for cut in 0..rs.len() {
            assert_eq!(classify(&rs[..cut]), Kind::Other, "cut at {cut}");
        }
        assert_eq!(classify(&[]), Kind::Other);
    }
}
