//! ICMP echo to outside hosts through unprivileged ping sockets
//! (`SOCK_DGRAM, IPPROTO_ICMP[V6]`): one socket per (guest, destination,
//! guest identifier) session. The kernel picks the identifier on the wire and
//! matches replies to the socket; the engine restores the guest's own.
//!
//! Runs as a tokio task per session; replies share one channel to the engine.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::Host;
use crate::metrics::{Counter, Metrics};

/// Echo requests waiting for one session's socket.
const SESSION_DEPTH: usize = 16;
const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// An echo reply for the engine: session id, sequence number, data.
pub type Reply = (u64, u16, Vec<u8>);

/// Opens a ping socket for `family`; fails with EACCES where
/// `net.ipv4.ping_group_range` excludes our group.
pub fn open(dst: IpAddr) -> std::io::Result<std::net::UdpSocket> {
    let (domain, protocol) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(protocol))?;
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddr::new(dst, 0).into())?;
    // A ping socket speaks datagrams like UDP does; tokio's UdpSocket only
    // needs send/recv on it.
    Ok(std::net::UdpSocket::from(socket))
}

/// Whether this host lets us open ping sockets at all (checked once at start).
pub fn available() -> bool {
    open(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)).is_ok()
}

/// Starts a session on an opened socket; returns the sender for (seq, data).
pub fn spawn(
    host: &Host,
    socket: std::net::UdpSocket,
    v6: bool,
    id: u64,
    replies: mpsc::Sender<Reply>,
    idle: Duration,
    metrics: Arc<Metrics>,
) -> mpsc::Sender<(u16, Vec<u8>)> {
    let (tx, mut rx) = mpsc::channel::<(u16, Vec<u8>)>(SESSION_DEPTH);
    let wake = host.wake.clone();
    host.runtime.spawn(async move {
        let Ok(socket) = UdpSocket::from_std(socket) else {
            return;
        };
        let (request, reply) = if v6 {
            (ECHO_REQUEST_V6, ECHO_REPLY_V6)
        } else {
            (ECHO_REQUEST_V4, ECHO_REPLY_V4)
        };
        let mut buf = vec![0u8; 65_535];
        loop {
            tokio::select! {
                echo = rx.recv() => match echo {
                    Some((seq, data)) => {
                        let mut message = Vec::with_capacity(8 + data.len());
                        // Identifier and checksum are the kernel's to fill in.
                        message.extend_from_slice(&[request, 0, 0, 0, 0, 0]);
                        message.extend_from_slice(&seq.to_be_bytes());
                        message.extend_from_slice(&data);
                        if socket.send(&message).await.is_err() {
                            metrics.inc(Counter::icmp_send_failed);
                        }
                    }
                    None => return,
                },
                received = socket.recv(&mut buf) => {
                    let Ok(n) = received else { continue };
                    let Some(message) = buf.get(..n) else { continue };
                    if let [kind, 0, _, _, _, _, s0, s1, data @ ..] = message
                        && *kind == reply
                    {
                        let seq = u16::from_be_bytes([*s0, *s1]);
                        if replies.try_send((id, seq, data.to_vec())).is_err() {
                            metrics.inc(Counter::icmp_reply_dropped);
                        }
                        wake.wake();
                    }
                },
                () = tokio::time::sleep(idle) => return,
            }
        }
    });
    tx
}
