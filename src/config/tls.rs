//! The `[tls]` table: opt-in interception of TLS on chosen ports.
#![forbid(unsafe_code)]

use serde::Deserialize;

use super::Checks;
use crate::wellknown::{DNS_PORT, ENCRYPTED_DNS_PORT};

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

impl Tls {
    pub(super) fn validate(&self, out: &mut Checks) {
        if self.enabled {
            out.check(
                "tls.ca-cert",
                self.ca_cert.is_some() && self.ca_key.is_some(),
                || "interception needs ca-cert and ca-key (`vhost-gateway ca generate`)".into(),
            );
            out.check("tls.ports", !self.ports.is_empty(), || {
                "no port to intercept".into()
            });
        }
        out.check(
            "tls.ports",
            self.ports
                .iter()
                .all(|p| ![0, DNS_PORT, ENCRYPTED_DNS_PORT].contains(p)),
            || "ports must not be 0, 53 or 853 (DNS has its own handling)".into(),
        );
        out.range("tls.leaf-validity-days", self.leaf_validity_days, 1..=397);
        out.range("tls.max-cached-certs", self.max_cached_certs, 1..=65_536);
        out.range(
            "tls.handshake-timeout-ms",
            self.handshake_timeout_ms,
            100..=120_000,
        );
        for entry in &self.bypass {
            if let Err(e) = crate::names::Pattern::parse(entry) {
                out.bad("tls.bypass", format!("{entry:?}: {e}"));
            }
        }
    }
}
