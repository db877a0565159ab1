//! The configuration: serde schema (unknown keys rejected), the embedded
//! defaults, and validation. One file per table — [`network`], the flow
//! tables ([`flows`]), [`dns`], [`tls`], [`policy`] (which also compiles
//! the policy) — plus the TOML line locator (`locate`) and value types.
//!
//! Pure data and checks: nothing here touches sockets or the guest. Every
//! value the rest of the daemon reads has been validated here first, so
//! later stages may rely on the invariants each table's `validate` states.
//! Imports only the layers below it (`policy` and the leaves).
#![forbid(unsafe_code)]

pub mod confinement;
pub mod dns;
pub mod flows;
mod locate;
pub mod network;
pub mod pcap;
pub mod policy;
pub mod tls;
mod types;

use std::path::Path;

use serde::Deserialize;

pub use confinement::{Confinement, SeccompMode};
pub use dns::{BlockedAnswer, Dns};
pub use flows::{Fragments, Icmp, Outbound, Protocol, Publish, Tcp, Udp};
pub use network::{MAX_MTU, Network};
pub use pcap::Pcap;
pub use policy::{PolicyConfig, PortSpec, Preset, RuleConfig};
pub use tls::{Fallback, Tls, UpstreamRoots};
pub use types::{Ipv6Prefix, MacAddr, Resolver};

use locate::{line_of_offset, locate_key};

/// The embedded defaults, also shipped as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

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
    /// Reassembly of the guest's fragmented datagrams.
    #[serde(default)]
    pub fragments: Fragments,
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
    /// How the daemon confines itself once started.
    #[serde(default)]
    pub confinement: Confinement,
    /// Captures of the guest's frames.
    #[serde(default)]
    pub pcap: Pcap,
}

/// Where the daemon's config comes from: a file (or the embedded defaults)
/// and the command line's overrides. Read at start and again at each
/// reload, the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// The config file; None: the embedded defaults.
    pub path: Option<std::path::PathBuf>,
    /// `--queue-pairs`, over the file's `network.queue-pairs`.
    pub queue_pairs: Option<u16>,
}

impl Source {
    /// The config as it reads now.
    pub fn read(&self) -> Result<Config, Error> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::embedded(),
        };
        if let Some(n) = self.queue_pairs {
            config.network.queue_pairs = n;
        }
        Ok(config)
    }
}

/// Problems found by validation, as (dotted key, message) pairs.
#[derive(Debug, Default)]
pub struct Checks(Vec<(String, String)>);

impl Checks {
    /// Records a problem.
    pub fn bad(&mut self, key: &str, message: String) {
        self.0.push((key.to_owned(), message));
    }

    /// Records `message()` when `ok` is false.
    pub fn check(&mut self, key: &str, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.bad(key, message());
        }
    }

    /// Records a value outside its range, naming the range.
    pub fn range<T>(&mut self, key: &str, value: T, range: std::ops::RangeInclusive<T>)
    where
        T: PartialOrd + std::fmt::Display,
    {
        if !range.contains(&value) {
            let message = format!("{value} is outside {}..={}", range.start(), range.end());
            self.bad(key, message);
        }
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
        let key_line = locate_key(&text, "dns.block-files");
        for file in config.dns.block_files.clone() {
            let list = match std::fs::read_to_string(&file) {
                Ok(list) => list,
                Err(e) => {
                    problems.push(Problem {
                        key: "dns.block-files".into(),
                        line: key_line,
                        message: format!("cannot read {}: {e}", file.display()),
                    });
                    continue;
                }
            };
            for (line, name) in dns::block_file_entries(&list) {
                match crate::names::Pattern::parse(name).map(drop) {
                    Ok(()) => config.dns.block.push(name.to_owned()),
                    Err(e) => problems.push(Problem {
                        key: "dns.block-files".into(),
                        line: key_line,
                        message: format!("{}:{line}: {name:?}: {e}", file.display()),
                    }),
                }
            }
        }
        if config.tls.enabled {
            for (key, path) in [
                ("tls.ca-cert", &config.tls.ca_cert),
                ("tls.ca-key", &config.tls.ca_key),
            ] {
                if let Some(Err(e)) = path.as_ref().map(std::fs::File::open) {
                    let path = path
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string());
                    problems.push(Problem {
                        key: key.into(),
                        line: locate_key(&text, key),
                        message: format!("cannot read {path}: {e}"),
                    });
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

    /// Checks every invariant the daemon relies on, table by table;
    /// returns (key, message) pairs.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Checks::default();
        self.network.validate(&mut out);
        self.tcp.validate(&mut out);
        self.udp.validate(&mut out);
        self.icmp.validate(&mut out);
        self.fragments.validate(&mut out);
        self.dns.validate(&mut out);
        self.policy.validate(&mut out);
        self.tls.validate(&mut out);
        self.pcap.validate(&mut out);
        Publish::validate_all(&self.publish, &mut out);
        out.0
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
            (
                "[network]\nipv6-gateway = \"fd76:6761:7465::\"\n",
                "network.ipv6-gateway",
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

    /// The guest's IPv6 prefix must be one SLAAC can live in: every prefix
    /// that is, holds or lies in loopback, unspecified, link-local,
    /// multicast, metadata, or that is outside global unicast and unique
    /// local, or embeds IPv4, is refused, however it is spelled; and the
    /// same for the IPv4 subnet.
    #[test]
    fn guest_prefixes_that_cannot_be_a_link_are_refused() {
        let bad_v6 = [
            ("fe80::", "fe80::1"),
            ("FE80:0000::", "fe80::1"),
            ("febf:ffff:ffff:ffff::", "febf:ffff:ffff:ffff::1"),
            ("::", "::1"),
            ("::", "::2"),
            ("0:0:0:0::", "::1"),
            ("ff02::", "ff02::1"),
            ("fd00:ec2::", "fd00:ec2::1"),
            ("64:ff9b::", "64:ff9b::1"),
            ("2002:c000:201::", "2002:c000:201::1"),
            ("2001::", "2001::1"),
            ("100::", "100::1"),
            ("fec0::", "fec0::1"),
        ];
        for (prefix, gateway) in bad_v6 {
            let text =
                format!("[network]\nipv6-prefix = \"{prefix}/64\"\nipv6-gateway = \"{gateway}\"\n");
            let Err(Error::Invalid(problems)) = Config::from_toml(&text) else {
                panic!("{text:?} should be rejected")
            };
            assert!(
                problems.iter().any(|p| p.key == "network.ipv6-prefix"),
                "{text:?}: {problems:?}"
            );
        }
        for (prefix, gateway) in [
            ("fd76:6761:7465::", "fd76:6761:7465::1"),
            ("2001:db8:1::", "2001:db8:1::1"),
            ("2a00:1450:1::", "2a00:1450:1::53"),
        ] {
            let text =
                format!("[network]\nipv6-prefix = \"{prefix}/64\"\nipv6-gateway = \"{gateway}\"\n");
            assert!(Config::from_toml(&text).is_ok(), "{text:?}");
        }
        for (gateway, guest, len) in [
            ("169.254.0.1", "169.254.0.2", 24),
            ("169.254.169.1", "169.254.169.2", 24),
            ("127.0.0.2", "127.0.0.3", 24),
            ("0.1.0.1", "0.1.0.2", 24),
            ("10.0.0.1", "10.0.0.2", 8),
        ] {
            let text = format!(
                "[network]\nipv4-gateway = \"{gateway}\"\nipv4-guest = \"{guest}\"\nipv4-prefix-len = {len}\n"
            );
            let verdict = Config::from_toml(&text);
            if gateway.starts_with("10.") {
                assert!(verdict.is_ok(), "{text:?}: {verdict:?}");
                continue;
            }
            let Err(Error::Invalid(problems)) = verdict else {
                panic!("{text:?} should be rejected")
            };
            assert!(
                problems.iter().any(|p| p.key == "network.ipv4-gateway"),
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
        let got: Vec<&str> = dns::block_file_entries(text)
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
        // A line of several words without an address is one bad entry,
        // not three names.
        std::fs::write(&list, "good.test\nbad name here\n").unwrap();
        let Err(Error::Invalid(problems)) = Config::load(&cfg) else {
            panic!("a line of three words was accepted")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("list.txt:2")
                && problems[0].message.contains("bad name here")
                && problems[0].key == "dns.block-files"
                && problems[0].line == Some(2),
            "{problems:?}"
        );
        // A missing file names the key and its line.
        let missing = dir.join("missing.txt");
        std::fs::write(&cfg, format!("[dns]\nblock-files = [{missing:?}]\n")).unwrap();
        let Err(Error::Invalid(problems)) = Config::load(&cfg) else {
            panic!("a missing block file was accepted")
        };
        assert!(
            problems[0].key == "dns.block-files"
                && problems[0].line == Some(2)
                && problems[0].message.contains("missing.txt"),
            "{problems:?}"
        );
        std::fs::write(&cfg, format!("[dns]\nblock-files = [{:?}]\n", list)).unwrap();
        std::fs::write(&list, "good.test\n").unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(c.dns.block, vec!["good.test".to_owned()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_ca_files_name_their_key_and_line() {
        let dir = std::env::temp_dir().join(format!("vg-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("c.toml");
        std::fs::write(
            &cfg,
            "[tls]\nenabled = true\nca-cert = \"/nonexistent/ca.pem\"\nca-key = \"/nonexistent/ca.key\"\n",
        )
        .unwrap();
        let Err(Error::Invalid(problems)) = Config::load(&cfg) else {
            panic!("missing CA files accepted")
        };
        let found: Vec<(&str, Option<usize>)> =
            problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            found,
            vec![("tls.ca-cert", Some(3)), ("tls.ca-key", Some(4))],
            "{problems:?}"
        );
        assert!(problems[0].message.contains("/nonexistent/ca.pem"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_mac_syntax_is_a_parse_error() {
        assert!(Config::from_toml("[network]\nguest-mac = \"52:54:00\"\n").is_err());
    }
}
