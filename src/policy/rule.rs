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

use super::HostSet;
use super::addr::special_group;

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

    /// The group's name in rules (`group:NAME`).
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Host => "host",
            Group::Loopback => "loopback",
            Group::Private => "private",
            Group::LinkLocal => "link-local",
            Group::Metadata => "metadata",
            Group::Multicast => "multicast",
            Group::Public => "public",
            Group::Any => "any",
        }
    }

    /// The group of one address form (see [`super::addr::forms`]): the
    /// host's when `host` holds it, else its special-purpose range's.
    pub fn of(form: IpAddr, host: &HostSet) -> Group {
        if host.contains(form) {
            return Group::Host;
        }
        special_group(form).0
    }

    /// Whether one address form is in the group.
    pub fn contains(self, form: IpAddr, host: &HostSet) -> bool {
        self == Group::Any || Group::of(form, host) == self
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

    /// Whether the destination covers `form` of the address `dst` the
    /// guest used: a prefix covers either, a group the form (what traffic
    /// reaches), a name the flow's name.
    fn matches(&self, dst: IpAddr, form: IpAddr, name: Option<&str>, host: &HostSet) -> bool {
        match self {
            Destination::Cidr(net, len) => {
                in_prefix(dst, *net, *len) || in_prefix(form, *net, *len)
            }
            Destination::Group(g) => g.contains(form, host),
            Destination::Name(pattern) => name.is_some_and(|n| pattern.matches(n)),
        }
    }

    /// Whether this destination may open the host's own addresses: only
    /// `group:host` does; a prefix, a name, `group:any` or another group
    /// that happens to hold a host address never allows it.
    pub fn opens_host(&self) -> bool {
        matches!(self, Destination::Group(Group::Host))
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
    /// Whether the rule applies to `form` of destination `dst` (see
    /// `Destination::matches`).
    pub fn matches(
        &self,
        (dst, form): (IpAddr, IpAddr),
        proto: Proto,
        port: Option<u16>,
        name: Option<&str>,
        host: &HostSet,
    ) -> bool {
        self.matches_transport(proto, port) && self.destination.matches(dst, form, name, host)
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

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Cidr(net, len) => write!(f, "{net}/{len}"),
            Destination::Name(pattern) => write!(f, "{pattern}"),
            Destination::Group(g) => write!(f, "group:{}", g.as_str()),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} {}", self.destination)?;
        if !self.protos.is_empty() {
            let protos: Vec<&str> = self.protos.iter().map(|p| p.as_str()).collect();
            write!(f, " {}", protos.join(","))?;
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|(lo, hi)| {
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    }
                })
                .collect();
            write!(f, " port {}", ports.join(","))?;
        }
        Ok(())
    }
}
