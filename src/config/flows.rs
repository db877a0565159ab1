//! The flow tables: `[outbound]`, `[tcp]`, `[udp]`, `[icmp]` and
//! `[[publish]]`: limits, timeouts and buffers of guest flows, and the host
//! ports published to the guest.
#![forbid(unsafe_code)]

use serde::Deserialize;

use super::Checks;

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

/// The `[fragments]` table: reassembly of the guest's fragmented UDP and
/// ICMP datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Fragments {
    /// Budget for all datagrams being reassembled (bytes, plus 256 per
    /// datagram).
    pub max_bytes: usize,
    /// The same budget for one source address.
    pub max_bytes_per_source: usize,
    /// A datagram not complete this long after its first fragment is
    /// dropped.
    pub timeout_seconds: u64,
}

impl Default for Fragments {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 20,
            max_bytes_per_source: 1 << 20,
            timeout_seconds: 15,
        }
    }
}

impl Fragments {
    pub(super) fn validate(&self, out: &mut Checks) {
        // Room for at least one whole 64 KiB datagram.
        out.range("fragments.max-bytes", self.max_bytes, 66_048..=1 << 30);
        out.range(
            "fragments.max-bytes-per-source",
            self.max_bytes_per_source,
            66_048..=1 << 30,
        );
        out.check(
            "fragments.max-bytes-per-source",
            self.max_bytes_per_source <= self.max_bytes,
            || "must not exceed fragments.max-bytes".into(),
        );
        out.range("fragments.timeout-seconds", self.timeout_seconds, 1..=120);
    }
}

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One `[[publish]]` entry: a host address forwarded to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Publish {
    /// tcp or udp.
    pub protocol: Protocol,
    /// Host address and port to listen on.
    pub host: std::net::SocketAddr,
    /// Guest port connections are forwarded to.
    pub guest_port: u16,
}

impl Tcp {
    pub(super) fn validate(&self, out: &mut Checks) {
        out.range("tcp.max-connections", self.max_connections, 1..=65_536);
        out.range(
            "tcp.connect-timeout-ms",
            self.connect_timeout_ms,
            100..=300_000,
        );
        out.range(
            "tcp.idle-timeout-seconds",
            self.idle_timeout_seconds,
            1..=604_800,
        );
        out.range("tcp.buffer-bytes", self.buffer_bytes, 4096..=16 << 20);
    }
}

impl Udp {
    pub(super) fn validate(&self, out: &mut Checks) {
        out.range("udp.max-sessions", self.max_sessions, 1..=65_536);
        out.range(
            "udp.idle-timeout-seconds",
            self.idle_timeout_seconds,
            1..=86_400,
        );
    }
}

impl Icmp {
    pub(super) fn validate(&self, out: &mut Checks) {
        out.range("icmp.max-sessions", self.max_sessions, 1..=4096);
        out.range(
            "icmp.idle-timeout-seconds",
            self.idle_timeout_seconds,
            1..=3600,
        );
    }
}

impl Publish {
    /// Checks the `[[publish]]` entries together (no host address twice).
    /// What is wrong with this entry on its own, if anything: (key, why).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.guest_port == 0 {
            return Some(("publish.guest-port", "guest-port must be 1..=65535".into()));
        }
        if self.host.port() == 0 {
            let why = format!("{}: host port must not be 0", self.host);
            return Some(("publish.host", why));
        }
        None
    }

    pub(super) fn validate_all(entries: &[Publish], out: &mut Checks) {
        let mut seen = std::collections::HashSet::new();
        for p in entries {
            if let Some((key, why)) = p.problem() {
                out.check(key, false, || why);
            }
            out.check("publish.host", seen.insert((p.protocol, p.host)), || {
                format!("{} is published twice", p.host)
            });
        }
    }
}
