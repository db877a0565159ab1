//! One UDP session's host side: a connected host socket per (guest source,
//! destination), datagrams both ways, ends when idle or when the engine drops
//! the session.
//!
//! Runs as a tokio task. Replies go to the engine through one channel shared
//! by all sessions; when it is full the reply is dropped and counted, as a
//! router would drop it.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::Host;
use crate::metrics::{Counter, Metrics};

/// Datagrams from the guest waiting for one session's socket.
pub const SESSION_DEPTH: usize = 64;
/// Largest datagram read from a host socket (a full IPv4/IPv6 UDP payload).
const MAX_DATAGRAM: usize = 65_535;

/// A reply for the engine: session id and payload.
pub type Reply = (u64, Vec<u8>);

/// Starts a session task; returns the sender for the guest's datagrams.
pub fn spawn(
    host: &Host,
    dst: SocketAddr,
    id: u64,
    replies: mpsc::Sender<Reply>,
    idle: Duration,
    metrics: Arc<Metrics>,
) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(SESSION_DEPTH);
    let wake = host.wake.clone();
    host.runtime.spawn(async move {
        let bind: SocketAddr = if dst.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = match UdpSocket::bind(bind).await {
            Ok(s) => s,
            Err(_) => return,
        };
        if socket.connect(dst).await.is_err() {
            metrics.inc(Counter::udp_send_failed);
            return;
        }
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                datagram = rx.recv() => match datagram {
                    Some(d) => {
                        if socket.send(&d).await.is_err() {
                            metrics.inc(Counter::udp_send_failed);
                        }
                    }
                    None => return,
                },
                received = socket.recv(&mut buf) => {
                    // ICMP errors surface as ECONNREFUSED and the like on a
                    // connected socket; the session lives on.
                    if let Ok(n) = received {
                        let payload = buf.get(..n).unwrap_or_default().to_vec();
                        if replies.try_send((id, payload)).is_err() {
                            metrics.inc(Counter::udp_reply_dropped);
                        }
                        wake.wake();
                    }
                }
                () = tokio::time::sleep(idle) => return,
            }
        }
    });
    tx
}
