//! The egress policy: a pure function from (destination address, protocol,
//! port, hostname and where it came from) to a decision naming the rule that
//! made it. Ordered rules, first match wins, then the default.
//!
//! No I/O and no knowledge of the engine: callers look up names (DNS pins)
//! and pass them in. Parsing of the TOML model is in `rule`.
#![forbid(unsafe_code)]

pub mod addr;
pub mod judge;
pub mod rule;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

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
    /// The `host` group: the gateway's addresses and the host's own.
    host: Arc<HostSet>,
}

/// The addresses that are the daemon's host, the policy's `host` group:
/// the gateway's own (fixed) and every address of the host's (the
/// daemon's namespace's) interfaces, replaced whenever they change
/// (`proxy::hostaddrs` watches them), plus the unspecified "this host"
/// addresses of the special-purpose table.
#[derive(Debug, Default)]
pub struct HostSet {
    gateway: Vec<IpAddr>,
    live: RwLock<Arc<HashSet<IpAddr>>>,
}

impl HostSet {
    /// A set holding the gateway's addresses and, so far, nothing else.
    pub fn new(gateway: Vec<IpAddr>) -> Self {
        Self {
            gateway,
            live: RwLock::default(),
        }
    }

    /// Replaces the host's interface addresses.
    pub fn replace(&self, addresses: HashSet<IpAddr>) {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        *live = Arc::new(addresses);
    }

    /// Whether `ip` (one form, see [`addr::forms`]) is the host's.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.gateway.contains(&ip)
            || self
                .live
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&ip)
    }

    /// The host's interface addresses now.
    pub fn live(&self) -> Arc<HashSet<IpAddr>> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Policy {
    /// A policy over `rules`, then `default`; `gateway` are the gateway's
    /// addresses (the fixed part of group `host`).
    pub fn new(rules: Vec<Rule>, default: Action, gateway: Vec<IpAddr>) -> Self {
        Self {
            rules,
            default,
            host: Arc::new(HostSet::new(gateway)),
        }
    }

    /// This policy over `host` instead of its own host set: a reloaded
    /// policy keeps the set the daemon keeps up to date.
    pub fn with_host_set(mut self, host: Arc<HostSet>) -> Self {
        self.host = host;
        self
    }

    /// The rule numbered `n` (1-based).
    pub fn rule(&self, n: usize) -> Option<&Rule> {
        self.rules.get(n.checked_sub(1)?)
    }

    /// The action when no rule matches.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// The `host` group, for the watcher that keeps it current.
    pub fn host_set(&self) -> &Arc<HostSet> {
        &self.host
    }

    /// The group `form` (one form of an address) is in.
    pub fn group_of(&self, form: IpAddr) -> Group {
        Group::of(form, &self.host)
    }

    /// Decides one flow. Every form of the destination (an IPv6 address
    /// may carry IPv4 ones, [`addr::forms`]) is decided on its own and the
    /// flow is allowed only when all are: the first deny, else the first
    /// form's allow.
    pub fn decide(&self, flow: &Flow<'_>) -> Decision {
        let forms = addr::forms(flow.dst);
        let mut first = None;
        for &form in forms.as_slice() {
            let decision = self.decide_form(flow, form);
            if decision.action == Action::Deny {
                return decision;
            }
            first.get_or_insert(decision);
        }
        first.unwrap_or(Decision {
            action: self.default,
            rule: None,
        })
    }

    /// First match for one form. A form that is the host's is opened only
    /// by an allow rule for `group:host`: neither a prefix nor another
    /// group that happens to hold it, nor an allowing default, does.
    fn decide_form(&self, flow: &Flow<'_>, form: IpAddr) -> Decision {
        let is_host = self.host.contains(form) || self.group_of(form) == Group::Host;
        let name = flow.name.map(|(n, _)| n);
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches((flow.dst, form), flow.proto, flow.port, name, &self.host) {
                continue;
            }
            if is_host && rule.action == Action::Allow && !rule.destination.opens_host() {
                continue;
            }
            return Decision {
                action: rule.action,
                rule: Some(i + 1),
            };
        }
        Decision {
            action: if is_host { Action::Deny } else { self.default },
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

    /// Whether a DNS query for `name` may be forwarded. The first name
    /// rule covering `name` decides (a deny is answered like a blocked
    /// name). With no name rule for it, the query goes on only when some
    /// flow could still be allowed without one: an address or group allow
    /// rule, or an allowing default; a deny of every destination
    /// (`group:any`, all protocols and ports) or a denying default blocks
    /// it. So under a default-deny allow-list of names, a name no allow rule
    /// covers is answered locally as blocked, for every query type — never
    /// a DNS tunnel out of a sandbox that can reach nothing else.
    pub fn query(&self, name: &str) -> Decision {
        let decision = |i: usize, rule: &Rule| Decision {
            action: rule.action,
            rule: Some(i + 1),
        };
        for (i, rule) in self.rules.iter().enumerate() {
            if let Destination::Name(pattern) = &rule.destination
                && pattern.matches(name)
            {
                return decision(i, rule);
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let total_deny = rule.destination == Destination::Group(Group::Any)
                && rule.protos.is_empty()
                && rule.ports.is_empty();
            match &rule.destination {
                Destination::Name(_) => {}
                _ if rule.action == Action::Allow => return decision(i, rule),
                _ if total_deny => return decision(i, rule),
                _ => {}
            }
        }
        Decision {
            action: self.default,
            rule: None,
        }
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

#[cfg(test)]
mod tests;
