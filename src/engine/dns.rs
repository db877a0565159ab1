//! The engine's side of DNS interception: every guest UDP datagram to port
//! 53, whatever address it is sent to, becomes a forwarder task; the answer
//! goes back to the guest from the address it asked.
//!
//! Queries hold a slot from the moment they are taken until the engine
//! takes their answer, so in-flight queries and undelivered answers
//! together stay within `dns.max-inflight`. At the bound a query gives way
//! to the newest (its task is cancelled, counted): the oldest of the guest
//! endpoint (address and port) holding the most slots, the oldest of all
//! on a tie. Under a flood the upstream and the host side are slow to get
//! to each query, and a lookup the guest's resolver makes now, from a port
//! of its own, must still get its turn rather than be pushed out by the
//! flood's later queries; a client that waits on many queries at once
//! loses the oldest of them, which it is the likeliest to have retried.
//! When every slot holds an answer the guest has not taken yet (a guest
//! slower to read than the upstream is to answer), an answer gives way by
//! the same rule (discarded, counted the same).
//!
//! Engine thread only; never awaits.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::dns::forward::{Forwarder, Transport};
use crate::metrics::{Counter, Metrics};
use crate::proxy::Host;

/// An answer for the guest: (guest endpoint, address it asked, message).
pub type Answer = (SocketAddr, SocketAddr, Vec<u8>);

/// One query's claim on the in-flight budget, released exactly once: by
/// the engine taking its answer, by the engine evicting it while it still
/// waits, or by its task ending without an answer. A query that has its
/// answer can no longer be evicted, so the answers waiting for the engine
/// never outnumber the slots (the answer queue's capacity).
struct Slot {
    state: AtomicU8,
    inflight: Arc<AtomicUsize>,
}

const WAITING: u8 = 0;
const ANSWERED: u8 = 1;
const DONE: u8 = 2;

impl Slot {
    /// From `from` to done, giving the slot back; false when the state was
    /// not `from`.
    fn finish(&self, from: u8) -> bool {
        let done = self
            .state
            .compare_exchange(from, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if done {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
        }
        done
    }

    fn waiting(&self) -> bool {
        self.state.load(Ordering::Acquire) == WAITING
    }
}

/// Gives the slot back if its task ends while still waiting (no answer,
/// or cancelled).
struct SlotGuard(Arc<Slot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.finish(WAITING);
    }
}

/// A query taken and not yet answered to the engine.
struct Pending {
    client: SocketAddr,
    task: AbortHandle,
    slot: Arc<Slot>,
}

impl Pending {
    /// Still waiting for its upstream (so it may be evicted).
    fn live(&self) -> bool {
        !self.task.is_finished() && self.slot.waiting()
    }
}

/// The interceptor.
pub struct Interceptor {
    forwarder: Arc<Forwarder>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
    /// Queries taken, oldest first, with the guest endpoint that asked
    /// (finished ones are dropped when met).
    queue: VecDeque<Pending>,
    answers_tx: mpsc::Sender<(Answer, Arc<Slot>)>,
    answers: mpsc::Receiver<(Answer, Arc<Slot>)>,
    /// Answers taken off the channel to choose one to discard, oldest
    /// first; delivered before the channel's.
    ready: VecDeque<(Answer, Arc<Slot>)>,
}

impl Interceptor {
    /// An interceptor resolving through `forwarder`.
    pub fn new(forwarder: Arc<Forwarder>, max_inflight: usize) -> Self {
        let (answers_tx, answers) = mpsc::channel(max_inflight.max(1));
        Self {
            forwarder,
            inflight: Arc::default(),
            max_inflight,
            queue: VecDeque::new(),
            answers_tx,
            answers,
            ready: VecDeque::new(),
        }
    }

    /// A query from the guest; returns an answer to send at once when the
    /// query cannot be taken.
    pub fn query(
        &mut self,
        host: &Host,
        metrics: &Arc<Metrics>,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        metrics.inc(Counter::dns_queries);
        self.prune();
        if self.inflight.load(Ordering::Acquire) >= self.max_inflight {
            self.evict(metrics);
        }
        if self.inflight.load(Ordering::Acquire) >= self.max_inflight {
            // Every slot holds an answer the guest has not taken yet.
            self.evict_answer(metrics);
        }
        if self.inflight.load(Ordering::Acquire) >= self.max_inflight {
            // Only while answers are between their task and the channel.
            metrics.inc(Counter::dns_over_limit);
            return crate::dns::forward::refused(payload);
        }
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let slot = Arc::new(Slot {
            state: AtomicU8::new(WAITING),
            inflight: self.inflight.clone(),
        });
        let forwarder = self.forwarder.clone();
        let answers = self.answers_tx.clone();
        let wake = host.wake.clone();
        let task_metrics = metrics.clone();
        let query = payload.to_vec();
        let guard = SlotGuard(slot.clone());
        let task = host.runtime.spawn(async move {
            let (answer, outcome) = forwarder.answer(&query, Transport::Udp).await;
            task_metrics.inc(outcome.counter());
            let Some(answer) = answer else {
                return;
            };
            // Evicted meanwhile: the slot is gone, and so is the answer.
            if guard
                .0
                .state
                .compare_exchange(WAITING, ANSWERED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return;
            }
            match answers.try_send(((src, dst, answer), guard.0.clone())) {
                Ok(()) => wake.wake(),
                Err(e) => {
                    // Not expected: answers never outnumber slots.
                    task_metrics.inc(Counter::dns_answers_dropped);
                    let (_, slot) = e.into_inner();
                    slot.finish(ANSWERED);
                }
            }
        });
        self.queue.push_back(Pending {
            client: src,
            task: task.abort_handle(),
            slot,
        });
        None
    }

    /// Drops finished queries from the front of the queue, and compacts it
    /// when finished ones behind a slow query pile up.
    fn prune(&mut self) {
        while self.queue.front().is_some_and(|p| !p.live()) {
            self.queue.pop_front();
        }
        if self.queue.len() > 2 * self.max_inflight.max(16) {
            self.queue.retain(Pending::live);
        }
    }

    /// Cancels the oldest query of the endpoint that holds the most.
    fn evict(&mut self, metrics: &Metrics) {
        self.queue.retain(Pending::live);
        let Some(at) = heaviest_first(self.queue.iter().map(|p| p.client)) else {
            return;
        };
        if let Some(victim) = self.queue.remove(at)
            && victim.slot.finish(WAITING)
        {
            victim.task.abort();
            metrics.inc(Counter::dns_evicted);
        }
    }

    /// Discards the oldest undelivered answer of the endpoint that holds
    /// the most.
    fn evict_answer(&mut self, metrics: &Metrics) {
        while let Ok(answer) = self.answers.try_recv() {
            self.ready.push_back(answer);
        }
        let Some(at) = heaviest_first(self.ready.iter().map(|((guest, _, _), _)| *guest)) else {
            return;
        };
        if let Some((_, slot)) = self.ready.remove(at)
            && slot.finish(ANSWERED)
        {
            metrics.inc(Counter::dns_evicted);
        }
    }

    /// The forwarder, for DNS over TCP flows.
    pub fn forwarder(&self) -> Arc<Forwarder> {
        self.forwarder.clone()
    }

    /// Queries in flight or with answers not yet delivered.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Whether answers wait for the engine.
    pub fn has_answers(&self) -> bool {
        !self.ready.is_empty() || !self.answers.is_empty()
    }

    /// The next answer for the guest; its slot is free from now on.
    pub fn next_answer(&mut self) -> Option<Answer> {
        let (answer, slot) = match self.ready.pop_front() {
            Some(ready) => ready,
            None => self.answers.try_recv().ok()?,
        };
        slot.finish(ANSWERED);
        Some(answer)
    }
}

/// The position of the first (oldest) entry of a client that holds the
/// most entries among `clients`, oldest first.
fn heaviest_first(clients: impl Iterator<Item = SocketAddr> + Clone) -> Option<usize> {
    let mut held: HashMap<SocketAddr, usize> = HashMap::new();
    for client in clients.clone() {
        *held.entry(client).or_default() += 1;
    }
    let most = held.values().copied().max()?;
    clients
        .into_iter()
        .position(|c| held.get(&c) == Some(&most))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A query for `name` (A, IN).
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(u8::try_from(label.len()).unwrap());
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    /// An upstream that answers `fast.test` at once and never anything else.
    fn upstream() -> SocketAddr {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let q = &buf[..n];
                if q.windows(4).any(|w| w == b"fast") {
                    let mut a = q.to_vec();
                    a[2] |= 0x80;
                    socket.send_to(&a, from).unwrap();
                }
            }
        });
        addr
    }

    /// An interceptor with 8 slots on `upstream()`, its host side (and the
    /// runtime that must outlive it).
    fn interceptor() -> (tokio::runtime::Runtime, Host, Interceptor) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut config = Config::embedded();
        config.dns.timeout_ms = 10_000;
        let rules =
            crate::dns::rules::Rules::new(&config.dns, Vec::new(), Arc::new(config.policy()));
        let forwarder = Forwarder::new(
            &config.dns,
            vec![upstream()],
            Arc::new(crate::dns::pins::Pins::new(16)),
            rules.live(),
        );
        let host = Host {
            runtime: runtime.handle().clone(),
            wake: Arc::new(crate::proxy::Wake::new().unwrap()),
            upstream: Arc::new(crate::proxy::Direct),
        };
        (runtime, host, Interceptor::new(forwarder, 8))
    }

    /// The next answer, waiting up to 5 s for it.
    fn wait_answer(dns: &mut Interceptor) -> Answer {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(answer) = dns.next_answer() {
                return answer;
            }
            assert!(std::time::Instant::now() < deadline, "no answer");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_flood_of_slow_queries_cannot_keep_a_new_one_out() {
        let (_runtime, host, mut dns) = interceptor();
        let metrics = Arc::new(Metrics::default());
        let guest: SocketAddr = "198.19.0.2:5000".parse().unwrap();
        let gateway: SocketAddr = "198.19.0.1:53".parse().unwrap();
        for i in 0..100u16 {
            let refused = dns.query(
                &host,
                &metrics,
                guest,
                gateway,
                &query(i, &format!("s{i}.slow.test")),
            );
            assert!(refused.is_none(), "query {i} refused");
            assert!(dns.inflight.load(Ordering::Acquire) <= 8);
        }
        assert_eq!(metrics.get(Counter::dns_evicted), 92);
        // A lookup now is taken and answered.
        assert!(
            dns.query(&host, &metrics, guest, gateway, &query(999, "fast.test"))
                .is_none()
        );
        let answer = wait_answer(&mut dns);
        assert_eq!(answer.2[..2], 999u16.to_be_bytes());
        assert!(dns.inflight.load(Ordering::Acquire) <= 8);
        assert!(dns.queue.len() <= 4 * 16);
    }

    /// A guest that leaves every slot holding an answer it has not taken
    /// still gets a new lookup through: an answer of the endpoint holding
    /// the most gives way, and every other one still arrives.
    #[test]
    fn answers_the_guest_has_not_taken_give_way_to_a_new_query() {
        let (_runtime, host, mut dns) = interceptor();
        let metrics = Arc::new(Metrics::default());
        let gateway: SocketAddr = "198.19.0.1:53".parse().unwrap();
        let flood: SocketAddr = "198.19.0.2:5000".parse().unwrap();
        let other: SocketAddr = "198.19.0.2:6000".parse().unwrap();
        for i in 0..8u16 {
            let q = query(i, &format!("f{i}.fast.test"));
            assert!(dns.query(&host, &metrics, flood, gateway, &q).is_none());
        }
        // Every task has handed its answer over; none is taken.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dns.answers.len() < 8 {
            assert!(std::time::Instant::now() < deadline, "not all answered");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let lookup = query(999, "fast.test");
        assert!(
            dns.query(&host, &metrics, other, gateway, &lookup)
                .is_none()
        );
        assert_eq!(metrics.get(Counter::dns_evicted), 1);
        assert_eq!(metrics.get(Counter::dns_over_limit), 0);
        let ids: Vec<u16> = (0..8)
            .map(|_| {
                let (_, _, a) = wait_answer(&mut dns);
                u16::from_be_bytes([a[0], a[1]])
            })
            .collect();
        // The flood's answers come in the order their tasks ended.
        let (flood_ids, last) = ids.split_at(7);
        assert_eq!(last, [999]);
        let distinct: std::collections::BTreeSet<_> = flood_ids.iter().collect();
        assert!(
            distinct.len() == 7 && flood_ids.iter().all(|&i| i < 8),
            "{ids:?}"
        );
        assert!(dns.next_answer().is_none());
        assert_eq!(dns.inflight.load(Ordering::Acquire), 0);
    }
}
