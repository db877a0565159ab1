//! IPv6 Router Advertisements (RFC 4861 4.2) for SLAAC: prefix, MTU and
//! RDNSS (RFC 8106) options, sent when the guest solicits and periodically.
//!
//! Owned by the engine thread; builds frames, does no I/O. Neighbor
//! Solicitations for the gateway's own addresses are smoltcp's job.
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
const OPT_SOURCE_LLADDR: u8 = 1;
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
}
