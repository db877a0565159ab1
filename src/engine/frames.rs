//! Frames the gateway writes itself, outside smoltcp: DHCP and RA replies,
//! relayed UDP datagrams and echo replies, and resets for refused SYNs;
//! and the ARP reply that teaches smoltcp the guest's link address.
//!
//! Pure builders on smoltcp's wire types; checksums are always filled in
//! (no checksum offload is negotiated with the guest).
#![forbid(unsafe_code)]

use std::net::IpAddr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet,
    Ipv6Repr, TcpPacket, UdpPacket,
};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const TCP_LEN: usize = 20;
const ICMP_ECHO_LEN: usize = 8;
const ICMPV4_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Who a frame is from and to. `src` and `dst` are the same family.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    /// Ethernet source.
    pub src_mac: EthernetAddress,
    /// Ethernet destination.
    pub dst_mac: EthernetAddress,
    /// IP source.
    pub src: IpAddr,
    /// IP destination.
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub hop_limit: u8,
}

/// Builds Ethernet + IP headers around a `payload_len` payload written by
/// `fill`, which gets the payload bytes; returns the frame.
fn ip_frame(
    ends: &Ends,
    protocol: IpProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip_len = if ends.dst.is_ipv4() {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    let mut frame = vec![0u8; ETH_LEN + ip_len + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    let ethertype = if ends.dst.is_ipv4() {
        EthernetProtocol::Ipv4
    } else {
        EthernetProtocol::Ipv6
    };
    EthernetRepr {
        src_addr: ends.src_mac,
        dst_addr: ends.dst_mac,
        ethertype,
    }
    .emit(&mut eth);
    match (ends.src, ends.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
            Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: protocol,
                payload_len,
                hop_limit: ends.hop_limit,
            }
            .emit(&mut ip, &ChecksumCapabilities::default());
            fill(ip.payload_mut());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = Ipv6Packet::new_unchecked(eth.payload_mut());
            Ipv6Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: protocol,
                payload_len,
                hop_limit: ends.hop_limit,
            }
            .emit(&mut ip);
            fill(ip.payload_mut());
        }
        // Mixed families cannot be built; callers pair addresses from one
        // flow key, so this stays an empty payload rather than a panic.
        _ => {}
    }
    frame
}

/// A UDP datagram whose payload `fill` writes.
pub fn udp_with(
    ends: &Ends,
    src_port: u16,
    dst_port: u16,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    ip_frame(ends, IpProtocol::Udp, UDP_LEN + payload_len, |buf| {
        let mut udp = UdpPacket::new_unchecked(buf);
        udp.set_src_port(src_port);
        udp.set_dst_port(dst_port);
        udp.set_len(u16::try_from(UDP_LEN + payload_len).unwrap_or(u16::MAX));
        fill(udp.payload_mut());
        udp.fill_checksum(&ends.src.into(), &ends.dst.into());
    })
}

/// A UDP datagram carrying `payload`.
pub fn udp(ends: &Ends, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    udp_with(ends, src_port, dst_port, payload.len(), |buf| {
        buf.copy_from_slice(payload);
    })
}

/// An ICMP (v4) or ICMPv6 echo reply.
pub fn echo_reply(ends: &Ends, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let protocol = if ends.dst.is_ipv4() {
        IpProtocol::Icmp
    } else {
        IpProtocol::Icmpv6
    };
    ip_frame(ends, protocol, ICMP_ECHO_LEN + data.len(), |buf| {
        let kind = if ends.dst.is_ipv4() {
            ICMPV4_ECHO_REPLY
        } else {
            ICMPV6_ECHO_REPLY
        };
        let header = [kind, 0, 0, 0];
        buf.get_mut(..4)
            .unwrap_or_default()
            .copy_from_slice(&header);
        buf.get_mut(4..6)
            .unwrap_or_default()
            .copy_from_slice(&ident.to_be_bytes());
        buf.get_mut(6..8)
            .unwrap_or_default()
            .copy_from_slice(&seq.to_be_bytes());
        buf.get_mut(8..).unwrap_or_default().copy_from_slice(data);
        fill_icmp_checksum(ends, buf);
    })
}

/// An ICMPv6 message (checksum field zero) from the gateway, e.g. an RA.
pub fn icmp_v6(ends: &Ends, message: &[u8]) -> Vec<u8> {
    ip_frame(ends, IpProtocol::Icmpv6, message.len(), |buf| {
        buf.copy_from_slice(message);
        fill_icmp_checksum(ends, buf);
    })
}

fn fill_icmp_checksum(ends: &Ends, buf: &mut [u8]) {
    match (ends.src, ends.dst) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            Icmpv6Packet::new_unchecked(buf).fill_checksum(&src, &dst);
        }
        _ => Icmpv4Packet::new_unchecked(buf).fill_checksum(),
    }
}

/// A RST|ACK answering a SYN with sequence number `syn_seq` (RFC 9293
/// 3.10.7.1: a closed port answers SEG.ACK = SEG.SEQ + SEG.LEN).
pub fn tcp_reset_for_syn(ends: &Ends, src_port: u16, dst_port: u16, syn_seq: u32) -> Vec<u8> {
    ip_frame(ends, IpProtocol::Tcp, TCP_LEN, |buf| {
        let mut tcp = TcpPacket::new_unchecked(buf);
        tcp.set_src_port(src_port);
        tcp.set_dst_port(dst_port);
        tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(0));
        tcp.set_ack_number(smoltcp::wire::TcpSeqNumber(i32::from_ne_bytes(
            syn_seq.wrapping_add(1).to_ne_bytes(),
        )));
        tcp.set_header_len(u8::try_from(TCP_LEN).unwrap_or(20));
        tcp.clear_flags();
        tcp.set_rst(true);
        tcp.set_ack(true);
        tcp.set_window_len(0);
        tcp.fill_checksum(&ends.src.into(), &ends.dst.into());
    })
}

/// An ARP reply as if from the guest (`guest` at `guest_mac`) to the
/// gateway, for smoltcp's neighbor cache (see `Gateway::teach`).
pub fn arp_learned(
    guest: std::net::Ipv4Addr,
    guest_mac: EthernetAddress,
    gateway: std::net::Ipv4Addr,
    gateway_mac: EthernetAddress,
) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: guest_mac,
        source_protocol_addr: guest,
        target_hardware_addr: gateway_mac,
        target_protocol_addr: gateway,
    };
    let eth = EthernetRepr {
        src_addr: guest_mac,
        dst_addr: gateway_mac,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut out = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut out);
    arp.emit(&mut ArpPacket::new_unchecked(out.payload_mut()));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Icmpv4Repr, TcpRepr};

    const GUEST: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 1, 2, 3]);
    const GW: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);

    fn ends(src: &str, dst: &str) -> Ends {
        Ends {
            src_mac: GW,
            dst_mac: GUEST,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            hop_limit: 64,
        }
    }

    fn payload_of(frame: &[u8]) -> (IpAddr, IpAddr, Vec<u8>) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        if eth.ethertype() == EthernetProtocol::Ipv4 {
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum());
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.payload().to_vec(),
            )
        } else {
            let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.payload().to_vec(),
            )
        }
    }

    #[test]
    fn udp_both_families_with_valid_checksums() {
        for (s, d) in [("192.0.2.1", "198.19.0.2"), ("2001:db8::1", "fd00::2")] {
            let f = udp(&ends(s, d), 7, 5353, b"hello");
            let (src, dst, body) = payload_of(&f);
            let u = UdpPacket::new_checked(&body[..]).unwrap();
            assert!(u.verify_checksum(&src.into(), &dst.into()));
            assert_eq!(
                (u.src_port(), u.dst_port(), u.payload()),
                (7, 5353, &b"hello"[..])
            );
        }
    }

    #[test]
    fn echo_reply_both_families() {
        let f = echo_reply(&ends("192.0.2.1", "198.19.0.2"), 0x1234, 7, b"abc");
        let (_, _, body) = payload_of(&f);
        let p = Icmpv4Packet::new_checked(&body[..]).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).unwrap(),
            Icmpv4Repr::EchoReply {
                ident: 0x1234,
                seq_no: 7,
                data: b"abc"
            }
        );
        let e = ends("2001:db8::1", "fd00::2");
        let f = echo_reply(&e, 1, 2, b"xy");
        let (src, dst, body) = payload_of(&f);
        let p = Icmpv6Packet::new_checked(&body[..]).unwrap();
        let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
            panic!()
        };
        assert!(p.verify_checksum(&s, &d));
        assert_eq!(body[0], 129);
    }

    #[test]
    fn reset_acknowledges_the_syn() {
        for (s, d) in [("192.0.2.1", "198.19.0.2"), ("2001:db8::1", "fd00::2")] {
            let f = tcp_reset_for_syn(&ends(s, d), 80, 40000, u32::MAX);
            let (src, dst, body) = payload_of(&f);
            let p = TcpPacket::new_checked(&body[..]).unwrap();
            let r = TcpRepr::parse(
                &p,
                &src.into(),
                &dst.into(),
                &ChecksumCapabilities::default(),
            )
            .unwrap();
            assert_eq!(r.control, smoltcp::wire::TcpControl::Rst);
            assert_eq!(r.ack_number, Some(smoltcp::wire::TcpSeqNumber(0)));
            assert_eq!((r.src_port, r.dst_port), (80, 40000));
        }
    }

    #[test]
    fn arp_learned_is_a_reply_from_the_guest_to_the_gateway() {
        let guest = std::net::Ipv4Addr::new(198, 19, 0, 2);
        let gateway = std::net::Ipv4Addr::new(198, 19, 0, 1);
        let guest_mac = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let gateway_mac = EthernetAddress([2, 0x76, 0x67, 0, 0, 1]);
        let frame = arp_learned(guest, guest_mac, gateway, gateway_mac);
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.src_addr(), guest_mac);
        assert_eq!(eth.dst_addr(), gateway_mac);
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: guest_mac,
                source_protocol_addr: guest,
                target_hardware_addr: gateway_mac,
                target_protocol_addr: gateway,
            }
        );
    }
}
