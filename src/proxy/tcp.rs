//! One TCP flow's host side: dial (timed), then copy both ways between the
//! host socket and the engine's channels, with half-close and reset carried
//! across.
//!
//! Runs as a tokio task. The host socket is read only when the channel to the
//! engine has room (a reserved slot), so a slow guest stops the reads and the
//! host's TCP window closes; the engine stops reading its smoltcp socket when
//! the channel to this task is full, which closes the guest's window.
//!
//! Guest-to-host bytes take a shortcut when nothing is queued for the task:
//! the engine writes them to the host socket itself ([`Direct`], a
//! non-blocking write), saving a thread hop per request; whatever the socket
//! does not take goes through the channel, and the engine writes directly
//! again only once the task has written everything queued, so order holds.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Host, Wake};

/// Largest chunk one message carries.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Messages in flight per direction: with CHUNK_BYTES, at most 256 KiB of a
/// flow's data sits in channels at any time.
pub const CHANNEL_DEPTH: usize = 4;

/// Engine to host.
#[derive(Debug)]
pub enum ToHost {
    /// Bytes the guest sent.
    Data(Vec<u8>),
    /// The guest closed its sending side (FIN).
    Fin,
    /// The guest reset the connection, or the flow is being torn down.
    Reset,
}

/// Host to engine.
#[derive(Debug)]
pub enum FromHost {
    /// The upstream connection is established; the engine may write to it
    /// directly through this (None: a local service, channel only).
    Connected(Option<Direct>),
    /// Dialling failed: refused, unreachable, timed out.
    Failed(io::ErrorKind),
    /// Bytes from the host peer.
    Data(Vec<u8>),
    /// The host peer closed its sending side.
    Fin,
    /// The host peer reset the connection, or the socket failed.
    Reset,
}

/// The engine's non-blocking path to a flow's host socket.
#[derive(Debug, Clone)]
pub struct Direct {
    stream: Arc<TcpStream>,
    queued: Arc<AtomicUsize>,
}

impl Direct {
    /// Writes what the socket takes now, only when nothing is queued for the
    /// task (else order could break); returns the bytes written.
    pub fn try_write(&self, data: &[u8]) -> usize {
        if self.queued.load(Ordering::Acquire) != 0 {
            return 0;
        }
        self.stream.try_write(data).unwrap_or(0)
    }

    /// Records bytes handed to the task through the channel.
    pub fn queue(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// The engine's ends of one flow's channels.
pub struct Channels {
    /// To the task.
    pub to_host: mpsc::Sender<ToHost>,
    /// From the task.
    pub from_host: mpsc::Receiver<FromHost>,
    /// The direct path, once connected.
    pub direct: Option<Direct>,
}

/// A new flow's channels: the engine's ends, and the task's.
pub fn pair() -> (Channels, mpsc::Receiver<ToHost>, mpsc::Sender<FromHost>) {
    let (to_host, to_host_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (from_host_tx, from_host) = mpsc::channel(CHANNEL_DEPTH);
    (
        Channels {
            to_host,
            from_host,
            direct: None,
        },
        to_host_rx,
        from_host_tx,
    )
}

fn direct(stream: TcpStream) -> Direct {
    Direct {
        stream: Arc::new(stream),
        queued: Arc::new(AtomicUsize::new(0)),
    }
}

/// Starts a task that dials `dst` and relays; the first message back is
/// `Connected` or `Failed`.
pub fn spawn_outbound(host: &Host, dst: SocketAddr, connect_timeout: Duration) -> Channels {
    let (channels, rx, tx) = pair();
    let host = host.clone();
    host.runtime.clone().spawn(async move {
        let dialled = tokio::time::timeout(connect_timeout, host.upstream.connect(dst)).await;
        let stream = match dialled {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let _ = tx.send(FromHost::Failed(e.kind())).await;
                host.wake.wake();
                return;
            }
            Err(_) => {
                let _ = tx.send(FromHost::Failed(io::ErrorKind::TimedOut)).await;
                host.wake.wake();
                return;
            }
        };
        let direct = direct(stream);
        if tx
            .send(FromHost::Connected(Some(direct.clone())))
            .await
            .is_err()
        {
            return;
        }
        host.wake.wake();
        relay(direct, rx, tx, &host.wake).await;
    });
    channels
}

/// Starts a task relaying an already accepted host connection (a published
/// port); no `Connected` message is sent.
pub fn spawn_inbound(host: &Host, stream: TcpStream) -> Channels {
    let (mut channels, rx, tx) = pair();
    let _ = stream.set_nodelay(true);
    let direct = direct(stream);
    channels.direct = Some(direct.clone());
    let wake = host.wake.clone();
    host.runtime.spawn(async move {
        relay(direct, rx, tx, &wake).await;
    });
    channels
}

async fn relay(
    direct: Direct,
    mut from_engine: mpsc::Receiver<ToHost>,
    to_engine: mpsc::Sender<FromHost>,
    wake: &Wake,
) {
    let stop = CancellationToken::new();
    tokio::join!(
        host_to_engine(&direct.stream, &to_engine, wake, &stop),
        engine_to_host(&direct, &mut from_engine, wake, &stop),
    );
}

async fn host_to_engine(
    stream: &TcpStream,
    tx: &mpsc::Sender<FromHost>,
    wake: &Wake,
    stop: &CancellationToken,
) {
    loop {
        // Reserve before reading: never take bytes from the host that the
        // engine has no room for.
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = tx.reserve() => match p {
                Ok(p) => p,
                Err(_) => { stop.cancel(); return; }
            },
        };
        let mut buf = vec![0u8; CHUNK_BYTES];
        let read = loop {
            tokio::select! {
                () = stop.cancelled() => return,
                ready = stream.readable() => {
                    if let Err(e) = ready {
                        break Err(e);
                    }
                }
            }
            match stream.try_read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        };
        match read {
            Ok(0) => {
                permit.send(FromHost::Fin);
                wake.wake();
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                permit.send(FromHost::Data(buf));
                wake.wake();
            }
            Err(_) => {
                permit.send(FromHost::Reset);
                wake.wake();
                stop.cancel();
                return;
            }
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn engine_to_host(
    direct: &Direct,
    rx: &mut mpsc::Receiver<ToHost>,
    wake: &Wake,
    stop: &CancellationToken,
) {
    let stream = &direct.stream;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            m = rx.recv() => m,
        };
        // A slot was freed: the engine may resume reading the guest.
        wake.wake();
        match message {
            Some(ToHost::Data(bytes)) => {
                let written = write_all(stream, &bytes).await;
                direct.queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                if written.is_err() {
                    // The read side sees the same failure and reports it.
                    return;
                }
                // Nothing queued any more: the engine may write directly.
                wake.wake();
            }
            Some(ToHost::Fin) => {
                let _ = socket2::SockRef::from(&**stream).shutdown(std::net::Shutdown::Write);
                return;
            }
            // Reset, or the engine dropped the flow without a FIN: make the
            // host see a reset, not a clean close.
            Some(ToHost::Reset) | None => {
                let _ = socket2::SockRef::from(&**stream).set_linger(Some(Duration::ZERO));
                stop.cancel();
                return;
            }
        }
    }
}

/// Bytes of a flow's beginning read to find its name.
const PEEK_BYTES: usize = 4096;
/// How long the guest gets to send them.
const PEEK_TIME: Duration = Duration::from_secs(5);

/// A flow whose policy decision waits for its name: accepted at once (the
/// guest sends its first bytes), decided on the TLS SNI or HTTP Host in them
/// (or without a name after `PEEK_BYTES` or `PEEK_TIME`), then dialled and
/// relayed with those bytes first, or reset.
pub fn spawn_deciding(
    host: &Host,
    dst: SocketAddr,
    upstream: SocketAddr,
    connect_timeout: Duration,
    policy: Arc<crate::policy::Policy>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Channels {
    use crate::policy::{Action, Flow, NameSource, Proto};
    use crate::tls::sni::{Peek, client_hello_sni, http_host};
    let (channels, mut rx, tx) = pair();
    let host = host.clone();
    host.runtime.clone().spawn(async move {
        if tx.send(FromHost::Connected(None)).await.is_err() {
            return;
        }
        host.wake.wake();
        let mut first: Vec<u8> = Vec::new();
        let deadline = tokio::time::Instant::now() + PEEK_TIME;
        let name = loop {
            let message = tokio::select! {
                m = rx.recv() => m,
                () = tokio::time::sleep_until(deadline) => break None,
            };
            host.wake.wake();
            match message {
                Some(ToHost::Data(bytes)) => first.extend_from_slice(&bytes),
                // The guest gave up before saying where it goes.
                _ => return,
            }
            match (client_hello_sni(&first), http_host(&first)) {
                (Peek::Name(n), _) => break Some((n, NameSource::Sni)),
                (_, Peek::Name(n)) => break Some((n, NameSource::Host)),
                (Peek::NoName, Peek::NoName) => break None,
                _ if first.len() >= PEEK_BYTES => break None,
                _ => {}
            }
        };
        let decision = policy.decide(&Flow {
            dst: dst.ip(),
            proto: Proto::Tcp,
            port: Some(dst.port()),
            name: name.as_ref().map(|(n, s)| (n.as_str(), *s)),
        });
        if decision.action == Action::Deny {
            metrics.inc(crate::metrics::Counter::policy_denied);
            crate::audit::deny(&crate::audit::Deny {
                proto: "tcp",
                dst: Some(dst.ip()),
                port: dst.port(),
                name: name.as_ref().map(|(n, _)| n.as_str()),
                name_source: name.as_ref().map(|(_, s)| s.as_str()),
                rule: decision.rule,
            });
            let _ = tx.send(FromHost::Reset).await;
            host.wake.wake();
            return;
        }
        metrics.inc(crate::metrics::Counter::policy_allowed);
        let stream =
            match tokio::time::timeout(connect_timeout, host.upstream.connect(upstream)).await {
                Ok(Ok(stream)) => stream,
                _ => {
                    let _ = tx.send(FromHost::Reset).await;
                    host.wake.wake();
                    return;
                }
            };
        let direct = direct(stream);
        if write_all(&direct.stream, &first).await.is_err() {
            let _ = tx.send(FromHost::Reset).await;
            host.wake.wake();
            return;
        }
        relay(direct, rx, tx, &host.wake).await;
    });
    channels
}
