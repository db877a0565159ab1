//! The `[policy]` table: the operator's rules, a preset, a default; and
//! their compilation into the [`crate::policy::Policy`] the daemon runs.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use serde::Deserialize;

use super::{Checks, Config};
use crate::policy::{Action, Destination, Group, Policy, Proto, Rule};
use crate::wellknown::GATEWAY_LINK_LOCAL;

/// A named starting point for the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Public addresses allowed; host, loopback, private, link-local,
    /// metadata and multicast denied; default deny.
    #[default]
    PublicOnly,
    /// Everything allowed but the host itself (its own addresses).
    AllowAll,
    /// Nothing allowed (DNS still answered).
    None,
}

impl Preset {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::PublicOnly => "public-only",
            Preset::AllowAll => "allow-all",
            Preset::None => "none",
        }
    }
}

/// A port or an inclusive range, as written in a rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// `443`.
    Port(u16),
    /// `"8000-8100"`.
    Range(String),
}

/// One `[[policy.rule]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuleConfig {
    /// allow or deny.
    pub action: Action,
    /// `CIDR`, `IP`, `name`, `*.name` or `group:NAME`.
    pub destination: String,
    /// tcp, udp, icmp; empty: all.
    #[serde(default)]
    pub protocols: Vec<Proto>,
    /// Ports and ranges; empty: all.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// The `[policy]` table: the operator's rules first, then the preset's,
/// then the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PolicyConfig {
    /// public-only (default), allow-all or none.
    #[serde(default)]
    pub preset: Preset,
    /// Overrides the preset's default action.
    #[serde(default)]
    pub default: Option<Action>,
    /// Ordered rules; first match wins.
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
}

impl RuleConfig {
    /// The compiled rule, or what is wrong with it.
    pub fn compile(&self) -> Result<Rule, String> {
        let ports = self
            .ports
            .iter()
            .map(|p| match p {
                PortSpec::Port(0) => Err("port 0".to_owned()),
                PortSpec::Port(n) => Ok((*n, *n)),
                PortSpec::Range(s) => crate::policy::rule::parse_ports(s),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !ports.is_empty() && self.protocols.contains(&Proto::Icmp) {
            return Err("ports do not apply to icmp".into());
        }
        Ok(Rule {
            action: self.action,
            destination: Destination::parse(&self.destination)?,
            protos: self.protocols.clone(),
            ports,
        })
    }
}

impl Config {
    /// The sandbox's own subnets: internal for rebind protection.
    pub fn own_networks(&self) -> Vec<(IpAddr, u8)> {
        let net = &self.network;
        let mut own = vec![(IpAddr::V4(net.ipv4_gateway), net.ipv4_prefix_len)];
        if net.ipv6_enabled {
            own.push((IpAddr::V6(net.ipv6_prefix.addr), net.ipv6_prefix.len));
        }
        own
    }

    /// The gateway's own addresses: the policy's fixed `host` members.
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        let n = &self.network;
        let mut own = vec![IpAddr::V4(n.ipv4_gateway)];
        if n.ipv6_enabled {
            own.push(IpAddr::V6(n.ipv6_gateway));
            own.push(IpAddr::V6(GATEWAY_LINK_LOCAL));
        }
        own
    }

    /// The compiled policy: operator rules, then the preset's, then the
    /// default. Rules were checked by `validate`; a rule that still fails is
    /// skipped rather than trusted.
    pub fn policy(&self) -> Policy {
        let p = &self.policy;
        let mut rules: Vec<Rule> = p.rule.iter().filter_map(|r| r.compile().ok()).collect();
        let group = |action, g| Rule {
            action,
            destination: Destination::Group(g),
            protos: Vec::new(),
            ports: Vec::new(),
        };
        let preset_default = match p.preset {
            Preset::PublicOnly => {
                for g in [
                    Group::Metadata,
                    Group::Host,
                    Group::Loopback,
                    Group::Private,
                    Group::LinkLocal,
                    Group::Multicast,
                ] {
                    rules.push(group(Action::Deny, g));
                }
                rules.push(group(Action::Allow, Group::Public));
                Action::Deny
            }
            Preset::AllowAll => {
                // Everything but the host itself, which only an explicit
                // `allow group:host` opens (its loopback only the gateway
                // mapping reaches).
                rules.push(group(Action::Deny, Group::Host));
                Action::Allow
            }
            Preset::None => Action::Deny,
        };
        Policy::new(
            rules,
            p.default.unwrap_or(preset_default),
            self.own_addresses(),
        )
    }
}

impl PolicyConfig {
    pub(super) fn validate(&self, out: &mut Checks) {
        for (i, rule) in self.rule.iter().enumerate() {
            if let Err(e) = rule.compile() {
                out.bad("policy.rule", format!("rule {}: {e}", i + 1));
            }
        }
    }
}
