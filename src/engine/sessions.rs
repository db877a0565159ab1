//! The session table the UDP and ICMP relays share: sessions by key, keys by
//! the id their host task tags replies with, a sender to each task, idle
//! expiry. Sessions whose task has ended are expired with the idle ones.
//!
//! Engine thread only; no I/O.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::Counter;

struct Session<T> {
    id: u64,
    to_host: mpsc::Sender<T>,
    last_active: Instant,
}

/// A relay's sessions and the one channel all their tasks send replies
/// (`R`) on.
pub struct Relay<K, T, R> {
    /// The sessions.
    pub table: Table<K, T>,
    /// For new sessions' tasks.
    pub replies_tx: mpsc::Sender<R>,
    /// Replies waiting for the engine.
    pub replies: mpsc::Receiver<R>,
}

impl<K: Copy + Eq + Hash, T, R> Relay<K, T, R> {
    /// An empty relay whose reply channel holds `depth` replies.
    pub fn new(depth: usize) -> Self {
        let (replies_tx, replies) = mpsc::channel(depth);
        Self {
            table: Table::default(),
            replies_tx,
            replies,
        }
    }
}

/// Sessions keyed by `K`, each with a channel of `T` to its host task.
pub struct Table<K, T> {
    sessions: HashMap<K, Session<T>>,
    by_id: HashMap<u64, K>,
    next_id: u64,
}

impl<K: Copy + Eq + Hash, T> Default for Table<K, T> {
    fn default() -> Self {
        Self {
            sessions: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 0,
        }
    }
}

impl<K: Copy + Eq + Hash, T> Table<K, T> {
    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether one more session fits under `max`; counts `full` when not.
    pub fn admits(&self, max: usize, metrics: &crate::metrics::Metrics, full: Counter) -> bool {
        let room = self.sessions.len() < max;
        if !room {
            metrics.inc(full);
        }
        room
    }

    /// Whether `key` has a session.
    pub fn contains(&self, key: &K) -> bool {
        self.sessions.contains_key(key)
    }

    /// The id the next inserted session will have (its task tags replies
    /// with it).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Adds a session under the id [`Table::next_id`] gave.
    pub fn insert(&mut self, key: K, to_host: mpsc::Sender<T>, now: Instant) {
        let id = self.next_id;
        self.next_id += 1;
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

    /// Hands `item` to the session's task; false when there is no session
    /// or its queue is full.
    pub fn send(&mut self, key: &K, item: T, now: Instant) -> bool {
        self.sessions.get_mut(key).is_some_and(|s| {
            s.last_active = now;
            s.to_host.try_send(item).is_ok()
        })
    }

    /// The key of the session with `id`, marking it active.
    pub fn key_of(&mut self, id: u64, now: Instant) -> Option<K> {
        let key = *self.by_id.get(&id)?;
        if let Some(s) = self.sessions.get_mut(&key) {
            s.last_active = now;
        }
        Some(key)
    }

    /// Drops sessions idle longer than `idle` or whose task has ended.
    pub fn expire(&mut self, now: Instant, idle: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_send_lookup_and_expire() {
        let mut t: Table<u8, u32> = Table::default();
        let now = Instant::now();
        let (tx, mut rx) = mpsc::channel(1);
        let id = t.next_id();
        t.insert(7, tx, now);
        assert!(t.send(&7, 1, now));
        assert!(!t.send(&7, 2, now), "queue of one is full");
        assert!(!t.send(&8, 1, now), "no such session");
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert_eq!(t.key_of(id, now), Some(7));
        t.expire(now + Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(t.len(), 1);
        t.expire(now + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(t.len(), 0);
        assert_eq!(t.key_of(id, now), None);
        // A session whose task ended goes at the next expiry.
        let (tx, rx) = mpsc::channel(1);
        t.insert(9, tx, now);
        drop(rx);
        t.expire(now, Duration::from_secs(10));
        assert!(!t.contains(&9));
    }
}
