//! IPv6 Router Advertisements (RFC 4861 4.2) for SLAAC: prefix, MTU and
//! RDNSS (RFC 8106) options, sent when the guest solicits and periodically;
//! and Neighbor Advertisements for the gateway's own addresses (4.4), with
//! the Router flag set: a router whose advertisement says it is not one is
//! dropped from the guest's default-router list (7.2.5), which smoltcp's own
//! answers (a host's) would do.
//!
//! Owned by the engine thread; builds frames, does no I/O.
#![forbid(unsafe_code)]

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;

use super::frames;
use crate::config::Network;

use crate::wellknown::GATEWAY_LINK_LOCAL;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: EthernetAddress = EthernetAddress([0x33, 0x33, 0, 0, 0, 1]);

const ICMPV6_ROUTER_ADVERT: u8 = 134;
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;
/// Neighbor Advertisement flags: Router, Solicited, Override (4.4).
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
const OPT_PREFIX_INFO: u8 = 3;
const OPT_MTU: u8 = 5;
const OPT_RDNSS: u8 = 25;
/// Prefix flags: on-link (L) and autonomous address configuration (A).
const PREFIX_ON_LINK_AUTONOMOUS: u8 = 0xc0;
/// Router lifetime: RFC 4861 6.2.1 default, 3 x MaxRtrAdvInterval, capped.
const ROUTER_LIFETIME_SECS: u16 = 1800;
const PREFIX_VALID_SECS: u32 = 86_400;
const PREFIX_PREFERRED_SECS: u32 = 14_400;
/// Solicited RAs closer together than this are not repeated (RFC 4861
/// 6.2.6 MIN_DELAY_BETWEEN_RAS).
const MIN_DELAY_BETWEEN_RAS: Duration = Duration::from_secs(3);

/// Sends router advertisements on schedule and on solicitation.
pub struct Advertiser {
    gateway_mac: EthernetAddress,
    message: Vec<u8>,
    interval: Duration,
    next_periodic: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Advertiser {
    /// An advertiser for `net`; `None` when IPv6 is off.
    pub fn new(net: &Network) -> Option<Self> {
        net.ipv6_enabled.then(|| Self {
            gateway_mac: EthernetAddress(net.gateway_mac.0),
            message: router_advert(net),
            interval: Duration::from_secs(u64::from(net.ra_interval_seconds)),
            next_periodic: None,
            last_sent: None,
        })
    }

    /// Answers a Router Solicitation at once, or, within
    /// MIN_DELAY_BETWEEN_RAS of the last advertisement, as soon as that delay
    /// has passed (RFC 4861 6.2.6: delayed, never dropped).
    pub fn solicited(&mut self, now: Instant) -> Option<Vec<u8>> {
        if let Some(last) = self.last_sent {
            let earliest = last + MIN_DELAY_BETWEEN_RAS;
            if now < earliest {
                self.next_periodic = Some(self.next_periodic.map_or(earliest, |t| t.min(earliest)));
                return None;
            }
        }
        Some(self.send(now))
    }

    /// The unsolicited advertisement due at `now`, if any. The first one goes
    /// out as soon as the device runs, so a guest that missed its own
    /// solicitation still configures.
    pub fn periodic(&mut self, now: Instant) -> Option<Vec<u8>> {
        match self.next_periodic {
            Some(t) if t > now => None,
            _ => Some(self.send(now)),
        }
    }

    /// When `periodic` next has something to send.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_periodic
    }

    fn send(&mut self, now: Instant) -> Vec<u8> {
        self.last_sent = Some(now);
        self.next_periodic = Some(now + self.interval);
        let ends = frames::Ends {
            src_mac: self.gateway_mac,
            dst_mac: ALL_NODES_MAC,
            src: GATEWAY_LINK_LOCAL.into(),
            dst: ALL_NODES.into(),
            hop_limit: 255,
        };
        frames::icmp_v6(&ends, &self.message)
    }
}

/// The Neighbor Advertisement answering a solicitation from `asker` (at
/// `asker_mac`) for `target`, one of the gateway's addresses: Router and
/// Override set, Solicited unless the asker was unspecified (duplicate
/// address detection, answered to all nodes, 7.2.4).
pub fn neighbor_advert(
    gateway_mac: EthernetAddress,
    asker: Ipv6Addr,
    asker_mac: EthernetAddress,
    target: Ipv6Addr,
) -> Vec<u8> {
    let dad = asker.is_unspecified();
    let mut flags = NA_ROUTER | NA_OVERRIDE;
    if !dad {
        flags |= NA_SOLICITED;
    }
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(&[ICMPV6_NEIGHBOR_ADVERT, 0, 0, 0, flags, 0, 0, 0]);
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[OPT_TARGET_LLADDR, 1]);
    m.extend_from_slice(&gateway_mac.0);
    let (dst, dst_mac) = if dad {
        (ALL_NODES, ALL_NODES_MAC)
    } else {
        (asker, asker_mac)
    };
    let ends = frames::Ends {
        src_mac: gateway_mac,
        dst_mac,
        src: target.into(),
        dst: dst.into(),
        hop_limit: 255,
    };
    frames::icmp_v6(&ends, &m)
}

/// The IPv6 source address of a guest frame, when it is a unicast one.
pub fn ipv6_source(frame: &[u8]) -> Option<Ipv6Addr> {
    const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
    if frame.get(12..14)? != ETHERTYPE_IPV6 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(frame.get(22..38)?).ok()?);
    (!src.is_unspecified() && !src.is_multicast()).then_some(src)
}

/// A Neighbor Advertisement as if from the guest (`asker` at
/// `asker_mac`) to the gateway, for smoltcp's neighbor cache: the gateway
/// answers the guest's solicitations itself, so smoltcp would otherwise
/// learn the guest's address only by asking, dropping its first reply.
pub fn learned(
    asker: Ipv6Addr,
    asker_mac: EthernetAddress,
    gateway: Ipv6Addr,
    gateway_mac: EthernetAddress,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(&[ICMPV6_NEIGHBOR_ADVERT, 0, 0, 0, NA_OVERRIDE, 0, 0, 0]);
    m.extend_from_slice(&asker.octets());
    m.extend_from_slice(&[OPT_TARGET_LLADDR, 1]);
    m.extend_from_slice(&asker_mac.0);
    let ends = frames::Ends {
        src_mac: asker_mac,
        dst_mac: gateway_mac,
        src: asker.into(),
        dst: gateway.into(),
        hop_limit: 255,
    };
    frames::icmp_v6(&ends, &m)
}

/// The ICMPv6 RA body (checksum zero, filled by the frame builder).
fn router_advert(net: &Network) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(&[ICMPV6_ROUTER_ADVERT, 0, 0, 0]);
    m.push(64); // Cur Hop Limit
    m.push(0); // M and O flags off: SLAAC, no DHCPv6.
    m.extend_from_slice(&ROUTER_LIFETIME_SECS.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes()); // Reachable Time: unspecified
    m.extend_from_slice(&0u32.to_be_bytes()); // Retrans Timer: unspecified

    m.extend_from_slice(&[OPT_SOURCE_LLADDR, 1]);
    m.extend_from_slice(&net.gateway_mac.0);

    m.extend_from_slice(&[OPT_MTU, 1, 0, 0]);
    m.extend_from_slice(&u32::from(net.mtu).to_be_bytes());

    m.extend_from_slice(&[
        OPT_PREFIX_INFO,
        4,
        net.ipv6_prefix.len,
        PREFIX_ON_LINK_AUTONOMOUS,
    ]);
    m.extend_from_slice(&PREFIX_VALID_SECS.to_be_bytes());
    m.extend_from_slice(&PREFIX_PREFERRED_SECS.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(&net.ipv6_prefix.addr.octets());

    let dns = net.advertised_dns_v6();
    // Length in units of 8 octets: 1 for the option header, 2 per address;
    // config validation caps the list at 3.
    let units = u8::try_from(1 + 2 * dns.len()).unwrap_or(u8::MAX);
    m.extend_from_slice(&[OPT_RDNSS, units, 0, 0]);
    // RFC 8106 5.1: lifetime at least 3 x MaxRtrAdvInterval.
    m.extend_from_slice(&net.ra_interval_seconds.saturating_mul(3).to_be_bytes());
    for server in dns {
        m.extend_from_slice(&server.octets());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        EthernetFrame, Icmpv6Packet, Icmpv6Repr, Ipv6Packet, NdiscPrefixInfoFlags, NdiscRepr,
    };

    #[test]
    fn advert_parses_with_prefix_mtu_and_rdnss() {
        let net = Network {
            mtu: 9000,
            ..Network::default()
        };
        let mut ra = Advertiser::new(&net).unwrap();
        let now = Instant::now();
        let frame = ra.periodic(now).unwrap();
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.dst_addr(), ALL_NODES_MAC);
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(ip.hop_limit(), 255);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        let repr = Icmpv6Repr::parse(
            &ip.src_addr(),
            &ip.dst_addr(),
            &icmp,
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
        .unwrap();
        let Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            mtu,
            prefix_info: Some(prefix),
            router_lifetime,
            ..
        }) = repr
        else {
            panic!("not an RA: {repr:?}")
        };
        assert_eq!(mtu, Some(9000));
        assert_eq!(prefix.prefix, net.ipv6_prefix.addr);
        assert_eq!(prefix.prefix_len, 64);
        assert!(prefix.flags.contains(NdiscPrefixInfoFlags::ADDRCONF));
        assert_eq!(router_lifetime.secs(), 1800);
        // RDNSS is the last option: type 25 carrying the gateway address.
        let tail = &ip.payload()[ip.payload().len() - 24..];
        assert_eq!(tail[0], OPT_RDNSS);
        assert_eq!(&tail[8..], &net.ipv6_gateway.octets());
    }

    #[test]
    fn schedule_and_solicitation_rate_limit() {
        let net = Network::default();
        let mut ra = Advertiser::new(&net).unwrap();
        let t0 = Instant::now();
        assert!(ra.periodic(t0).is_some());
        assert!(ra.periodic(t0).is_none());
        // A solicitation right after an advertisement is answered 3 s after
        // it, by the periodic path; not dropped.
        assert!(ra.solicited(t0 + Duration::from_secs(1)).is_none());
        assert_eq!(ra.deadline(), Some(t0 + Duration::from_secs(3)));
        assert!(ra.periodic(t0 + Duration::from_secs(2)).is_none());
        assert!(ra.periodic(t0 + Duration::from_secs(3)).is_some());
        assert!(ra.solicited(t0 + Duration::from_secs(7)).is_some());
        assert_eq!(ra.deadline(), Some(t0 + Duration::from_secs(67)));
        assert!(ra.periodic(t0 + Duration::from_secs(67)).is_some());
    }

    #[test]
    fn ipv6_off_means_no_advertiser() {
        let net = Network {
            ipv6_enabled: false,
            ..Network::default()
        };
        assert!(Advertiser::new(&net).is_none());
    }

    #[test]
    fn neighbor_advert_says_router_and_reaches_the_asker() {
        use smoltcp::wire::NdiscNeighborFlags;
        let gw = EthernetAddress([2, 0x76, 0x67, 0, 0, 1]);
        let guest = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let asker: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        for (from, to, solicited) in [
            (asker, asker, true),
            (Ipv6Addr::UNSPECIFIED, ALL_NODES, false),
        ] {
            let frame = neighbor_advert(gw, from, guest, GATEWAY_LINK_LOCAL);
            let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
            let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
            assert_eq!(ip.hop_limit(), 255);
            assert_eq!(ip.dst_addr(), to);
            let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
            let repr = Icmpv6Repr::parse(
                &ip.src_addr(),
                &ip.dst_addr(),
                &icmp,
                &smoltcp::phy::ChecksumCapabilities::default(),
            )
            .unwrap();
            let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            }) = repr
            else {
                panic!("not an NA: {repr:?}")
            };
            assert!(flags.contains(NdiscNeighborFlags::ROUTER));
            assert_eq!(flags.contains(NdiscNeighborFlags::SOLICITED), solicited);
            assert_eq!(target_addr, GATEWAY_LINK_LOCAL);
            assert_eq!(lladdr.map(|l| l.as_bytes().to_vec()), Some(gw.0.to_vec()));
        }
    }
}
