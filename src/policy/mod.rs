//! The egress policy: a pure function from (destination address, protocol,
//! port, hostname and where it came from) to a decision naming the rule that
//! made it. Ordered rules, first match wins, then the default.
//!
//! No I/O and no knowledge of the engine: callers look up names (DNS pins)
//! and pass them in. Parsing of the TOML model is in `rule`.
#![forbid(unsafe_code)]

pub mod judge;
pub mod rule;

use std::net::IpAddr;

pub use crate::names::NameSource;
pub use judge::{Claim, Denied, Query, Verdict};
pub use rule::{Action, Destination, Group, Proto, Rule};

/// What is being decided.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// Destination address the guest used.
    pub dst: IpAddr,
    /// Transport.
    pub proto: Proto,
    /// Destination port (none for ICMP).
    pub port: Option<u16>,
    /// Hostname and its source, when known.
    pub name: Option<(&'a str, NameSource)>,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// 1-based index of the rule that decided; None: the default.
    pub rule: Option<usize>,
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    default: Action,
    /// The gateway's own addresses: the `host` group.
    own: Vec<IpAddr>,
}

impl Policy {
    /// A policy over `rules`, then `default`; `own` are the gateway's
    /// addresses (group `host`).
    pub fn new(rules: Vec<Rule>, default: Action, own: Vec<IpAddr>) -> Self {
        Self {
            rules,
            default,
            own,
        }
    }

    /// Decides one flow.
    pub fn decide(&self, flow: &Flow<'_>) -> Decision {
        let dst = canonical(flow.dst);
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(
                dst,
                flow.proto,
                flow.port,
                flow.name.map(|(n, _)| n),
                &self.own,
            ) {
                return Decision {
                    action: rule.action,
                    rule: Some(i + 1),
                };
            }
        }
        Decision {
            action: self.default,
            rule: None,
        }
    }

    /// Whether knowing the flow's hostname could change its decision: a
    /// domain rule for its protocol and port, with the other action, comes
    /// before the rule (or default) that decides it without a name.
    pub fn needs_name(&self, flow: &Flow<'_>) -> bool {
        let without = self.decide(&Flow {
            name: None,
            ..*flow
        });
        let last = without.rule.unwrap_or(self.rules.len() + 1);
        self.rules.iter().take(last - 1).any(|rule| {
            matches!(rule.destination, Destination::Name(_))
                && rule.action != without.action
                && rule.matches_transport(flow.proto, flow.port)
        })
    }

    /// For a DNS query for `name`: the first rule naming a domain that
    /// covers it decides; a deny is answered like a blocked name.
    pub fn name_denied(&self, name: &str) -> Option<usize> {
        for (i, rule) in self.rules.iter().enumerate() {
            if let Destination::Name(pattern) = &rule.destination
                && pattern.matches(name)
            {
                return (rule.action == Action::Deny).then_some(i + 1);
            }
        }
        None
    }

    /// Rules that can never decide because an earlier rule always matches
    /// first: (shadowed rule, shadowing rule), 1-based.
    pub fn shadowed(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (j, later) in self.rules.iter().enumerate() {
            if let Some(i) = self.rules[..j].iter().position(|e| e.covers(later)) {
                out.push((j + 1, i + 1));
            }
        }
        out
    }
}

/// IPv4-mapped IPv6 addresses are decided as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests;
