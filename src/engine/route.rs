//! The route step of the engine's dispatch (classify → police → route):
//! which part of the gateway takes a frame, given what it is and the
//! policy's verdict. The order of the checks is part of the meaning (a DNS
//! port is intercepted before it could be dialled, a published session's
//! reply before QUIC is dropped); the table test below pins it down.
//!
//! Pure: classification, verdict and the engine's setup in; a route out.
//! Also home of the gateway mapping ([`upstream`]): the one way a guest
//! reaches the host's loopback.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::classify::{Kind, Own};
use super::police::{Facts, Verdict};
use crate::metrics::Counter;
use crate::policy::addr::{forms, reaches_local_host};
use crate::wellknown::{DNS_PORT, ENCRYPTED_DNS_PORT};

/// What does not change between frames.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The gateway's addresses.
    pub own: Own,
    /// Whether the gateway's addresses lead to the host's loopback.
    pub allow_host_loopback: bool,
    /// TCP ports whose TLS is intercepted (and whose UDP, QUIC, is
    /// dropped); empty when interception is off.
    pub tls_ports: Vec<u16>,
    /// Whether DNS over TLS is terminated (interception is on).
    pub terminates_dot: bool,
}

/// How a new TCP flow is served once its SYN is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Dial the destination (at this address: the host mapping applied).
    Dial(SocketAddr),
    /// Dial, but hold the guest's first bytes until they name a pinned
    /// name the policy allows.
    Gate(SocketAddr),
    /// TLS interception, dialling this address.
    Tls(SocketAddr),
    /// Decide on the first bytes, then dial this address.
    FirstBytes(SocketAddr),
    /// DNS over TCP, answered by the forwarder.
    DnsTcp,
    /// DNS over TLS, terminated and answered by the forwarder.
    DnsTls,
}

/// Who takes the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A SYN of a flow that exists: the flow table knows what to do.
    Existing,
    /// A new TCP flow, held while it is opened this way.
    Open(Open),
    /// Answer the SYN with a RST; count the counter when there is one (a
    /// policy deny is counted by the police step).
    Refuse(Option<Counter>),
    /// Drop the frame; count the counter when there is one.
    Drop(Option<Counter>),
    /// The DHCP server.
    Dhcp,
    /// The router advertiser.
    RouterSolicit,
    /// A neighbor advertisement as the router.
    NeighborSolicit,
    /// A guest reply to a published UDP session.
    PublishedReply,
    /// A DNS query for the forwarder.
    DnsQuery,
    /// The UDP relay.
    Udp,
    /// The ICMP echo relay.
    Echo,
    /// smoltcp.
    Stack,
}

/// Where traffic the guest sends to `dst` really goes, or None when
/// nowhere: the gateway's addresses map to the host's loopback (same port)
/// only when allowed, and that mapping is the only way there — a loopback
/// or "this host" destination in any form (IPv4-mapped, NAT64, 6to4, ...)
/// goes nowhere, whatever the policy says; so do multicast, broadcast and
/// port 0.
pub fn upstream(dst: SocketAddr, own: &Own, allow_host_loopback: bool) -> Option<SocketAddr> {
    let ip = dst.ip();
    if own.is_own(ip) {
        let loopback = if ip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        };
        return allow_host_loopback.then_some(SocketAddr::new(loopback, dst.port()));
    }
    let nowhere = forms(ip).as_slice().iter().any(|form| {
        let broadcast = matches!(form, IpAddr::V4(v4) if v4.is_broadcast());
        form.is_multicast() || broadcast
    });
    if nowhere || reaches_local_host(ip) || dst.port() == 0 {
        return None;
    }
    Some(dst)
}

/// Routes one classified, policed frame.
pub fn route(kind: &Kind<'_>, verdict: &Verdict, facts: Facts, setup: &Setup) -> Route {
    let upstream = |dst| upstream(dst, &setup.own, setup.allow_host_loopback);
    let intercepts = |port| setup.tls_ports.contains(&port);
    match kind {
        Kind::TcpSyn { .. } if facts.flow_exists => Route::Existing,
        Kind::TcpSyn { .. } if !verdict.allows() => Route::Refuse(None),
        // The interceptor decides on the SNI itself (and the Host inside);
        // only an address-level deny stops it at the SYN.
        Kind::TcpSyn { dst, .. } if intercepts(dst.port()) => {
            upstream(*dst).map_or(Route::Refuse(None), |up| Route::Open(Open::Tls(up)))
        }
        Kind::TcpSyn { dst, .. } => match verdict {
            Verdict::Peek(names) if names.is_empty() => {
                upstream(*dst).map_or(Route::Refuse(None), |up| Route::Open(Open::FirstBytes(up)))
            }
            Verdict::Peek(_) => upstream(*dst)
                .map_or(Route::Refuse(Some(Counter::tcp_denied)), |up| {
                    Route::Open(Open::Gate(up))
                }),
            // DNS over TLS: answered by our forwarder when we can terminate
            // TLS, refused otherwise (the guest falls back to port 53).
            _ if dst.port() == ENCRYPTED_DNS_PORT => {
                if setup.terminates_dot {
                    Route::Open(Open::DnsTls)
                } else {
                    Route::Refuse(Some(Counter::dns_encrypted_refused))
                }
            }
            _ if dst.port() == DNS_PORT => Route::Open(Open::DnsTcp),
            _ => upstream(*dst).map_or(Route::Refuse(Some(Counter::tcp_denied)), |up| {
                Route::Open(Open::Dial(up))
            }),
        },
        Kind::Udp { .. } | Kind::Echo(_) if !verdict.allows() => Route::Drop(None),
        Kind::Dhcp { .. } => Route::Dhcp,
        Kind::RouterSolicit => Route::RouterSolicit,
        Kind::NeighborSolicit { .. } => Route::NeighborSolicit,
        Kind::NotOurs => Route::Drop(Some(Counter::neighbor_not_ours)),
        Kind::Fragment => Route::Drop(Some(Counter::drop_fragment)),
        Kind::Udp { dst, .. } if dst.port() == ENCRYPTED_DNS_PORT => {
            Route::Drop(Some(Counter::dns_encrypted_refused))
        }
        Kind::Udp { .. } if facts.published_session => Route::PublishedReply,
        // QUIC would bypass interception: dropped, so the client falls back
        // to TCP.
        Kind::Udp { dst, .. } if intercepts(dst.port()) => {
            Route::Drop(Some(Counter::tls_quic_dropped))
        }
        Kind::Udp { dst, .. } if dst.port() == DNS_PORT => Route::DnsQuery,
        Kind::Udp { .. } => Route::Udp,
        Kind::Echo(_) => Route::Echo,
        Kind::Stack => Route::Stack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Reason;
    use crate::engine::classify::sample::*;
    use crate::policy::Proto;

    fn own() -> Own {
        Own {
            v4: Ipv4Addr::new(198, 19, 0, 1),
            v6: Some((
                "fd76:6761:7465::1".parse().unwrap(),
                crate::wellknown::GATEWAY_LINK_LOCAL,
            )),
        }
    }

    fn setup(tls: bool, loopback: bool) -> Setup {
        Setup {
            own: own(),
            allow_host_loopback: loopback,
            tls_ports: if tls { vec![443] } else { Vec::new() },
            terminates_dot: tls,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn upstream_mapping() {
        let cases = [
            ("192.0.2.1:80", false, Some("192.0.2.1:80")),
            ("198.19.0.1:22", false, None),
            ("198.19.0.1:22", true, Some("127.0.0.1:22")),
            ("[fd76:6761:7465::1]:22", true, Some("[::1]:22")),
            ("[fe80::1]:22", true, Some("[::1]:22")),
            ("0.0.0.0:80", true, None),
            ("255.255.255.255:80", true, None),
            ("224.0.0.1:80", true, None),
            ("[ff02::1]:80", true, None),
            ("192.0.2.1:0", true, None),
            // Loopback only through the gateway mapping (fuzz regression:
            // frame/syn-to-127.255.255.255).
            ("127.255.255.255:48", true, None),
            ("127.0.0.1:22", true, None),
            ("[::1]:22", true, None),
            ("[::ffff:127.0.0.1]:22", true, None),
            ("[::ffff:0.0.0.0]:22", true, None),
        ];
        for (dst, allow, want) in cases {
            assert_eq!(
                upstream(addr(dst), &own(), allow),
                want.map(addr),
                "{dst} {allow}"
            );
        }
    }

    proptest::proptest! {
        /// The gateway mapping is the only way to the host's loopback: any
        /// destination that is not the gateway's and would reach the local
        /// host, in any encoding, goes nowhere.
        #[test]
        fn only_the_gateway_reaches_loopback(bits in proptest::prelude::any::<u128>(), v4 in proptest::prelude::any::<u32>(), pick in 0u8..6, port in 1u16..) {
            let local = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::from(0x7f00_0000 | (v4 & 0xff_ffff)), Ipv4Addr::from(v4 & 0xff_ffff)];
            let a = local[usize::from(pick) % local.len()];
            let a32 = u128::from(u32::from(a));
            let encoded = [
                IpAddr::V4(a),
                IpAddr::V6(a.to_ipv6_mapped()),
                IpAddr::V6(Ipv6Addr::from(a32)),
                IpAddr::V6(Ipv6Addr::from((0x0064_ff9b_u128 << 96) | a32)),
                IpAddr::V6(Ipv6Addr::from((0x2002_u128 << 112) | (a32 << 80) | (bits & 0xffff_ffff_ffff_ffff_ffff))),
                IpAddr::V6(Ipv6Addr::from((0x2001_0000_u128 << 96) | ((bits >> 64) & (0xffff_ffff_u128 << 64)) | u128::from(!u32::from(a)))),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ];
            for allow in [false, true] {
                for ip in encoded {
                    let dst = SocketAddr::new(ip, port);
                    proptest::prop_assert_eq!(upstream(dst, &own(), allow), None, "{}", dst);
                }
            }
        }
    }

    /// Today's dispatch, arm by arm.
    #[test]
    fn table() {
        let allow = Verdict::Allow((Proto::Tcp, "192.0.2.1".parse().unwrap(), Some(80)));
        let deny = Verdict::Deny {
            subject: (Proto::Tcp, "192.0.2.1".parse().unwrap(), Some(80)),
            denied: (None, Reason::Policy),
            name: None,
        };
        let peek = Verdict::Peek(Vec::new());
        let peek_pinned = Verdict::Peek(vec!["www.ok.test".into()]);
        let exempt = Verdict::Exempt;
        let none = Facts::default();
        let exists = Facts {
            flow_exists: true,
            ..none
        };
        let session = Facts {
            published_session: true,
            ..none
        };
        let (plain, tls, loopback) = (setup(false, false), setup(true, false), setup(false, true));
        let c = |counter| Some(counter);
        let cases: Vec<(Kind<'_>, &Verdict, Facts, &Setup, Route)> = vec![
            (
                syn("192.0.2.1:80"),
                &allow,
                none,
                &plain,
                Route::Open(Open::Dial(addr("192.0.2.1:80"))),
            ),
            (
                syn("192.0.2.1:80"),
                &deny,
                none,
                &plain,
                Route::Refuse(None),
            ),
            (
                syn("192.0.2.1:80"),
                &exempt,
                exists,
                &plain,
                Route::Existing,
            ),
            (
                syn("198.19.0.1:22"),
                &allow,
                none,
                &plain,
                Route::Refuse(c(Counter::tcp_denied)),
            ),
            (
                syn("198.19.0.1:22"),
                &allow,
                none,
                &loopback,
                Route::Open(Open::Dial(addr("127.0.0.1:22"))),
            ),
            (
                syn("0.0.0.0:80"),
                &allow,
                none,
                &plain,
                Route::Refuse(c(Counter::tcp_denied)),
            ),
            // TLS interception wins over a first-bytes decision; a deny by
            // address still refuses.
            (
                syn("192.0.2.1:443"),
                &peek,
                none,
                &tls,
                Route::Open(Open::Tls(addr("192.0.2.1:443"))),
            ),
            (syn("192.0.2.1:443"), &deny, none, &tls, Route::Refuse(None)),
            (
                syn("198.19.0.1:443"),
                &allow,
                none,
                &tls,
                Route::Refuse(None),
            ),
            (
                syn("192.0.2.1:443"),
                &peek,
                none,
                &plain,
                Route::Open(Open::FirstBytes(addr("192.0.2.1:443"))),
            ),
            (
                syn("192.0.2.1:443"),
                &peek_pinned,
                none,
                &plain,
                Route::Open(Open::Gate(addr("192.0.2.1:443"))),
            ),
            (
                syn("198.19.0.1:443"),
                &peek,
                none,
                &plain,
                Route::Refuse(None),
            ),
            // DNS over TCP and TLS to any address.
            (
                syn("192.0.2.1:53"),
                &exempt,
                none,
                &plain,
                Route::Open(Open::DnsTcp),
            ),
            (
                syn("192.0.2.1:853"),
                &exempt,
                none,
                &plain,
                Route::Refuse(c(Counter::dns_encrypted_refused)),
            ),
            (
                syn("192.0.2.1:853"),
                &exempt,
                none,
                &tls,
                Route::Open(Open::DnsTls),
            ),
            // Datagrams.
            (udp("192.0.2.1:80"), &allow, none, &plain, Route::Udp),
            (udp("192.0.2.1:80"), &deny, none, &plain, Route::Drop(None)),
            (udp("192.0.2.1:53"), &exempt, none, &plain, Route::DnsQuery),
            (
                udp("192.0.2.1:853"),
                &exempt,
                none,
                &tls,
                Route::Drop(c(Counter::dns_encrypted_refused)),
            ),
            (
                udp("192.0.2.1:443"),
                &allow,
                none,
                &tls,
                Route::Drop(c(Counter::tls_quic_dropped)),
            ),
            (udp("192.0.2.1:443"), &allow, none, &plain, Route::Udp),
            (
                udp("198.19.0.1:50000"),
                &exempt,
                session,
                &tls,
                Route::PublishedReply,
            ),
            // Everything else.
            (
                Kind::Dhcp { payload: b"" },
                &exempt,
                none,
                &plain,
                Route::Dhcp,
            ),
            (
                Kind::NeighborSolicit {
                    src: "fe80::2".parse().unwrap(),
                    target: crate::wellknown::GATEWAY_LINK_LOCAL,
                },
                &exempt,
                none,
                &plain,
                Route::NeighborSolicit,
            ),
            (
                Kind::RouterSolicit,
                &exempt,
                none,
                &plain,
                Route::RouterSolicit,
            ),
            (
                Kind::NotOurs,
                &exempt,
                none,
                &plain,
                Route::Drop(c(Counter::neighbor_not_ours)),
            ),
            (
                Kind::Fragment,
                &exempt,
                none,
                &plain,
                Route::Drop(c(Counter::drop_fragment)),
            ),
            (Kind::Stack, &exempt, none, &plain, Route::Stack),
        ];
        for (kind, verdict, facts, setup, want) in cases {
            assert_eq!(
                route(&kind, verdict, facts, setup),
                want,
                "{kind:?} {verdict:?}"
            );
        }
    }
}
