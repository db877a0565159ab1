//! The DHCP exchanges a guest can start, table-driven, including wrong ones.
#![allow(clippy::type_complexity)]

use super::*;
use smoltcp::wire::{EthernetFrame, Ipv4Packet, UdpPacket};

const CLIENT: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
const OTHER: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x11, 0x22, 0x33]);

fn net() -> Network {
    Network {
        domain_search: vec!["sandbox.test".into()],
        ..Network::default()
    }
}

fn request(
    kind: DhcpMessageType,
    client: EthernetAddress,
    ciaddr: Ipv4Addr,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: kind,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: client,
        client_ip: ciaddr,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: requested,
        client_identifier: None,
        server_identifier: server,
        parameter_request_list: Some(&[1, 3, 6, 26, 119]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
        .unwrap();
    buf
}

/// Parses a reply frame down to the DHCP message; returns (dst ip, repr type,
/// yiaddr, raw payload).
fn parse_reply(frame: &[u8]) -> (Ipv4Addr, DhcpMessageType, Ipv4Addr, Vec<u8>) {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
    let payload = udp.payload().to_vec();
    let packet = DhcpPacket::new_checked(&payload[..]).unwrap();
    let repr = DhcpRepr::parse(&packet).unwrap();
    (ip.dst_addr(), repr.message_type, repr.your_ip, payload)
}

fn reply(outcome: Outcome) -> Vec<u8> {
    match outcome {
        Outcome::Reply(f) => f,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn discover_offer_request_ack_with_all_options() {
    let n = net();
    let mut s = Server::new(&n);
    let now = Instant::now();
    let offer = reply(s.handle(
        &request(
            DhcpMessageType::Discover,
            CLIENT,
            Ipv4Addr::UNSPECIFIED,
            None,
            None,
        ),
        now,
    ));
    let (dst, kind, yiaddr, _) = parse_reply(&offer);
    assert_eq!(
        (kind, yiaddr, dst),
        (DhcpMessageType::Offer, n.ipv4_guest, n.ipv4_guest)
    );
    assert_eq!(s.leased_to(now), None, "an offer is not a lease");

    let ack = reply(s.handle(
        &request(
            DhcpMessageType::Request,
            CLIENT,
            Ipv4Addr::UNSPECIFIED,
            Some(n.ipv4_guest),
            Some(n.ipv4_gateway),
        ),
        now,
    ));
    let (_, kind, yiaddr, payload) = parse_reply(&ack);
    assert_eq!((kind, yiaddr), (DhcpMessageType::Ack, n.ipv4_guest));
    let packet = DhcpPacket::new_checked(&payload[..]).unwrap();
    let repr = DhcpRepr::parse(&packet).unwrap();
    assert_eq!(repr.router, Some(n.ipv4_gateway));
    assert_eq!(repr.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
    assert_eq!(repr.lease_duration, Some(3600));
    assert_eq!(repr.server_identifier, Some(n.ipv4_gateway));
    assert_eq!(repr.dns_servers.unwrap().as_slice(), &[n.ipv4_gateway]);
    let opts: Vec<(u8, Vec<u8>)> = packet
        .options()
        .map(|o| (o.kind, o.data.to_vec()))
        .collect();
    assert!(
        opts.contains(&(26, n.mtu.to_be_bytes().to_vec())),
        "{opts:?}"
    );
    assert!(
        opts.iter()
            .any(|(k, d)| *k == 119 && d.starts_with(&[7, b's']))
    );
    assert_eq!(s.leased_to(now), Some(CLIENT));
}

#[test]
fn request_table() {
    let n = net();
    let guest = n.ipv4_guest;
    let gw = n.ipv4_gateway;
    let wrong = Ipv4Addr::new(198, 19, 0, 77);
    let none = Ipv4Addr::UNSPECIFIED;
    // (name, ciaddr, requested, server id, expected)
    let cases: &[(
        &str,
        Ipv4Addr,
        Option<Ipv4Addr>,
        Option<Ipv4Addr>,
        Option<DhcpMessageType>,
    )] = &[
        (
            "selecting ours",
            none,
            Some(guest),
            Some(gw),
            Some(DhcpMessageType::Ack),
        ),
        (
            "selecting other server",
            none,
            Some(guest),
            Some(wrong),
            None,
        ),
        (
            "selecting wrong address",
            none,
            Some(wrong),
            Some(gw),
            Some(DhcpMessageType::Nak),
        ),
        (
            "init-reboot right",
            none,
            Some(guest),
            None,
            Some(DhcpMessageType::Ack),
        ),
        (
            "init-reboot wrong",
            none,
            Some(wrong),
            None,
            Some(DhcpMessageType::Nak),
        ),
        (
            "renewing right",
            guest,
            None,
            None,
            Some(DhcpMessageType::Ack),
        ),
        (
            "renewing wrong",
            wrong,
            None,
            None,
            Some(DhcpMessageType::Nak),
        ),
        (
            "nothing at all",
            none,
            None,
            None,
            Some(DhcpMessageType::Nak),
        ),
    ];
    for (name, ciaddr, requested, server, want) in cases {
        let mut s = Server::new(&n);
        let out = s.handle(
            &request(
                DhcpMessageType::Request,
                CLIENT,
                *ciaddr,
                *requested,
                *server,
            ),
            Instant::now(),
        );
        match (want, out) {
            (None, Outcome::Quiet) => {}
            (Some(kind), Outcome::Reply(f)) => {
                let (dst, got, _, _) = parse_reply(&f);
                assert_eq!(got, *kind, "{name}");
                if *kind == DhcpMessageType::Nak {
                    assert_eq!(dst, Ipv4Addr::BROADCAST, "{name}: NAK is broadcast");
                }
            }
            (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn second_client_is_refused_until_release_or_expiry() {
    let n = net();
    let mut s = Server::new(&n);
    let now = Instant::now();
    let req = |c| {
        request(
            DhcpMessageType::Request,
            c,
            Ipv4Addr::UNSPECIFIED,
            Some(n.ipv4_guest),
            None,
        )
    };
    assert!(matches!(s.handle(&req(CLIENT), now), Outcome::Reply(_)));
    assert_eq!(s.handle(&req(OTHER), now), Outcome::Refused);
    let later = now + Duration::from_secs(3601);
    assert!(matches!(s.handle(&req(OTHER), later), Outcome::Reply(_)));
    assert_eq!(s.leased_to(later), Some(OTHER));
    let release = request(
        DhcpMessageType::Release,
        OTHER,
        n.ipv4_guest,
        None,
        Some(n.ipv4_gateway),
    );
    assert_eq!(s.handle(&release, later), Outcome::Quiet);
    assert_eq!(s.leased_to(later), None);
}

#[test]
fn inform_gets_parameters_without_a_lease() {
    let n = net();
    let mut s = Server::new(&n);
    let f = reply(s.handle(
        &request(DhcpMessageType::Inform, CLIENT, n.ipv4_guest, None, None),
        Instant::now(),
    ));
    let (dst, kind, yiaddr, payload) = parse_reply(&f);
    assert_eq!(
        (kind, yiaddr, dst),
        (DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED, n.ipv4_guest)
    );
    let packet = DhcpPacket::new_checked(&payload[..]).unwrap();
    assert_eq!(DhcpRepr::parse(&packet).unwrap().lease_duration, None);
}

#[test]
fn garbage_and_truncations_are_malformed_not_panics() {
    let n = net();
    let mut s = Server::new(&n);
    let good = request(
        DhcpMessageType::Discover,
        CLIENT,
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
    );
    for cut in 0..good.len() {
        let out = s.handle(&good[..cut], Instant::now());
        assert!(
            matches!(out, Outcome::Malformed | Outcome::Reply(_)),
            "cut {cut}: {out:?}"
        );
    }
    assert_eq!(s.handle(&[0xff; 300], Instant::now()), Outcome::Malformed);
    // A BOOTREPLY sent by the guest is not answered.
    let mut echoed = good.clone();
    echoed[0] = 2;
    assert_eq!(s.handle(&echoed, Instant::now()), Outcome::Malformed);
}
