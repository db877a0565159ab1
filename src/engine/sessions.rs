//! The datagram sessions the UDP and ICMP relays share: one connected,
//! nonblocking host socket per session, owned by the engine and watched in
//! its host-socket epoll under a token tagged with the relay's kind. Sends
//! go out at once; a session that became readable is drained as frames for
//! the guest find room. Idle sessions expire (their sockets close).
//!
//! While the guest takes no replies the socket's receive buffer is the
//! queue; what the kernel drops when it overflows is learned from
//! `SO_RXQ_OVFL` on the next read and counted.
//!
//! Engine thread only; never blocks.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use std::time::{Duration, Instant};

use super::hostio::HostIo;
use crate::metrics::{Counter, Metrics};

/// Largest datagram read from a host socket (a full IPv4/IPv6 payload).
const MAX_DATAGRAM: usize = 65_535;
/// Bits of a token that say which table it belongs to.
pub const TAG_SHIFT: u32 = 60;
/// How long a session must have been quiet to give way to a new one at
/// the limit.
pub const EVICT_IDLE: Duration = Duration::from_secs(1);
/// Socket errors passed over in one read before giving the pass back.
const MAX_ERRORS_PER_READ: usize = 64;
/// Sessions checked for an unread reply before a new one is refused.
const MAX_PEEKS_PER_ADMISSION: usize = 8;

/// Whether a datagram waits on `socket` (a pending socket error is not
/// one: an ICMP error answers nothing).
fn has_datagram(socket: &std::net::UdpSocket) -> bool {
    socket.peek(&mut [0u8; 1]).is_ok()
}

struct Session<K> {
    key: K,
    socket: std::net::UdpSocket,
    last_active: Instant,
    /// The kernel's drop count for the socket when last read.
    dropped: u32,
    /// Something came back on it: a session in use, not a probe into the
    /// void (what a flood's sessions are).
    answered: bool,
    opened: Instant,
    /// Payload bytes sent for the guest and received for it.
    bytes_out: u64,
    bytes_in: u64,
}

/// One session as the operator sees it.
pub struct SessionView<K> {
    /// Its key.
    pub key: K,
    /// How long it has been open.
    pub age: Duration,
    /// Payload bytes from the guest and to it.
    pub bytes: (u64, u64),
}

/// Sessions keyed by `K`.
pub struct Datagrams<K> {
    by_key: HashMap<K, u64>,
    by_token: HashMap<u64, Session<K>>,
    readable: HashSet<u64>,
    tag: u64,
    next: u64,
    buf: Vec<u8>,
    cmsg: Vec<u8>,
    /// What the kernel's drops count as.
    drop_counter: Counter,
}

impl<K: Copy + Eq + Hash> Datagrams<K> {
    /// An empty table whose tokens carry `tag` (see [`TAG_SHIFT`]);
    /// replies the kernel drops count as `drop_counter`.
    pub fn new(tag: u64, drop_counter: Counter) -> Self {
        Self {
            by_key: HashMap::new(),
            by_token: HashMap::new(),
            readable: HashSet::new(),
            tag: tag << TAG_SHIFT,
            next: 0,
            buf: Vec::new(),
            cmsg: nix::cmsg_space!(u32),
            drop_counter,
        }
    }

    /// Whether `token` is one of this table's.
    pub fn owns(&self, token: u64) -> bool {
        token >> TAG_SHIFT << TAG_SHIFT == self.tag
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Whether `key` has a session.
    pub fn contains(&self, key: &K) -> bool {
        self.by_key.contains_key(key)
    }

    /// Whether one more session fits under `max`. At the limit the
    /// session idle longest gives way if it has been quiet for
    /// [`EVICT_IDLE`], else the least recently active one that nothing has
    /// come back on yet (counted as `evicted`): a flood of one-datagram
    /// sessions into the void would otherwise hold every slot and lock the
    /// guest's new sessions out, while sessions in use (answered, or busy
    /// within the last second) keep theirs. Counts `full` when nothing
    /// gives way.
    ///
    /// A reply that has arrived but that the engine has not read yet
    /// (its readiness comes in a later pass, after this frame's batch)
    /// already makes a session answered: each candidate's socket is
    /// peeked before it goes. Without that, a flood of new sessions pushes
    /// a guest's new ping or lookup out between its request and the read
    /// of its reply, and the reply is lost.
    pub fn admits(
        &mut self,
        max: usize,
        now: Instant,
        metrics: &Metrics,
        (full, evicted): (Counter, Counter),
    ) -> bool {
        if self.by_key.len() < max {
            return true;
        }
        let quiet = self
            .by_token
            .iter()
            .min_by_key(|(_, s)| s.last_active)
            .filter(|(_, s)| now.saturating_duration_since(s.last_active) >= EVICT_IDLE)
            .map(|(token, _)| *token);
        let victim = quiet.or_else(|| {
            // Bounded: a flood into hosts that answer fills the table with
            // sessions in use, and then nothing gives way.
            for _ in 0..MAX_PEEKS_PER_ADMISSION {
                let (token, session) = self
                    .by_token
                    .iter_mut()
                    .filter(|(_, s)| !s.answered)
                    .min_by_key(|(_, s)| s.last_active)?;
                if !has_datagram(&session.socket) {
                    return Some(*token);
                }
                session.answered = true;
                self.readable.insert(*token);
            }
            None
        });
        match victim.and_then(|token| self.by_token.remove(&token).map(|s| (token, s))) {
            Some((token, session)) => {
                self.by_key.remove(&session.key);
                self.readable.remove(&token);
                metrics.inc(evicted);
                true
            }
            None => {
                metrics.inc(full);
                false
            }
        }
    }

    /// Adds a session on `socket` (connected, nonblocking), watched in `io`.
    pub fn open(
        &mut self,
        io: &HostIo,
        key: K,
        socket: std::net::UdpSocket,
        now: Instant,
    ) -> std::io::Result<()> {
        let token = self.tag | (self.next & ((1 << TAG_SHIFT) - 1));
        self.next = self.next.wrapping_add(1);
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::RxqOvfl, &1)?;
        io.add(socket.as_raw_fd(), token)?;
        self.by_key.insert(key, token);
        self.by_token.insert(
            token,
            Session {
                key,
                socket,
                last_active: now,
                dropped: 0,
                answered: false,
                opened: now,
                bytes_out: 0,
                bytes_in: 0,
            },
        );
        Ok(())
    }

    /// Sends one datagram on `key`'s session; false when there is none or
    /// the socket would not take it now.
    pub fn send(&mut self, key: &K, datagram: &[u8], now: Instant) -> bool {
        let Some(session) = self.by_key.get(key).and_then(|t| self.by_token.get_mut(t)) else {
            return false;
        };
        session.last_active = now;
        let sent = session.socket.send(datagram).is_ok();
        if sent {
            session.bytes_out += datagram.len() as u64;
        }
        sent
    }

    /// Every session as the operator sees it.
    pub fn report(&self, now: Instant) -> impl Iterator<Item = SessionView<K>> + '_ {
        self.by_token.values().map(move |s| SessionView {
            key: s.key,
            age: now.saturating_duration_since(s.opened),
            bytes: (s.bytes_out, s.bytes_in),
        })
    }

    /// Marks a session readable (an epoll edge).
    pub fn mark(&mut self, token: u64) {
        if self.by_token.contains_key(&token) {
            self.readable.insert(token);
        }
    }

    /// Whether a session has datagrams waiting to be read.
    pub fn has_readable(&self) -> bool {
        !self.readable.is_empty()
    }

    /// The next datagram a readable session received that `wanted`
    /// accepts: its key and bytes. A session that would block is no longer
    /// readable; errors (an ICMP error on a connected socket surfaces as
    /// ECONNREFUSED) and unwanted datagrams are skipped.
    pub fn next(
        &mut self,
        now: Instant,
        metrics: &Metrics,
        wanted: impl Fn(&K, &[u8]) -> bool,
    ) -> Option<(K, &[u8])> {
        if self.buf.len() < MAX_DATAGRAM {
            self.buf.resize(MAX_DATAGRAM, 0);
        }
        // Socket errors clear as they are read; this bounds a pass all the
        // same should one keep coming.
        let mut errors = 0;
        let (key, n) = loop {
            let token = *self.readable.iter().next()?;
            let Some(session) = self.by_token.get_mut(&token) else {
                self.readable.remove(&token);
                continue;
            };
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            let received = recvmsg::<()>(
                session.socket.as_raw_fd(),
                &mut iov,
                Some(&mut self.cmsg),
                MsgFlags::empty(),
            );
            match received {
                Ok(message) => {
                    let n = message.bytes;
                    let drops = message.cmsgs().into_iter().flatten().find_map(|c| match c {
                        ControlMessageOwned::RxqOvfl(total) => Some(total),
                        _ => None,
                    });
                    if let Some(total) = drops {
                        let lost = total.wrapping_sub(session.dropped);
                        session.dropped = total;
                        metrics.add(self.drop_counter, u64::from(lost));
                    }
                    session.last_active = now;
                    session.answered = true;
                    session.bytes_in += n as u64;
                    if wanted(&session.key, self.buf.get(..n).unwrap_or_default()) {
                        break (session.key, n);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    self.readable.remove(&token);
                }
                Err(_) => {
                    errors += 1;
                    if errors >= MAX_ERRORS_PER_READ {
                        return None;
                    }
                }
            }
        };
        Some((key, self.buf.get(..n).unwrap_or_default()))
    }

    /// Every session's key.
    pub fn keys(&self) -> Vec<K> {
        self.by_key.keys().copied().collect()
    }

    /// Closes the session `key` (its socket with it).
    pub fn close(&mut self, key: &K) {
        if let Some(token) = self.by_key.remove(key) {
            self.by_token.remove(&token);
            self.readable.remove(&token);
        }
    }

    /// Closes sessions idle longer than `idle`.
    pub fn expire(&mut self, now: Instant, idle: Duration) {
        let by_key = &mut self.by_key;
        let readable = &mut self.readable;
        self.by_token.retain(|token, s| {
            let keep = now.saturating_duration_since(s.last_active) <= idle;
            if !keep {
                by_key.remove(&s.key);
                readable.remove(token);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback peer and a socket connected to it (a session's socket).
    fn connected_socket() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(peer.local_addr().unwrap()).unwrap();
        (peer, socket)
    }

    /// The counters `admits` is given in these tests.
    const COUNTERS: (Counter, Counter) = (Counter::udp_over_limit, Counter::udp_session_evicted);

    /// A table holding one session per key, opened `step` apart from
    /// `t0`, each connected to one loopback peer.
    struct Filled {
        /// Held: the sessions are registered in it.
        _io: HostIo,
        table: Datagrams<u8>,
        peer: std::net::UdpSocket,
        /// Each session's own address, in key order.
        addrs: Vec<std::net::SocketAddr>,
        t0: Instant,
    }

    fn filled(keys: &[u8], step: Duration) -> Filled {
        let io = HostIo::new().unwrap();
        let mut table = Datagrams::new(1, Counter::udp_reply_dropped);
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let t0 = Instant::now();
        let mut addrs = Vec::new();
        let mut at = t0;
        for key in keys {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.connect(peer.local_addr().unwrap()).unwrap();
            addrs.push(socket.local_addr().unwrap());
            table.open(&io, *key, socket, at).unwrap();
            at += step;
        }
        Filled {
            _io: io,
            table,
            peer,
            addrs,
            t0,
        }
    }

    #[test]
    fn at_the_limit_the_quietest_session_gives_way_after_a_second() {
        let metrics = Metrics::default();
        let mut filled = filled(&[1, 2], Duration::ZERO);
        let (table, t0) = (&mut filled.table, filled.t0);
        // Both fresh and answered (in use): nothing gives way.
        for session in table.by_token.values_mut() {
            session.answered = true;
        }
        assert!(!table.admits(2, t0, &metrics, COUNTERS));
        assert_eq!(metrics.get(Counter::udp_over_limit), 1);
        // Session 2 stays in use; 1 has been quiet for over a second.
        let later = t0 + EVICT_IDLE + Duration::from_millis(100);
        assert!(table.send(&2, b"still here", later));
        assert!(table.admits(2, later, &metrics, COUNTERS));
        assert!(!table.contains(&1) && table.contains(&2));
        assert_eq!(table.len(), 1);
        assert_eq!(metrics.get(Counter::udp_session_evicted), 1);
        // Below the limit nothing is touched.
        assert!(table.admits(2, later, &metrics, COUNTERS));
        assert!(table.contains(&2));
    }

    #[test]
    fn at_the_limit_an_unanswered_session_gives_way_at_once() {
        let metrics = Metrics::default();
        let mut filled = filled(&[1, 2, 3], Duration::from_millis(10));
        let (table, t0) = (&mut filled.table, filled.t0);
        // 1 is answered (in use); 2 and 3 are probes into the void.
        let one = table.by_key[&1];
        table.by_token.get_mut(&one).unwrap().answered = true;
        let now = t0 + Duration::from_millis(50);
        // The least recently active unanswered one goes, a flood's next
        // session cannot push out one in use.
        assert!(table.admits(3, now, &metrics, COUNTERS));
        assert!(table.contains(&1) && !table.contains(&2) && table.contains(&3));
        assert!(table.admits(2, now, &metrics, COUNTERS));
        assert!(table.contains(&1) && !table.contains(&3));
        assert!(!table.admits(1, now, &metrics, COUNTERS));
        assert!(table.contains(&1));
        assert_eq!(metrics.get(Counter::udp_session_evicted), 2);
    }

    #[test]
    fn an_unread_reply_keeps_a_session_from_giving_way() {
        let metrics = Metrics::default();
        let mut filled = filled(&[1, 2, 3], Duration::from_millis(10));
        let (table, t0) = (&mut filled.table, filled.t0);
        // 1 and 2 were answered, but no pass has read the replies yet.
        filled.peer.send_to(b"reply", filled.addrs[0]).unwrap();
        filled.peer.send_to(b"reply", filled.addrs[1]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let now = t0 + Duration::from_millis(50);
        assert!(table.admits(3, now, &metrics, COUNTERS));
        assert!(table.contains(&1) && table.contains(&2) && !table.contains(&3));
        // They are in use now, and their replies are read in the next pass.
        assert!(table.has_readable());
        let mut got = Vec::new();
        while let Some((key, bytes)) = table.next(now, &metrics, |_, _| true) {
            got.push((key, bytes.to_vec()));
        }
        got.sort();
        assert_eq!(got, [(1, b"reply".to_vec()), (2, b"reply".to_vec())]);
        // Nothing is left to give way: the next session is refused.
        assert!(!table.admits(2, now, &metrics, COUNTERS));
        assert_eq!(metrics.get(Counter::udp_over_limit), 1);
        assert_eq!(metrics.get(Counter::udp_session_evicted), 1);
    }

    #[test]
    fn open_send_receive_and_expire() {
        let io = HostIo::new().unwrap();
        let metrics = Metrics::default();
        let mut table: Datagrams<u8> = Datagrams::new(1, Counter::udp_reply_dropped);
        let (peer, socket) = connected_socket();
        let now = Instant::now();
        table.open(&io, 7, socket, now).unwrap();
        assert!(table.contains(&7));
        assert!(table.send(&7, b"ping", now));
        assert!(!table.send(&8, b"ping", now), "no such session");
        let mut buf = [0u8; 16];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        peer.send_to(b"pong", from).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut io = io;
        let ready = io.ready();
        let token = ready
            .iter()
            .find(|(_, r)| r.readable)
            .map(|(t, _)| *t)
            .unwrap();
        assert!(table.owns(token));
        assert!(!Datagrams::<u8>::new(2, Counter::udp_reply_dropped).owns(token));
        table.mark(token);
        assert_eq!(
            table
                .next(now, &metrics, |_, _| true)
                .map(|(k, d)| (k, d.to_vec())),
            Some((7, b"pong".to_vec()))
        );
        assert!(table.next(now, &metrics, |_, _| true).is_none());
        assert!(!table.has_readable());
        assert_eq!(metrics.get(Counter::udp_reply_dropped), 0);
        table.expire(now + Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(table.len(), 1);
        table.expire(now + Duration::from_secs(11), Duration::from_secs(10));
        assert!(table.is_empty());
    }

    #[test]
    fn kernel_drops_are_counted() {
        let io = HostIo::new().unwrap();
        let metrics = Metrics::default();
        let mut table: Datagrams<u8> = Datagrams::new(1, Counter::udp_reply_dropped);
        let (peer, socket) = connected_socket();
        // The smallest receive buffer: a burst overflows it.
        setsockopt(&socket, sockopt::RcvBuf, &1).unwrap();
        let to = socket.local_addr().unwrap();
        let now = Instant::now();
        table.open(&io, 1, socket, now).unwrap();
        let sent = 200;
        for _ in 0..sent {
            peer.send_to(&[0u8; 1000], to).unwrap();
        }
        let mut io = io;
        let token = io.ready().first().map(|(t, _)| *t).unwrap();
        table.mark(token);
        let mut read = 0;
        while table.next(now, &metrics, |_, _| true).is_some() {
            read += 1;
        }
        // Drops are learned from a datagram queued after them.
        assert_eq!(metrics.get(Counter::udp_reply_dropped), 0);
        assert!(read < sent, "read {read} of {sent}");
        peer.send_to(b"after", to).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(io.ready().iter().any(|(t, _)| *t == token));
        table.mark(token);
        let got = table
            .next(now, &metrics, |_, _| true)
            .map(|(k, d)| (k, d.to_vec()));
        assert_eq!(got, Some((1, b"after".to_vec())));
        let dropped = metrics.get(Counter::udp_reply_dropped);
        assert_eq!(read + dropped, sent, "read {read}, dropped {dropped}");
    }
}
