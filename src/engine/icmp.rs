//! Guest echo requests to outside hosts on the engine side: sessions per
//! (guest, destination, identifier) over ping sockets, replies framed back
//! with the guest's own identifier.
//!
//! Runs on the engine thread; never awaits. Where the host forbids ping
//! sockets, echo requests are dropped and counted after one log line at start.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Ctx;
use super::classify::Echo;
use crate::config::Icmp as IcmpConfig;
use crate::metrics::Counter;
use crate::proxy::icmp::{Reply, open, spawn};

const REPLY_DEPTH: usize = 128;

/// A session: guest address, destination, guest identifier.
pub type Key = (IpAddr, IpAddr, u16);

struct Session {
    id: u64,
    to_host: mpsc::Sender<(u16, Vec<u8>)>,
    last_active: Instant,
}

/// The echo session table.
pub struct Sessions {
    sessions: HashMap<Key, Session>,
    by_id: HashMap<u64, Key>,
    next_id: u64,
    replies_tx: mpsc::Sender<Reply>,
    replies: mpsc::Receiver<Reply>,
    config: IcmpConfig,
    available: bool,
}

impl Sessions {
    /// An empty table; `available` says whether ping sockets work here.
    pub fn new(config: IcmpConfig, available: bool) -> Self {
        let (replies_tx, replies) = mpsc::channel(REPLY_DEPTH);
        Self {
            sessions: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 0,
            replies_tx,
            replies,
            config,
            available,
        }
    }

    /// An echo request from the guest to a non-gateway address.
    pub fn send(&mut self, ctx: &Ctx<'_>, echo: &Echo<'_>) {
        let (metrics, now) = (ctx.metrics, ctx.now);
        let Echo {
            src,
            dst,
            ident,
            seq,
            data,
        } = *echo;
        if !self.available {
            metrics.inc(Counter::icmp_unavailable);
            return;
        }
        if dst.is_multicast() || dst.is_unspecified() || dst.is_loopback() {
            metrics.inc(Counter::icmp_denied);
            return;
        }
        let key = (src, dst, ident);
        if !self.sessions.contains_key(&key) {
            if self.sessions.len() >= self.config.max_sessions {
                metrics.inc(Counter::icmp_over_limit);
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
            let id = self.next_id;
            self.next_id += 1;
            let idle = Duration::from_secs(self.config.idle_timeout_seconds);
            let to_host = spawn(
                ctx.host,
                socket,
                dst.is_ipv6(),
                id,
                self.replies_tx.clone(),
                idle,
                metrics.clone(),
            );
            self.sessions.insert(
                key,
                Session {
                    id,
                    to_host,
                    last_active: now,
                },
            );
            self.by_id.insert(id, key);
        }
        if let Some(session) = self.sessions.get_mut(&key) {
            session.last_active = now;
            if session.to_host.try_send((seq, data.to_vec())).is_err() {
                metrics.inc(Counter::icmp_queue_full);
            }
        }
    }

    /// The next reply: (guest, remote, guest identifier, seq, data).
    pub fn next_reply(&mut self) -> Option<(IpAddr, IpAddr, u16, u16, Vec<u8>)> {
        loop {
            let (id, seq, data) = self.replies.try_recv().ok()?;
            if let Some(&(guest, remote, ident)) = self.by_id.get(&id) {
                return Some((guest, remote, ident, seq, data));
            }
        }
    }

    /// Closes idle sessions.
    pub fn expire(&mut self, now: Instant) {
        let idle = Duration::from_secs(self.config.idle_timeout_seconds);
        let by_id = &mut self.by_id;
        self.sessions.retain(|_, s| {
            let keep =
                now.saturating_duration_since(s.last_active) <= idle && !s.to_host.is_closed();
            if !keep {
                by_id.remove(&s.id);
            }
            keep
        });
    }
}
