//! Name pins: which names each address the guest was given came from. Every
//! A/AAAA answer handed to the guest records address -> queried name for
//! the record's TTL (clamped), in a bounded table shared by the forwarder
//! tasks (writers) and the engine (reader), for the policy's domain rules
//! and the audit log. An address keeps a few names (shared hosting and CDNs
//! answer many names with one address), newest first; a flow's TLS SNI or
//! HTTP Host must be one of them.
//!
//! A plain mutex: entries are tiny and held only for a map operation.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RData;

/// Shortest pin: names with tiny TTLs still pin for the connection that
/// follows the answer.
const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest pin.
const MAX_TTL: Duration = Duration::from_secs(86_400);

/// Names kept per address; the oldest name goes first.
const NAMES_PER_ADDRESS: usize = 4;

struct Pin {
    name: String,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    /// Newest name first.
    by_addr: HashMap<IpAddr, Vec<Pin>>,
    /// Insertion order, for eviction when full.
    order: VecDeque<IpAddr>,
}

/// The pin table.
pub struct Pins {
    inner: Mutex<Inner>,
    max: usize,
}

impl Pins {
    /// A table of at most `max` addresses.
    pub fn new(max: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins `addr` to `name` for `ttl` (clamped).
    pub fn pin(&self, addr: IpAddr, name: &str, ttl: Duration, now: Instant) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let expires = now + ttl.clamp(MIN_TTL, MAX_TTL);
        let mut inner = self.lock();
        let fresh = !inner.by_addr.contains_key(&addr);
        let names = inner.by_addr.entry(addr).or_default();
        names.retain(|p| p.name != name && p.expires > now);
        names.insert(0, Pin { name, expires });
        names.truncate(NAMES_PER_ADDRESS);
        if fresh {
            inner.order.push_back(addr);
        }
        while inner.by_addr.len() > self.max {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.by_addr.remove(&oldest);
        }
    }

    /// The name `addr` was last given for, if the pin is live.
    pub fn name_of(&self, addr: IpAddr, now: Instant) -> Option<String> {
        self.names_of(addr, now).into_iter().next()
    }

    /// Every live name `addr` was given for, newest first.
    pub fn names_of(&self, addr: IpAddr, now: Instant) -> Vec<String> {
        let inner = self.lock();
        inner.by_addr.get(&addr).map_or_else(Vec::new, |names| {
            names
                .iter()
                .filter(|p| p.expires > now)
                .map(|p| p.name.clone())
                .collect()
        })
    }

    /// Pins every A/AAAA record of a DNS answer to the queried name.
    pub fn record_answer(&self, answer: &[u8], now: Instant) {
        let Ok(message) = Message::from_vec(answer) else {
            return;
        };
        let Some(query) = message.queries.first() else {
            return;
        };
        let name = query.name().to_ascii();
        for record in &message.answers {
            let addr = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            self.pin(addr, &name, Duration::from_secs(u64::from(record.ttl)), now);
        }
    }

    /// Number of pins (live or not yet evicted).
    pub fn len(&self) -> usize {
        self.lock().by_addr.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_expire_and_are_bounded() {
        let pins = Pins::new(2);
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "2001:db8::3".parse().unwrap();
        pins.pin(a, "One.Test.", Duration::from_secs(5), t);
        assert_eq!(pins.name_of(a, t).as_deref(), Some("one.test"));
        // TTL 5 s is clamped up to 30 s.
        assert!(pins.name_of(a, t + Duration::from_secs(29)).is_some());
        assert!(pins.name_of(a, t + Duration::from_secs(31)).is_none());
        pins.pin(b, "two.test", Duration::from_secs(600), t);
        pins.pin(c, "three.test", Duration::from_secs(600), t);
        assert_eq!(pins.len(), 2);
        assert!(pins.name_of(a, t).is_none(), "oldest evicted");
        assert_eq!(pins.name_of(c, t).as_deref(), Some("three.test"));
        // Another name for the same address: newest first, both kept, up
        // to NAMES_PER_ADDRESS, each with its own expiry.
        pins.pin(b, "other.test", Duration::from_secs(40), t);
        assert_eq!(pins.name_of(b, t).as_deref(), Some("other.test"));
        assert_eq!(pins.names_of(b, t), ["other.test", "two.test"]);
        assert_eq!(pins.names_of(b, t + Duration::from_secs(41)), ["two.test"]);
        for n in 0..6 {
            pins.pin(b, &format!("n{n}.test"), Duration::from_secs(600), t);
        }
        assert_eq!(
            pins.names_of(b, t),
            ["n5.test", "n4.test", "n3.test", "n2.test"]
        );
        // Re-pinning a name moves it to the front without a duplicate.
        pins.pin(b, "n3.test", Duration::from_secs(600), t);
        assert_eq!(
            pins.names_of(b, t),
            ["n3.test", "n5.test", "n4.test", "n2.test"]
        );
        pins.record_answer(&[1, 2, 3], t);
    }
}
