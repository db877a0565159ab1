//! The `[dns]` table: interception, upstreams, block lists, rebind
//! protection; and the block-list files it names.
#![forbid(unsafe_code)]

use serde::Deserialize;

use super::Checks;
use super::types::Resolver;

/// How blocked names are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockedAnswer {
    /// NXDOMAIN: the name does not exist.
    Nxdomain,
    /// REFUSED: the resolver will not answer.
    Refused,
    /// NOERROR with 0.0.0.0 (A) or :: (AAAA), nothing for other types.
    Null,
}

/// The `[dns]` table: every UDP query to port 53 (any address) is answered
/// by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Dns {
    /// Upstream resolvers, tried in order; empty means the host's
    /// /etc/resolv.conf nameservers.
    pub upstreams: Vec<Resolver>,
    /// How long one upstream gets for one query.
    pub timeout_ms: u64,
    /// Rounds over the upstream list before SERVFAIL.
    pub attempts: u32,
    /// Queries being resolved at once; more are answered REFUSED.
    pub max_inflight: usize,
    /// Blocked names: `example.com` exactly, `*.example.com` everything under it.
    pub block: Vec<String>,
    /// Files of blocked names: one per line, or hosts-file lines; `#`
    /// comments. Read by [`super::Config::load`] into `block`.
    pub block_files: Vec<std::path::PathBuf>,
    /// nxdomain or refused.
    pub blocked_answer: BlockedAnswer,
    /// Remove answers that point names at internal addresses.
    pub rebind_protection: bool,
    /// Names exempt from rebind protection (block-list grammar).
    pub rebind_allow: Vec<String>,
    /// Addresses whose name is remembered (for domain rules and logs).
    pub max_pins: usize,
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout_ms: 2000,
            attempts: 2,
            max_inflight: 256,
            block: Vec::new(),
            block_files: Vec::new(),
            blocked_answer: BlockedAnswer::Nxdomain,
            rebind_protection: true,
            rebind_allow: Vec::new(),
            max_pins: 16_384,
        }
    }
}

impl Dns {
    pub(super) fn validate(&self, out: &mut Checks) {
        out.range("dns.timeout-ms", self.timeout_ms, 100..=30_000);
        out.range("dns.attempts", self.attempts, 1..=5);
        out.range("dns.max-pins", self.max_pins, 16..=1_048_576);
        out.range("dns.max-inflight", self.max_inflight, 1..=4096);
        out.check(
            "dns.upstreams",
            self.upstreams
                .iter()
                .all(|u| u.0.port() != 0 && !u.0.ip().is_unspecified()),
            || "upstreams need an address and a port (53 by default)".into(),
        );
        for entry in self.block.iter().chain(&self.rebind_allow) {
            if let Err(e) = crate::names::Pattern::parse(entry) {
                out.bad("dns.block", format!("{entry:?}: {e}"));
            }
        }
    }
}

/// (line number, name) of each entry of a block-list file: one name per
/// line, or hosts-file lines (`0.0.0.0 name [name...]`), `#` comments;
/// hosts files' own names (localhost and friends) are skipped. A line of
/// several words that does not start with an address is neither format:
/// it comes back whole, to be reported rather than read as several names.
pub fn block_file_entries(text: &str) -> Vec<(usize, &str)> {
    const HOSTS_OWN: &[&str] = &[
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
    ];
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words
            .peek()
            .is_some_and(|w| w.parse::<std::net::IpAddr>().is_ok())
        {
            words.next();
        } else if line.split_whitespace().nth(1).is_some() {
            // Not a name (names have no spaces): the grammar check reports it.
            out.push((i + 1, line));
            continue;
        }
        for name in words {
            if !HOSTS_OWN.contains(&name) {
                out.push((i + 1, name));
            }
        }
    }
    out
}
