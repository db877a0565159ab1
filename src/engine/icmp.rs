//! Guest echo requests to outside hosts on the engine side: sessions per
//! (guest, destination, identifier) over ping sockets, replies framed back
//! with the guest's own identifier.
//!
//! Runs on the engine thread; never awaits. Where the host forbids ping
//! sockets, echo requests are dropped and counted after one log line at start.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Ctx;
use super::classify::Echo;
use super::sessions::Relay;
use crate::config::Icmp as IcmpConfig;
use crate::metrics::Counter;
use crate::proxy::icmp::{Reply, open, spawn};

const REPLY_DEPTH: usize = 128;

/// A session: guest address, destination, guest identifier.
pub type Key = (IpAddr, IpAddr, u16);

/// The echo session table.
pub struct Sessions {
    relay: Relay<Key, (u16, Vec<u8>), Reply>,
    config: IcmpConfig,
    available: bool,
}

impl Sessions {
    /// An empty table; `available` says whether ping sockets work here.
    pub fn new(config: IcmpConfig, available: bool) -> Self {
        Self {
            relay: Relay::new(REPLY_DEPTH),
            config,
            available,
        }
    }

    /// An echo request from the guest to a non-gateway address.
    pub fn send(&mut self, ctx: &Ctx<'_>, echo: &Echo<'_>) {
        let (metrics, now) = (ctx.metrics, ctx.now);
        if !self.available {
            metrics.inc(Counter::icmp_unavailable);
            return;
        }
        let dst = echo.dst;
        let nowhere = crate::policy::addr::forms(dst)
            .as_slice()
            .iter()
            .any(|f| f.is_multicast() || matches!(f, IpAddr::V4(v4) if v4.is_broadcast()));
        if nowhere || crate::policy::addr::reaches_local_host(dst) {
            metrics.inc(Counter::icmp_denied);
            return;
        }
        let key = (echo.src, dst, echo.ident);
        if !self.relay.table.contains(&key) {
            if !self
                .relay
                .table
                .admits(self.config.max_sessions, metrics, Counter::icmp_over_limit)
            {
                return;
            }
            let socket = match open(dst) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%dst, error = %e, "cannot open ping socket");
                    metrics.inc(Counter::icmp_unavailable);
                    return;
                }
            };
            let idle = Duration::from_secs(self.config.idle_timeout_seconds);
            let to_host = spawn(
                ctx.host,
                socket,
                dst.is_ipv6(),
                self.relay.table.next_id(),
                self.relay.replies_tx.clone(),
                idle,
                metrics.clone(),
            );
            self.relay.table.insert(key, to_host, now);
        }
        if !self
            .relay
            .table
            .send(&key, (echo.seq, echo.data.to_vec()), now)
        {
            metrics.inc(Counter::icmp_queue_full);
        }
    }

    /// The next reply: (guest, remote, guest identifier, seq, data).
    pub fn next_reply(&mut self, now: Instant) -> Option<(IpAddr, IpAddr, u16, u16, Vec<u8>)> {
        loop {
            let (id, seq, data) = self.relay.replies.try_recv().ok()?;
            if let Some((guest, remote, ident)) = self.relay.table.key_of(id, now) {
                return Some((guest, remote, ident, seq, data));
            }
        }
    }

    /// Closes idle sessions.
    pub fn expire(&mut self, now: Instant) {
        self.relay
            .table
            .expire(now, Duration::from_secs(self.config.idle_timeout_seconds));
    }
}
