//! Guest UDP sessions on the engine side: one host task per (guest source,
//! destination), replies framed back with the destination as source.
//!
//! Runs on the engine thread; never awaits. Sessions are capped and expire
//! when idle; a full session queue or reply channel drops the datagram and
//! counts it, as a congested router would.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Ctx;
use super::sessions::Relay;
use crate::config::Udp as UdpConfig;
use crate::metrics::Counter;
use crate::proxy::udp::{Reply, spawn};

/// Replies from all sessions waiting for the engine.
const REPLY_DEPTH: usize = 512;

/// A session: guest endpoint and destination.
pub type Key = (SocketAddr, SocketAddr);

/// The UDP session table.
pub struct Sessions {
    relay: Relay<Key, Vec<u8>, Reply>,
    config: UdpConfig,
}

impl Sessions {
    /// An empty table.
    pub fn new(config: UdpConfig) -> Self {
        Self {
            relay: Relay::new(REPLY_DEPTH),
            config,
        }
    }

    /// A datagram from the guest.
    pub fn send(&mut self, ctx: &Ctx<'_>, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let (metrics, now) = (ctx.metrics, ctx.now);
        let key = (src, dst);
        if !self.relay.table.contains(&key) {
            let Some(upstream) = ctx.upstream(dst) else {
                metrics.inc(Counter::udp_denied);
                return;
            };
            if !self
                .relay
                .table
                .admits(self.config.max_sessions, metrics, Counter::udp_over_limit)
            {
                return;
            }
            let idle = Duration::from_secs(self.config.idle_timeout_seconds);
            let to_host = spawn(
                ctx.host,
                upstream,
                self.relay.table.next_id(),
                self.relay.replies_tx.clone(),
                idle,
                metrics.clone(),
            );
            metrics.inc(Counter::udp_sessions);
            self.relay.table.insert(key, to_host, now);
        }
        if !self.relay.table.send(&key, payload.to_vec(), now) {
            metrics.inc(Counter::udp_queue_full);
        }
    }

    /// The next reply from the host side: (guest endpoint, remote, payload).
    pub fn next_reply(&mut self, now: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        loop {
            let (id, payload) = self.relay.replies.try_recv().ok()?;
            if let Some((guest, remote)) = self.relay.table.key_of(id, now) {
                return Some((guest, remote, payload));
            }
        }
    }

    /// Closes sessions idle past the timeout (their tasks end with them).
    pub fn expire(&mut self, now: Instant) {
        self.relay
            .table
            .expire(now, Duration::from_secs(self.config.idle_timeout_seconds));
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.relay.table.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.relay.table.is_empty()
    }
}
