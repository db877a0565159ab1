//! Guest echo requests to outside hosts: sessions per (guest, destination,
//! identifier) over engine-owned ping sockets, replies framed back with the
//! guest's own identifier.
//!
//! Runs on the engine thread; never blocks. Where the host forbids ping
//! sockets, echo requests are dropped and counted after one log line at start.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::Ctx;
use super::classify::Echo;
use super::sessions::Datagrams;
use crate::config::Icmp as IcmpConfig;
use crate::metrics::{Counter, Metrics};
use crate::proxy::icmp::{open, reply, request};

/// The tag of echo sessions' tokens in the host-socket epoll.
pub const TAG: u64 = 2;

/// A session: guest address, destination, guest identifier.
pub type Key = (IpAddr, IpAddr, u16);

/// The echo session table.
pub struct Sessions {
    table: Datagrams<Key>,
    config: IcmpConfig,
    available: bool,
}

impl Sessions {
    /// An empty table; `available` says whether ping sockets work here.
    pub fn new(config: IcmpConfig, available: bool) -> Self {
        Self {
            table: Datagrams::new(TAG, Counter::icmp_reply_dropped),
            config,
            available,
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

    /// Every session as the operator sees it (the ports are the echo
    /// identifier on the guest's side, 0 on the far side).
    pub fn report(&self, now: Instant) -> impl Iterator<Item = super::report::Flow> + '_ {
        self.table.report(now).map(|s| super::report::Flow {
            proto: "icmp",
            guest: SocketAddr::new(s.key.0, s.key.2),
            remote: SocketAddr::new(s.key.1, 0),
            name: None,
            state: super::report::FlowState::Established,
            bytes_from_guest: s.bytes.0,
            bytes_to_guest: s.bytes.1,
            age_ms: super::tcp::duration_ms(s.age),
            pair: 0,
        })
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
        if !self.table.contains(&key) {
            if !self.table.admits(
                self.config.max_sessions,
                now,
                metrics,
                (Counter::icmp_over_limit, Counter::icmp_session_evicted),
            ) {
                return;
            }
            let opened = open(dst).and_then(|socket| self.table.open(ctx.io, key, socket, now));
            if let Err(e) = opened {
                crate::proxy::fdlimit::note(&e, "opening a ping socket", Some(metrics));
                tracing::debug!(%dst, error = %e, "cannot open ping socket");
                metrics.inc(Counter::icmp_unavailable);
                return;
            }
        }
        let message = request(dst.is_ipv6(), echo.seq, echo.data);
        if !self.table.send(&key, &message, now) {
            metrics.inc(Counter::icmp_send_failed);
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

    /// Whether `token` is an echo session's.
    pub fn owns(&self, token: u64) -> bool {
        self.table.owns(token)
    }

    /// The next reply: (guest, remote, guest identifier, seq, data).
    pub fn next_reply(
        &mut self,
        now: Instant,
        metrics: &Metrics,
    ) -> Option<(IpAddr, IpAddr, u16, u16, &[u8])> {
        // Anything but an echo reply (errors, our own requests looped
        // back) is passed over.
        let is_reply = |key: &Key, message: &[u8]| reply(key.1.is_ipv6(), message).is_some();
        let ((guest, remote, ident), message) = self.table.next(now, metrics, is_reply)?;
        let (seq, data) = reply(remote.is_ipv6(), message)?;
        Some((guest, remote, ident, seq, data))
    }

    /// Closes idle sessions.
    pub fn expire(&mut self, now: Instant) {
        self.table
            .expire(now, Duration::from_secs(self.config.idle_timeout_seconds));
    }

    /// Number of sessions.
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
