//! Published ports on the engine side: accepted host connections become
//! smoltcp connections from the gateway to the guest, and host datagrams
//! become UDP from a gateway port per host peer, whose guest replies go back
//! to that peer.
//!
//! Runs on the engine thread; never awaits.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::{Counter, Metrics};
use crate::proxy::publish::{Attachment, Inbound, UdpEntries, UdpEntry};

/// Inbound items taken per pass, so a connection flood cannot hold the thread.
pub const INBOUND_PER_PASS: usize = 64;
const FIRST_PORT: u16 = 49_152;

struct Session {
    port: u16,
    last_active: Instant,
}

/// The attachment and the UDP sessions of published ports.
pub struct Published {
    inbound: mpsc::Receiver<Inbound>,
    udp: UdpEntries,
    sessions: HashMap<(usize, SocketAddr), Session>,
    by_port: HashMap<u16, (usize, SocketAddr)>,
    next_port: u16,
    max_sessions: usize,
    idle: Duration,
}

impl Published {
    /// Wraps an attachment; UDP sessions are capped and expire like outbound
    /// ones.
    pub fn new(attachment: Attachment, max_sessions: usize, idle: Duration) -> Self {
        Self {
            inbound: attachment.inbound,
            udp: attachment.udp,
            sessions: HashMap::new(),
            by_port: HashMap::new(),
            next_port: FIRST_PORT,
            max_sessions,
            idle,
        }
    }

    /// UDP entry `entry`, while it is published.
    fn entry(&self, entry: usize) -> Option<UdpEntry> {
        // The table is only ever grown or blanked: any state is valid.
        let entries = self.udp.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(entry).cloned().flatten()
    }

    /// The next inbound connection or datagram.
    pub fn next_inbound(&mut self) -> Option<Inbound> {
        self.inbound.try_recv().ok()
    }

    /// For a datagram from `peer` at UDP entry `entry`: the gateway port it
    /// comes from and the guest port it goes to.
    pub fn datagram_to_guest(
        &mut self,
        entry: usize,
        peer: SocketAddr,
        now: Instant,
        metrics: &Metrics,
    ) -> Option<(u16, u16)> {
        let guest_port = self.entry(entry)?.guest_port;
        if let Some(session) = self.sessions.get_mut(&(entry, peer)) {
            session.last_active = now;
            return Some((session.port, guest_port));
        }
        if self.sessions.len() >= self.max_sessions {
            metrics.inc(Counter::udp_over_limit);
            return None;
        }
        let port = self.free_port()?;
        self.sessions.insert(
            (entry, peer),
            Session {
                port,
                last_active: now,
            },
        );
        self.by_port.insert(port, (entry, peer));
        Some((port, guest_port))
    }

    fn free_port(&mut self) -> Option<u16> {
        for _ in FIRST_PORT..=u16::MAX {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_PORT);
            if !self.by_port.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    /// A guest datagram to the gateway's `port`: true when it belongs to a
    /// published session and was sent to its host peer.
    pub fn datagram_from_guest(
        &mut self,
        port: u16,
        payload: &[u8],
        now: Instant,
        metrics: &Metrics,
    ) -> bool {
        let Some(&(entry, peer)) = self.by_port.get(&port) else {
            return false;
        };
        if let Some(session) = self.sessions.get_mut(&(entry, peer)) {
            session.last_active = now;
        }
        if let Some(e) = self.entry(entry)
            && e.out.try_send((peer, payload.to_vec())).is_err()
        {
            metrics.inc(Counter::udp_queue_full);
        }
        true
    }

    /// Whether `port` is a gateway port of a published UDP session.
    pub fn is_session_port(&self, port: u16) -> bool {
        self.by_port.contains_key(&port)
    }

    /// Forgets idle UDP sessions.
    pub fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        let by_port = &mut self.by_port;
        self.sessions.retain(|_, s| {
            let keep = now.saturating_duration_since(s.last_active) <= idle;
            if !keep {
                by_port.remove(&s.port);
            }
            keep
        });
    }
}
