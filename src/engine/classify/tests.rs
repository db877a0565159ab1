//! Classification table over built frames, and truncations of each.

use super::*;
use crate::engine::frames::{self, Ends};
use smoltcp::wire::{ArpHardware, EthernetAddress, EthernetRepr, TcpPacket};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 1, 2, 3]);
const GW_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);

fn own() -> Own {
    Own {
        v4: "198.19.0.1".parse().unwrap(),
        v6: Some(("fd00::1".parse().unwrap(), "fe80::1".parse().unwrap())),
    }
}

fn from_guest(src: &str, dst: &str) -> Ends {
    Ends {
        src_mac: GUEST_MAC,
        dst_mac: GW_MAC,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        hop_limit: 64,
    }
}

fn arp_for(target: &str) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 28];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: "198.19.0.2".parse().unwrap(),
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target.parse().unwrap(),
    }
    .emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
    let _ = ArpHardware::Ethernet;
    frame
}

fn neighbor_solicit(target: &str) -> Vec<u8> {
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target.parse::<Ipv6Addr>().unwrap().octets());
    let mut e = from_guest("fe80::5054:ff:fe01:203", "ff02::1:ff00:1");
    e.hop_limit = 255;
    frames::icmp_v6(&e, &m)
}

fn tcp_segment(src: &str, dst: &str, syn: bool, ack: bool) -> Vec<u8> {
    let mut f = frames::tcp_reset_for_syn(&from_guest(src, dst), 40000, 443, 99);
    let ip_len = if src.contains(':') { 40 } else { 20 };
    let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut tcp = TcpPacket::new_unchecked(&mut f[14 + ip_len..]);
    tcp.clear_flags();
    tcp.set_syn(syn);
    tcp.set_ack(ack);
    tcp.fill_checksum(&s.into(), &d.into());
    f
}

#[test]
fn classification_table() {
    let o = own();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("arp for gateway", arp_for("198.19.0.1"), "Stack"),
        ("arp for another host", arp_for("198.19.0.9"), "NotOurs"),
        ("arp for the guest itself", arp_for("198.19.0.2"), "NotOurs"),
        (
            "ns for gateway",
            neighbor_solicit("fd00::1"),
            "NeighborSolicit",
        ),
        (
            "ns for link-local gateway",
            neighbor_solicit("fe80::1"),
            "NeighborSolicit",
        ),
        (
            "ns for the guest (DAD)",
            neighbor_solicit("fd00::5054:ff:fe01:203"),
            "NotOurs",
        ),
        (
            "echo to gateway",
            frames::echo_reply(&from_guest("198.19.0.2", "198.19.0.1"), 1, 1, b"x"),
            "Stack",
        ),
        (
            "udp dns",
            frames::udp(&from_guest("198.19.0.2", "192.0.2.53"), 5000, 53, b"q"),
            "Udp",
        ),
        (
            "udp v6",
            frames::udp(&from_guest("fd00::2", "2001:db8::1"), 5000, 7, b"q"),
            "Udp",
        ),
        (
            "dhcp",
            frames::udp(&from_guest("0.0.0.0", "255.255.255.255"), 68, 67, b"d"),
            "Dhcp",
        ),
        (
            "syn v4",
            tcp_segment("198.19.0.2", "192.0.2.1", true, false),
            "TcpSyn",
        ),
        (
            "syn v6",
            tcp_segment("fd00::2", "2001:db8::1", true, false),
            "TcpSyn",
        ),
        (
            "ack",
            tcp_segment("198.19.0.2", "192.0.2.1", false, true),
            "Stack",
        ),
        (
            "syn-ack",
            tcp_segment("198.19.0.2", "192.0.2.1", true, true),
            "Stack",
        ),
    ];
    for (name, frame, want) in cases {
        let got = classify(&frame, &o);
        let kind = format!("{got:?}");
        assert!(kind.starts_with(want), "{name}: {kind}");
        // No truncation panics or is mistaken for a service frame.
        for cut in 0..frame.len() {
            let k = classify(&frame[..cut], &o);
            assert!(
                matches!(k, Kind::Stack | Kind::NotOurs),
                "{name} cut at {cut}: {k:?}"
            );
        }
    }
}

#[test]
fn echo_requests_elsewhere_go_to_the_relay() {
    let o = own();
    // An echo *request*: type 8 (v4) / 128 (v6); build from a reply and fix up.
    for (src, dst, kind) in [
        ("198.19.0.2", "192.0.2.7", 8u8),
        ("fd00::2", "2001:db8::7", 128u8),
    ] {
        let e = from_guest(src, dst);
        let mut f = frames::echo_reply(&e, 0x1234, 9, b"ping");
        let ip_len = if src.contains(':') { 40 } else { 20 };
        f[14 + ip_len] = kind;
        f[14 + ip_len + 2] = 0;
        f[14 + ip_len + 3] = 0;
        let body = &mut f[14 + ip_len..];
        match (e.src, e.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                Icmpv6Packet::new_unchecked(body).fill_checksum(&s, &d)
            }
            _ => Icmpv4Packet::new_unchecked(body).fill_checksum(),
        }
        match classify(&f, &o) {
            Kind::Echo(echo) => {
                assert_eq!((echo.ident, echo.seq, echo.data), (0x1234, 9, &b"ping"[..]));
                assert_eq!(echo.dst, e.dst);
            }
            other => panic!("{src}: {other:?}"),
        }
    }
}

#[test]
fn bad_checksums_and_fragments() {
    let o = own();
    let mut syn = tcp_segment("198.19.0.2", "192.0.2.1", true, false);
    let last = syn.len() - 1;
    syn[last] ^= 0xff;
    assert_eq!(classify(&syn, &o), Kind::Stack, "corrupt SYN is not held");
    let mut udp = frames::udp(&from_guest("198.19.0.2", "192.0.2.53"), 5000, 53, b"query");
    let last = udp.len() - 1;
    udp[last] ^= 0xff;
    assert_eq!(
        classify(&udp, &o),
        Kind::Stack,
        "corrupt UDP is not relayed"
    );
    let mut frag = frames::udp(&from_guest("198.19.0.2", "192.0.2.53"), 5000, 53, b"query");
    let mut ip = Ipv4Packet::new_unchecked(&mut frag[14..]);
    ip.set_more_frags(true);
    ip.fill_checksum();
    assert_eq!(classify(&frag, &o), Kind::Fragment);
}
