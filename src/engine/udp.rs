//! Guest UDP sessions: one engine-owned, connected host socket per (guest
//! source, destination); replies framed back with the destination as
//! source.
//!
//! Runs on the engine thread; never blocks. Sessions are capped and expire
//! when idle; a datagram the host socket will not take now is dropped and
//! counted, as a congested router would.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Ctx;
use super::sessions::Datagrams;
use crate::config::Udp as UdpConfig;
use crate::metrics::{Counter, Metrics};

/// The tag of UDP sessions' tokens in the host-socket epoll.
pub const TAG: u64 = 1;

/// A session: guest endpoint and destination.
pub type Key = (SocketAddr, SocketAddr);

/// The UDP session table.
pub struct Sessions {
    table: Datagrams<Key>,
    config: UdpConfig,
}

impl Sessions {
    /// An empty table.
    pub fn new(config: UdpConfig) -> Self {
        Self {
            table: Datagrams::new(TAG, Counter::udp_reply_dropped),
            config,
        }
    }

    /// Every session's key.
    pub fn keys(&self) -> Vec<Key> {
        self.table.keys()
    }

    /// Closes the session `key`.
    pub fn close(&mut self, key: &Key) {
        self.table.close(key);
    }

    /// Every session as the operator sees it.
    pub fn report(&self, now: Instant) -> impl Iterator<Item = super::report::Flow> + '_ {
        self.table.report(now).map(|s| super::report::Flow {
            proto: "udp",
            guest: s.key.0,
            remote: s.key.1,
            name: None,
            state: super::report::FlowState::Established,
            bytes_from_guest: s.bytes.0,
            bytes_to_guest: s.bytes.1,
            age_ms: super::tcp::duration_ms(s.age),
            pair: 0,
        })
    }

    /// A datagram from the guest.
    pub fn send(&mut self, ctx: &Ctx<'_>, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let (metrics, now) = (ctx.metrics, ctx.now);
        let key = (src, dst);
        if !self.table.contains(&key) {
            let Some(upstream) = ctx.upstream(dst) else {
                metrics.inc(Counter::udp_denied);
                return;
            };
            if !self.table.admits(
                self.config.max_sessions,
                now,
                metrics,
                (Counter::udp_over_limit, Counter::udp_session_evicted),
            ) {
                return;
            }
            let opened = crate::proxy::udp::open(upstream)
                .and_then(|socket| self.table.open(ctx.io, key, socket, now));
            if let Err(e) = opened {
                crate::proxy::fdlimit::note(&e, "opening a UDP session", Some(metrics));
                tracing::debug!(%dst, error = %e, "cannot open a UDP session");
                metrics.inc(Counter::udp_send_failed);
                return;
            }
            metrics.inc(Counter::udp_sessions);
        }
        if !self.table.send(&key, payload, now) {
            metrics.inc(Counter::udp_send_failed);
        }
    }

    /// Marks a session's socket readable.
    pub fn mark(&mut self, token: u64) {
        self.table.mark(token);
    }

    /// Whether the session `key` is open.
    pub fn holds(&self, key: &Key) -> bool {
        self.table.contains(key)
    }

    /// Whether `token` is a UDP session's.
    pub fn owns(&self, token: u64) -> bool {
        self.table.owns(token)
    }

    /// The next reply from the host side: (guest endpoint, remote, payload).
    pub fn next_reply(
        &mut self,
        now: Instant,
        metrics: &Metrics,
    ) -> Option<(SocketAddr, SocketAddr, &[u8])> {
        let ((guest, remote), payload) = self.table.next(now, metrics, |_, _| true)?;
        Some((guest, remote, payload))
    }

    /// Closes sessions idle past the timeout.
    pub fn expire(&mut self, now: Instant) {
        self.table
            .expire(now, Duration::from_secs(self.config.idle_timeout_seconds));
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Whether replies wait to be read.
    pub fn has_readable(&self) -> bool {
        self.table.has_readable()
    }
}
