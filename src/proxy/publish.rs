//! Published ports: host listeners (`[[publish]]`) whose connections and
//! datagrams are carried to a guest port, from the gateway's address.
//!
//! The config's entries are bound once at start (a port that cannot be
//! bound stops the daemon before it listens for a VMM); the control API
//! adds and removes entries at run time. All are kept across VMM
//! connections. Each listener is a tokio task that hands what it accepts to
//! whichever engine is attached, or closes it at once when no guest is
//! there; removing an entry ends its task, which closes its socket (new
//! connections are refused by the host; accepted ones go on). Inbound
//! traffic is not subject to egress rules.
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
    /// The entry is published already.
    #[error("{protocol:?} {addr} is published already")]
    Exists {
        /// tcp or udp.
        protocol: Protocol,
        /// The host address.
        addr: SocketAddr,
    },
    /// A privileged port asked for at run time: the capability to bind it
    /// is dropped at start.
    #[error(
        "{addr}: ports below 1024 can be published only in the config (binding them needs \
         CAP_NET_BIND_SERVICE, which the daemon drops once started)"
    )]
    Privileged {
        /// The host address.
        addr: SocketAddr,
    },
}

#[derive(Clone)]
struct Inbox {
    tx: mpsc::Sender<Inbound>,
    wake: Arc<Wake>,
}

/// A published UDP entry as the engine sees it.
#[derive(Clone)]
pub struct UdpEntry {
    /// The guest port datagrams go to.
    pub guest_port: u16,
    /// Where the guest's replies go: (host peer, payload).
    pub out: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

/// The UDP entries, indexed as in [`Inbound::Udp`]; a removed entry's
/// place stays empty (indexes are never reused).
pub type UdpEntries = Arc<Mutex<Vec<Option<UdpEntry>>>>;

/// What an engine gets when it attaches.
pub struct Attachment {
    /// Connections and datagrams for the guest.
    pub inbound: mpsc::Receiver<Inbound>,
    /// The UDP entries, as they are now and as they will be.
    pub udp: UdpEntries,
}

/// A published entry being served.
struct Running {
    entry: Publish,
    task: tokio::task::JoinHandle<()>,
    udp_index: Option<usize>,
}

/// The running listeners.
pub struct Publisher {
    slot: Arc<Mutex<Option<Inbox>>>,
    udp: UdpEntries,
    running: Mutex<Vec<Running>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Lists of entries stay valid whatever panicked while holding them.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let publisher = Publisher {
            slot: Arc::default(),
            udp: Arc::default(),
            running: Mutex::default(),
            runtime: runtime.clone(),
            metrics: metrics.clone(),
        };
        for (entry, socket) in self.0 {
            publisher.serve(entry, socket)?;
        }
        Ok(publisher)
    }
}

/// Binds one entry.
fn bind_one(entry: &Publish) -> Result<BoundSocket, Error> {
    let bind_error = |source| Error::Bind {
        protocol: entry.protocol,
        addr: entry.host,
        source,
    };
    Ok(match entry.protocol {
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
    })
}

impl Publisher {
    /// Binds every entry; nothing is served until [`Bound::start`].
    pub fn bind(entries: &[Publish]) -> Result<Bound, Error> {
        let mut bound = Vec::with_capacity(entries.len());
        for entry in entries {
            bound.push((entry.clone(), bind_one(entry)?));
        }
        Ok(Bound(bound))
    }

    /// Starts serving a bound entry.
    fn serve(&self, entry: Publish, socket: BoundSocket) -> Result<(), Error> {
        let _enter = self.runtime.enter();
        let bind_error = |source| Error::Bind {
            protocol: entry.protocol,
            addr: entry.host,
            source,
        };
        let (task, udp_index) = match socket {
            BoundSocket::Tcp(std) => {
                let listener = TcpListener::from_std(std).map_err(bind_error)?;
                let task = self.runtime.spawn(accept_tcp(
                    listener,
                    entry.guest_port,
                    self.slot.clone(),
                    self.metrics.clone(),
                ));
                (task, None)
            }
            BoundSocket::Udp(std) => {
                let socket = UdpSocket::from_std(std).map_err(bind_error)?;
                let (out, out_rx) = mpsc::channel(UDP_OUT_DEPTH);
                let mut udp = lock(&self.udp);
                let index = udp.len();
                udp.push(Some(UdpEntry {
                    guest_port: entry.guest_port,
                    out,
                }));
                let task = self.runtime.spawn(relay_udp(
                    socket,
                    index,
                    out_rx,
                    self.slot.clone(),
                    self.metrics.clone(),
                ));
                (task, Some(index))
            }
        };
        tracing::info!(protocol = ?entry.protocol, host = %entry.host, guest_port = entry.guest_port, "published");
        lock(&self.running).push(Running {
            entry,
            task,
            udp_index,
        });
        Ok(())
    }

    /// Publishes one more entry at run time.
    pub fn add(&self, entry: Publish) -> Result<(), Error> {
        let taken = lock(&self.running)
            .iter()
            .any(|r| r.entry.protocol == entry.protocol && r.entry.host == entry.host);
        if taken {
            return Err(Error::Exists {
                protocol: entry.protocol,
                addr: entry.host,
            });
        }
        let socket = match bind_one(&entry) {
            Err(Error::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied
                    && entry.host.port() < 1024 =>
            {
                return Err(Error::Privileged { addr: entry.host });
            }
            other => other?,
        };
        self.serve(entry, socket)
    }

    /// Stops publishing `protocol` `host`: the entry, and the task to
    /// await, after which its socket is closed. None when it is not
    /// published.
    pub fn remove(
        &self,
        protocol: Protocol,
        host: SocketAddr,
    ) -> Option<(Publish, tokio::task::JoinHandle<()>)> {
        let mut running = lock(&self.running);
        let at = running
            .iter()
            .position(|r| r.entry.protocol == protocol && r.entry.host == host)?;
        let gone = running.remove(at);
        if let Some(index) = gone.udp_index
            && let Some(place) = lock(&self.udp).get_mut(index)
        {
            *place = None;
        }
        gone.task.abort();
        tracing::info!(protocol = ?protocol, host = %host, "unpublished");
        Some((gone.entry, gone.task))
    }

    /// The entries published now, in the order they were added.
    pub fn list(&self) -> Vec<Publish> {
        lock(&self.running)
            .iter()
            .map(|r| r.entry.clone())
            .collect()
    }

    /// Makes the engine woken by `wake` the receiver of everything inbound,
    /// replacing any earlier one.
    pub fn attach(&self, wake: Arc<Wake>) -> Attachment {
        let (tx, inbound) = mpsc::channel(INBOX_DEPTH);
        *lock(&self.slot) = Some(Inbox { tx, wake });
        Attachment {
            inbound,
            udp: self.udp.clone(),
        }
    }
}

fn inbox(slot: &Mutex<Option<Inbox>>) -> Option<Inbox> {
    lock(slot).clone()
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
