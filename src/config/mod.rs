//! The configuration: serde schema (unknown keys rejected), the embedded
//! defaults, and validation.
//!
//! Pure data and checks: nothing here touches sockets or the guest. Every value
//! the rest of the daemon reads has been validated here first, so later stages
//! may rely on the invariants listed on [`Config::validate`].
#![forbid(unsafe_code)]

mod types;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::Deserialize;

pub use types::{Ipv6Prefix, MacAddr, Resolver};

/// The embedded defaults, also shipped as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Smallest MTU any IPv4 host must accept (RFC 791).
const MIN_MTU_V4: u16 = 576;
/// IPv6 links must carry at least this much (RFC 8200 5).
const MIN_MTU_V6: u16 = 1280;
/// Largest MTU we can carry: a 64 KiB IP packet less headers, as passt uses.
pub const MAX_MTU: u16 = 65520;

/// Errors from loading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or schema error (unknown key, wrong type).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
}

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `network.mtu`; empty when unknown.
    pub key: String,
    /// 1-based line in the file, when it could be found.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.key.is_empty(), self.line) {
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.key, self.message),
            (false, None) => write!(f, "{}: {}", self.key, self.message),
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The guest-facing network.
    #[serde(default)]
    pub network: Network,
    /// Where guest flows may go.
    #[serde(default)]
    pub outbound: Outbound,
    /// TCP flow limits and buffers.
    #[serde(default)]
    pub tcp: Tcp,
    /// UDP session limits.
    #[serde(default)]
    pub udp: Udp,
    /// ICMP echo session limits.
    #[serde(default)]
    pub icmp: Icmp,
    /// Host ports published to guest ports.
    #[serde(default)]
    pub publish: Vec<Publish>,
    /// DNS interception.
    #[serde(default)]
    pub dns: Dns,
    /// The egress policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// TLS interception.
    #[serde(default)]
    pub tls: Tls,
}

/// A named starting point for the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Public addresses allowed; host, loopback, private, link-local,
    /// metadata and multicast denied; default deny.
    #[default]
    PublicOnly,
    /// Everything allowed.
    AllowAll,
    /// Nothing allowed (DNS still answered).
    None,
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
    pub action: crate::policy::Action,
    /// `CIDR`, `IP`, `name`, `*.name` or `group:NAME`.
    pub destination: String,
    /// tcp, udp, icmp; empty: all.
    #[serde(default)]
    pub protocols: Vec<crate::policy::Proto>,
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
    pub default: Option<crate::policy::Action>,
    /// Ordered rules; first match wins.
    #[serde(default)]
    pub rule: Vec<RuleConfig>,
}

impl RuleConfig {
    /// The compiled rule, or what is wrong with it.
    pub fn compile(&self) -> Result<crate::policy::Rule, String> {
        let ports = self
            .ports
            .iter()
            .map(|p| match p {
                PortSpec::Port(0) => Err("port 0".to_owned()),
                PortSpec::Port(n) => Ok((*n, *n)),
                PortSpec::Range(s) => crate::policy::rule::parse_ports(s),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !ports.is_empty() && self.protocols.contains(&crate::policy::Proto::Icmp) {
            return Err("ports do not apply to icmp".into());
        }
        Ok(crate::policy::Rule {
            action: self.action,
            destination: crate::policy::Destination::parse(&self.destination)?,
            protos: self.protocols.clone(),
            ports,
        })
    }
}

impl Config {
    /// The gateway's own addresses (the policy's `host` group).
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        let n = &self.network;
        let mut own = vec![IpAddr::V4(n.ipv4_gateway)];
        if n.ipv6_enabled {
            own.push(IpAddr::V6(n.ipv6_gateway));
            own.push(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)));
        }
        own
    }

    /// The compiled policy: operator rules, then the preset's, then the
    /// default. Rules were checked by `validate`; a rule that still fails is
    /// skipped rather than trusted.
    pub fn policy(&self) -> crate::policy::Policy {
        use crate::policy::{Action, Destination, Group, Rule};
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
            Preset::AllowAll => Action::Allow,
            Preset::None => Action::Deny,
        };
        crate::policy::Policy::new(
            rules,
            p.default.unwrap_or(preset_default),
            self.own_addresses(),
        )
    }
}

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
    /// comments. Read by [`Config::load`] into `block`.
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

/// What to do with a flow on an intercepted port that cannot be
/// intercepted (no SNI, or not TLS at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Relay it untouched, decided by the policy without a name.
    #[default]
    Pass,
    /// Reset it.
    Refuse,
}

/// Which roots verify upstream servers (plus `upstream-ca-file`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamRoots {
    /// Mozilla's roots compiled in (webpki-roots): the same on every host.
    #[default]
    Webpki,
    /// The host's store (/etc/ssl/certs and friends).
    System,
    /// None: only `upstream-ca-file`.
    None,
}

/// The `[tls]` table: opt-in interception of TLS on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Tls {
    /// Intercept at all.
    pub enabled: bool,
    /// TCP ports whose TLS is intercepted (and whose UDP, QUIC, is dropped).
    pub ports: Vec<u16>,
    /// The operator CA's certificate (PEM), which signs the leaves.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM, PKCS#8).
    pub ca_key: Option<std::path::PathBuf>,
    /// Names passed through untouched (block-list grammar: `name`,
    /// `*.name`), for clients that pin certificates.
    pub bypass: Vec<String>,
    /// Roots that verify upstream servers.
    pub upstream_roots: UpstreamRoots,
    /// Extra CA certificates (PEM) trusted for upstream servers.
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// Validity of a minted leaf certificate.
    pub leaf_validity_days: u32,
    /// Leaf certificates kept (one per name); the oldest goes first.
    pub max_cached_certs: usize,
    /// A TLS flow with no SNI.
    pub no_sni: Fallback,
    /// A flow on an intercepted port that is not TLS.
    pub not_tls: Fallback,
    /// How long the guest gets to send its ClientHello, and each side to
    /// finish its handshake.
    pub handshake_timeout_ms: u64,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            enabled: false,
            ports: vec![443],
            ca_cert: None,
            ca_key: None,
            bypass: Vec::new(),
            upstream_roots: UpstreamRoots::Webpki,
            upstream_ca_file: None,
            leaf_validity_days: 7,
            max_cached_certs: 1024,
            no_sni: Fallback::Pass,
            not_tls: Fallback::Pass,
            handshake_timeout_ms: 10_000,
        }
    }
}

/// The `[outbound]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Outbound {
    /// Whether the gateway's addresses reach the host's loopback (same port).
    pub allow_host_loopback: bool,
}

/// The `[tcp]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Tcp {
    /// Most concurrent flows; further SYNs are answered with RST.
    pub max_connections: usize,
    /// Upstream connect timeout.
    pub connect_timeout_ms: u64,
    /// A flow with no data either way for this long is reset.
    pub idle_timeout_seconds: u64,
    /// Receive and send buffer of each flow's socket on the guest side.
    pub buffer_bytes: usize,
}

impl Default for Tcp {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            connect_timeout_ms: 10_000,
            idle_timeout_seconds: 3600,
            buffer_bytes: 1024 * 1024,
        }
    }
}

/// The `[udp]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Udp {
    /// Most concurrent sessions (guest source, destination).
    pub max_sessions: usize,
    /// A session with no datagram either way for this long is closed.
    pub idle_timeout_seconds: u64,
}

impl Default for Udp {
    fn default() -> Self {
        Self {
            max_sessions: 512,
            idle_timeout_seconds: 60,
        }
    }
}

/// The `[icmp]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Icmp {
    /// Most concurrent echo sessions (guest, destination, identifier).
    pub max_sessions: usize,
    /// A session with no echo for this long is closed.
    pub idle_timeout_seconds: u64,
}

impl Default for Icmp {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            idle_timeout_seconds: 10,
        }
    }
}

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One `[[publish]]` entry: a host address forwarded to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Publish {
    /// tcp or udp.
    pub protocol: Protocol,
    /// Host address and port to listen on.
    pub host: std::net::SocketAddr,
    /// Guest port connections are forwarded to.
    pub guest_port: u16,
}

/// The `[network]` table: addresses and link parameters the guest is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Network {
    /// MAC reported in the virtio config space.
    pub guest_mac: MacAddr,
    /// The gateway's own MAC.
    pub gateway_mac: MacAddr,
    /// The gateway's IPv4 address.
    pub ipv4_gateway: Ipv4Addr,
    /// The address leased to the guest.
    pub ipv4_guest: Ipv4Addr,
    /// Prefix length of the guest subnet.
    pub ipv4_prefix_len: u8,
    /// Whether router advertisements are sent and IPv6 is answered.
    pub ipv6_enabled: bool,
    /// The SLAAC prefix (a /64).
    pub ipv6_prefix: Ipv6Prefix,
    /// The gateway's address inside that prefix.
    pub ipv6_gateway: Ipv6Addr,
    /// Link MTU.
    pub mtu: u16,
    /// Advertised IPv4 DNS servers; empty means the gateway.
    pub dns_ipv4: Vec<Ipv4Addr>,
    /// Advertised IPv6 DNS servers; empty means the gateway.
    pub dns_ipv6: Vec<Ipv6Addr>,
    /// DHCP option 119 search domains.
    pub domain_search: Vec<String>,
    /// DHCP lease time.
    pub dhcp_lease_seconds: u32,
    /// Unsolicited RA interval.
    pub ra_interval_seconds: u32,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            guest_mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            gateway_mac: MacAddr([0x02, 0x76, 0x67, 0x00, 0x00, 0x01]),
            ipv4_gateway: Ipv4Addr::new(198, 19, 0, 1),
            ipv4_guest: Ipv4Addr::new(198, 19, 0, 2),
            ipv4_prefix_len: 24,
            ipv6_enabled: true,
            ipv6_prefix: Ipv6Prefix {
                addr: Ipv6Addr::new(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 0),
                len: 64,
            },
            ipv6_gateway: Ipv6Addr::new(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 1),
            mtu: MAX_MTU,
            dns_ipv4: Vec::new(),
            dns_ipv6: Vec::new(),
            domain_search: Vec::new(),
            dhcp_lease_seconds: 3600,
            ra_interval_seconds: 60,
        }
    }
}

impl Network {
    /// DNS servers the guest is told about over DHCP.
    pub fn advertised_dns_v4(&self) -> Vec<Ipv4Addr> {
        if self.dns_ipv4.is_empty() {
            vec![self.ipv4_gateway]
        } else {
            self.dns_ipv4.clone()
        }
    }

    /// DNS servers the guest is told about in router advertisements.
    pub fn advertised_dns_v6(&self) -> Vec<Ipv6Addr> {
        if self.dns_ipv6.is_empty() {
            vec![self.ipv6_gateway]
        } else {
            self.dns_ipv6.clone()
        }
    }

    /// The IPv4 subnet mask.
    pub fn ipv4_netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.ipv4_prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    fn ipv4_network(&self, addr: Ipv4Addr) -> u32 {
        u32::from(addr) & u32::from(self.ipv4_netmask())
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of_offset(text, s.start));
            Error::Invalid(vec![Problem {
                key: String::new(),
                line,
                message: e.message().trim().to_owned(),
            }])
        })?;
        let problems: Vec<Problem> = config
            .validate()
            .into_iter()
            .map(|(key, message)| Problem {
                line: locate_key(text, &key),
                key,
                message,
            })
            .collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Invalid(problems))
        }
    }

    /// Reads, parses and validates a file, and the block-list files it
    /// names (their entries join `dns.block`).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::from_toml(&text)?;
        let mut problems = Vec::new();
        for file in config.dns.block_files.clone() {
            let list = std::fs::read_to_string(&file).map_err(|source| Error::Read {
                path: file.display().to_string(),
                source,
            })?;
            for (line, name) in block_file_entries(&list) {
                match crate::names::Pattern::parse(name).map(drop) {
                    Ok(()) => config.dns.block.push(name.to_owned()),
                    Err(e) => problems.push(Problem {
                        key: "dns.block-files".into(),
                        line: None,
                        message: format!("{}:{line}: {name:?}: {e}", file.display()),
                    }),
                }
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Invalid(problems))
        }
    }

    /// The embedded defaults.
    pub fn embedded() -> Self {
        Self::default()
    }

    /// Checks every invariant the daemon relies on; returns (key, message)
    /// pairs. After this, addresses are unicast and distinct, the guest is
    /// inside the gateway's subnet, the MTU is in range for the enabled
    /// families, and the IPv6 prefix is a /64 containing the gateway.
    pub fn validate(&self) -> Vec<(String, String)> {
        let n = &self.network;
        let mut out = Vec::new();
        let mut bad_network = Vec::new();
        let mut bad =
            |key: &str, message: String| bad_network.push((format!("network.{key}"), message));

        for (key, mac) in [("guest-mac", n.guest_mac), ("gateway-mac", n.gateway_mac)] {
            if mac.is_multicast() || mac.is_zero() {
                bad(key, format!("{mac} is not a unicast MAC address"));
            }
        }
        if n.guest_mac == n.gateway_mac {
            bad("gateway-mac", "must differ from guest-mac".into());
        }
        if !(8..=30).contains(&n.ipv4_prefix_len) {
            bad(
                "ipv4-prefix-len",
                format!("{} is outside 8..=30", n.ipv4_prefix_len),
            );
        } else {
            let mask = u32::from(n.ipv4_netmask());
            for (key, addr) in [
                ("ipv4-gateway", n.ipv4_gateway),
                ("ipv4-guest", n.ipv4_guest),
            ] {
                let host = u32::from(addr) & !mask;
                if addr.is_unspecified()
                    || addr.is_multicast()
                    || addr.is_broadcast()
                    || addr.is_loopback()
                {
                    bad(key, format!("{addr} is not a usable unicast address"));
                } else if host == 0 || host == !mask {
                    bad(
                        key,
                        format!("{addr} is the network or broadcast address of its subnet"),
                    );
                }
            }
            if n.ipv4_network(n.ipv4_gateway) != n.ipv4_network(n.ipv4_guest) {
                bad(
                    "ipv4-guest",
                    format!(
                        "{} is not in the gateway's subnet {}/{}",
                        n.ipv4_guest, n.ipv4_gateway, n.ipv4_prefix_len
                    ),
                );
            }
            if n.ipv4_gateway == n.ipv4_guest {
                bad("ipv4-guest", "must differ from ipv4-gateway".into());
            }
        }
        let min_mtu = if n.ipv6_enabled {
            MIN_MTU_V6
        } else {
            MIN_MTU_V4
        };
        if !(min_mtu..=MAX_MTU).contains(&n.mtu) {
            bad(
                "mtu",
                format!(
                    "{} is outside {min_mtu}..={MAX_MTU}{}",
                    n.mtu,
                    if n.ipv6_enabled {
                        " (IPv6 needs at least 1280)"
                    } else {
                        ""
                    }
                ),
            );
        }
        if n.ipv6_enabled {
            if n.ipv6_prefix.len != 64 {
                bad(
                    "ipv6-prefix",
                    format!("SLAAC needs a /64, not /{}", n.ipv6_prefix.len),
                );
            }
            if !n.ipv6_prefix.contains(n.ipv6_gateway) {
                bad(
                    "ipv6-gateway",
                    format!("{} is not inside {}", n.ipv6_gateway, n.ipv6_prefix),
                );
            }
            if n.ipv6_gateway.is_multicast() || n.ipv6_gateway.is_unspecified() {
                bad("ipv6-gateway", "must be a unicast address".into());
            }
        }
        if n.dns_ipv4.len() > 3 {
            bad("dns-ipv4", "at most 3 servers".into());
        }
        if n.dns_ipv6.len() > 3 {
            bad("dns-ipv6", "at most 3 servers".into());
        }
        for name in &n.domain_search {
            if let Err(e) = crate::names::check(name) {
                bad("domain-search", format!("{name:?}: {e}"));
            }
        }
        if crate::names::encode_wire(&n.domain_search).len() > 255 {
            bad(
                "domain-search",
                "encoded list exceeds 255 bytes (one DHCP option)".into(),
            );
        }
        if !(60..=604_800).contains(&n.dhcp_lease_seconds) {
            bad(
                "dhcp-lease-seconds",
                format!("{} is outside 60..=604800", n.dhcp_lease_seconds),
            );
        }
        if !(4..=1800).contains(&n.ra_interval_seconds) {
            bad(
                "ra-interval-seconds",
                format!("{} is outside 4..=1800", n.ra_interval_seconds),
            );
        }
        out.append(&mut bad_network);
        let mut check = |key: &str, ok: bool, message: String| {
            if !ok {
                out.push((key.to_owned(), message));
            }
        };
        let t = &self.tcp;
        check(
            "tcp.max-connections",
            (1..=65_536).contains(&t.max_connections),
            format!("{} is outside 1..=65536", t.max_connections),
        );
        check(
            "tcp.connect-timeout-ms",
            (100..=300_000).contains(&t.connect_timeout_ms),
            format!("{} is outside 100..=300000", t.connect_timeout_ms),
        );
        check(
            "tcp.idle-timeout-seconds",
            (1..=604_800).contains(&t.idle_timeout_seconds),
            format!("{} is outside 1..=604800", t.idle_timeout_seconds),
        );
        check(
            "tcp.buffer-bytes",
            (4096..=16 << 20).contains(&t.buffer_bytes),
            format!("{} is outside 4096..=16777216", t.buffer_bytes),
        );
        check(
            "udp.max-sessions",
            (1..=65_536).contains(&self.udp.max_sessions),
            format!("{} is outside 1..=65536", self.udp.max_sessions),
        );
        check(
            "udp.idle-timeout-seconds",
            (1..=86_400).contains(&self.udp.idle_timeout_seconds),
            format!("{} is outside 1..=86400", self.udp.idle_timeout_seconds),
        );
        check(
            "icmp.max-sessions",
            (1..=4096).contains(&self.icmp.max_sessions),
            format!("{} is outside 1..=4096", self.icmp.max_sessions),
        );
        check(
            "icmp.idle-timeout-seconds",
            (1..=3600).contains(&self.icmp.idle_timeout_seconds),
            format!("{} is outside 1..=3600", self.icmp.idle_timeout_seconds),
        );
        let d = &self.dns;
        check(
            "dns.timeout-ms",
            (100..=30_000).contains(&d.timeout_ms),
            format!("{} is outside 100..=30000", d.timeout_ms),
        );
        check(
            "dns.attempts",
            (1..=5).contains(&d.attempts),
            format!("{} is outside 1..=5", d.attempts),
        );
        check(
            "dns.max-pins",
            (16..=1_048_576).contains(&d.max_pins),
            format!("{} is outside 16..=1048576", d.max_pins),
        );
        check(
            "dns.max-inflight",
            (1..=4096).contains(&d.max_inflight),
            format!("{} is outside 1..=4096", d.max_inflight),
        );
        check(
            "dns.upstreams",
            d.upstreams
                .iter()
                .all(|u| u.0.port() != 0 && !u.0.ip().is_unspecified()),
            "upstreams need an address and a port (53 by default)".into(),
        );
        for entry in d.block.iter().chain(&d.rebind_allow) {
            if let Err(e) = crate::names::Pattern::parse(entry) {
                check("dns.block", false, format!("{entry:?}: {e}"));
            }
        }
        for (i, rule) in self.policy.rule.iter().enumerate() {
            if let Err(e) = rule.compile() {
                check("policy.rule", false, format!("rule {}: {e}", i + 1));
            }
        }
        let t = &self.tls;
        if t.enabled {
            check(
                "tls.ca-cert",
                t.ca_cert.is_some() && t.ca_key.is_some(),
                "interception needs ca-cert and ca-key (`vhost-gateway ca generate`)".into(),
            );
            check(
                "tls.ports",
                !t.ports.is_empty(),
                "no port to intercept".into(),
            );
        }
        check(
            "tls.ports",
            t.ports.iter().all(|p| {
                ![
                    0,
                    crate::wellknown::DNS_PORT,
                    crate::wellknown::ENCRYPTED_DNS_PORT,
                ]
                .contains(p)
            }),
            "ports must not be 0, 53 or 853 (DNS has its own handling)".into(),
        );
        check(
            "tls.leaf-validity-days",
            (1..=397).contains(&t.leaf_validity_days),
            format!("{} is outside 1..=397", t.leaf_validity_days),
        );
        check(
            "tls.max-cached-certs",
            (1..=65_536).contains(&t.max_cached_certs),
            format!("{} is outside 1..=65536", t.max_cached_certs),
        );
        check(
            "tls.handshake-timeout-ms",
            (100..=120_000).contains(&t.handshake_timeout_ms),
            format!("{} is outside 100..=120000", t.handshake_timeout_ms),
        );
        for entry in &t.bypass {
            if let Err(e) = crate::names::Pattern::parse(entry) {
                check("tls.bypass", false, format!("{entry:?}: {e}"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.publish {
            check(
                "publish.guest-port",
                p.guest_port != 0,
                "guest-port must be 1..=65535".into(),
            );
            check(
                "publish.host",
                p.host.port() != 0,
                format!("{}: host port must not be 0", p.host),
            );
            check(
                "publish.host",
                seen.insert((p.protocol, p.host)),
                format!("{} is published twice", p.host),
            );
        }
        out
    }

    /// One line describing the configuration, for `check-config`.
    pub fn summary(&self) -> String {
        let n = &self.network;
        let v6 = if n.ipv6_enabled {
            format!("IPv6 {} via {}", n.ipv6_prefix, n.ipv6_gateway)
        } else {
            "IPv6 off".to_owned()
        };
        format!(
            "guest {}/{} via {}, {v6}, MTU {}",
            n.ipv4_guest, n.ipv4_prefix_len, n.ipv4_gateway, n.mtu
        )
    }
}

/// (line number, name) of each entry of a block-list file: one name per
/// line, or hosts-file lines (`0.0.0.0 name [name...]`), `#` comments;
/// hosts files' own names (localhost and friends) are skipped.
fn block_file_entries(text: &str) -> Vec<(usize, &str)> {
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
        }
        for name in words {
            if !HOSTS_OWN.contains(&name) {
                out.push((i + 1, name));
            }
        }
    }
    out
}

/// 1-based line number of a byte offset.
fn line_of_offset(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |head| head.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// Finds the line where a dotted key (`table.key`) is set, by scanning table
/// headers and `key =` lines. Our schema is a set of flat tables, so this is
/// exact for it; it returns None rather than guess when the key is absent.
fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            continue;
        }
        if current == table
            && let Some((k, _)) = line.split_once('=')
            && k.trim().trim_matches('"') == key
        {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_file_equals_embedded_defaults() {
        let parsed = Config::from_toml(DEFAULT_TOML).expect("default.toml is valid");
        assert_eq!(parsed, Config::embedded());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::embedded());
    }

    #[test]
    fn defaults_validate() {
        assert!(Config::embedded().validate().is_empty());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err = Config::from_toml("[network]\nmtu = 1500\nmut = 9000\n").unwrap_err();
        let Error::Invalid(problems) = err else {
            panic!("expected Invalid")
        };
        assert_eq!(problems[0].line, Some(3));
        assert!(
            problems[0].message.contains("unknown field"),
            "{problems:?}"
        );
    }

    #[test]
    fn validation_table() {
        let cases: &[(&str, &str)] = &[
            ("[network]\nmtu = 100\n", "network.mtu"),
            ("[network]\nmtu = 1000\n", "network.mtu"),
            ("[network]\nmtu = 65521\n", "network.mtu"),
            (
                "[network]\nipv4-guest = \"10.0.0.2\"\n",
                "network.ipv4-guest",
            ),
            (
                "[network]\nipv4-guest = \"198.19.0.1\"\n",
                "network.ipv4-guest",
            ),
            (
                "[network]\nipv4-guest = \"198.19.0.255\"\n",
                "network.ipv4-guest",
            ),
            (
                "[network]\nipv4-prefix-len = 31\n",
                "network.ipv4-prefix-len",
            ),
            (
                "[network]\nguest-mac = \"01:00:5e:00:00:01\"\n",
                "network.guest-mac",
            ),
            (
                "[network]\nipv6-prefix = \"fd00::/48\"\n",
                "network.ipv6-prefix",
            ),
            (
                "[network]\nipv6-gateway = \"fd00::1\"\n",
                "network.ipv6-gateway",
            ),
            (
                "[network]\ndhcp-lease-seconds = 5\n",
                "network.dhcp-lease-seconds",
            ),
            (
                "[network]\nra-interval-seconds = 0\n",
                "network.ra-interval-seconds",
            ),
            (
                "[network]\ndomain-search = [\"bad..name\"]\n",
                "network.domain-search",
            ),
            ("[tls]\nports = [443, 853]\n", "tls.ports"),
            ("[tls]\nleaf-validity-days = 0\n", "tls.leaf-validity-days"),
            ("[tls]\nmax-cached-certs = 0\n", "tls.max-cached-certs"),
            (
                "[tls]\nhandshake-timeout-ms = 1\n",
                "tls.handshake-timeout-ms",
            ),
            ("[tls]\nbypass = [\"bad..name\"]\n", "tls.bypass"),
        ];
        for (text, key) in cases {
            let Err(Error::Invalid(problems)) = Config::from_toml(text) else {
                panic!("{text:?} should be rejected")
            };
            assert!(
                problems.iter().any(|p| p.key == *key && p.line == Some(2)),
                "{text:?}: {problems:?}"
            );
        }
    }

    #[test]
    fn interception_needs_a_ca() {
        let Err(Error::Invalid(problems)) = Config::from_toml("[tls]\nenabled = true\n") else {
            panic!("interception without a CA must be rejected")
        };
        assert!(
            problems.iter().any(|p| p.key == "tls.ca-cert"),
            "{problems:?}"
        );
        let ok = "[tls]\nenabled = true\nca-cert = \"/c.pem\"\nca-key = \"/c.key\"\nno-sni = \"refuse\"\n";
        let c = Config::from_toml(ok).unwrap();
        assert_eq!(c.tls.no_sni, Fallback::Refuse);
        assert!(Config::from_toml("[tls]\nno-sni = \"maybe\"\n").is_err());
    }

    #[test]
    fn mtu_9000_without_ipv6_minimum_issue() {
        let c = Config::from_toml("[network]\nmtu = 9000\nipv6-enabled = false\n").unwrap();
        assert_eq!(c.network.mtu, 9000);
        let c = Config::from_toml("[network]\nmtu = 1000\nipv6-enabled = false\n").unwrap();
        assert_eq!(c.network.mtu, 1000);
    }

    #[test]
    fn block_files_in_both_formats() {
        let text = "# list\nads.example\n\n0.0.0.0 a.test b.test # two\n127.0.0.1 localhost\n::1 ip6-localhost\n*.tracker.test\n";
        let got: Vec<&str> = block_file_entries(text)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(
            got,
            vec!["ads.example", "a.test", "b.test", "*.tracker.test"]
        );
        let dir = std::env::temp_dir().join(format!("vg-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("list.txt");
        std::fs::write(&list, "good.test\nbad..name\n").unwrap();
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, format!("[dns]\nblock-files = [{:?}]\n", list)).unwrap();
        let Err(Error::Invalid(problems)) = Config::load(&cfg) else {
            panic!("bad entry accepted")
        };
        assert!(problems[0].message.contains("list.txt:2"), "{problems:?}");
        std::fs::write(&list, "good.test\n").unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(c.dns.block, vec!["good.test".to_owned()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_mac_syntax_is_a_parse_error() {
        assert!(Config::from_toml("[network]\nguest-mac = \"52:54:00\"\n").is_err());
    }
}
