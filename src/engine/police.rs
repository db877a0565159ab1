//! The police step of the engine's dispatch (classify → police → route):
//! the egress policy's word on a frame that would open or use a flow.
//!
//! Pure: the frame's classification, facts the dispatcher looked up, and
//! the policy in; a verdict out. The dispatcher counts and audits it. A
//! TCP flow whose decision a hostname could change is decided on its first
//! bytes (`Peek`): with no DNS pin for its address, entirely; with pins
//! that allow it, its SNI/Host must be one of them and allowed.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use super::classify::Kind;
use crate::audit::Reason;
use crate::names::NameSource;
use crate::policy::{Claim, Denied, Flow, Policy, Proto, Query, Verdict as Judged};
use crate::wellknown::{DNS_PORT, ENCRYPTED_DNS_PORT};

/// What the dispatcher knows about a frame beyond its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// A SYN for a flow that already exists (a retransmission): it keeps
    /// the flow's first decision.
    pub flow_exists: bool,
    /// A datagram to a gateway port of a published UDP session: a reply to
    /// inbound traffic, not egress.
    pub published_session: bool,
}

/// What is decided: protocol, destination, port.
pub type Subject = (Proto, IpAddr, Option<u16>);

/// The policy's word on one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not egress (gateway services, intercepted DNS, inbound replies, a
    /// flow that was decided already): nothing to decide.
    Exempt,
    /// Allowed.
    Allow(Subject),
    /// Denied, with the pinned name the decision saw.
    Deny {
        /// What was denied.
        subject: Subject,
        /// The rule and reason.
        denied: Denied,
        /// The destination's newest DNS name, when it had one.
        name: Option<String>,
    },
    /// Accept the TCP flow and decide on its first bytes; the names the
    /// destination was given (empty: none).
    Peek(Vec<String>),
}

impl Verdict {
    /// Whether the frame may go on.
    pub fn allows(&self) -> bool {
        !matches!(self, Verdict::Deny { .. })
    }
}

/// Decides one classified frame; `pinned` looks up the names the guest's
/// DNS answers gave an address, newest first.
pub fn police(
    kind: &Kind<'_>,
    facts: Facts,
    policy: &Policy,
    pinned: impl FnOnce(IpAddr) -> Vec<String>,
) -> Verdict {
    let intercepted = |port: u16| port == DNS_PORT || port == ENCRYPTED_DNS_PORT;
    let subject: Subject = match kind {
        Kind::TcpSyn { .. } if facts.flow_exists => return Verdict::Exempt,
        Kind::TcpSyn { dst, .. } if !intercepted(dst.port()) => {
            (Proto::Tcp, dst.ip(), Some(dst.port()))
        }
        Kind::Udp { dst, .. } if !intercepted(dst.port()) => {
            if facts.published_session {
                return Verdict::Exempt;
            }
            (Proto::Udp, dst.ip(), Some(dst.port()))
        }
        Kind::Echo(e) => (Proto::Icmp, e.dst, None),
        _ => return Verdict::Exempt,
    };
    let (proto, dst, port) = subject;
    let names = pinned(dst);
    let judged = policy.judge(&Query {
        dst,
        proto,
        port,
        pinned: &names,
        claim: Claim::Unread,
    });
    match judged {
        Judged::NeedsName => Verdict::Peek(names),
        // QUIC carries its name (SNI) in an Initial we do not read: where a
        // name could change the decision, it is refused, and the client
        // falls back to TCP, whose ClientHello is read.
        Judged::Allow(_) if is_quic(kind) && name_matters(policy, subject, &names) => {
            Verdict::Deny {
                subject,
                denied: (None, Reason::NameUnreadable),
                name: names.into_iter().next(),
            }
        }
        Judged::Allow(_) | Judged::Resolve(_) => Verdict::Allow(subject),
        Judged::Deny(denied) => Verdict::Deny {
            subject,
            denied,
            name: names.into_iter().next(),
        },
    }
}

/// Whether a datagram is a QUIC long-header packet (RFC 9000 17.2: form
/// and fixed bits set, a non-zero version), which is how every QUIC
/// connection starts.
fn is_quic(kind: &Kind<'_>) -> bool {
    let Kind::Udp { payload, .. } = kind else {
        return false;
    };
    match payload {
        [first, v0, v1, v2, v3, ..] => first & 0xc0 == 0xc0 && [*v0, *v1, *v2, *v3] != [0; 4],
        _ => false,
    }
}

/// A live flow or session as a reload sees it: what it is (as its first
/// frame would be classified), the names its address has now, what its
/// bytes were allowed for (TCP), and whether its gate still reads them.
pub struct Live<'a> {
    /// The flow's opening frame, rebuilt (a SYN, a datagram, an echo).
    pub kind: Kind<'a>,
    /// The destination's live DNS names, newest first.
    pub pinned: Vec<String>,
    /// What its bytes were allowed for (TLS SNI, HTTP Hosts, or nothing
    /// named), oldest first.
    pub claims: Vec<crate::egress::ClaimRecord>,
    /// Its first bytes are still being read: the gate judges them under
    /// the rules in force.
    pub gating: bool,
}

/// A deny of a live flow: what, the rule and reason, the name it carried.
pub type Revoked = (Subject, Denied, Option<(String, NameSource)>);

/// What `new` denies of a live flow that `old`, judging the same facts,
/// allowed: a reload resets exactly these. Comparing with the old rules
/// keeps a reload that changes nothing for a flow from touching it (a DNS
/// pin that lapsed since the flow opened is not the reload's doing).
pub fn revoked(live: &Live<'_>, old: &Policy, new: &Policy) -> Option<Revoked> {
    let denied = judge_live(live, new)?;
    judge_live(live, old).is_none().then_some(denied)
}

/// A live flow judged as at its opening under `policy`, then on every claim
/// its bytes made; the first deny.
fn judge_live(live: &Live<'_>, policy: &Policy) -> Option<Revoked> {
    let names = match police(&live.kind, Facts::default(), policy, |_| {
        live.pinned.clone()
    }) {
        Verdict::Exempt | Verdict::Allow(_) => return None,
        Verdict::Deny {
            subject,
            denied,
            name,
        } => return Some((subject, denied, name.map(|n| (n, NameSource::Dns)))),
        Verdict::Peek(names) => names,
    };
    let Kind::TcpSyn { dst, .. } = live.kind else {
        return None;
    };
    let subject = (Proto::Tcp, dst.ip(), Some(dst.port()));
    if live.gating {
        return None;
    }
    if live.claims.is_empty() {
        return Some((subject, (None, Reason::NameUnread), None));
    }
    for claim in &live.claims {
        let query = Query {
            dst: dst.ip(),
            proto: Proto::Tcp,
            port: Some(dst.port()),
            pinned: &names,
            claim: match claim {
                Some((name, source)) => Claim::Named(name, *source),
                None => Claim::Unnamed,
            },
        };
        // A claim with no DNS answer behind it was resolved when it was
        // decided; the name rules are what a reload changes.
        if let Judged::Deny(denied) = policy.judge(&query) {
            return Some((subject, denied, claim.clone()));
        }
    }
    None
}

/// Whether a name rule could turn this flow's decision, named by any of
/// the destination's pins or by none.
fn name_matters(policy: &Policy, (proto, dst, port): Subject, pins: &[String]) -> bool {
    fn flow((proto, dst, port): Subject, name: Option<&str>) -> Flow<'_> {
        Flow {
            dst,
            proto,
            port,
            name: name.map(|n| (n, NameSource::Dns)),
        }
    }
    let subject = (proto, dst, port);
    policy.needs_name(&flow(subject, None))
        || pins
            .iter()
            .any(|p| policy.needs_name(&flow(subject, Some(p))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::classify::sample::*;
    use std::net::SocketAddr;

    fn quic(dst: &str) -> Kind<'static> {
        Kind::Udp {
            src: "198.19.0.2:40000".parse().unwrap(),
            dst: dst.parse().unwrap(),
            payload: &[0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8],
        }
    }

    fn subject(proto: Proto, dst: &str) -> Subject {
        let addr: SocketAddr = dst
            .parse()
            .unwrap_or_else(|_| SocketAddr::new(dst.parse().unwrap(), 0));
        let port = (proto != Proto::Icmp).then_some(addr.port());
        (proto, addr.ip(), port)
    }

    /// Today's behaviour under the default preset and under a name
    /// allow-list, frame by frame.
    #[test]
    fn table() {
        let public_only = Config::embedded().policy();
        let names = Config::from_toml(
            "[policy]\npreset = \"none\"\n[[policy.rule]]\naction = \"allow\"\ndestination = \"*.ok.test\"\n",
        )
        .unwrap()
        .policy();
        let none = Facts::default();
        let exists = Facts {
            flow_exists: true,
            ..Facts::default()
        };
        let session = Facts {
            published_session: true,
            ..Facts::default()
        };
        let deny = |proto, dst: &str, rule, name: Option<&str>| Verdict::Deny {
            subject: subject(proto, dst),
            denied: (rule, Reason::Policy),
            name: name.map(str::to_owned),
        };
        let www = vec!["www.ok.test".to_owned()];
        let cases: Vec<(&Policy, Kind<'_>, Facts, Vec<String>, Verdict)> = vec![
            // Public addresses pass, the rest is denied by its preset rule.
            (
                &public_only,
                syn("192.0.2.1:80"),
                none,
                vec![],
                Verdict::Allow(subject(Proto::Tcp, "192.0.2.1:80")),
            ),
            (
                &public_only,
                syn("10.0.0.1:80"),
                none,
                vec![],
                deny(Proto::Tcp, "10.0.0.1:80", Some(4), None),
            ),
            (
                &public_only,
                udp("169.254.169.254:80"),
                none,
                vec![],
                deny(Proto::Udp, "169.254.169.254:80", Some(1), None),
            ),
            (
                &public_only,
                echo("127.0.0.1"),
                none,
                vec![],
                deny(Proto::Icmp, "127.0.0.1", Some(3), None),
            ),
            // DNS and DoT are intercepted, not egress; so are retransmitted
            // SYNs and replies to published sessions.
            (
                &public_only,
                syn("10.0.0.1:53"),
                none,
                vec![],
                Verdict::Exempt,
            ),
            (
                &public_only,
                udp("10.0.0.1:853"),
                none,
                vec![],
                Verdict::Exempt,
            ),
            (
                &public_only,
                syn("10.0.0.1:80"),
                exists,
                vec![],
                Verdict::Exempt,
            ),
            (
                &public_only,
                udp("198.19.0.1:50000"),
                session,
                vec![],
                Verdict::Exempt,
            ),
            (
                &public_only,
                Kind::Dhcp { payload: b"" },
                none,
                vec![],
                Verdict::Exempt,
            ),
            (&public_only, Kind::Stack, none, vec![], Verdict::Exempt),
            // Names: a flow a name could decide is peeked at, with its pins.
            (
                &names,
                syn("192.0.2.1:443"),
                none,
                vec![],
                Verdict::Peek(vec![]),
            ),
            (
                &names,
                syn("192.0.2.1:443"),
                none,
                www.clone(),
                Verdict::Peek(www.clone()),
            ),
            (
                &names,
                syn("192.0.2.1:443"),
                none,
                vec!["evil.test".into()],
                deny(Proto::Tcp, "192.0.2.1:443", None, Some("evil.test")),
            ),
            // UDP to a pinned allowed name passes; without a pin it is
            // denied (no first bytes to read).
            (
                &names,
                udp("192.0.2.1:443"),
                none,
                www.clone(),
                Verdict::Allow(subject(Proto::Udp, "192.0.2.1:443")),
            ),
            (
                &names,
                udp("192.0.2.1:443"),
                none,
                vec![],
                deny(Proto::Udp, "192.0.2.1:443", None, None),
            ),
            // QUIC to a pinned address a name could turn: refused (TCP
            // falls back and its ClientHello is read); other UDP there, and
            // QUIC where names do not matter, pass.
            (
                &names,
                quic("192.0.2.1:443"),
                none,
                www.clone(),
                Verdict::Deny {
                    subject: subject(Proto::Udp, "192.0.2.1:443"),
                    denied: (None, Reason::NameUnreadable),
                    name: Some("www.ok.test".into()),
                },
            ),
            (
                &public_only,
                quic("192.0.2.1:443"),
                none,
                vec![],
                Verdict::Allow(subject(Proto::Udp, "192.0.2.1:443")),
            ),
        ];
        for (policy, kind, facts, pins, want) in cases {
            let got = police(&kind, facts, policy, |_| pins.clone());
            assert_eq!(got, want, "{kind:?} {facts:?} {pins:?}");
        }
    }

    fn live(kind: Kind<'static>, claims: &[(&str, NameSource)], gating: bool) -> Live<'static> {
        Live {
            kind,
            pinned: Vec::new(),
            claims: claims
                .iter()
                .map(|(n, s)| Some(((*n).to_owned(), *s)))
                .collect(),
            gating,
        }
    }

    fn syn(dst: &str) -> Kind<'static> {
        Kind::TcpSyn {
            src: "198.19.0.2:40000".parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq: 0,
        }
    }

    /// A reload resets what its rules deny and the old ones allowed, on
    /// every transport, on what the flow's bytes claimed; a reload that
    /// changes nothing for a flow leaves it.
    #[test]
    fn a_reload_revokes_what_the_new_rules_deny_and_only_that() {
        let policy = |text: &str| Config::from_toml(text).unwrap().policy();
        let open = policy("[policy]\npreset = \"allow-all\"\n");
        let closed = policy(
            "[policy]\npreset = \"allow-all\"\n[[policy.rule]]\naction = \"deny\"\n\
             destination = \"192.0.2.0/24\"\n",
        );
        let names = policy(
            "[policy]\npreset = \"none\"\n[[policy.rule]]\naction = \"allow\"\n\
             destination = \"*.ok.test\"\n",
        );
        let udp = Kind::Udp {
            src: "198.19.0.2:40000".parse().unwrap(),
            dst: "192.0.2.10:5353".parse().unwrap(),
            payload: &[],
        };
        let echo = Kind::Echo(crate::engine::classify::Echo {
            src: "198.19.0.2".parse().unwrap(),
            dst: "192.0.2.10".parse().unwrap(),
            ident: 7,
            seq: 0,
            data: &[],
        });
        for kind in [syn("192.0.2.10:80"), udp, echo] {
            let flow = live(kind, &[], false);
            let (_, denied, _) = revoked(&flow, &open, &closed).expect("denied by rule 1");
            assert_eq!(denied, (Some(1), Reason::Policy));
            assert!(
                revoked(&flow, &closed, &closed).is_none(),
                "nothing changed"
            );
            assert!(revoked(&flow, &closed, &open).is_none(), "opened up");
        }
        let elsewhere = live(syn("198.51.100.1:80"), &[], false);
        assert!(revoked(&elsewhere, &open, &closed).is_none());
        // Under name rules, TCP flows are judged on what their bytes said.
        let ok = live(
            syn("198.51.100.1:443"),
            &[("www.ok.test", NameSource::Sni)],
            false,
        );
        assert!(revoked(&ok, &open, &names).is_none());
        let evil = live(
            syn("198.51.100.1:443"),
            &[("evil.test", NameSource::Sni)],
            false,
        );
        let (_, denied, name) = revoked(&evil, &open, &names).expect("evil.test is not allowed");
        assert_eq!(denied.1, Reason::Policy);
        assert_eq!(name, Some(("evil.test".to_owned(), NameSource::Sni)));
        // One bad Host among good ones on a keep-alive flow is enough.
        let mixed = live(
            syn("198.51.100.1:80"),
            &[
                ("a.ok.test", NameSource::Host),
                ("evil.test", NameSource::Host),
            ],
            false,
        );
        assert!(revoked(&mixed, &open, &names).is_some());
        // Allowed by address alone before, its bytes never read for a name.
        let unread = live(syn("198.51.100.1:22"), &[], false);
        let (_, denied, _) = revoked(&unread, &open, &names).expect("needs a name now");
        assert_eq!(denied, (None, Reason::NameUnread));
        // Still being read: its gate decides under the new rules.
        assert!(revoked(&live(syn("198.51.100.1:80"), &[], true), &open, &names).is_none());
    }
}
