//! Policy rules and their parts: actions, destinations (CIDR, domain,
//! domain suffix, named group), protocols and port sets, parsed from the
//! config's strings with errors that say what is wrong.
#![forbid(unsafe_code)]

use std::net::IpAddr;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

/// Transport of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo.
    Icmp,
}

impl Proto {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// Named groups of destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The gateway's own addresses (the way to the host's loopback).
    Host,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918, unique-local fc00::/7, CGNAT 100.64.0.0/10.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// Cloud metadata: 169.254.169.254, fd00:ec2::254.
    Metadata,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// None of the others.
    Public,
    /// Everything.
    Any,
}

/// Where a rule applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address prefix.
    Cidr(IpAddr, u8),
    /// A hostname, or every name under one (the grammar of [`crate::names`]).
    Name(crate::names::Pattern),
    /// A named group.
    Group(Group),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What it does.
    pub action: Action,
    /// Where it applies.
    pub destination: Destination,
    /// Protocols; empty means all.
    pub protos: Vec<Proto>,
    /// Port ranges (inclusive); empty means all (and ICMP).
    pub ports: Vec<(u16, u16)>,
}

use crate::wellknown::{METADATA_V4, METADATA_V6};

impl Group {
    /// The groups no public name should resolve into and no public flow
    /// reaches: what "public" excludes besides the host.
    pub const INTERNAL: [Group; 5] = [
        Group::Loopback,
        Group::Private,
        Group::LinkLocal,
        Group::Metadata,
        Group::Multicast,
    ];

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "host" => Group::Host,
            "loopback" => Group::Loopback,
            "private" => Group::Private,
            "link-local" => Group::LinkLocal,
            "metadata" => Group::Metadata,
            "multicast" => Group::Multicast,
            "public" => Group::Public,
            "any" => Group::Any,
            _ => return None,
        })
    }

    /// Whether `ip` is in the group (`own`: the gateway's addresses).
    pub fn contains(self, ip: IpAddr, own: &[IpAddr]) -> bool {
        match self {
            Group::Host => own.contains(&ip),
            Group::Loopback => ip.is_loopback(),
            Group::Private => match ip {
                IpAddr::V4(v4) => {
                    let [a, b, ..] = v4.octets();
                    v4.is_private() || (a == 100 && (64..128).contains(&b))
                }
                IpAddr::V6(v6) => v6.segments()[0] & 0xfe00 == 0xfc00 && v6 != METADATA_V6,
            },
            Group::LinkLocal => match ip {
                IpAddr::V4(v4) => v4.is_link_local() && v4 != METADATA_V4,
                IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
            },
            Group::Metadata => ip == IpAddr::V4(METADATA_V4) || ip == IpAddr::V6(METADATA_V6),
            Group::Multicast => ip.is_multicast(),
            Group::Public => {
                !Group::Host.contains(ip, own)
                    && !Group::INTERNAL.iter().any(|g| g.contains(ip, own))
                    && !ip.is_unspecified()
            }
            Group::Any => true,
        }
    }
}

/// Whether `ip` lies in `net`/`len` (families must match; a length past
/// the family's width counts as the whole width).
pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl Destination {
    /// Parses `CIDR`, `IP`, `name`, `*.name` or `group:NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(group) = s.strip_prefix("group:") {
            return Group::parse(group)
                .map(Destination::Group)
                .ok_or_else(|| format!("unknown group {group:?} (host, loopback, private, link-local, metadata, multicast, public, any)"));
        }
        if let Some((addr, len)) = s.split_once('/') {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("{s:?}: not an address prefix"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?;
            return Ok(Destination::Cidr(ip, len));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(Destination::Cidr(ip, len));
        }
        crate::names::Pattern::parse(s)
            .map(Destination::Name)
            .map_err(|e| format!("{s:?}: {e}"))
    }

    fn matches(&self, ip: IpAddr, name: Option<&str>, own: &[IpAddr]) -> bool {
        match self {
            Destination::Cidr(net, len) => in_prefix(ip, *net, *len),
            Destination::Group(g) => g.contains(ip, own),
            Destination::Name(pattern) => name.is_some_and(|n| pattern.matches(n)),
        }
    }
}

/// Parses a port spec: `443` or `"8000-8100"`.
pub fn parse_ports(spec: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = spec.split_once('-').unwrap_or((spec, spec));
    let lo: u16 = lo
        .trim()
        .parse()
        .map_err(|_| format!("{spec:?}: not a port or range"))?;
    let hi: u16 = hi
        .trim()
        .parse()
        .map_err(|_| format!("{spec:?}: not a port or range"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{spec:?}: ports are 1..=65535, low to high"));
    }
    Ok((lo, hi))
}

impl Rule {
    /// Whether the rule applies.
    pub fn matches(
        &self,
        ip: IpAddr,
        proto: Proto,
        port: Option<u16>,
        name: Option<&str>,
        own: &[IpAddr],
    ) -> bool {
        (self.protos.is_empty() || self.protos.contains(&proto))
            && (self.ports.is_empty()
                || port.is_some_and(|p| self.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&p))))
            && self.destination.matches(ip, name, own)
    }

    /// Whether the rule's protocols and ports admit this flow.
    pub fn matches_transport(&self, proto: Proto, port: Option<u16>) -> bool {
        (self.protos.is_empty() || self.protos.contains(&proto))
            && (self.ports.is_empty()
                || port.is_some_and(|p| self.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&p))))
    }

    /// Whether every flow `later` matches is matched by `self` (so `later`
    /// never decides when it comes after `self`). Conservative: only
    /// clear-cut cases.
    pub fn covers(&self, later: &Rule) -> bool {
        let dest = self.destination == later.destination
            || self.destination == Destination::Group(Group::Any)
            || match (&self.destination, &later.destination) {
                (Destination::Cidr(a, la), Destination::Cidr(b, lb)) => {
                    la <= lb && in_prefix(*b, *a, *la)
                }
                _ => false,
            };
        let protos = self.protos.is_empty()
            || (!later.protos.is_empty() && later.protos.iter().all(|p| self.protos.contains(p)));
        let ports = self.ports.is_empty()
            || (!later.ports.is_empty()
                && later
                    .ports
                    .iter()
                    .all(|(l, h)| self.ports.iter().any(|(sl, sh)| sl <= l && h <= sh)));
        dest && protos && ports
    }
}
