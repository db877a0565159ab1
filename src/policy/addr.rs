//! Addresses as the policy sees them.
//!
//! **Forms.** An IPv6 address may carry an IPv4 address that is where
//! traffic to it ends up: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated
//! (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated), NAT64
//! (`64:ff9b::/96`, RFC 6052; and the local-use `64:ff9b:1::/48`, RFC 8215,
//! in every RFC 6052 layout that fits it), 6to4 (`2002::/16`, RFC 3056) and
//! Teredo (`2001::/32`, RFC 4380: the server's and the client's address).
//! [`forms`] lists what a destination stands for; the policy allows it only
//! when it allows every form, so no encoding is cheaper than the address
//! it carries.
//!
//! **Special-purpose ranges.** [`SPECIAL`] is the IANA IPv4 and IPv6
//! special-purpose address registries, each range with the group it
//! belongs to; `tests` below checks an address of every range. Ranges the
//! registries mark as not globally reachable are `private` (or loopback,
//! link-local, multicast) — except the documentation ranges, which are
//! never routed and are treated as public so examples and the test suite's
//! own "internet" work. The host group (the gateway's and the host's own
//! addresses) is not in the table: it is live, see [`super::HostSet`].
//!
//! Pure; no I/O.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Group;
use crate::wellknown::{METADATA_V4, METADATA_V6};

/// What a destination stands for: the address itself, or the IPv4
/// addresses an IPv6 address carries (at most [`Forms::MAX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forms {
    list: [IpAddr; Forms::MAX],
    len: usize,
}

impl Forms {
    /// Most forms one address has (the NAT64 local-use layouts).
    pub const MAX: usize = 4;

    fn one(ip: IpAddr) -> Self {
        Self {
            list: [ip; Self::MAX],
            len: 1,
        }
    }

    fn of(v4s: &[Ipv4Addr]) -> Self {
        let mut forms = Self {
            list: [IpAddr::V4(Ipv4Addr::UNSPECIFIED); Self::MAX],
            len: 0,
        };
        for v4 in v4s.iter().take(Self::MAX) {
            let ip = IpAddr::V4(*v4);
            if !forms.as_slice().contains(&ip) {
                if let Some(slot) = forms.list.get_mut(forms.len) {
                    *slot = ip;
                }
                forms.len += 1;
            }
        }
        forms
    }

    /// The forms, the most telling first.
    pub fn as_slice(&self) -> &[IpAddr] {
        self.list.get(..self.len).unwrap_or_default()
    }

    /// Whether the address carries another (an IPv4 inside IPv6).
    pub fn is_embedding(&self, ip: IpAddr) -> bool {
        self.as_slice() != [ip]
    }
}

/// The forms of `ip`: an IPv4 address or a plain IPv6 address stands for
/// itself; an IPv6 address that embeds IPv4 stands for what it embeds.
pub fn forms(ip: IpAddr) -> Forms {
    let IpAddr::V6(v6) = ip else {
        return Forms::one(ip);
    };
    let o = v6.octets();
    let s = v6.segments();
    let v4 = |a: usize, b: usize, c: usize, d: usize| {
        let get = |i: usize| o.get(i).copied().unwrap_or(0);
        Ipv4Addr::new(get(a), get(b), get(c), get(d))
    };
    let last32 = v4(12, 13, 14, 15);
    match s {
        // ::ffff:a.b.c.d (mapped) and ::ffff:0:a.b.c.d (translated, RFC 2765).
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => Forms::of(&[last32]),
        // :: and ::1 are themselves; the rest of ::/96 is IPv4-compatible.
        [0, 0, 0, 0, 0, 0, 0, 0] | [0, 0, 0, 0, 0, 0, 0, 1] => Forms::one(ip),
        [0, 0, 0, 0, 0, 0, _, _] => Forms::of(&[last32]),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Forms::of(&[last32]),
        [0x64, 0xff9b, 1, ..] => {
            // RFC 6052 2.2 layouts inside the /48 the operator may use: /96
            // (the last 32 bits), and /48, /56, /64, whose IPv4 bits skip
            // octet 8 (u, zero) and are followed by a zero suffix.
            let zero = |from: usize| o.get(from..).is_some_and(|t| t.iter().all(|b| *b == 0));
            let mut carried = vec![last32];
            if o.get(8) == Some(&0) {
                for (suffix, layout) in [
                    (11, v4(6, 7, 9, 10)),
                    (12, v4(7, 9, 10, 11)),
                    (13, v4(9, 10, 11, 12)),
                ] {
                    if zero(suffix) {
                        carried.push(layout);
                    }
                }
            }
            Forms::of(&carried)
        }
        [0x2002, ..] => Forms::of(&[v4(2, 3, 4, 5)]),
        [0x2001, 0, ..] => {
            // Teredo: the server at bits 32..63, the client's address
            // obfuscated (inverted) in the last 32 bits.
            let client = Ipv4Addr::from(!u32::from(last32));
            Forms::of(&[client, v4(4, 5, 6, 7)])
        }
        _ => Forms::one(ip),
    }
}

/// An address range of a special-purpose registry and its group.
pub type Special = (IpAddr, u8, Group, &'static str);

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[allow(clippy::too_many_arguments)]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
}

/// The IANA special-purpose registries (IPv4 and IPv6, as of 2025), most
/// specific range first; ranges that embed IPv4 are decided through
/// [`forms`] and appear here only for what they are themselves.
pub const SPECIAL: &[Special] = &[
    // IPv4 (RFC 6890 and updates).
    (
        v4(0, 0, 0, 0),
        8,
        Group::Host,
        "this network (RFC 791): the host itself",
    ),
    (v4(10, 0, 0, 0), 8, Group::Private, "private (RFC 1918)"),
    (
        v4(100, 64, 0, 0),
        10,
        Group::Private,
        "shared address space, CGNAT (RFC 6598)",
    ),
    (v4(127, 0, 0, 0), 8, Group::Loopback, "loopback (RFC 1122)"),
    (
        v4(169, 254, 169, 254),
        32,
        Group::Metadata,
        "cloud instance metadata",
    ),
    (
        v4(169, 254, 0, 0),
        16,
        Group::LinkLocal,
        "link-local (RFC 3927)",
    ),
    (v4(172, 16, 0, 0), 12, Group::Private, "private (RFC 1918)"),
    (
        v4(192, 0, 0, 0),
        24,
        Group::Private,
        "IETF protocol assignments (RFC 6890)",
    ),
    (
        v4(192, 0, 2, 0),
        24,
        Group::Public,
        "documentation TEST-NET-1 (RFC 5737)",
    ),
    (
        v4(192, 31, 196, 0),
        24,
        Group::Public,
        "AS112-v4 (RFC 7535)",
    ),
    (v4(192, 52, 193, 0), 24, Group::Public, "AMT (RFC 7450)"),
    (
        v4(192, 88, 99, 0),
        24,
        Group::Private,
        "deprecated 6to4 relay anycast (RFC 7526)",
    ),
    (v4(192, 168, 0, 0), 16, Group::Private, "private (RFC 1918)"),
    (
        v4(192, 175, 48, 0),
        24,
        Group::Public,
        "AS112 direct delegation (RFC 7534)",
    ),
    (
        v4(198, 18, 0, 0),
        15,
        Group::Private,
        "benchmarking (RFC 2544)",
    ),
    (
        v4(198, 51, 100, 0),
        24,
        Group::Public,
        "documentation TEST-NET-2 (RFC 5737)",
    ),
    (
        v4(203, 0, 113, 0),
        24,
        Group::Public,
        "documentation TEST-NET-3 (RFC 5737)",
    ),
    (
        v4(224, 0, 0, 0),
        4,
        Group::Multicast,
        "multicast (RFC 5771)",
    ),
    (
        v4(255, 255, 255, 255),
        32,
        Group::Multicast,
        "limited broadcast (RFC 919)",
    ),
    (v4(240, 0, 0, 0), 4, Group::Private, "reserved (RFC 1112)"),
    // IPv6 (RFC 6890 and updates).
    (
        v6(0, 0, 0, 0, 0, 0, 0, 0),
        128,
        Group::Host,
        "unspecified (RFC 4291): the host itself",
    ),
    (
        v6(0, 0, 0, 0, 0, 0, 0, 1),
        128,
        Group::Loopback,
        "loopback (RFC 4291)",
    ),
    (
        v6(0x64, 0xff9b, 0, 0, 0, 0, 0, 0),
        32,
        Group::Private,
        "NAT64 space outside its assigned prefixes",
    ),
    (
        v6(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        Group::Private,
        "discard-only (RFC 6666)",
    ),
    (
        v6(0x100, 0, 0, 1, 0, 0, 0, 0),
        64,
        Group::Private,
        "dummy prefix (RFC 9780)",
    ),
    (
        v6(0x2001, 3, 0, 0, 0, 0, 0, 0),
        32,
        Group::Public,
        "AMT (RFC 7450)",
    ),
    (
        v6(0x2001, 4, 0x112, 0, 0, 0, 0, 0),
        48,
        Group::Public,
        "AS112-v6 (RFC 7535)",
    ),
    (
        v6(0x2001, 0x20, 0, 0, 0, 0, 0, 0),
        28,
        Group::Private,
        "ORCHIDv2 (RFC 7343)",
    ),
    (
        v6(0x2001, 0x30, 0, 0, 0, 0, 0, 0),
        28,
        Group::Public,
        "drone remote ID (RFC 9374)",
    ),
    (
        v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        Group::Public,
        "documentation (RFC 3849)",
    ),
    (
        v6(0x2001, 0, 0, 0, 0, 0, 0, 0),
        23,
        Group::Private,
        "IETF protocol assignments (RFC 2928)",
    ),
    (
        v6(0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0),
        48,
        Group::Public,
        "AS112 direct delegation (RFC 7534)",
    ),
    (
        v6(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        Group::Public,
        "documentation (RFC 9637)",
    ),
    (
        v6(0x5f00, 0, 0, 0, 0, 0, 0, 0),
        16,
        Group::Private,
        "segment routing SIDs (RFC 9602)",
    ),
    (
        v6(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254),
        128,
        Group::Metadata,
        "cloud instance metadata (AWS)",
    ),
    (
        v6(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        Group::Private,
        "unique local (RFC 4193)",
    ),
    (
        v6(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        Group::LinkLocal,
        "link-local unicast (RFC 4291)",
    ),
    (
        v6(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        Group::Private,
        "site-local, deprecated (RFC 3879)",
    ),
    (
        v6(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        Group::Multicast,
        "multicast (RFC 4291)",
    ),
];

/// The group of one form (not of an address that embeds IPv4: use
/// [`forms`] first), from the special-purpose table; `Public` when no
/// range holds it.
pub fn special_group(ip: IpAddr) -> (Group, &'static str) {
    SPECIAL
        .iter()
        .find(|(net, len, _, _)| super::rule::in_prefix(ip, *net, *len))
        .map_or((Group::Public, "global unicast"), |(_, _, g, why)| {
            (*g, why)
        })
}

/// Whether `ip`, in any form, is loopback or the host's unspecified
/// "this host" (0.0.0.0/8, ::): traffic to it would reach the daemon's own
/// host, which only the gateway mapping (with `allow-host-loopback`) may do.
pub fn reaches_local_host(ip: IpAddr) -> bool {
    forms(ip)
        .as_slice()
        .iter()
        .any(|f| matches!(special_group(*f).0, Group::Loopback | Group::Host))
}

/// Why the subnet `net/len` cannot be the guest's link, or None: it holds
/// (or lies inside) a range that is the host itself, loopback, link-local,
/// cloud metadata or multicast; for IPv6 it must also be global unicast
/// (2000::/3) or unique local (fc00::/7) and not embed IPv4 (6to4, Teredo
/// and the like), since SLAAC addresses are made inside it. Every special
/// range is compared by overlap, so no spelling of the prefix slips by.
pub fn subnet_conflict(net: IpAddr, len: u8) -> Option<&'static str> {
    use super::rule::in_prefix;
    let conflicting = SPECIAL.iter().find(|(range, range_len, group, _)| {
        matches!(
            group,
            Group::Host | Group::Loopback | Group::LinkLocal | Group::Metadata | Group::Multicast
        ) && in_prefix(net, *range, (*range_len).min(len))
    });
    if let Some((_, _, _, why)) = conflicting {
        return Some(why);
    }
    if let IpAddr::V6(v6) = net {
        let any = IpAddr::V6(Ipv6Addr::from(u128::from(v6) | 1));
        let global = in_prefix(net, v6_net(0x2000), 3.min(len));
        let unique_local = in_prefix(net, v6_net(0xfc00), 7.min(len));
        if !((global && len >= 3) || (unique_local && len >= 7)) {
            return Some("neither global unicast (2000::/3) nor unique local (fc00::/7)");
        }
        if forms(any).is_embedding(any) {
            return Some("addresses in it embed IPv4 (6to4, Teredo, ...)");
        }
    }
    None
}

fn v6_net(first: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0))
}

/// The metadata addresses, for callers that name them.
pub const METADATA: [IpAddr; 2] = [IpAddr::V4(METADATA_V4), IpAddr::V6(METADATA_V6)];

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn form_list(s: &str) -> Vec<IpAddr> {
        forms(ip(s)).as_slice().to_vec()
    }

    #[test]
    fn embeddings_table() {
        let cases: &[(&str, &[&str])] = &[
            ("192.0.2.1", &["192.0.2.1"]),
            ("2001:db8::1", &["2001:db8::1"]),
            ("::", &["::"]),
            ("::1", &["::1"]),
            ("::ffff:127.0.0.1", &["127.0.0.1"]),
            ("::ffff:0.0.0.0", &["0.0.0.0"]),
            ("::ffff:0:10.0.0.1", &["10.0.0.1"]),
            ("::169.254.169.254", &["169.254.169.254"]),
            ("::2", &["0.0.0.2"]),
            ("64:ff9b::a9fe:a9fe", &["169.254.169.254"]),
            ("64:ff9b::7f00:1", &["127.0.0.1"]),
            // Local-use NAT64: the /96 layout, and the shorter ones while
            // the u octet is zero.
            ("64:ff9b:1::a9fe:a9fe", &["169.254.169.254"]),
            ("64:ff9b:1:0:ffff:ffff:a9fe:a9fe", &["169.254.169.254"]),
            (
                "64:ff9b:1:a9fe:a9:fe00::",
                &["0.0.0.0", "169.254.169.254", "254.169.254.0", "169.254.0.0"],
            ),
            ("2002:a9fe:a9fe::1", &["169.254.169.254"]),
            ("2002:c000:201::", &["192.0.2.1"]),
            // Teredo: client 10.0.0.1 inverted (f5ff:fffe), server 192.0.2.1.
            ("2001:0:c000:201:0:0:f5ff:fffe", &["10.0.0.1", "192.0.2.1"]),
        ];
        for (addr, want) in cases {
            let want: Vec<IpAddr> = want.iter().map(|w| ip(w)).collect();
            assert_eq!(form_list(addr), want, "{addr}");
        }
    }

    #[test]
    fn special_purpose_table() {
        // One address of every range, and a neighbour outside where it
        // matters; the table's own entries are all reachable by lookup.
        for (net, _, group, why) in SPECIAL {
            let (got, _) = special_group(*net);
            assert_eq!(got, *group, "{net} ({why})");
        }
        let cases: &[(&str, Group)] = &[
            ("0.1.2.3", Group::Host),
            ("10.255.255.255", Group::Private),
            ("100.63.255.255", Group::Public),
            ("100.64.0.1", Group::Private),
            ("100.127.255.255", Group::Private),
            ("100.128.0.0", Group::Public),
            ("127.255.255.255", Group::Loopback),
            ("169.254.169.254", Group::Metadata),
            ("169.254.169.253", Group::LinkLocal),
            ("172.31.255.255", Group::Private),
            ("172.32.0.0", Group::Public),
            ("192.0.0.9", Group::Private),
            ("192.0.2.10", Group::Public),
            ("192.88.99.1", Group::Private),
            ("198.17.255.255", Group::Public),
            ("198.18.0.1", Group::Private),
            ("198.19.255.255", Group::Private),
            ("198.20.0.0", Group::Public),
            ("223.255.255.255", Group::Public),
            ("239.255.255.255", Group::Multicast),
            ("240.0.0.1", Group::Private),
            ("255.255.255.254", Group::Private),
            ("255.255.255.255", Group::Multicast),
            ("8.8.8.8", Group::Public),
            ("64:ff9b:2::1", Group::Private),
            ("100::1", Group::Private),
            ("2001:2::1", Group::Private),
            ("2001:3::1", Group::Public),
            ("2001:db8::10", Group::Public),
            ("2001:4860::8888", Group::Public),
            ("fd00:ec2::254", Group::Metadata),
            ("fd00:ec2::253", Group::Private),
            ("fe80::1", Group::LinkLocal),
            ("febf::1", Group::LinkLocal),
            ("fec0::1", Group::Private),
            ("ff02::1", Group::Multicast),
            ("5f00::1", Group::Private),
        ];
        for (addr, want) in cases {
            assert_eq!(special_group(ip(addr)).0, *want, "{addr}");
        }
    }

    #[test]
    fn local_host_in_every_form() {
        for addr in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::ffff:0:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::7f00:1",
            "2002:7f00:1::",
            "2001:0:c000:201::80ff:fffe",
        ] {
            assert!(reaches_local_host(ip(addr)), "{addr}");
        }
        for addr in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1"] {
            assert!(!reaches_local_host(ip(addr)), "{addr}");
        }
    }
}
