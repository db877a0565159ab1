//! Guest UDP sessions on the engine side: one host task per (guest source,
//! destination), replies framed back with the destination as source.
//!
//! Runs on the engine thread; never awaits. Sessions are capped and expire
//! when idle; a full session queue or reply channel drops the datagram and
//! counts it, as a congested router would.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Ctx;
use crate::config::Udp as UdpConfig;
use crate::metrics::Counter;
use crate::proxy::udp::{Reply, spawn};

/// Replies from all sessions waiting for the engine.
const REPLY_DEPTH: usize = 512;

/// A session: guest endpoint and destination.
pub type Key = (SocketAddr, SocketAddr);

struct Session {
    id: u64,
    to_host: mpsc::Sender<Vec<u8>>,
    last_active: Instant,
}

/// The UDP session table.
pub struct Sessions {
    sessions: HashMap<Key, Session>,
    by_id: HashMap<u64, Key>,
    next_id: u64,
    replies_tx: mpsc::Sender<Reply>,
    replies: mpsc::Receiver<Reply>,
    config: UdpConfig,
}

impl Sessions {
    /// An empty table.
    pub fn new(config: UdpConfig) -> Self {
        let (replies_tx, replies) = mpsc::channel(REPLY_DEPTH);
        Self {
            sessions: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 0,
            replies_tx,
            replies,
            config,
        }
    }

    /// A datagram from the guest.
    pub fn send(&mut self, ctx: &Ctx<'_>, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let (metrics, now) = (ctx.metrics, ctx.now);
        let key = (src, dst);
        if !self.sessions.contains_key(&key) {
            let Some(upstream) = ctx.upstream(dst) else {
                metrics.inc(Counter::udp_denied);
                return;
            };
            if self.sessions.len() >= self.config.max_sessions {
                metrics.inc(Counter::udp_over_limit);
                return;
            }
            let id = self.next_id;
            self.next_id += 1;
            let idle = Duration::from_secs(self.config.idle_timeout_seconds);
            let to_host = spawn(
                ctx.host,
                upstream,
                id,
                self.replies_tx.clone(),
                idle,
                metrics.clone(),
            );
            metrics.inc(Counter::udp_sessions);
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
            if session.to_host.try_send(payload.to_vec()).is_err() {
                metrics.inc(Counter::udp_queue_full);
            }
        }
    }

    /// The next reply from the host side: (guest endpoint, remote, payload).
    pub fn next_reply(&mut self, now: Instant) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        loop {
            let (id, payload) = self.replies.try_recv().ok()?;
            let Some(key) = self.by_id.get(&id).copied() else {
                continue;
            };
            if let Some(session) = self.sessions.get_mut(&key) {
                session.last_active = now;
            }
            return Some((key.0, key.1, payload));
        }
    }

    /// Closes sessions idle past the timeout (their tasks end with them).
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

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }
}
