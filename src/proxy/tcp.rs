//! One TCP flow's host side: dial (timed), then copy both ways between the
//! host socket and the engine's channels, with half-close and reset carried
//! across.
//!
//! Runs as a tokio task. The host socket is read only when the channel to the
//! engine has room (a reserved slot), so a slow guest stops the reads and the
//! host's TCP window closes; the engine stops reading its smoltcp socket when
//! the channel to this task is full, which closes the guest's window.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
    /// The upstream connection is established.
    Connected,
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

fn pair() -> (Channels, mpsc::Receiver<ToHost>, mpsc::Sender<FromHost>) {
    let (to_host, to_host_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (from_host_tx, from_host) = mpsc::channel(CHANNEL_DEPTH);
    (Channels { to_host, from_host }, to_host_rx, from_host_tx)
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
        if tx.send(FromHost::Connected).await.is_err() {
            return;
        }
        host.wake.wake();
        relay(stream, rx, tx, &host.wake).await;
    });
    channels
}

/// Starts a task relaying an already accepted host connection (a published
/// port); no `Connected` message is sent.
pub fn spawn_inbound(host: &Host, stream: TcpStream) -> Channels {
    let (channels, rx, tx) = pair();
    let wake = host.wake.clone();
    host.runtime.spawn(async move {
        let _ = stream.set_nodelay(true);
        relay(stream, rx, tx, &wake).await;
    });
    channels
}

async fn relay(
    stream: TcpStream,
    mut from_engine: mpsc::Receiver<ToHost>,
    to_engine: mpsc::Sender<FromHost>,
    wake: &Wake,
) {
    let (rd, wr) = stream.into_split();
    let stop = CancellationToken::new();
    tokio::join!(
        host_to_engine(rd, &to_engine, wake, &stop),
        engine_to_host(wr, &mut from_engine, wake, &stop),
    );
}

async fn host_to_engine(
    mut rd: OwnedReadHalf,
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
        let read = tokio::select! {
            () = stop.cancelled() => return,
            r = rd.read(&mut buf) => r,
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

async fn engine_to_host(
    mut wr: OwnedWriteHalf,
    rx: &mut mpsc::Receiver<ToHost>,
    wake: &Wake,
    stop: &CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            m = rx.recv() => m,
        };
        // A slot was freed: the engine may resume reading the guest.
        wake.wake();
        match message {
            Some(ToHost::Data(bytes)) => {
                if wr.write_all(&bytes).await.is_err() {
                    // The read side sees the same failure and reports it.
                    return;
                }
            }
            Some(ToHost::Fin) => {
                let _ = wr.shutdown().await;
                return;
            }
            // Reset, or the engine dropped the flow without a FIN: make the
            // host see a reset, not a clean close.
            Some(ToHost::Reset) | None => {
                let _ = socket2::SockRef::from(wr.as_ref()).set_linger(Some(Duration::ZERO));
                stop.cancel();
                return;
            }
        }
    }
}
