//! Pre-classification of guest frames: which part of the gateway owns each.
//!
//! Runs on the engine thread over the daemon's own copy of a frame. smoltcp
//! runs with `any_ip` so it can terminate TCP for any destination, and with
//! that on it would answer ARP, Neighbor Solicitations and pings for every
//! address; so those are filtered here to the gateway's own addresses, UDP and
//! foreign pings never reach smoltcp, and new TCP connections are held until
//! the host side has connected. Every view is a smoltcp `new_checked` wrapper:
//! lengths are checked before fields are read and nothing here panics.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::wellknown::DHCP_SERVER_PORT;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Icmpv4Packet, Icmpv6Packet,
    IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

const ICMPV4_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
/// Neighbor Discovery messages must arrive with this hop limit (RFC 4861 6.1.1).
const NDP_HOP_LIMIT: u8 = 255;

/// The gateway's own addresses.
#[derive(Debug, Clone, Copy)]
pub struct Own {
    /// IPv4 gateway address.
    pub v4: Ipv4Addr,
    /// IPv6 gateway and link-local addresses, when IPv6 is on.
    pub v6: Option<(Ipv6Addr, Ipv6Addr)>,
}

impl Own {
    /// Whether `addr` is one of the gateway's addresses.
    pub fn is_own(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => a == self.v4,
            IpAddr::V6(a) => self.v6.is_some_and(|(g, ll)| a == g || a == ll),
        }
    }
}

/// An ICMP echo request from the guest.
#[derive(Debug, PartialEq, Eq)]
pub struct Echo<'a> {
    /// Guest address.
    pub src: IpAddr,
    /// Destination.
    pub dst: IpAddr,
    /// The guest's identifier.
    pub ident: u16,
    /// Sequence number.
    pub seq: u16,
    /// Payload.
    pub data: &'a [u8],
}

/// What a frame is and who takes it.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// UDP to port 67: the DHCP server.
    Dhcp {
        /// BOOTP payload.
        payload: &'a [u8],
    },
    /// A valid Router Solicitation: the advertiser.
    RouterSolicit,
    /// A valid Neighbor Solicitation for one of the gateway's addresses:
    /// answered as a router (`ndp::neighbor_advert`).
    NeighborSolicit {
        /// Who asks (unspecified for duplicate address detection).
        src: Ipv6Addr,
        /// The gateway address asked for.
        target: Ipv6Addr,
    },
    /// ARP or Neighbor Solicitation for an address that is not the
    /// gateway's: nobody answers (the guest must see no such neighbor).
    NotOurs,
    /// A TCP SYN (no ACK) with a valid checksum: a new flow, held.
    TcpSyn {
        /// Guest endpoint.
        src: SocketAddr,
        /// Destination endpoint.
        dst: SocketAddr,
        /// The SYN's sequence number, for a RST that acknowledges it.
        seq: u32,
    },
    /// A UDP datagram (not DHCP): the relay.
    Udp {
        /// Guest endpoint.
        src: SocketAddr,
        /// Destination endpoint.
        dst: SocketAddr,
        /// Payload.
        payload: &'a [u8],
    },
    /// An echo request to an address that is not the gateway's: the relay.
    Echo(Echo<'a>),
    /// An IPv4 fragment that reassembly (`reasm`, which runs first and
    /// takes UDP and ICMP) left: TCP, whose guests set DF. Dropped.
    Fragment,
    /// Everything else: smoltcp (ARP and NDP for us, pings to us, TCP
    /// segments of known flows, and what it drops or resets).
    Stack,
}

/// Sorts one guest frame.
pub fn classify<'a>(frame: &'a [u8], own: &Own) -> Kind<'a> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Kind::Stack;
    };
    let payload = frame
        .get(EthernetFrame::<&[u8]>::header_len()..)
        .unwrap_or_default();
    match eth.ethertype() {
        EthernetProtocol::Arp => arp(payload, own),
        EthernetProtocol::Ipv4 => ipv4(payload, own),
        EthernetProtocol::Ipv6 => ipv6(payload, own),
        _ => Kind::Stack,
    }
}

fn arp<'a>(packet: &[u8], own: &Own) -> Kind<'a> {
    let Ok(arp) = ArpPacket::new_checked(packet) else {
        return Kind::Stack;
    };
    match ArpRepr::parse(&arp) {
        Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            target_protocol_addr,
            ..
        }) if target_protocol_addr != own.v4 => Kind::NotOurs,
        _ => Kind::Stack,
    }
}

fn ipv4<'a>(packet: &'a [u8], own: &Own) -> Kind<'a> {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Kind::Stack;
    };
    if !ip.verify_checksum() {
        return Kind::Stack;
    }
    let header_len = usize::from(ip.header_len());
    let total_len = usize::from(ip.total_len());
    let Some(body) = packet.get(header_len..total_len) else {
        return Kind::Stack;
    };
    let src = IpAddr::V4(ip.src_addr());
    let dst = IpAddr::V4(ip.dst_addr());
    let fragment = ip.more_frags() || ip.frag_offset() != 0;
    match ip.next_header() {
        _ if fragment => Kind::Fragment,
        IpProtocol::Udp => udp(body, src, dst),
        IpProtocol::Tcp => tcp(body, src, dst),
        IpProtocol::Icmp => {
            let Ok(icmp) = Icmpv4Packet::new_checked(body) else {
                return Kind::Stack;
            };
            if icmp.msg_type() != smoltcp::wire::Icmpv4Message::EchoRequest
                || !icmp.verify_checksum()
            {
                return Kind::Stack;
            }
            echo(body, ICMPV4_ECHO_REQUEST, src, dst, own)
        }
        _ => Kind::Stack,
    }
}

fn ipv6<'a>(packet: &'a [u8], own: &Own) -> Kind<'a> {
    let Ok(ip) = Ipv6Packet::new_checked(packet) else {
        return Kind::Stack;
    };
    let src = IpAddr::V6(ip.src_addr());
    let dst = IpAddr::V6(ip.dst_addr());
    let Some(body) = packet.get(40..40 + usize::from(ip.payload_len())) else {
        return Kind::Stack;
    };
    match ip.next_header() {
        IpProtocol::Udp => udp(body, src, dst),
        IpProtocol::Tcp => tcp(body, src, dst),
        IpProtocol::Icmpv6 => {
            let Ok(icmp) = Icmpv6Packet::new_checked(body) else {
                return Kind::Stack;
            };
            if !icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()) {
                return Kind::Stack;
            }
            match body.first().copied() {
                Some(ICMPV6_ROUTER_SOLICIT) if ip.hop_limit() == NDP_HOP_LIMIT => {
                    Kind::RouterSolicit
                }
                Some(ICMPV6_NEIGHBOR_SOLICIT) => {
                    // Target address at offset 8 (RFC 4861 4.3).
                    let target = body
                        .get(8..24)
                        .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        .map(Ipv6Addr::from);
                    match target {
                        // RFC 4861 7.1.1: hop limit 255, code 0.
                        Some(t)
                            if own.is_own(IpAddr::V6(t))
                                && ip.hop_limit() == NDP_HOP_LIMIT
                                && body.get(1) == Some(&0) =>
                        {
                            Kind::NeighborSolicit {
                                src: ip.src_addr(),
                                target: t,
                            }
                        }
                        Some(t) if own.is_own(IpAddr::V6(t)) => Kind::NotOurs,
                        _ => Kind::NotOurs,
                    }
                }
                Some(ICMPV6_ECHO_REQUEST) => echo(body, ICMPV6_ECHO_REQUEST, src, dst, own),
                _ => Kind::Stack,
            }
        }
        _ => Kind::Stack,
    }
}

fn echo<'a>(body: &'a [u8], request: u8, src: IpAddr, dst: IpAddr, own: &Own) -> Kind<'a> {
    if own.is_own(dst) {
        return Kind::Stack;
    }
    match body {
        [kind, 0, _, _, i0, i1, s0, s1, data @ ..] if *kind == request => Kind::Echo(Echo {
            src,
            dst,
            ident: u16::from_be_bytes([*i0, *i1]),
            seq: u16::from_be_bytes([*s0, *s1]),
            data,
        }),
        _ => Kind::Stack,
    }
}

fn udp(body: &[u8], src: IpAddr, dst: IpAddr) -> Kind<'_> {
    let Ok(udp) = UdpPacket::new_checked(body) else {
        return Kind::Stack;
    };
    if !udp.verify_checksum(&src.into(), &dst.into()) {
        return Kind::Stack;
    }
    let Some(payload) = body.get(8..usize::from(udp.len())) else {
        return Kind::Stack;
    };
    if udp.dst_port() == DHCP_SERVER_PORT {
        return Kind::Dhcp { payload };
    }
    Kind::Udp {
        src: SocketAddr::new(src, udp.src_port()),
        dst: SocketAddr::new(dst, udp.dst_port()),
        payload,
    }
}

fn tcp(body: &[u8], src: IpAddr, dst: IpAddr) -> Kind<'_> {
    let Ok(tcp) = TcpPacket::new_checked(body) else {
        return Kind::Stack;
    };
    if tcp.syn() && !tcp.ack() && !tcp.rst() && tcp.verify_checksum(&src.into(), &dst.into()) {
        Kind::TcpSyn {
            src: SocketAddr::new(src, tcp.src_port()),
            dst: SocketAddr::new(dst, tcp.dst_port()),
            seq: u32::from_ne_bytes(tcp.seq_number().0.to_ne_bytes()),
        }
    } else {
        Kind::Stack
    }
}

/// Classified frames for the dispatch steps' table tests.
#[cfg(test)]
pub mod sample {
    use super::{Echo, Kind};

    const GUEST: &str = "198.19.0.2:40000";

    /// A SYN from the guest to `dst`.
    pub fn syn(dst: &str) -> Kind<'static> {
        Kind::TcpSyn {
            src: GUEST.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq: 1,
        }
    }

    /// A datagram from the guest to `dst`.
    pub fn udp(dst: &str) -> Kind<'static> {
        Kind::Udp {
            src: GUEST.parse().unwrap(),
            dst: dst.parse().unwrap(),
            payload: b"x",
        }
    }

    /// An echo request from the guest to `dst`.
    pub fn echo(dst: &str) -> Kind<'static> {
        Kind::Echo(Echo {
            src: "198.19.0.2".parse().unwrap(),
            dst: dst.parse().unwrap(),
            ident: 1,
            seq: 1,
            data: b"",
        })
    }
}

#[cfg(test)]
mod tests;
