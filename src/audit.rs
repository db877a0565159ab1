//! The audit stream: one structured line per egress deny, on the
//! `vhost_gateway::audit` target (JSON with `--log-format json`), with the
//! rule that decided. Every deny in the daemon goes through here so the
//! format operators parse is defined once.
#![forbid(unsafe_code)]

use std::net::IpAddr;

/// One denied flow, datagram, echo or DNS name.
pub struct Deny<'a> {
    /// tcp, udp, icmp or dns.
    pub proto: &'a str,
    /// Destination address, when there is one (not for DNS names).
    pub dst: Option<IpAddr>,
    /// Destination port (0 for none).
    pub port: u16,
    /// Hostname, when known.
    pub name: Option<&'a str>,
    /// Where the name came from: dns, sni, host, query.
    pub name_source: Option<&'a str>,
    /// 1-based rule; None: the default (only read when `reason` is
    /// `Policy`).
    pub rule: Option<usize>,
    /// Why: a rule (or the default), or a name that does not belong to
    /// the address.
    pub reason: Reason,
    /// A live flow that a reload's new rules deny (it is reset): the line's
    /// reason is `reload`, and `cause` says why the new rules deny it.
    pub reload: bool,
}

/// Why a flow was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The rule (or default) named in the line.
    Policy,
    /// The flow's SNI/Host is not a name the guest was given the address
    /// for (fronting an address with another name).
    NameNotPinned,
    /// The flow's SNI/Host, with no DNS answer behind the address, does not
    /// resolve to it.
    NameNotResolving,
    /// The flow needed a name and its bytes hide or double it (TLS a
    /// server would reject, ECH, two Hosts, an unparseable request...).
    NameUnreadable,
    /// The flow needs a name under a reloaded policy, and its bytes were
    /// never read for one (its old policy decided by address alone).
    NameUnread,
}

impl Reason {
    /// Value of the `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Policy => "policy",
            Reason::NameNotPinned => "name-not-pinned",
            Reason::NameNotResolving => "name-not-resolving",
            Reason::NameUnreadable => "name-unreadable",
            Reason::NameUnread => "name-unread",
        }
    }
}

/// Writes the audit line.
pub fn deny(d: &Deny<'_>) {
    let dst = d.dst.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    let rule = match (d.reason, d.rule) {
        (Reason::Policy, Some(r)) => r.to_string(),
        (Reason::Policy, None) => "default".to_owned(),
        // No rule denied it: the name did not belong to the address.
        _ => "-".to_owned(),
    };
    let (name, name_source) = (d.name.unwrap_or("-"), d.name_source.unwrap_or("-"));
    if d.reload {
        tracing::warn!(
            target: "vhost_gateway::audit",
            proto = d.proto, dst = %dst, port = d.port, name, name_source,
            decision = "deny", rule, reason = "reload", cause = d.reason.as_str(),
            "egress revoked by a reload: flow reset"
        );
    } else {
        tracing::warn!(
            target: "vhost_gateway::audit",
            proto = d.proto, dst = %dst, port = d.port, name, name_source,
            decision = "deny", rule, reason = d.reason.as_str(),
            "egress denied"
        );
    }
}
