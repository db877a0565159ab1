use super::*;
use crate::engine::classify::{Kind, Own, classify};
use crate::engine::frames;
use proptest::prelude::*;
use smoltcp::wire::EthernetAddress;

const LIMITS: Limits = Limits {
    max_bytes: 4 << 20,
    max_bytes_per_source: 1 << 20,
    timeout: Duration::from_secs(15),
};

fn ends(src: &str, dst: &str) -> frames::Ends {
    frames::Ends {
        src_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
        dst_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        hop_limit: 64,
    }
}

fn guest(v6: bool) -> frames::Ends {
    if v6 {
        ends("fd00::2", "2001:db8::10")
    } else {
        ends("198.19.0.2", "192.0.2.10")
    }
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

fn udp(v6: bool, len: usize, seed: u8) -> Vec<u8> {
    frames::udp(&guest(v6), 40000, 7, &payload(len, seed))
}

fn own() -> Own {
    Own {
        v4: "198.19.0.1".parse().unwrap(),
        v6: Some(("fd00::1".parse().unwrap(), "fe80::1".parse().unwrap())),
    }
}

/// The UDP payload a frame carries, as classify reads it.
fn udp_payload(frame: &[u8]) -> Vec<u8> {
    match classify(frame, &own()) {
        Kind::Udp { payload, .. } => payload.to_vec(),
        other => panic!("not a datagram: {other:?}"),
    }
}

fn feed(r: &mut Reassembler, pieces: &[Vec<u8>], metrics: &Metrics) -> Vec<Vec<u8>> {
    let now = Instant::now();
    pieces
        .iter()
        .filter_map(|p| match r.offer(p, now, metrics) {
            Outcome::Complete(f) => Some(f),
            Outcome::Taken => None,
            Outcome::NotFragment => panic!("a piece was not taken as a fragment"),
        })
        .collect()
}

#[test]
fn whole_frames_and_tcp_are_not_fragments() {
    let metrics = Metrics::default();
    let mut r = Reassembler::new(LIMITS);
    for v6 in [false, true] {
        let frame = udp(v6, 100, 0);
        assert_eq!(
            r.offer(&frame, Instant::now(), &metrics),
            Outcome::NotFragment
        );
    }
    // A TCP fragment is left to the usual path, which drops it.
    let tcp = frames::tcp_reset_for_syn(&guest(false), 1, 2, 3);
    let mut pieces = fragment(&pad_tcp(tcp), 68, 9).unwrap();
    assert_eq!(
        r.offer(&pieces.remove(0), Instant::now(), &metrics),
        Outcome::NotFragment
    );
    assert!(r.is_empty());
}

/// A TCP frame made long enough to need fragments at a tiny MTU.
fn pad_tcp(mut frame: Vec<u8>) -> Vec<u8> {
    frame.extend_from_slice(&[0u8; 64]);
    let total = u16::try_from(frame.len() - ETH_LEN).unwrap();
    let mut ip = Ipv4Packet::new_unchecked(&mut frame[ETH_LEN..]);
    ip.set_total_len(total);
    ip.fill_checksum();
    frame
}

#[test]
fn an_mtu_1500_guest_sends_an_8_kib_datagram_both_families() {
    for v6 in [false, true] {
        let metrics = Metrics::default();
        let mut r = Reassembler::new(LIMITS);
        let frame = udp(v6, 8192, 7);
        let pieces = fragment(&frame, 1500, 0x1234).unwrap();
        assert_eq!(pieces.len(), 6);
        assert!(pieces.iter().all(|p| p.len() <= 1514));
        let out = feed(&mut r, &pieces, &metrics);
        assert_eq!(out.len(), 1);
        assert_eq!(udp_payload(&out[0]), payload(8192, 7));
        assert_eq!(metrics.get(Counter::fragments_reassembled), 1);
        assert_eq!(r.used(), 0);
        assert!(r.is_empty());
    }
}

#[test]
fn echo_requests_reassemble_too() {
    for v6 in [false, true] {
        let metrics = Metrics::default();
        let mut r = Reassembler::new(LIMITS);
        let mut frame = frames::echo_reply(&guest(v6), 7, 1, &payload(6000, 1));
        // Turn the reply into a request: type 8 / 128, checksum again.
        let ip_len = if v6 { IPV6_LEN } else { IPV4_LEN };
        frame[ETH_LEN + ip_len] = if v6 { 128 } else { 8 };
        frame[ETH_LEN + ip_len + 2..ETH_LEN + ip_len + 4].fill(0);
        let e = guest(v6);
        let body = &mut frame[ETH_LEN + ip_len..];
        match (e.src, e.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                smoltcp::wire::Icmpv6Packet::new_unchecked(body).fill_checksum(&s, &d)
            }
            _ => smoltcp::wire::Icmpv4Packet::new_unchecked(body).fill_checksum(),
        }
        let out = feed(&mut r, &fragment(&frame, 1280, 5).unwrap(), &metrics);
        assert_eq!(out.len(), 1);
        match classify(&out[0], &own()) {
            Kind::Echo(echo) => assert_eq!(echo.data, payload(6000, 1).as_slice()),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn overlapping_pieces_drop_the_datagram_and_its_later_pieces() {
    for v6 in [false, true] {
        let metrics = Metrics::default();
        let mut r = Reassembler::new(LIMITS);
        let pieces = fragment(&udp(v6, 4000, 0), 1500, 77).unwrap();
        // A second version of the first piece with other bytes (a classic
        // overlap rewrite of the UDP header).
        let mut rewrite = pieces[0].clone();
        let last = rewrite.len() - 1;
        rewrite[last] ^= 0xff;
        assert_eq!(feed(&mut r, &pieces[..1], &metrics).len(), 0);
        assert_eq!(feed(&mut r, &[rewrite], &metrics).len(), 0);
        // The rest arrives: nothing comes out.
        assert_eq!(feed(&mut r, &pieces[1..], &metrics).len(), 0);
        assert_eq!(
            metrics.get(Counter::drop_fragment_overlap),
            1 + pieces.len() as u64 - 1
        );
        assert_eq!(metrics.get(Counter::fragments_reassembled), 0);
    }
}

#[test]
fn an_exact_duplicate_is_ignored() {
    let metrics = Metrics::default();
    let mut r = Reassembler::new(LIMITS);
    let pieces = fragment(&udp(false, 3000, 3), 1500, 8).unwrap();
    let mut twice = pieces.clone();
    twice.insert(1, pieces[0].clone());
    let out = feed(&mut r, &twice, &metrics);
    assert_eq!(out.len(), 1);
    assert_eq!(udp_payload(&out[0]), payload(3000, 3));
}

/// Rewrites an IPv4 fragment's offset field (in 8-byte units) and flags.
fn set_v4_offset(piece: &mut [u8], units: u16, more: bool) {
    let mut ip = Ipv4Packet::new_unchecked(&mut piece[ETH_LEN..]);
    ip.clear_flags();
    ip.set_more_frags(more);
    ip.set_frag_offset(units * 8);
    ip.fill_checksum();
}

#[test]
fn malformed_pieces_are_dropped_and_counted() {
    let metrics = Metrics::default();
    let mut r = Reassembler::new(LIMITS);
    let pieces = fragment(&udp(false, 3000, 0), 1500, 1).unwrap();
    // A non-last piece whose length is not a multiple of 8.
    let mut odd = pieces[0].clone();
    odd.pop();
    let total = u16::try_from(odd.len() - ETH_LEN).unwrap();
    let mut ip = Ipv4Packet::new_unchecked(&mut odd[ETH_LEN..]);
    ip.set_total_len(total);
    ip.fill_checksum();
    // A piece ending past 65,535 bytes.
    let mut far = pieces[1].clone();
    set_v4_offset(&mut far, 8189, false);
    for bad in [odd, far] {
        assert_eq!(r.offer(&bad, Instant::now(), &metrics), Outcome::Taken);
    }
    assert_eq!(metrics.get(Counter::drop_fragment_bad), 2);
    assert!(r.is_empty());
}

#[test]
fn a_second_different_end_is_an_overlap() {
    let metrics = Metrics::default();
    let mut r = Reassembler::new(LIMITS);
    let pieces = fragment(&udp(false, 3000, 0), 1500, 1).unwrap();
    let mut early_end = pieces[1].clone();
    set_v4_offset(&mut early_end, 185, false);
    let mut out = feed(&mut r, &[pieces[2].clone(), early_end], &metrics);
    out.extend(feed(&mut r, &pieces, &metrics));
    assert!(out.is_empty());
    assert!(metrics.get(Counter::drop_fragment_overlap) >= 1);
}

#[test]
fn incomplete_datagrams_time_out() {
    let metrics = Metrics::default();
    let mut r = Reassembler::new(LIMITS);
    let pieces = fragment(&udp(true, 3000, 0), 1500, 1).unwrap();
    let t0 = Instant::now();
    assert_eq!(r.offer(&pieces[0], t0, &metrics), Outcome::Taken);
    assert_eq!(r.len(), 1);
    r.expire(t0 + Duration::from_secs(14), &metrics);
    assert_eq!(r.len(), 1);
    r.expire(t0 + Duration::from_secs(15), &metrics);
    assert!(r.is_empty());
    assert_eq!(r.used(), 0);
    assert_eq!(metrics.get(Counter::drop_fragment_timeout), 1);
    // The rest, late: never a datagram.
    let late = t0 + Duration::from_secs(16);
    for p in &pieces[1..] {
        assert_eq!(r.offer(p, late, &metrics), Outcome::Taken);
    }
    assert_eq!(metrics.get(Counter::fragments_reassembled), 0);
}

#[test]
fn a_flood_of_partial_datagrams_stays_in_budget_and_a_new_one_passes() {
    let limits = Limits {
        max_bytes: 256 << 10,
        max_bytes_per_source: 128 << 10,
        timeout: Duration::from_secs(15),
    };
    let metrics = Metrics::default();
    let mut r = Reassembler::new(limits);
    let now = Instant::now();
    for id in 0..10_000u32 {
        for v6 in [false, true] {
            let pieces = fragment(&udp(v6, 3000, 0), 1500, id).unwrap();
            r.offer(&pieces[0], now, &metrics);
            assert!(r.used() <= limits.max_bytes);
        }
    }
    assert!(metrics.get(Counter::drop_fragment_evicted) > 10_000);
    for v6 in [false, true] {
        let out = feed(
            &mut r,
            &fragment(&udp(v6, 8000, 9), 1500, 99_999).unwrap(),
            &metrics,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(udp_payload(&out[0]), payload(8000, 9));
    }
}

#[test]
fn fragments_to_the_guest_fit_the_mtu_and_carry_everything() {
    for v6 in [false, true] {
        for mtu in [1280, 1500, 9000] {
            let frame = udp(v6, 20_000, 2);
            let pieces = fragment(&frame, mtu, 42).unwrap();
            assert!(pieces.iter().all(|p| p.len() - ETH_LEN <= mtu), "{mtu}");
            let metrics = Metrics::default();
            let out = feed(&mut Reassembler::new(LIMITS), &pieces, &metrics);
            assert_eq!(udp_payload(&out[0]), payload(20_000, 2));
        }
        assert!(fragment(&udp(v6, 1000, 0), 1500, 1).is_none());
    }
}

proptest! {
    /// Any split, any order, any duplicated pieces: the datagram comes out
    /// once, whole, and the budget returns to zero.
    #[test]
    fn every_order_and_duplication_reassembles_once(
        v6 in any::<bool>(),
        len in 1usize..20_000,
        mtu in 576usize..9000,
        order in proptest::collection::vec(any::<u16>(), 1..64),
        dup in proptest::collection::vec(any::<u16>(), 0..8),
    ) {
        let frame = udp(v6, len, 5);
        let Some(pieces) = fragment(&frame, mtu, 3) else {
            return Ok(());
        };
        let mut keyed: Vec<(u16, Vec<u8>)> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (order.get(i).copied().unwrap_or(0), p.clone()))
            .collect();
        for d in &dup {
            let p = pieces[usize::from(*d) % pieces.len()].clone();
            keyed.push((*d, p));
        }
        keyed.sort_by_key(|(k, _)| *k);
        let shuffled: Vec<Vec<u8>> = keyed.into_iter().map(|(_, p)| p).collect();
        let metrics = Metrics::default();
        let mut r = Reassembler::new(LIMITS);
        let out = feed(&mut r, &shuffled, &metrics);
        // A duplicate arriving after completion starts a new, partial one.
        prop_assert!(!out.is_empty());
        prop_assert_eq!(udp_payload(&out[0]), payload(len, 5));
        prop_assert_eq!(metrics.get(Counter::drop_fragment_overlap), 0);
    }

    /// Arbitrary bytes after a valid fragment header never panic, and the
    /// budget holds whatever the pieces claim.
    #[test]
    fn hostile_pieces_keep_the_budget(
        pieces in proptest::collection::vec((any::<u16>(), any::<bool>(), 0usize..3000, any::<u8>()), 1..200),
    ) {
        let limits = Limits { max_bytes: 64 << 10, max_bytes_per_source: 32 << 10, timeout: Duration::from_secs(15) };
        let metrics = Metrics::default();
        let mut r = Reassembler::new(limits);
        let base = fragment(&udp(false, 3000, 0), 1500, 1).unwrap();
        for (units, more, cut, id) in pieces {
            let mut p = base[0].clone();
            p.truncate((ETH_LEN + IPV4_LEN + cut).min(p.len()));
            let total = u16::try_from(p.len() - ETH_LEN).unwrap();
            let mut ip = Ipv4Packet::new_unchecked(&mut p[ETH_LEN..]);
            ip.set_total_len(total);
            ip.set_ident(u16::from(id));
            ip.clear_flags();
            ip.set_more_frags(more);
            ip.set_frag_offset((units & 0x1fff) * 8);
            ip.fill_checksum();
            r.offer(&p, Instant::now(), &metrics);
            prop_assert!(r.used() <= limits.max_bytes_per_source);
        }
    }
}
