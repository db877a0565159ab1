//! One TCP flow's host side on tokio: the dial (timed), after which a
//! dialled flow's socket goes to the engine, which moves its bytes itself;
//! and, for flows a task must see (first-bytes decisions, local services),
//! the channels between the task and the engine, with half-close and reset
//! carried across.
//!
//! The host socket is read only when the channel to the engine has room (a
//! reserved slot), so a slow guest stops the reads and the host's TCP window
//! closes; the engine stops reading its smoltcp socket when the channel to
//! the task is full, which closes the guest's window.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
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
    /// The upstream connection is established: the socket, nonblocking, for
    /// the engine to own (None: a local service, channels only).
    Connected(Option<std::net::TcpStream>),
    /// Dialling failed: refused, unreachable, timed out.
    Failed(io::ErrorKind),
    /// Bytes from the host peer.
    Data(Vec<u8>),
    /// The host peer closed its sending side.
    Fin,
    /// The host peer reset the connection, or the socket failed.
    Reset,
}

/// The engine's ends of one flow's channels.
pub struct Channels {
    /// To the task.
    pub to_host: mpsc::Sender<ToHost>,
    /// From the task.
    pub from_host: mpsc::Receiver<FromHost>,
}

/// A new flow's channels: the engine's ends, and the task's.
pub fn pair() -> (Channels, mpsc::Receiver<ToHost>, mpsc::Sender<FromHost>) {
    let (to_host, to_host_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (from_host_tx, from_host) = mpsc::channel(CHANNEL_DEPTH);
    (Channels { to_host, from_host }, to_host_rx, from_host_tx)
}

/// Starts a task that dials `dst`; the one message back is `Connected`
/// with the socket (the task then ends: the engine owns the flow) or
/// `Failed`.
pub fn spawn_outbound(host: &Host, dst: SocketAddr, connect_timeout: Duration) -> Channels {
    let (channels, _rx, tx) = pair();
    let host = host.clone();
    host.runtime.clone().spawn(async move {
        let dial = tokio::time::timeout(connect_timeout, host.upstream.connect(dst));
        // A flow the engine dropped (reset, evicted, guest gone) ends its
        // dial at once: the half-open socket must not outlive it.
        let dialled = tokio::select! {
            dialled = dial => dialled,
            () = tx.closed() => return,
        };
        let message = match dialled {
            Ok(Ok(stream)) => match stream.into_std() {
                Ok(stream) => FromHost::Connected(Some(stream)),
                Err(e) => FromHost::Failed(e.kind()),
            },
            Ok(Err(e)) => {
                super::fdlimit::note(&e, "dialling an upstream", None);
                FromHost::Failed(e.kind())
            }
            Err(_) => FromHost::Failed(io::ErrorKind::TimedOut),
        };
        // The engine may have dropped the flow meanwhile; nobody to tell.
        let _ = tx.send(message).await;
        host.wake.wake();
    });
    channels
}

async fn relay(
    stream: Arc<TcpStream>,
    mut from_engine: mpsc::Receiver<ToHost>,
    to_engine: mpsc::Sender<FromHost>,
    wake: &Wake,
    inspect: Option<Box<dyn Inspect>>,
) {
    let stop = CancellationToken::new();
    tokio::join!(
        host_to_engine(&stream, &to_engine, wake, &stop),
        engine_to_host(&stream, &mut from_engine, &to_engine, wake, &stop, inspect),
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
    stream: &TcpStream,
    rx: &mut mpsc::Receiver<ToHost>,
    to_engine: &mpsc::Sender<FromHost>,
    wake: &Wake,
    stop: &CancellationToken,
    mut inspect: Option<Box<dyn Inspect>>,
) {
    let abort = || {
        // Both sides see a reset: the host by SO_LINGER 0, the guest by a
        // Reset the engine turns into a RST.
        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
        stop.cancel();
    };
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            m = rx.recv() => m,
        };
        // A slot was freed: the engine may resume reading the guest.
        wake.wake();
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
                if write_all(stream, &bytes).await.is_err() {
                    // The read side sees the same failure and reports it.
                    return;
                }
            }
            Some(ToHost::Fin) => {
                // A host already gone shows as a reset on the read side.
                let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
                return;
            }
            // Reset, or the engine dropped the flow without a FIN: make the
            // host see a reset, not a clean close.
            Some(ToHost::Reset) | None => {
                let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
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
    let stream = Arc::new(stream);
    if write_all(&stream, first).await.is_err() {
        reset(&tx, &host.wake).await;
        return;
    }
    relay(stream, rx, tx, &host.wake, inspect).await;
}

/// Resets the guest's side of a flow from its task.
pub async fn reset(tx: &mpsc::Sender<FromHost>, wake: &Wake) {
    // The engine may have dropped the flow already; then there is nobody
    // left to reset.
    let _ = tx.send(FromHost::Reset).await;
    wake.wake();
}
