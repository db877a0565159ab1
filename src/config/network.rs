//! The `[network]` table: the guest's addresses and link, and the
//! invariants the engine relies on for them.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use super::Checks;
use super::types::{Ipv6Prefix, MacAddr};

/// Smallest MTU any IPv4 host must accept (RFC 791).
const MIN_MTU_V4: u16 = 576;
/// IPv6 links must carry at least this much (RFC 8200 5).
const MIN_MTU_V6: u16 = 1280;
/// Largest MTU we can carry: a 64 KiB IP packet less headers, as passt uses.
pub const MAX_MTU: u16 = 65520;
/// Most queue pairs: the vhost-user relay holds early ring enables for
/// this many (`vhost::compat`).
pub const MAX_QUEUE_PAIRS: u16 = 8;

/// The `[network]` table: addresses and link parameters the guest is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Network {
    /// MAC reported in the virtio config space.
    pub guest_mac: MacAddr,
    /// The gateway's own MAC.
    pub gateway_mac: MacAddr,
    /// The gateway's IPv4 address.
    pub ipv4_gateway: Ipv4Addr,
    /// The address leased to the guest.
    pub ipv4_guest: Ipv4Addr,
    /// Prefix length of the guest subnet.
    pub ipv4_prefix_len: u8,
    /// Whether router advertisements are sent and IPv6 is answered.
    pub ipv6_enabled: bool,
    /// The SLAAC prefix (a /64).
    pub ipv6_prefix: Ipv6Prefix,
    /// The gateway's address inside that prefix.
    pub ipv6_gateway: Ipv6Addr,
    /// Link MTU.
    pub mtu: u16,
    /// TCP segmentation offload both ways (virtio TSO features offered).
    pub segmentation_offload: bool,
    /// Queue pairs offered (VIRTIO_NET_F_MQ above 1): one worker thread and
    /// one engine each.
    pub queue_pairs: u16,
    /// Advertised IPv4 DNS servers; empty means the gateway.
    pub dns_ipv4: Vec<Ipv4Addr>,
    /// Advertised IPv6 DNS servers; empty means the gateway.
    pub dns_ipv6: Vec<Ipv6Addr>,
    /// DHCP option 119 search domains.
    pub domain_search: Vec<String>,
    /// DHCP lease time.
    pub dhcp_lease_seconds: u32,
    /// Unsolicited RA interval.
    pub ra_interval_seconds: u32,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            guest_mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            gateway_mac: MacAddr([0x02, 0x76, 0x67, 0x00, 0x00, 0x01]),
            ipv4_gateway: Ipv4Addr::new(198, 19, 0, 1),
            ipv4_guest: Ipv4Addr::new(198, 19, 0, 2),
            ipv4_prefix_len: 24,
            ipv6_enabled: true,
            ipv6_prefix: Ipv6Prefix {
                addr: Ipv6Addr::new(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 0),
                len: 64,
            },
            ipv6_gateway: Ipv6Addr::new(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 1),
            mtu: MAX_MTU,
            segmentation_offload: true,
            queue_pairs: 1,
            dns_ipv4: Vec::new(),
            dns_ipv6: Vec::new(),
            domain_search: Vec::new(),
            dhcp_lease_seconds: 3600,
            ra_interval_seconds: 60,
        }
    }
}

impl Network {
    /// DNS servers the guest is told about over DHCP.
    pub fn advertised_dns_v4(&self) -> Vec<Ipv4Addr> {
        if self.dns_ipv4.is_empty() {
            vec![self.ipv4_gateway]
        } else {
            self.dns_ipv4.clone()
        }
    }

    /// DNS servers the guest is told about in router advertisements.
    pub fn advertised_dns_v6(&self) -> Vec<Ipv6Addr> {
        if self.dns_ipv6.is_empty() {
            vec![self.ipv6_gateway]
        } else {
            self.dns_ipv6.clone()
        }
    }

    /// The IPv4 subnet mask.
    pub fn ipv4_netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.ipv4_prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    fn ipv4_network(&self, addr: Ipv4Addr) -> u32 {
        u32::from(addr) & u32::from(self.ipv4_netmask())
    }

    /// Checks the table: addresses are unicast and distinct, the guest is
    /// inside the gateway's subnet, the MTU is in range for the enabled
    /// families, and the IPv6 prefix is a /64 containing the gateway.
    pub(super) fn validate(&self, out: &mut Checks) {
        let mut bad = |key: &str, message: String| out.bad(&format!("network.{key}"), message);
        for (key, mac) in [
            ("guest-mac", self.guest_mac),
            ("gateway-mac", self.gateway_mac),
        ] {
            if mac.is_multicast() || mac.is_zero() {
                bad(key, format!("{mac} is not a unicast MAC address"));
            }
        }
        if self.guest_mac == self.gateway_mac {
            bad("gateway-mac", "must differ from guest-mac".into());
        }
        if !(8..=30).contains(&self.ipv4_prefix_len) {
            bad(
                "ipv4-prefix-len",
                format!("{} is outside 8..=30", self.ipv4_prefix_len),
            );
        } else {
            self.validate_ipv4(&mut bad);
        }
        let min_mtu = if self.ipv6_enabled {
            MIN_MTU_V6
        } else {
            MIN_MTU_V4
        };
        if !(min_mtu..=MAX_MTU).contains(&self.mtu) {
            let why = if self.ipv6_enabled {
                " (IPv6 needs at least 1280)"
            } else {
                ""
            };
            bad(
                "mtu",
                format!("{} is outside {min_mtu}..={MAX_MTU}{why}", self.mtu),
            );
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.queue_pairs) {
            bad(
                "queue-pairs",
                format!("{} is outside 1..={MAX_QUEUE_PAIRS}", self.queue_pairs),
            );
        }
        if self.ipv6_enabled {
            if self.ipv6_prefix.len != 64 {
                bad(
                    "ipv6-prefix",
                    format!("SLAAC needs a /64, not /{}", self.ipv6_prefix.len),
                );
            }
            if !self.ipv6_prefix.contains(self.ipv6_gateway) {
                bad(
                    "ipv6-gateway",
                    format!("{} is not inside {}", self.ipv6_gateway, self.ipv6_prefix),
                );
            }
            let net = IpAddr::V6(self.ipv6_prefix.addr);
            if let Some(why) = crate::policy::addr::subnet_conflict(net, self.ipv6_prefix.len) {
                bad(
                    "ipv6-prefix",
                    format!("{} cannot be the guest's prefix: {why}", self.ipv6_prefix),
                );
            }
            if self.ipv6_gateway.is_multicast() || self.ipv6_gateway.is_unspecified() {
                bad("ipv6-gateway", "must be a unicast address".into());
            } else if u128::from(self.ipv6_gateway) & u128::from(u64::MAX) == 0 {
                bad(
                    "ipv6-gateway",
                    format!(
                        "{} has an all-zero interface ID (the subnet-router anycast address)",
                        self.ipv6_gateway
                    ),
                );
            }
        }
        if self.dns_ipv4.len() > 3 {
            bad("dns-ipv4", "at most 3 servers".into());
        }
        if self.dns_ipv6.len() > 3 {
            bad("dns-ipv6", "at most 3 servers".into());
        }
        for name in &self.domain_search {
            if let Err(e) = crate::names::check(name) {
                bad("domain-search", format!("{name:?}: {e}"));
            }
        }
        if crate::names::encode_wire(&self.domain_search).len() > 255 {
            bad(
                "domain-search",
                "encoded list exceeds 255 bytes (one DHCP option)".into(),
            );
        }
        if !(60..=604_800).contains(&self.dhcp_lease_seconds) {
            bad(
                "dhcp-lease-seconds",
                format!("{} is outside 60..=604800", self.dhcp_lease_seconds),
            );
        }
        if !(4..=1800).contains(&self.ra_interval_seconds) {
            bad(
                "ra-interval-seconds",
                format!("{} is outside 4..=1800", self.ra_interval_seconds),
            );
        }
    }

    /// The IPv4 addresses, once the prefix length is known to be sane.
    fn validate_ipv4(&self, bad: &mut impl FnMut(&str, String)) {
        let mask = u32::from(self.ipv4_netmask());
        for (key, addr) in [
            ("ipv4-gateway", self.ipv4_gateway),
            ("ipv4-guest", self.ipv4_guest),
        ] {
            let host = u32::from(addr) & !mask;
            if addr.is_unspecified()
                || addr.is_multicast()
                || addr.is_broadcast()
                || addr.is_loopback()
            {
                bad(key, format!("{addr} is not a usable unicast address"));
            } else if host == 0 || host == !mask {
                bad(
                    key,
                    format!("{addr} is the network or broadcast address of its subnet"),
                );
            }
        }
        let net = IpAddr::V4(Ipv4Addr::from(self.ipv4_network(self.ipv4_gateway)));
        if let Some(why) = crate::policy::addr::subnet_conflict(net, self.ipv4_prefix_len) {
            bad(
                "ipv4-gateway",
                format!(
                    "subnet {net}/{} cannot be the guest's link: {why}",
                    self.ipv4_prefix_len
                ),
            );
        }
        if self.ipv4_network(self.ipv4_gateway) != self.ipv4_network(self.ipv4_guest) {
            bad(
                "ipv4-guest",
                format!(
                    "{} is not in the gateway's subnet {}/{}",
                    self.ipv4_guest, self.ipv4_gateway, self.ipv4_prefix_len
                ),
            );
        }
        if self.ipv4_gateway == self.ipv4_guest {
            bad("ipv4-guest", "must differ from ipv4-gateway".into());
        }
    }
}
