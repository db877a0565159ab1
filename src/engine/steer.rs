//! Which queue pair owns each guest flow, with more than one pair.
//!
//! Every pair has its own engine (smoltcp interface, flow and session
//! tables, host sockets) on its own worker thread; a flow lives on the pair
//! whose queue its first frame came in on, and its frames to the guest go
//! out there. A guest may send later frames of the same flow on another
//! queue (Linux moves a socket's transmit queue when its thread moves to
//! another CPU), so a frame of a flow the pair does not hold locally is
//! looked up here and, when another pair owns it, handed over to that
//! pair's inbox instead of being answered with a reset.
//!
//! The directory is only consulted for frames of flows the pair does not
//! hold; established flows on their own pair never take the lock. A claim
//! is made by the first pair to see a flow's frame and dropped by the
//! owner's periodic sweep once it holds nothing for that flow. Bounded:
//! when full, frames are handled where they arrive (the one-pair
//! behaviour), counted.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::metrics::{Counter, Metrics};
use crate::proxy::Wake;

/// Frames waiting in one pair's inbox at most.
pub const INBOX_FRAMES: usize = 512;
/// Bytes waiting in one pair's inbox at most: a guest sending 64 KiB
/// segments on the wrong queue must not park 32 MiB per pair.
pub const INBOX_BYTES: usize = 4 << 20;

/// A flow or session as the guest's frames name it: guest side first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowKey {
    /// A TCP connection: guest endpoint, the other end.
    Tcp(SocketAddr, SocketAddr),
    /// A UDP session: guest endpoint, destination.
    Udp(SocketAddr, SocketAddr),
    /// An echo session: guest, destination, identifier.
    Echo(IpAddr, IpAddr, u16),
}

/// The flow a guest frame belongs to; None for frames of no flow (ARP,
/// NDP, other ICMP, fragments after the first, malformed ones), which any
/// pair answers.
pub fn key(frame: &[u8]) -> Option<FlowKey> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (src, dst, proto, body) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.frag_offset() != 0 {
                return None;
            }
            let body = eth.payload().get(usize::from(ip.header_len())..)?;
            let len = usize::from(ip.total_len()).checked_sub(usize::from(ip.header_len()))?;
            let body = body.get(..len)?;
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                ip.next_header(),
                body,
            )
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            let body = eth.payload().get(40..40 + usize::from(ip.payload_len()))?;
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                ip.next_header(),
                body,
            )
        }
        _ => return None,
    };
    let ports = || {
        let p = body.get(..4)?;
        Some((
            SocketAddr::new(src, u16::from_be_bytes([p[0], p[1]])),
            SocketAddr::new(dst, u16::from_be_bytes([p[2], p[3]])),
        ))
    };
    match proto {
        IpProtocol::Tcp => ports().map(|(s, d)| FlowKey::Tcp(s, d)),
        IpProtocol::Udp => ports().map(|(s, d)| FlowKey::Udp(s, d)),
        IpProtocol::Icmp | IpProtocol::Icmpv6 => {
            let request = if src.is_ipv4() { 8 } else { 128 };
            match body {
                [kind, 0, _, _, i0, i1, ..] if *kind == request => {
                    Some(FlowKey::Echo(src, dst, u16::from_be_bytes([*i0, *i1])))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Who takes a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The pair that saw it (it owned or has now claimed the flow, or the
    /// directory is full).
    Here,
    /// Another pair.
    Pair(usize),
}

struct Inbox {
    /// The frames, and their total length.
    frames: Mutex<(VecDeque<Vec<u8>>, usize)>,
    wake: Arc<Wake>,
}

/// The directory and the pairs' inboxes.
pub struct Steer {
    owners: Mutex<HashMap<FlowKey, usize>>,
    max_entries: usize,
    inboxes: Vec<Inbox>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A pair that panicked holding the lock left a map that is still
    // structurally valid: go on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Steer {
    /// A directory for pairs woken by `wakes` (one per pair, in order),
    /// holding at most `max_entries` flows.
    pub fn new(wakes: Vec<Arc<Wake>>, max_entries: usize) -> Self {
        Self {
            owners: Mutex::new(HashMap::new()),
            max_entries,
            inboxes: wakes
                .into_iter()
                .map(|wake| Inbox {
                    frames: Mutex::new((VecDeque::new(), 0)),
                    wake,
                })
                .collect(),
        }
    }

    /// Who takes a frame of `key` that `pair` saw and holds nothing for:
    /// its owner, else `pair`, which then owns it.
    pub fn claim(&self, key: FlowKey, pair: usize, metrics: &Metrics) -> Owner {
        let mut owners = lock(&self.owners);
        if let Some(&owner) = owners.get(&key) {
            return if owner == pair {
                Owner::Here
            } else {
                Owner::Pair(owner)
            };
        }
        if owners.len() >= self.max_entries {
            metrics.inc(Counter::steer_full);
        } else {
            owners.insert(key, pair);
        }
        Owner::Here
    }

    /// Makes `pair` the owner of `key` (a flow it opens towards the guest).
    pub fn own(&self, key: FlowKey, pair: usize) {
        let mut owners = lock(&self.owners);
        if owners.len() < self.max_entries || owners.contains_key(&key) {
            owners.insert(key, pair);
        }
    }

    /// Drops `pair`'s claims on flows for which `holds` is false.
    pub fn sweep(&self, pair: usize, mut holds: impl FnMut(&FlowKey) -> bool) {
        lock(&self.owners).retain(|key, owner| *owner != pair || holds(key));
    }

    /// Hands a guest frame to `pair`'s inbox and wakes it; counted and
    /// dropped when the inbox is full.
    pub fn hand_over(&self, pair: usize, frame: &[u8], metrics: &Metrics) {
        let Some(inbox) = self.inboxes.get(pair) else {
            return;
        };
        let mut frames = lock(&inbox.frames);
        let (queued, bytes) = &mut *frames;
        if queued.len() >= INBOX_FRAMES || *bytes + frame.len() > INBOX_BYTES {
            metrics.inc(Counter::steer_inbox_full);
            return;
        }
        queued.push_back(frame.to_vec());
        *bytes += frame.len();
        drop(frames);
        metrics.inc(Counter::steer_handed_over);
        inbox.wake.wake();
    }

    /// The next frame handed to `pair`.
    pub fn take(&self, pair: usize) -> Option<Vec<u8>> {
        let mut frames = lock(&self.inboxes.get(pair)?.frames);
        let frame = frames.0.pop_front()?;
        frames.1 = frames.1.saturating_sub(frame.len());
        Some(frame)
    }

    /// How many pairs there are.
    pub fn pairs(&self) -> usize {
        self.inboxes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::frames;
    use smoltcp::wire::EthernetAddress;

    fn ends(src: &str, dst: &str) -> frames::Ends {
        frames::Ends {
            src_mac: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            dst_mac: EthernetAddress([2, 0x76, 0x67, 0, 0, 1]),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            hop_limit: 64,
        }
    }

    #[test]
    fn keys_of_every_flow_kind_in_both_families() {
        for (src, dst) in [("198.19.0.2", "192.0.2.1"), ("fd76::2", "2001:db8::1")] {
            let e = ends(src, dst);
            let udp = frames::udp(&e, 5000, 53, b"q");
            let (s, d) = (SocketAddr::new(e.src, 5000), SocketAddr::new(e.dst, 53));
            assert_eq!(key(&udp), Some(FlowKey::Udp(s, d)), "{src}");
            let rst = frames::tcp_reset_for_syn(&e, 40_000, 443, 7);
            let want = FlowKey::Tcp(SocketAddr::new(e.src, 40_000), SocketAddr::new(e.dst, 443));
            assert_eq!(key(&rst), Some(want), "{src}");
            // An echo reply is no session of the guest's.
            assert_eq!(key(&frames::echo_reply(&e, 9, 1, b"x")), None);
        }
        assert_eq!(key(&[]), None);
        assert_eq!(key(&[0u8; 60]), None);
    }

    #[test]
    fn an_inbox_holds_at_most_its_bytes() {
        let wakes = (0..2).map(|_| Arc::new(Wake::new().unwrap())).collect();
        let steer = Steer::new(wakes, 16);
        let metrics = Metrics::default();
        let segment = vec![0u8; 64 << 10];
        for _ in 0..100 {
            steer.hand_over(1, &segment, &metrics);
        }
        let held = INBOX_BYTES / segment.len();
        assert_eq!(metrics.get(Counter::steer_handed_over), held as u64);
        assert_eq!(metrics.get(Counter::steer_inbox_full), (100 - held) as u64);
        assert!(steer.take(1).is_some());
        steer.hand_over(1, &segment, &metrics);
        assert_eq!(metrics.get(Counter::steer_handed_over), held as u64 + 1);
        assert!(steer.take(0).is_none());
    }

    #[test]
    fn truncated_and_mutated_frames_never_panic() {
        let e = ends("198.19.0.2", "192.0.2.1");
        let frame = frames::udp(&e, 5000, 4000, b"payload");
        // Any answer will do; the point is that none of these panics.
        for cut in 0..frame.len() {
            let _ = key(&frame[..cut]);
        }
        for i in 0..frame.len() {
            for v in [0u8, 0xff, 0x45, 0x60, 6, 17, 58] {
                let mut f = frame.clone();
                f[i] = v;
                let _ = key(&f);
            }
        }
    }

    #[test]
    fn first_claim_owns_later_pairs_hand_over_and_sweeps_release() {
        let wakes: Vec<_> = (0..2).map(|_| Arc::new(Wake::new().unwrap())).collect();
        let steer = Steer::new(wakes, 2);
        let m = Metrics::default();
        let a = FlowKey::Echo(
            "198.19.0.2".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            1,
        );
        let b = FlowKey::Echo(
            "198.19.0.2".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            2,
        );
        let c = FlowKey::Echo(
            "198.19.0.2".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            3,
        );
        assert_eq!(steer.claim(a, 1, &m), Owner::Here);
        assert_eq!(steer.claim(a, 0, &m), Owner::Pair(1));
        assert_eq!(steer.claim(a, 1, &m), Owner::Here);
        assert_eq!(steer.claim(b, 0, &m), Owner::Here);
        // Full: handled where seen, not remembered, counted.
        assert_eq!(steer.claim(c, 1, &m), Owner::Here);
        assert_eq!(steer.claim(c, 0, &m), Owner::Here);
        assert_eq!(m.get(Counter::steer_full), 2);
        steer.sweep(1, |_| false);
        assert_eq!(steer.claim(a, 0, &m), Owner::Here, "released by its owner");
        steer.hand_over(1, b"frame", &m);
        assert_eq!(steer.take(1).as_deref(), Some(&b"frame"[..]));
        assert_eq!(steer.take(1), None);
        for _ in 0..=INBOX_FRAMES {
            steer.hand_over(0, b"f", &m);
        }
        assert_eq!(m.get(Counter::steer_inbox_full), 1);
    }
}
