//! DNS over a byte stream (TCP from the guest, port 53 at any address, and
//! the inside of DNS over TLS): 2-byte length-prefixed queries (RFC 1035
//! 4.2.2; several may be pipelined, RFC 7766), each answered through the
//! forwarder over TCP, the answers written back in order.
//!
//! Runs on the flow's tokio task (`services` starts it).
#![forbid(unsafe_code)]

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::forward::{Forwarder, Transport};
use crate::metrics::{Counter, Metrics};

/// Bytes of unanswered queries a guest may have buffered: one largest
/// message and its length; more resets the flow.
const MAX_BUFFERED: usize = 2 + 65_535;

/// Answers length-prefixed queries from `stream` until it ends (also the
/// inside of DNS over TLS); false when the guest overran the framing bound.
pub async fn serve_stream<S>(stream: &mut S, forwarder: &Forwarder, metrics: &Metrics) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffered: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = stream.shutdown().await;
                return true;
            }
            Ok(n) => n,
        };
        buffered.extend_from_slice(buf.get(..n).unwrap_or_default());
        if buffered.len() > MAX_BUFFERED {
            metrics.inc(Counter::dns_malformed);
            return false;
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
            if stream.write_all(&framed).await.is_err() || stream.flush().await.is_err() {
                return true;
            }
        }
    }
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
