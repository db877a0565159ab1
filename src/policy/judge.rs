//! The egress decision for one flow, as far as it can be made without I/O:
//! the one function every path that opens or names a flow calls (the
//! engine at a SYN, datagram or echo; its first-bytes gate; the
//! first-bytes service and TLS interception through `egress`).
//!
//! Inputs are what the caller looked up: the names the destination was
//! given by the guest's DNS answers (pins) and what the flow's own first
//! bytes claim. A claimed name must be one of the pinned names when there
//! are any (no fronting an address with another name); with none, a name
//! that is what allows the flow must still be shown to resolve to the
//! address, which is the caller's (async) part: [`Verdict::Resolve`].
#![forbid(unsafe_code)]

use std::net::IpAddr;

use super::{Action, Flow, Policy, Proto};
use crate::audit::Reason;
use crate::names::NameSource;

/// What the flow's first bytes have said about its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim<'a> {
    /// Not read yet: the flow is being opened (SYN, datagram, echo).
    Unread,
    /// Read: they name nothing (or only an address literal).
    Unnamed,
    /// Read: the TLS SNI or HTTP Host.
    Named(&'a str, NameSource),
}

/// One flow to decide.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// Destination address the guest used.
    pub dst: IpAddr,
    /// Transport.
    pub proto: Proto,
    /// Destination port (none for ICMP).
    pub port: Option<u16>,
    /// Names the guest's DNS answers gave `dst`, newest first.
    pub pinned: &'a [String],
    /// What the first bytes say.
    pub claim: Claim<'a>,
}

/// A deny: the rule that decided (None: the default, or no rule when the
/// reason is not `Policy`) and why.
pub type Denied = (Option<usize>, Reason);

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Let it through; the rule that allowed it (None: the default).
    Allow(Option<usize>),
    /// Refuse it.
    Deny(Denied),
    /// A TCP flow whose hostname could change the decision: accept it and
    /// decide on its first bytes (only for [`Claim::Unread`]).
    NeedsName,
    /// Allowed only by a claimed name with no DNS answer behind the
    /// address: allow once the name resolves to `dst`, else deny with
    /// [`Reason::NameNotResolving`].
    Resolve(&'a str),
}

impl Policy {
    /// Decides `query`.
    pub fn judge<'a>(&self, query: &Query<'a>) -> Verdict<'a> {
        let claimed = match query.claim {
            Claim::Named(name, source) => Some((name, source)),
            Claim::Unread | Claim::Unnamed => None,
        };
        if let Some((name, _)) = claimed
            && !query.pinned.is_empty()
            && !query.pinned.iter().any(|p| p == name)
        {
            return Verdict::Deny((None, Reason::NameNotPinned));
        }
        // With no name from the bytes, the pins speak: the address is
        // allowed when any live pin allows it (shared hosting: one denied
        // name on an address must not take an allowed one down), and the
        // newest pin speaks for a deny.
        let named_by_pin = |pin: &'a String| Flow {
            dst: query.dst,
            proto: query.proto,
            port: query.port,
            name: Some((pin.as_str(), NameSource::Dns)),
        };
        let flow = match claimed {
            Some(name) => Flow {
                dst: query.dst,
                proto: query.proto,
                port: query.port,
                name: Some(name),
            },
            None => query
                .pinned
                .iter()
                .map(named_by_pin)
                .find(|f| self.decide(f).action == Action::Allow)
                .or_else(|| query.pinned.first().map(named_by_pin))
                .unwrap_or(Flow {
                    dst: query.dst,
                    proto: query.proto,
                    port: query.port,
                    name: None,
                }),
        };
        let decision = self.decide(&flow);
        if query.claim == Claim::Unread
            && query.proto == Proto::Tcp
            && (query.pinned.is_empty() || decision.action == Action::Allow)
            && self.needs_name(&flow)
        {
            return Verdict::NeedsName;
        }
        if decision.action == Action::Deny {
            return Verdict::Deny((decision.rule, Reason::Policy));
        }
        if let Some((name, _)) = claimed
            && query.pinned.is_empty()
        {
            // Only a name that is what allows the flow needs checking.
            let unnamed = self.decide(&Flow { name: None, ..flow });
            if unnamed.action != Action::Allow {
                return Verdict::Resolve(name);
            }
        }
        Verdict::Allow(decision.rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Destination, Rule};

    fn rule(action: Action, destination: &str) -> Rule {
        Rule {
            action,
            destination: Destination::parse(destination).unwrap(),
            protos: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// Allow *.ok.test and 192.0.2.0/24 port-less, deny the rest.
    fn policy() -> Policy {
        Policy::new(
            vec![
                rule(Action::Deny, "bad.ok.test"),
                rule(Action::Allow, "*.ok.test"),
                rule(Action::Allow, "198.51.100.0/24"),
            ],
            Action::Deny,
            Vec::new(),
        )
    }

    #[test]
    fn table() {
        use Claim::{Named, Unnamed, Unread};
        use NameSource::{Host, Sni};
        let p = policy();
        let www = ["www.ok.test".to_owned()];
        let shared = ["www.ok.test".to_owned(), "evil.test".to_owned()];
        let evil = ["evil.test".to_owned()];
        let newest_denied = ["evil.test".to_owned(), "www.ok.test".to_owned()];
        let none: [String; 0] = [];
        let cases: &[(&str, Proto, &[String], Claim<'_>, Verdict<'_>)] = &[
            // At the SYN: a pin that allows, a domain rule that could turn.
            ("192.0.2.1", Proto::Tcp, &www, Unread, Verdict::NeedsName),
            ("192.0.2.1", Proto::Tcp, &none, Unread, Verdict::NeedsName),
            // A pinned address the policy denies is refused at once.
            (
                "192.0.2.1",
                Proto::Tcp,
                &evil,
                Unread,
                Verdict::Deny((None, Reason::Policy)),
            ),
            // UDP is never decided on first bytes.
            (
                "192.0.2.1",
                Proto::Udp,
                &www,
                Unread,
                Verdict::Allow(Some(2)),
            ),
            (
                "192.0.2.1",
                Proto::Udp,
                &none,
                Unread,
                Verdict::Deny((None, Reason::Policy)),
            ),
            // An address rule decides without a name.
            (
                "198.51.100.7",
                Proto::Tcp,
                &none,
                Unnamed,
                Verdict::Allow(Some(3)),
            ),
            // Named flows with pins: the name must be pinned, then decided.
            (
                "192.0.2.1",
                Proto::Tcp,
                &shared,
                Named("www.ok.test", Sni),
                Verdict::Allow(Some(2)),
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &shared,
                Named("evil.test", Host),
                Verdict::Deny((None, Reason::Policy)),
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &shared,
                Named("api.ok.test", Sni),
                Verdict::Deny((None, Reason::NameNotPinned)),
            ),
            // No name in the bytes: any live pin that allows, allows,
            // whichever is newest.
            (
                "192.0.2.1",
                Proto::Tcp,
                &shared,
                Unnamed,
                Verdict::Allow(Some(2)),
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &newest_denied,
                Unnamed,
                Verdict::Allow(Some(2)),
            ),
            (
                "192.0.2.1",
                Proto::Udp,
                &newest_denied,
                Unread,
                Verdict::Allow(Some(2)),
            ),
            // At the SYN the flow is accepted and its first bytes must then
            // name an allowed pin.
            (
                "192.0.2.1",
                Proto::Tcp,
                &newest_denied,
                Unread,
                Verdict::NeedsName,
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &newest_denied,
                Named("evil.test", Sni),
                Verdict::Deny((None, Reason::Policy)),
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &newest_denied,
                Named("www.ok.test", Sni),
                Verdict::Allow(Some(2)),
            ),
            // No pins: a name that allows must resolve; one that denies,
            // denies; one the address already allows needs nothing.
            (
                "192.0.2.1",
                Proto::Tcp,
                &none,
                Named("api.ok.test", Sni),
                Verdict::Resolve("api.ok.test"),
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &none,
                Named("bad.ok.test", Sni),
                Verdict::Deny((Some(1), Reason::Policy)),
            ),
            (
                "198.51.100.7",
                Proto::Tcp,
                &none,
                Named("elsewhere.test", Host),
                Verdict::Allow(Some(3)),
            ),
            (
                "192.0.2.1",
                Proto::Tcp,
                &none,
                Unnamed,
                Verdict::Deny((None, Reason::Policy)),
            ),
        ];
        for (dst, proto, pinned, claim, want) in cases {
            let got = p.judge(&Query {
                dst: dst.parse().unwrap(),
                proto: *proto,
                port: Some(443),
                pinned,
                claim: *claim,
            });
            assert_eq!(got, *want, "{dst} {proto:?} {pinned:?} {claim:?}");
        }
    }
}
