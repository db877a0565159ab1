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

/// Checks a flow's guest bytes before they reach the host (flows whose
/// every request is decided); implemented above this layer, by the egress
/// boundary.
pub trait Inspect: Send {
    /// Takes the guest's next bytes (`fin`: its FIN follows them) and
    /// returns what may be written now, holding back the rest; None resets
    /// the flow.
    fn pass<'a>(
        &'a mut self,
        data: &'a [u8],
        fin: bool,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + 'a>>;
}

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
        relay(direct, rx, tx, &host.wake, None).await;
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
        relay(direct, rx, tx, &wake, None).await;
    });
    channels
}

async fn relay(
    direct: Direct,
    mut from_engine: mpsc::Receiver<ToHost>,
    to_engine: mpsc::Sender<FromHost>,
    wake: &Wake,
    inspect: Option<Box<dyn Inspect>>,
) {
    let stop = CancellationToken::new();
    tokio::join!(
        host_to_engine(&direct.stream, &to_engine, wake, &stop),
        engine_to_host(&direct, &mut from_engine, &to_engine, wake, &stop, inspect),
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
    to_engine: &mpsc::Sender<FromHost>,
    wake: &Wake,
    stop: &CancellationToken,
    mut inspect: Option<Box<dyn Inspect>>,
) {
    let stream = &direct.stream;
    let abort = || {
        // Both sides see a reset: the host by SO_LINGER 0, the guest by a
        // Reset the engine turns into a RST.
        let _ = socket2::SockRef::from(&**stream).set_linger(Some(Duration::ZERO));
        stop.cancel();
    };
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            m = rx.recv() => m,
        };
        // A slot was freed: the engine may resume reading the guest.
        wake.wake();
        // What the engine queued is released only once written, so it does
        // not write directly ahead of it.
        let queued = match &message {
            Some(ToHost::Data(bytes)) => bytes.len(),
            _ => 0,
        };
        let message = match (message, inspect.as_mut()) {
            (Some(ToHost::Data(bytes)), Some(inspector)) => {
                match inspector.pass(&bytes, false).await {
                    Some(cleared) => Some(ToHost::Data(cleared)),
                    None => {
                        abort();
                        reset(to_engine, wake).await;
                        return;
                    }
                }
            }
            (Some(ToHost::Fin), Some(inspector)) => match inspector.pass(&[], true).await {
                Some(cleared) if cleared.is_empty() => Some(ToHost::Fin),
                Some(cleared) => {
                    // The last cleared bytes, then the FIN.
                    if write_all(stream, &cleared).await.is_err() {
                        return;
                    }
                    Some(ToHost::Fin)
                }
                None => {
                    abort();
                    reset(to_engine, wake).await;
                    return;
                }
            },
            (other, _) => other,
        };
        match message {
            Some(ToHost::Data(bytes)) => {
                let written = write_all(stream, &bytes).await;
                direct.queued.fetch_sub(queued, Ordering::AcqRel);
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

/// Dials `upstream` (within `timeout`), sends `first` ahead of everything
/// else, then relays the flow, every later guest byte through `inspect`
/// when there is one; the guest is reset when anything fails. For a flow
/// whose task read its first bytes before deciding to dial.
pub async fn dial_and_relay(
    host: &Host,
    upstream: SocketAddr,
    timeout: Duration,
    first: &[u8],
    (rx, tx): (mpsc::Receiver<ToHost>, mpsc::Sender<FromHost>),
    inspect: Option<Box<dyn Inspect>>,
) {
    let dialled = tokio::time::timeout(timeout, host.upstream.connect(upstream)).await;
    let Ok(Ok(stream)) = dialled else {
        reset(&tx, &host.wake).await;
        return;
    };
    let direct = direct(stream);
    if write_all(&direct.stream, first).await.is_err() {
        reset(&tx, &host.wake).await;
        return;
    }
    relay(direct, rx, tx, &host.wake, inspect).await;
}

/// Resets the guest's side of a flow from its task.
pub async fn reset(tx: &mpsc::Sender<FromHost>, wake: &Wake) {
    // The engine may have dropped the flow already; then there is nobody
    // left to reset.
    let _ = tx.send(FromHost::Reset).await;
    wake.wake();
}
