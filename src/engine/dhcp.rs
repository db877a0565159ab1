//! The DHCPv4 server (RFC 2131) for the sandbox's single guest address.
//!
//! Owned by the engine thread; pure logic over smoltcp's DHCP wire types: it
//! takes a BOOTP payload and returns the reply frame, if any. One address is
//! leased, to the first client that asks, until it is released or expires.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use smoltcp::wire::{DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress};

use super::frames::{self, Ends};
use crate::config::Network;
use crate::wellknown::{DHCP_CLIENT_PORT, DHCP_SERVER_PORT};

/// DHCP client port (RFC 2131 4.1).
/// DHCP option: interface MTU (RFC 2132 5.1).
const OPT_INTERFACE_MTU: u8 = 26;
/// DHCP option: domain search (RFC 3397).
const OPT_DOMAIN_SEARCH: u8 = 119;

/// What the server did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send this frame to the guest.
    Reply(Vec<u8>),
    /// Understood; nothing to send (RELEASE, DECLINE, a REQUEST for another
    /// server).
    Quiet,
    /// Not a DHCP request we can parse; counted as a malformed drop.
    Malformed,
    /// A second client asked while the lease is held; counted.
    Refused,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    client: EthernetAddress,
    expires: Instant,
}

/// The server's state: its parameters and the one lease.
pub struct Server {
    gateway_mac: EthernetAddress,
    gateway: Ipv4Addr,
    guest: Ipv4Addr,
    netmask: Ipv4Addr,
    dns: Vec<Ipv4Addr>,
    mtu: [u8; 2],
    search: Vec<u8>,
    lease_time: Duration,
    lease: Option<Lease>,
}

impl Server {
    /// A server handing out `net`'s guest address.
    pub fn new(net: &Network) -> Self {
        Self {
            gateway_mac: EthernetAddress(net.gateway_mac.0),
            gateway: net.ipv4_gateway,
            guest: net.ipv4_guest,
            netmask: net.ipv4_netmask(),
            dns: net.advertised_dns_v4(),
            mtu: net.mtu.to_be_bytes(),
            search: crate::names::encode_wire(&net.domain_search),
            lease_time: Duration::from_secs(u64::from(net.dhcp_lease_seconds)),
            lease: None,
        }
    }

    /// The client currently holding the lease, if any.
    #[cfg(test)]
    pub fn leased_to(&self, now: Instant) -> Option<EthernetAddress> {
        self.lease(now).map(|(client, _)| client)
    }

    /// The client holding the lease and the time it has left.
    pub fn lease(&self, now: Instant) -> Option<(EthernetAddress, Duration)> {
        self.lease
            .filter(|l| l.expires > now)
            .map(|l| (l.client, l.expires - now))
    }

    /// Handles one BOOTP payload from the guest.
    pub fn handle(&mut self, payload: &[u8], now: Instant) -> Outcome {
        let Ok(packet) = DhcpPacket::new_checked(payload) else {
            return Outcome::Malformed;
        };
        let Ok(request) = DhcpRepr::parse(&packet) else {
            return Outcome::Malformed;
        };
        // BOOTREQUEST only (op 1); a guest echoing replies at us is ignored.
        if packet.opcode() != smoltcp::wire::DhcpOpCode::Request {
            return Outcome::Malformed;
        }
        let client = request.client_hardware_address;
        if self
            .lease
            .is_some_and(|l| l.expires > now && l.client != client)
        {
            return Outcome::Refused;
        }
        match request.message_type {
            DhcpMessageType::Discover => self.reply(&request, DhcpMessageType::Offer),
            DhcpMessageType::Request => self.request(&request, now),
            DhcpMessageType::Inform => self.reply(&request, DhcpMessageType::Ack),
            DhcpMessageType::Release => {
                if request.client_ip == self.guest {
                    self.lease = None;
                }
                Outcome::Quiet
            }
            DhcpMessageType::Decline => {
                // The guest saw our address in use on its link: nothing we can
                // hand out instead, so the lease is dropped and we say nothing.
                self.lease = None;
                Outcome::Quiet
            }
            _ => Outcome::Malformed,
        }
    }

    /// RFC 2131 4.3.2: SELECTING, INIT-REBOOT, RENEWING/REBINDING.
    fn request(&mut self, request: &DhcpRepr<'_>, now: Instant) -> Outcome {
        if let Some(server) = request.server_identifier
            && server != self.gateway
        {
            // The client chose another server's offer.
            return Outcome::Quiet;
        }
        let wanted = request.requested_ip.unwrap_or(request.client_ip);
        if wanted != self.guest {
            return self.reply(request, DhcpMessageType::Nak);
        }
        self.lease = Some(Lease {
            client: request.client_hardware_address,
            expires: now + self.lease_time,
        });
        self.reply(request, DhcpMessageType::Ack)
    }

    fn reply(&self, request: &DhcpRepr<'_>, kind: DhcpMessageType) -> Outcome {
        let inform = request.message_type == DhcpMessageType::Inform;
        let nak = kind == DhcpMessageType::Nak;
        let lease_secs = u32::try_from(self.lease_time.as_secs()).unwrap_or(u32::MAX);
        let mut extra: Vec<DhcpOption<'_>> = Vec::new();
        if !nak {
            extra.push(DhcpOption {
                kind: OPT_INTERFACE_MTU,
                data: &self.mtu,
            });
            if !self.search.is_empty() {
                extra.push(DhcpOption {
                    kind: OPT_DOMAIN_SEARCH,
                    data: &self.search,
                });
            }
        }
        let mut dns = heapless::Vec::new();
        for server in self.dns.iter().take(3) {
            let _ = dns.push(*server);
        }
        let with_params = !nak;
        let with_lease = !nak && !inform;
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: request.transaction_id,
            secs: 0,
            client_hardware_address: request.client_hardware_address,
            client_ip: if inform {
                request.client_ip
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            your_ip: if with_lease {
                self.guest
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: with_params.then_some(self.gateway),
            subnet_mask: with_params.then_some(self.netmask),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: request.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.gateway),
            parameter_request_list: None,
            dns_servers: with_params.then_some(dns),
            max_size: None,
            lease_duration: with_lease.then_some(lease_secs),
            renew_duration: with_lease.then_some(lease_secs / 2),
            rebind_duration: with_lease.then_some(lease_secs / 8 * 7),
            additional_options: &extra,
        };
        // RFC 2131 4.1: broadcast when asked to or when the client has no
        // address yet that could receive unicast; NAKs are always broadcast.
        let (dst_mac, dst_ip) = if nak || request.broadcast {
            (EthernetAddress::BROADCAST, Ipv4Addr::BROADCAST)
        } else if inform || !request.client_ip.is_unspecified() {
            (request.client_hardware_address, request.client_ip)
        } else {
            (request.client_hardware_address, self.guest)
        };
        let ends = Ends {
            src_mac: self.gateway_mac,
            dst_mac,
            src: IpAddr::V4(self.gateway),
            dst: IpAddr::V4(dst_ip),
            hop_limit: 64,
        };
        let len = repr.buffer_len();
        let mut emitted = Ok(());
        let frame = frames::udp_with(&ends, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, len, |buf| {
            let mut packet = DhcpPacket::new_unchecked(buf);
            emitted = repr.emit(&mut packet);
        });
        match emitted {
            Ok(()) => Outcome::Reply(frame),
            Err(_) => Outcome::Malformed,
        }
    }
}

#[cfg(test)]
mod tests;
