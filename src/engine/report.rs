//! What an operator may ask of the attached guest: its live flows and
//! gauges, per queue pair, and the guest itself (lease, pairs, since when).
//!
//! The flow tables belong to each pair's engine thread and are never
//! touched from outside: a request goes into the pair's inbox, the pair is
//! woken, and its engine answers at the start of its next pass. A pair
//! that does not run (its queues not started yet) never answers; the asker
//! waits with a timeout.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;

use super::guest::{Guest, lock};
use crate::policy::Policy;

/// Where a flow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowState {
    /// A SYN held while the far end is dialled, or the handshake with the
    /// guest under way.
    Connecting,
    /// Open both ways (datagram sessions are always this).
    Established,
    /// Closing or aborted, not yet gone.
    Closing,
}

/// One live flow or datagram session.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    /// `tcp`, `udp` or `icmp`.
    pub proto: &'static str,
    /// The guest's end (for ICMP the port is the echo identifier).
    pub guest: SocketAddr,
    /// The far end as the guest addressed it (port 0 for ICMP).
    pub remote: SocketAddr,
    /// The name the guest resolved the far end from, when it did (its DNS
    /// pin).
    pub name: Option<String>,
    /// Where it is in its life.
    pub state: FlowState,
    /// Payload bytes from the guest to the far end.
    pub bytes_from_guest: u64,
    /// Payload bytes from the far end to the guest.
    pub bytes_to_guest: u64,
    /// Milliseconds since it opened.
    pub age_ms: u64,
    /// The queue pair that carries it.
    pub pair: usize,
}

/// Live gauges of one pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Gauges {
    /// TCP flows connecting (SYN held while dialling, or in handshake).
    pub tcp_connecting: usize,
    /// TCP flows established.
    pub tcp_established: usize,
    /// TCP flows closing.
    pub tcp_closing: usize,
    /// UDP sessions.
    pub udp_sessions: usize,
    /// ICMP echo sessions.
    pub icmp_sessions: usize,
    /// DNS queries in flight or with answers not yet delivered.
    pub dns_inflight: usize,
    /// Frames waiting for the guest's RX buffers.
    pub frames_waiting_for_guest: usize,
    /// Fragment reassembly budget in use (bytes and per-datagram cost).
    pub fragment_bytes_held: usize,
}

impl Gauges {
    /// Sums another pair's gauges into these.
    pub fn add(&mut self, other: &Gauges) {
        self.tcp_connecting += other.tcp_connecting;
        self.tcp_established += other.tcp_established;
        self.tcp_closing += other.tcp_closing;
        self.udp_sessions += other.udp_sessions;
        self.icmp_sessions += other.icmp_sessions;
        self.dns_inflight += other.dns_inflight;
        self.frames_waiting_for_guest += other.frames_waiting_for_guest;
        self.fragment_bytes_held += other.fragment_bytes_held;
    }
}

/// One pair's answer.
#[derive(Debug, Clone, Default)]
pub struct PairReport {
    /// Its gauges.
    pub gauges: Gauges,
    /// Its flows, oldest first, at most the limit asked for.
    pub flows: Vec<Flow>,
    /// How many flows it has in all.
    pub total_flows: usize,
}

/// A request waiting in a pair's inbox.
pub(super) enum Request {
    /// Its gauges and at most `limit` flows.
    Report {
        limit: usize,
        reply: oneshot::Sender<PairReport>,
    },
    /// A reload replaced `old` with `new`: reset what `new` denies of the
    /// pair's live flows and sessions; the answer is how many.
    Reconsider {
        old: Arc<Policy>,
        new: Arc<Policy>,
        reply: oneshot::Sender<usize>,
    },
}

/// A pair's inbox.
pub(super) type Inbox = Mutex<Vec<Request>>;

/// Milliseconds since the first stamp of the process, plus one (never 0,
/// which means "between passes").
fn stamp() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let ms = BASE.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
}

/// The guest a daemon is attached to, for the control API. Holds it
/// weakly: a guest whose VMM went away is gone from here with it.
#[derive(Default)]
pub struct Board {
    attached: Mutex<Option<(Weak<Guest>, Instant)>>,
}

impl Board {
    /// A new guest is attached (its device was built).
    pub fn attach(&self, guest: &Arc<Guest>) {
        *lock(&self.attached) = Some((Arc::downgrade(guest), Instant::now()));
    }

    /// The attached guest, if its VMM is still there, and since when.
    pub fn guest(&self) -> Option<(Arc<Guest>, Instant)> {
        let attached = lock(&self.attached);
        let (guest, since) = attached.as_ref()?;
        Some((guest.upgrade()?, *since))
    }
}

/// The guest's lease and addressing as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct GuestStatus {
    /// Queue pairs the device offers.
    pub queue_pairs: usize,
    /// The MAC that holds the DHCP lease, when one is held.
    pub mac: Option<String>,
    /// Seconds left on the lease, when one is held.
    pub lease_seconds_left: Option<u64>,
}

impl Guest {
    /// Asks every pair for its report (at most `limit` flows each); each
    /// receiver gets its pair's answer at that pair's next pass.
    pub fn ask(&self, limit: usize) -> Vec<oneshot::Receiver<PairReport>> {
        self.post(|reply| Request::Report { limit, reply })
    }

    /// Tells every pair that a reload replaced the `old` policy with `new`;
    /// each receiver gets how many flows its pair reset.
    pub fn reconsider(
        &self,
        old: &Arc<Policy>,
        new: &Arc<Policy>,
    ) -> Vec<oneshot::Receiver<usize>> {
        self.post(|reply| Request::Reconsider {
            old: old.clone(),
            new: new.clone(),
            reply,
        })
    }

    /// Puts a request into every pair's inbox and wakes the pair.
    fn post<T>(
        &self,
        request: impl Fn(oneshot::Sender<T>) -> Request,
    ) -> Vec<oneshot::Receiver<T>> {
        self.inboxes
            .iter()
            .zip(&self.wakes)
            .map(|(inbox, wake)| {
                let (reply, answer) = oneshot::channel();
                lock(inbox).push(request(reply));
                wake.wake();
                answer
            })
            .collect()
    }

    /// Requests waiting for pair `pair`.
    pub(super) fn requests(&self, pair: usize) -> Vec<Request> {
        self.inboxes
            .get(pair)
            .map(|inbox| std::mem::take(&mut *lock(inbox)))
            .unwrap_or_default()
    }

    /// Lease and pairs.
    pub fn status(&self) -> GuestStatus {
        let now = Instant::now();
        let lease = lock(&self.dhcp).lease(now);
        GuestStatus {
            queue_pairs: self.wakes.len(),
            mac: lease.map(|(mac, _)| mac.to_string()),
            lease_seconds_left: lease.map(|(_, left)| left.as_secs()),
        }
    }

    /// Pair `pair` starts a pass.
    pub(super) fn pass_begins(&self, pair: usize) {
        if let Some(busy) = self.busy.get(pair) {
            busy.store(stamp(), Ordering::Relaxed);
        }
    }

    /// Pair `pair` finished its pass.
    pub(super) fn pass_ends(&self, pair: usize) {
        if let Some(busy) = self.busy.get(pair) {
            busy.store(0, Ordering::Relaxed);
        }
    }

    /// The pair that has been inside one pass the longest, if for more
    /// than `limit`, and for how long: a worker that is stuck (a pass takes
    /// microseconds to milliseconds; an idle pair is between passes).
    pub fn stuck(&self, limit: Duration) -> Option<(usize, Duration)> {
        let now = stamp();
        self.busy
            .iter()
            .enumerate()
            .filter_map(|(pair, busy)| {
                let began = busy.load(Ordering::Relaxed);
                (began != 0).then(|| (pair, Duration::from_millis(now.saturating_sub(began))))
            })
            .filter(|(_, took)| *took > limit)
            .max_by_key(|(_, took)| *took)
    }

    /// DNS pins held for this guest.
    pub fn pins(&self) -> usize {
        self.pins.len()
    }

    /// The name the guest resolved `addr` from, if it did.
    pub(super) fn name_of(&self, addr: std::net::IpAddr, now: Instant) -> Option<String> {
        self.pins.name_of(addr, now)
    }
}
