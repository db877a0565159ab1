//! Well-known ports and special addresses the gateway treats specially,
//! each with the document that assigns it.
//!
//! Leaf module: constants only.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

/// DNS (RFC 1035 4.2.1): intercepted on UDP and TCP, whatever the address.
pub const DNS_PORT: u16 = 53;
/// DNS over TLS (RFC 7858) and over QUIC (RFC 9250): terminated when TLS
/// interception is on, refused otherwise, so stub resolvers fall back to
/// port 53, where the block list applies.
pub const ENCRYPTED_DNS_PORT: u16 = 853;
/// DHCP server port (RFC 2131 4.1).
pub const DHCP_SERVER_PORT: u16 = 67;
/// DHCP client port (RFC 2131 4.1).
pub const DHCP_CLIENT_PORT: u16 = 68;
/// The gateway's link-local address: the source of its router
/// advertisements, so the guest's IPv6 default router (RFC 4861 4.2).
pub const GATEWAY_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Cloud instance metadata (AWS, GCP, Azure, OpenStack, ...).
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// AWS's IPv6 instance metadata address.
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254);
