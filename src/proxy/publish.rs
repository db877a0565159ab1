//! Published ports: host listeners (`[[publish]]`) whose connections and
//! datagrams are carried to a guest port, from the gateway's address.
//!
//! Bound once at start (a port that cannot be bound stops the daemon before
//! it listens for a VMM) and kept across VMM connections. Each listener is a
//! tokio task that hands what it accepts to whichever engine is attached, or
//! closes it at once when no guest is there. Inbound traffic is not subject to
//! egress rules.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

use crate::config::{Protocol, Publish};
use crate::metrics::{Counter, Metrics};
use crate::proxy::Wake;

/// Inbound connections and datagrams waiting for the engine.
const INBOX_DEPTH: usize = 256;
/// Guest replies waiting for one published UDP socket.
const UDP_OUT_DEPTH: usize = 256;

/// Something arriving at a published port.
pub enum Inbound {
    /// An accepted TCP connection for `guest_port`.
    Tcp {
        /// The host side, nonblocking, for the engine to own.
        stream: std::net::TcpStream,
        /// The guest port to connect to.
        guest_port: u16,
    },
    /// A datagram from `peer` at published UDP entry `entry`.
    Udp {
        /// Index among the UDP entries.
        entry: usize,
        /// The host peer.
        peer: SocketAddr,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// Errors binding published ports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot publish {protocol:?} {addr}")]
    Bind {
        /// tcp or udp.
        protocol: Protocol,
        /// The host address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct Inbox {
    tx: mpsc::Sender<Inbound>,
    wake: Arc<Wake>,
}

/// A published UDP entry as the engine sees it.
pub struct UdpEntry {
    /// The guest port datagrams go to.
    pub guest_port: u16,
    /// Where the guest's replies go: (host peer, payload).
    pub out: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

/// What an engine gets when it attaches.
pub struct Attachment {
    /// Connections and datagrams for the guest.
    pub inbound: mpsc::Receiver<Inbound>,
    /// The UDP entries, indexed as in [`Inbound::Udp`].
    pub udp: Vec<UdpEntry>,
}

/// Where a published UDP entry's replies go: (host peer, payload).
type UdpOut = mpsc::Sender<(SocketAddr, Vec<u8>)>;

/// The running listeners.
pub struct Publisher {
    slot: Arc<Mutex<Option<Inbox>>>,
    udp: Vec<(u16, UdpOut)>,
}

/// A published entry's socket, bound and not yet served.
enum BoundSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Every published entry bound, before any thread exists (binding a
/// privileged port needs a capability the daemon drops once started).
pub struct Bound(Vec<(Publish, BoundSocket)>);

impl Bound {
    /// Starts every entry's task on `runtime`.
    pub fn start(
        self,
        runtime: &tokio::runtime::Handle,
        metrics: &Arc<Metrics>,
    ) -> Result<Publisher, Error> {
        let _enter = runtime.enter();
        let slot: Arc<Mutex<Option<Inbox>>> = Arc::default();
        let mut udp = Vec::new();
        for (entry, socket) in self.0 {
            let bind_error = |source| Error::Bind {
                protocol: entry.protocol,
                addr: entry.host,
                source,
            };
            match socket {
                BoundSocket::Tcp(std) => {
                    let listener = TcpListener::from_std(std).map_err(bind_error)?;
                    runtime.spawn(accept_tcp(
                        listener,
                        entry.guest_port,
                        slot.clone(),
                        metrics.clone(),
                    ));
                }
                BoundSocket::Udp(std) => {
                    let socket = UdpSocket::from_std(std).map_err(bind_error)?;
                    let (out, out_rx) = mpsc::channel(UDP_OUT_DEPTH);
                    runtime.spawn(relay_udp(
                        socket,
                        udp.len(),
                        out_rx,
                        slot.clone(),
                        metrics.clone(),
                    ));
                    udp.push((entry.guest_port, out));
                }
            }
            tracing::info!(protocol = ?entry.protocol, host = %entry.host, guest_port = entry.guest_port, "published");
        }
        Ok(Publisher { slot, udp })
    }
}

impl Publisher {
    /// Binds every entry; nothing is served until [`Bound::start`].
    pub fn bind(entries: &[Publish]) -> Result<Bound, Error> {
        let mut bound = Vec::with_capacity(entries.len());
        for entry in entries {
            let bind_error = |source| Error::Bind {
                protocol: entry.protocol,
                addr: entry.host,
                source,
            };
            let socket = match entry.protocol {
                Protocol::Tcp => {
                    let std = std::net::TcpListener::bind(entry.host).map_err(bind_error)?;
                    std.set_nonblocking(true).map_err(bind_error)?;
                    BoundSocket::Tcp(std)
                }
                Protocol::Udp => {
                    let std = std::net::UdpSocket::bind(entry.host).map_err(bind_error)?;
                    std.set_nonblocking(true).map_err(bind_error)?;
                    BoundSocket::Udp(std)
                }
            };
            bound.push((entry.clone(), socket));
        }
        Ok(Bound(bound))
    }

    /// Makes the engine woken by `wake` the receiver of everything inbound,
    /// replacing any earlier one.
    pub fn attach(&self, wake: Arc<Wake>) -> Attachment {
        let (tx, inbound) = mpsc::channel(INBOX_DEPTH);
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(Inbox { tx, wake });
        Attachment {
            inbound,
            udp: self
                .udp
                .iter()
                .map(|(guest_port, out)| UdpEntry {
                    guest_port: *guest_port,
                    out: out.clone(),
                })
                .collect(),
        }
    }
}

fn inbox(slot: &Mutex<Option<Inbox>>) -> Option<Inbox> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn accept_tcp(
    listener: TcpListener,
    guest_port: u16,
    slot: Arc<Mutex<Option<Inbox>>>,
    metrics: Arc<Metrics>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // The connection stays queued while we are out of
                // descriptors: retrying at once would spin.
                super::fdlimit::note(&e, "accepting on a published port", Some(&metrics));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // The engine owns accepted connections; a socket tokio cannot give
        // up is closed like a refused one.
        let Ok(stream) = stream.into_std() else {
            metrics.inc(Counter::publish_refused);
            continue;
        };
        let handed = inbox(&slot).is_some_and(|inbox| {
            let sent = inbox.tx.try_send(Inbound::Tcp { stream, guest_port });
            if sent.is_ok() {
                inbox.wake.wake();
            }
            sent.is_ok()
        });
        if !handed {
            // No guest attached, or it is not keeping up: the stream was
            // dropped with the failed send, which closes it at once.
            tracing::debug!(%peer, guest_port, "published connection refused: no guest");
            metrics.inc(Counter::publish_refused);
        }
    }
}

async fn relay_udp(
    socket: UdpSocket,
    entry: usize,
    mut out: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
    slot: Arc<Mutex<Option<Inbox>>>,
    metrics: Arc<Metrics>,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let Ok((n, peer)) = received else { continue };
                let payload = buf.get(..n).unwrap_or_default().to_vec();
                let handed = inbox(&slot).is_some_and(|inbox| {
                    let sent = inbox.tx.try_send(Inbound::Udp { entry, peer, payload });
                    if sent.is_ok() {
                        inbox.wake.wake();
                    }
                    sent.is_ok()
                });
                if !handed {
                    metrics.inc(Counter::publish_refused);
                }
            }
            reply = out.recv() => {
                let Some((peer, payload)) = reply else { return };
                if socket.send_to(&payload, peer).await.is_err() {
                    metrics.inc(Counter::udp_send_failed);
                }
            }
        }
    }
}
