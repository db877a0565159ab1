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
    /// 1-based rule; None: the default.
    pub rule: Option<usize>,
}

/// Writes the audit line.
pub fn deny(d: &Deny<'_>) {
    tracing::warn!(
        target: "vhost_gateway::audit",
        proto = d.proto,
        dst = %d.dst.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        port = d.port,
        name = d.name.unwrap_or("-"),
        name_source = d.name_source.unwrap_or("-"),
        decision = "deny",
        rule = d.rule.map_or_else(|| "default".to_owned(), |r| r.to_string()),
        "egress denied"
    );
}
