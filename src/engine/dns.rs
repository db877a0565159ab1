//! The engine's side of DNS interception: every guest UDP datagram to port
//! 53, whatever address it is sent to, becomes a forwarder task; the answer
//! goes back to the guest from the address it asked. In-flight queries are
//! bounded; beyond the bound the guest gets REFUSED at once.
//!
//! Engine thread only; never awaits.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::dns::forward::{Forwarder, Transport};
use crate::metrics::{Counter, Metrics};
use crate::proxy::Host;

/// Answers waiting for the engine.
const ANSWER_DEPTH: usize = 256;

/// An answer for the guest: (guest endpoint, address it asked, message).
pub type Answer = (SocketAddr, SocketAddr, Vec<u8>);

/// The interceptor.
pub struct Interceptor {
    forwarder: Arc<Forwarder>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
    answers_tx: mpsc::Sender<Answer>,
    answers: mpsc::Receiver<Answer>,
}

impl Interceptor {
    /// An interceptor resolving through `forwarder`.
    pub fn new(forwarder: Arc<Forwarder>, max_inflight: usize) -> Self {
        let (answers_tx, answers) = mpsc::channel(ANSWER_DEPTH);
        Self {
            forwarder,
            inflight: Arc::default(),
            max_inflight,
            answers_tx,
            answers,
        }
    }

    /// A query from the guest; returns an answer to send at once when the
    /// query cannot be taken (REFUSED at the in-flight bound).
    pub fn query(
        &mut self,
        host: &Host,
        metrics: &Arc<Metrics>,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        metrics.inc(Counter::dns_queries);
        if self.inflight.load(Ordering::Acquire) >= self.max_inflight {
            metrics.inc(Counter::dns_over_limit);
            return crate::dns::forward::refused(payload);
        }
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let forwarder = self.forwarder.clone();
        let inflight = self.inflight.clone();
        let answers = self.answers_tx.clone();
        let wake = host.wake.clone();
        let metrics = metrics.clone();
        let query = payload.to_vec();
        host.runtime.spawn(async move {
            let (answer, outcome) = forwarder.answer(&query, Transport::Udp).await;
            inflight.fetch_sub(1, Ordering::AcqRel);
            metrics.inc(outcome.counter());
            if let Some(answer) = answer
                && answers.try_send((src, dst, answer)).is_ok()
            {
                wake.wake();
            }
        });
        None
    }

    /// The forwarder, for DNS over TCP flows.
    pub fn forwarder(&self) -> Arc<Forwarder> {
        self.forwarder.clone()
    }

    /// The next answer for the guest.
    pub fn next_answer(&mut self) -> Option<Answer> {
        self.answers.try_recv().ok()
    }
}
