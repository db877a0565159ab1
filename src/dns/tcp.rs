//! DNS over TCP from the guest (port 53, any address): a local service in
//! place of a dialled upstream. The task reads 2-byte length-prefixed
//! queries from the flow (RFC 1035 4.2.2; several may be pipelined, RFC
//! 7766), answers each through the forwarder over TCP, and writes the
//! answers back in order.
//!
//! Runs as the flow's tokio task; speaks the same channels as a dialled
//! flow's task, so the engine treats it like any other TCP flow.
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::forward::{Forwarder, Transport};
use crate::metrics::{Counter, Metrics};
use crate::proxy::Host;
use crate::proxy::tcp::{Channels, FromHost, ToHost, pair};

/// Bytes of unanswered queries a guest may have buffered: one largest
/// message and its length; more resets the flow.
const MAX_BUFFERED: usize = 2 + 65_535;

/// Starts the service task for one flow.
pub fn spawn(host: &Host, forwarder: Arc<Forwarder>, metrics: Arc<Metrics>) -> Channels {
    let (channels, mut from_engine, to_engine) = pair();
    let wake = host.wake.clone();
    host.runtime.spawn(async move {
        if to_engine.send(FromHost::Connected(None)).await.is_err() {
            return;
        }
        wake.wake();
        let mut buffered: Vec<u8> = Vec::new();
        while let Some(message) = from_engine.recv().await {
            wake.wake();
            match message {
                ToHost::Data(bytes) => buffered.extend_from_slice(&bytes),
                ToHost::Fin => {
                    let _ = to_engine.send(FromHost::Fin).await;
                    wake.wake();
                    return;
                }
                ToHost::Reset => return,
            }
            if buffered.len() > MAX_BUFFERED {
                metrics.inc(Counter::dns_malformed);
                let _ = to_engine.send(FromHost::Reset).await;
                wake.wake();
                return;
            }
            while let Some(query) = next_message(&mut buffered) {
                metrics.inc(Counter::dns_queries);
                let (answer, outcome) = forwarder.answer(&query, Transport::Tcp).await;
                metrics.inc(outcome.counter());
                let Some(answer) = answer else { continue };
                let Ok(len) = u16::try_from(answer.len()) else {
                    continue;
                };
                let mut framed = Vec::with_capacity(answer.len() + 2);
                framed.extend_from_slice(&len.to_be_bytes());
                framed.extend_from_slice(&answer);
                if to_engine.send(FromHost::Data(framed)).await.is_err() {
                    return;
                }
                wake.wake();
            }
        }
    });
    channels
}

/// Takes one complete length-prefixed message off the front of `buf`.
fn next_message(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*buf.first()?, *buf.get(1)?]));
    let message = buf.get(2..2 + len)?.to_vec();
    buf.drain(..2 + len);
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_handles_partial_and_pipelined_messages() {
        let mut buf = vec![0, 3, b'a', b'b'];
        assert_eq!(next_message(&mut buf), None);
        buf.extend_from_slice(&[b'c', 0, 1, b'x', 0]);
        assert_eq!(next_message(&mut buf), Some(b"abc".to_vec()));
        assert_eq!(next_message(&mut buf), Some(b"x".to_vec()));
        assert_eq!(next_message(&mut buf), None);
        assert_eq!(buf, vec![0]);
        let mut empty = Vec::new();
        assert_eq!(next_message(&mut empty), None);
        let mut zero = vec![0, 0];
        assert_eq!(next_message(&mut zero), Some(Vec::new()));
    }
}
