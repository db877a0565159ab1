//! Segmentation offload headers both ways: every header field a guest
//! controls, bent one at a time and all at once, against frames built with
//! smoltcp's wire types.

use super::offload::{self, GSO_ECN, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, MAX_GSO_FRAME};
use super::*;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet,
    Ipv6Packet, TcpPacket,
};

const TSO: Layout = Layout {
    hdr_len: NET_HDR_LEN,
    mergeable: true,
    guest_csum: true,
    guest_tso4: true,
    host_tso4: true,
    host_tso6: true,
    host_ecn: true,
};
const PAYLOAD: usize = 20_000;
const MSS: u16 = 1448;

fn addrs(v6: bool) -> (IpAddress, IpAddress) {
    if v6 {
        (
            IpAddress::v6(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 2),
            IpAddress::v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        )
    } else {
        (IpAddress::v4(198, 19, 0, 2), IpAddress::v4(192, 0, 2, 1))
    }
}

/// A TCP segment of `payload` bytes with a full, valid checksum.
fn segment(v6: bool, payload: usize) -> Vec<u8> {
    let ip_len = if v6 { 40 } else { 20 };
    let mut f = vec![0u8; 14 + ip_len + 20 + payload];
    let (src, dst) = addrs(v6);
    {
        let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
        eth.set_src_addr(EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        eth.set_dst_addr(EthernetAddress([2, 0x76, 0x67, 0, 0, 1]));
        eth.set_ethertype(if v6 {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        });
    }
    let tcp_at = 14 + ip_len;
    if v6 {
        let mut ip = Ipv6Packet::new_unchecked(&mut f[14..]);
        ip.set_version(6);
        ip.set_payload_len(u16::try_from(20 + payload).unwrap());
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_hop_limit(64);
        let (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) = (src, dst) else {
            unreachable!()
        };
        ip.set_src_addr(s);
        ip.set_dst_addr(d);
    } else {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(u16::try_from(20 + 20 + payload).unwrap());
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        let (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) = (src, dst) else {
            unreachable!()
        };
        ip.set_src_addr(s);
        ip.set_dst_addr(d);
        ip.fill_checksum();
    }
    let mut tcp = TcpPacket::new_unchecked(&mut f[tcp_at..]);
    tcp.set_src_port(40_000);
    tcp.set_dst_port(443);
    tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(7));
    tcp.set_ack(true);
    tcp.set_header_len(20);
    tcp.set_window_len(1000);
    for (i, b) in tcp.payload_mut().iter_mut().enumerate() {
        *b = u8::try_from(i % 253).unwrap();
    }
    tcp.fill_checksum(&src, &dst);
    f
}

/// The folded pseudo-header sum (RFC 793, RFC 8200 8.1), not complemented.
fn pseudo_header(src: &IpAddress, dst: &IpAddress, tcp_len: u32) -> u16 {
    let bytes = |a: &IpAddress| match a {
        IpAddress::Ipv4(a) => a.octets().to_vec(),
        IpAddress::Ipv6(a) => a.octets().to_vec(),
    };
    let mut sum: u64 = 6 + u64::from(tcp_len >> 16) + u64::from(tcp_len & 0xffff);
    for pair in [bytes(src), bytes(dst)].concat().chunks(2) {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap()
}

fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    let v6 = eth.ethertype() == EthernetProtocol::Ipv6;
    let (src, dst) = addrs(v6);
    let at = if v6 { 14 + 40 } else { 14 + 20 };
    TcpPacket::new_checked(&frame[at..])
        .unwrap()
        .verify_checksum(&src, &dst)
}

/// What Linux hands over for a segment: the header, and the checksum
/// field holding the pseudo-header sum over the whole TCP length.
fn as_guest_sends(v6: bool, payload: usize) -> Vec<u8> {
    let mut f = segment(v6, payload);
    let at = if v6 { 14 + 40 } else { 14 + 20 };
    let (src, dst) = addrs(v6);
    let tcp_len = u32::try_from(f.len() - at).unwrap();
    let pseudo = pseudo_header(&src, &dst, tcp_len);
    f[at + 16..at + 18].copy_from_slice(&pseudo.to_be_bytes());
    let mut packet = vec![0u8; NET_HDR_LEN];
    packet[0] = HDR_F_NEEDS_CSUM;
    packet[1] = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
    packet[2..4].copy_from_slice(&u16::try_from(at + 20).unwrap().to_le_bytes());
    packet[4..6].copy_from_slice(&MSS.to_le_bytes());
    packet[6..8].copy_from_slice(&u16::try_from(at).unwrap().to_le_bytes());
    packet[8..10].copy_from_slice(&16u16.to_le_bytes());
    packet.extend_from_slice(&f);
    packet
}

/// Completes a partial checksum the way a NIC would: the test's own
/// arithmetic, not the code under test.
fn complete(packet: &mut [u8]) {
    let start = NET_HDR_LEN + usize::from(u16::from_le_bytes([packet[6], packet[7]]));
    let at = start + usize::from(u16::from_le_bytes([packet[8], packet[9]]));
    let mut sum: u64 = 0;
    for pair in packet[start..].chunks(2) {
        sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = !u16::try_from(sum).unwrap();
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn segments_in_both_families_are_taken_whole_and_left_partial() {
    for v6 in [false, true] {
        let sent = as_guest_sends(v6, PAYLOAD);
        let mut packet = sent.clone();
        assert_eq!(
            offload::tx(&mut packet, TSO),
            Ok(offload::TxOffload::Segmented)
        );
        // Nothing reads a data segment's sum: it stays as the guest left
        // it, and that was a correct partial sum.
        assert_eq!(packet, sent, "v6 {v6}");
        complete(&mut packet);
        assert!(tcp_checksum_ok(&packet[NET_HDR_LEN..]), "v6 {v6}");
        assert_eq!(&packet[NET_HDR_LEN..], &segment(v6, PAYLOAD)[..]);
    }
}

/// A SYN's checksum decides whether a flow is held: it is completed.
#[test]
fn a_partial_syn_is_completed() {
    for v6 in [false, true] {
        let mut packet = as_guest_sends(v6, 0);
        packet[1] = 0;
        let at = NET_HDR_LEN + if v6 { 14 + 40 } else { 14 + 20 };
        packet[at + 13] = 0x02;
        let mut want = packet.clone();
        complete(&mut want);
        assert_eq!(offload::tx(&mut packet, TSO), Ok(offload::TxOffload::None));
        assert_eq!(packet, want, "v6 {v6}");
        assert!(tcp_checksum_ok(&packet[NET_HDR_LEN..]), "v6 {v6}");
    }
}

/// Every header a guest could send with an otherwise valid segment: only
/// the negotiated types pass, and nothing with a bent field does.
#[test]
fn every_gso_type_is_refused_unless_negotiated_and_matching() {
    for v6 in [false, true] {
        for gso_type in 0..=u8::MAX {
            let kind = gso_type & !GSO_ECN;
            for layout in [
                TSO,
                Layout {
                    host_ecn: false,
                    ..TSO
                },
                Layout {
                    host_tso4: false,
                    ..TSO
                },
                Layout {
                    host_tso6: false,
                    ..TSO
                },
                Layout::plain(NET_HDR_LEN, true, true),
            ] {
                let mut packet = as_guest_sends(v6, PAYLOAD);
                packet[1] = gso_type;
                let got = offload::tx(&mut packet, layout);
                let family_ok = if v6 {
                    kind == GSO_TCPV6 && layout.host_tso6
                } else {
                    kind == GSO_TCPV4 && layout.host_tso4
                };
                let ecn_ok = gso_type & GSO_ECN == 0 || layout.host_ecn;
                let want = if gso_type == 0 {
                    Ok(offload::TxOffload::None)
                } else if family_ok && ecn_ok {
                    Ok(offload::TxOffload::Segmented)
                } else {
                    Err(Drop::BadOffload)
                };
                assert_eq!(got, want, "v6 {v6} type {gso_type:#x} {layout:?}");
            }
        }
    }
}

#[test]
fn bent_segment_headers_are_refused() {
    type Bend = fn(&mut Vec<u8>);
    let cases: &[(&str, Bend)] = &[
        ("segment size 0", |p| p[4..6].copy_from_slice(&[0, 0])),
        ("no partial checksum", |p| p[0] = 0),
        ("checksum offset of UDP", |p| {
            p[8..10].copy_from_slice(&6u16.to_le_bytes())
        }),
        ("checksum starts early", |p| {
            p[6..8].copy_from_slice(&19u16.to_le_bytes())
        }),
        ("checksum starts late", |p| {
            p[6..8].copy_from_slice(&21u16.to_le_bytes())
        }),
        ("checksum starts at 0", |p| {
            p[6..8].copy_from_slice(&0u16.to_le_bytes())
        }),
        ("checksum past the end", |p| {
            p[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
        }),
        ("UDP inside", |p| p[NET_HDR_LEN + 14 + 9] = 17),
        ("IPv6 type on IPv4", |p| p[1] = GSO_TCPV6),
        ("ARP ethertype", |p| {
            p[NET_HDR_LEN + 12..NET_HDR_LEN + 14].copy_from_slice(&[8, 6])
        }),
        ("VLAN ethertype", |p| {
            p[NET_HDR_LEN + 12..NET_HDR_LEN + 14].copy_from_slice(&[0x81, 0]);
        }),
        ("IP version 6 in an IPv4 frame", |p| {
            p[NET_HDR_LEN + 14] = 0x65
        }),
        ("IP header length 4", |p| p[NET_HDR_LEN + 14] = 0x41),
        ("cut inside the TCP header", |p| {
            p.truncate(NET_HDR_LEN + 14 + 20 + 10)
        }),
        ("cut inside the IP header", |p| {
            p.truncate(NET_HDR_LEN + 14 + 8)
        }),
    ];
    for (what, bend) in cases {
        let mut packet = as_guest_sends(false, PAYLOAD);
        bend(&mut packet);
        assert_eq!(
            offload::tx(&mut packet, TSO),
            Err(Drop::BadOffload),
            "{what}"
        );
    }
    let mut v6 = as_guest_sends(true, PAYLOAD);
    v6[NET_HDR_LEN + 14 + 6] = 0; // a hop-by-hop header first
    assert_eq!(
        offload::tx(&mut v6, TSO),
        Err(Drop::BadOffload),
        "extension header"
    );
    let mut v6 = as_guest_sends(true, PAYLOAD);
    v6[1] = GSO_TCPV4;
    assert_eq!(
        offload::tx(&mut v6, TSO),
        Err(Drop::BadOffload),
        "IPv4 type on IPv6"
    );
}

/// Random bytes in every header field over a valid segment never panic, and
/// whatever is accepted as a segment is a TCP segment of the named family
/// with a checksum that verifies.
#[test]
fn random_headers_never_pass_an_inconsistent_segment() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..20_000 {
        let v6 = i % 2 == 0;
        let mut packet = as_guest_sends(v6, 3000);
        let r = next().to_le_bytes();
        let fields = usize::try_from(next() % 1024).unwrap();
        for (bit, byte) in r.iter().enumerate().take(NET_HDR_LEN - 2) {
            if fields & (1 << bit) != 0 {
                packet[bit] = *byte;
            }
        }
        if let Ok(offload::TxOffload::Segmented) = offload::tx(&mut packet, TSO) {
            let kind = packet[1] & !GSO_ECN;
            assert_eq!(kind, if v6 { GSO_TCPV6 } else { GSO_TCPV4 }, "{packet:?}");
            complete(&mut packet);
            assert!(
                tcp_checksum_ok(&packet[NET_HDR_LEN..]),
                "iteration {i}: {:?}",
                &packet[..NET_HDR_LEN]
            );
        }
    }
}

/// A chain over the MTU is a segment or nothing; segments over 64 KiB are
/// refused whatever their header says.
#[test]
fn frames_over_the_mtu_need_a_valid_segment_header() {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let read = |packet: &[u8], layout: Layout| {
        let q = MockSplitQueue::new(&mem, 16);
        mem.write_slice(packet, GuestAddress(0x10_0000)).unwrap();
        let len = u32::try_from(packet.len()).unwrap();
        let desc = virtio_queue::desc::RawDescriptor::from(
            virtio_queue::desc::split::Descriptor::new(0x10_0000, len, 0, 0),
        );
        let chain = q.build_desc_chain(&[desc]).unwrap();
        let mut buf = Vec::new();
        read_tx_chain(&mem, chain, layout, 1514, &mut buf)
    };
    let segment = as_guest_sends(false, PAYLOAD);
    assert_eq!(
        read(&segment, TSO).map(|r| r.segmented),
        Ok(true),
        "a valid segment"
    );
    let mut plain = segment.clone();
    plain[..10].fill(0);
    assert_eq!(read(&plain, TSO), Err(Drop::TooLong), "no header");
    assert_eq!(
        read(&segment, Layout::plain(NET_HDR_LEN, true, true)),
        Err(Drop::TooLong),
        "not negotiated"
    );
    let mut huge = as_guest_sends(false, 0);
    huge.resize(NET_HDR_LEN + MAX_GSO_FRAME + 1, 0);
    assert_eq!(read(&huge, TSO), Err(Drop::TooLong), "over 64 KiB");
}

/// Our segments for the guest: the header Linux expects, and a checksum
/// field that, completed as the guest's stack would, verifies.
#[test]
fn segments_for_the_guest_carry_a_header_and_a_pseudo_header_sum() {
    let mut frame = segment(false, PAYLOAD);
    let at = 14 + 20;
    frame[at + 16..at + 18].fill(0);
    let mut header = [0xffu8; NET_HDR_LEN];
    assert!(offload::rx_header(TSO, &mut header, &mut frame, Some(MSS)));
    assert_eq!(header[0], HDR_F_NEEDS_CSUM);
    assert_eq!(header[1], GSO_TCPV4);
    assert_eq!(u16::from_le_bytes([header[2], header[3]]), 14 + 20 + 20);
    assert_eq!(u16::from_le_bytes([header[4], header[5]]), MSS);
    assert_eq!(u16::from_le_bytes([header[6], header[7]]), 14 + 20);
    assert_eq!(u16::from_le_bytes([header[8], header[9]]), 16);
    // The guest's side: complete the partial sum as a NIC would.
    let mut packet = header.to_vec();
    packet.extend_from_slice(&frame);
    assert_eq!(
        offload::tx(&mut packet, TSO),
        Ok(offload::TxOffload::Segmented)
    );
    complete(&mut packet);
    assert!(tcp_checksum_ok(&packet[NET_HDR_LEN..]));
    // Only TCP/IPv4 is ever cut by the guest for us.
    for mut other in [segment(true, 100), vec![0u8; 60]] {
        assert!(!offload::rx_header(TSO, &mut header, &mut other, Some(MSS)));
    }
}
