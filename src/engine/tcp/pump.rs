//! One flow's bytes both ways, between its smoltcp socket and its host side.
//!
//! Two host sides:
//! - [`Owned`]: the engine owns the connected host socket (dialled flows
//!   once connected, published-port connections). Bytes are read from it
//!   straight into the smoltcp socket's send buffer and written to it
//!   straight from the receive buffer (smoltcp's `send`/`recv` closures):
//!   one copy each way, no task, no channel, no thread hop. Backpressure is
//!   the buffers themselves: a full smoltcp buffer stops host reads (the
//!   host's window closes), a host socket that would block stops guest
//!   reads (the guest's window closes).
//! - a task at the other end of channels (flows still dialling, and local
//!   services: first-bytes decisions, TLS, DNS), fed in chunks.
//!
//! A gated flow's guest bytes pass its [`Gate`] first, on either side.
//! Engine thread only; never blocks.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::{self, State};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::super::gate::{Gate, Outcome};
use crate::proxy::tcp::{CHUNK_BYTES, Channels, FromHost, ToHost};

/// A connected host socket the engine owns.
pub struct Owned {
    /// The socket, nonblocking.
    pub stream: std::net::TcpStream,
    /// Its token in the engine's epoll.
    pub token: u64,
    /// Last seen readable (cleared only when a read would block).
    pub readable: bool,
    /// Last seen writable (cleared only when a write would block).
    pub writable: bool,
    /// Bytes a gate cleared that the socket has not taken yet.
    unsent: Vec<u8>,
}

impl Owned {
    /// Takes over `stream` (made nonblocking) under `token`.
    pub fn new(stream: std::net::TcpStream, token: u64) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        // A proxy adding Nagle delays only adds round trips: the guest's
        // stack coalesces already.
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            token,
            // Optimistic: a read or write that would block says so.
            readable: true,
            writable: true,
            unsent: Vec::new(),
        })
    }

    /// Makes the host see a reset rather than a clean close when the socket
    /// is dropped.
    pub fn reset(&self) {
        // Failing leaves a FIN instead of a RST: the peer still learns the
        // connection is gone.
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }
}

/// The host side of a flow.
pub enum HostSide {
    /// A task at the other end of channels; `pending` is the host's data
    /// not yet taken by the smoltcp socket, from `offset`.
    Task {
        /// The channels.
        channels: Channels,
        /// Host bytes waiting for room in the smoltcp socket.
        pending: Vec<u8>,
        /// How much of them went already.
        offset: usize,
    },
    /// The engine owns the socket.
    Owned(Owned),
}

impl HostSide {
    /// The side of a flow whose task answers on `channels`.
    pub fn task(channels: Channels) -> Self {
        HostSide::Task {
            channels,
            pending: Vec::new(),
            offset: 0,
        }
    }
}

/// A flow's state both ways.
#[derive(Default)]
pub struct Ends {
    /// The host sent its FIN (EOF).
    pub host_fin: bool,
    /// Our FIN went to the guest.
    pub fin_to_guest: bool,
    /// The guest's FIN went to the host.
    pub fin_to_host: bool,
    /// We aborted the smoltcp socket.
    pub aborted: bool,
}

/// Bytes a flow moved each way, for the operator's flow list.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// From the guest to the host side.
    pub from_guest: u64,
    /// From the host side to the guest.
    pub to_guest: u64,
}

/// What a read or write into a smoltcp buffer came to.
enum Io {
    Moved,
    Eof,
    Blocked,
    Failed,
}

fn io_result(r: std::io::Result<usize>) -> (usize, Io) {
    match r {
        Ok(0) => (0, Io::Eof),
        Ok(n) => (n, Io::Moved),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
            (0, Io::Blocked)
        }
        Err(_) => (0, Io::Failed),
    }
}

/// Moves a flow's bytes; true when anything moved.
pub fn pump(
    host: &mut HostSide,
    gate: &mut Option<Gate>,
    ends: &mut Ends,
    traffic: &mut Traffic,
    socket: &mut tcp::Socket<'static>,
) -> bool {
    // An aborted flow waits only for its RST to go out: whatever its
    // socket still holds (a denied request, say) goes nowhere.
    if ends.aborted {
        return false;
    }
    let moved = match host {
        HostSide::Owned(owned) => pump_owned(owned, gate, ends, traffic, socket),
        HostSide::Task {
            channels,
            pending,
            offset,
        } => pump_task(channels, pending, offset, gate, ends, traffic, socket),
    };
    if ends.aborted {
        socket.abort();
    }
    moved
}

fn abort(ends: &mut Ends) -> bool {
    ends.aborted = true;
    true
}

/// Whether the guest's FIN may go to the host: it was received, and every
/// byte before it went.
fn guest_finished(socket: &tcp::Socket<'static>) -> bool {
    !socket.may_recv()
        && socket.recv_queue() == 0
        && matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        )
}

fn pump_owned(
    owned: &mut Owned,
    gate: &mut Option<Gate>,
    ends: &mut Ends,
    traffic: &mut Traffic,
    socket: &mut tcp::Socket<'static>,
) -> bool {
    let mut moved = false;
    // Host to guest: read straight into the socket's send buffer.
    while owned.readable && !ends.host_fin && socket.can_send() {
        let stream = &owned.stream;
        let read = socket.send(|buf| {
            let (n, io) = io_result((&*stream).read(buf));
            (n, (n, io))
        });
        match read {
            Ok((n, Io::Moved)) => {
                traffic.to_guest += n as u64;
                moved = true;
            }
            Ok((_, Io::Eof)) => ends.host_fin = true,
            Ok((_, Io::Blocked)) => owned.readable = false,
            Ok((_, Io::Failed)) | Err(_) => return abort(ends),
        }
    }
    if ends.host_fin && !ends.fin_to_guest {
        // smoltcp sends the FIN after what is queued.
        socket.close();
        ends.fin_to_guest = true;
        moved = true;
    }
    // Guest to host: a gate's cleared bytes first, then straight from the
    // socket's receive buffer.
    loop {
        if !owned.unsent.is_empty() {
            if !owned.writable {
                return moved;
            }
            let (n, io) = io_result((&owned.stream).write(&owned.unsent));
            match io {
                Io::Moved => {
                    owned.unsent.drain(..n);
                    traffic.from_guest += n as u64;
                    moved = true;
                    continue;
                }
                Io::Blocked => {
                    owned.writable = false;
                    return moved;
                }
                Io::Eof | Io::Failed => return abort(ends),
            }
        }
        let Some(g) = gate.as_mut() else { break };
        match g.take(socket, CHUNK_BYTES) {
            Outcome::Wait => {
                if g.is_done() {
                    *gate = None;
                    continue;
                }
                if !g.may_finish() {
                    // Held bytes (and the FIN after them) wait.
                    return moved;
                }
                break;
            }
            Outcome::Denied => return abort(ends),
            Outcome::Pass(bytes) => owned.unsent = bytes,
        }
    }
    if gate.is_none() {
        while owned.writable && socket.can_recv() {
            let stream = &owned.stream;
            let wrote = socket.recv(|buf| {
                let (n, io) = io_result((&*stream).write(buf));
                (n, (n, io))
            });
            match wrote {
                Ok((n, Io::Moved)) => {
                    traffic.from_guest += n as u64;
                    moved = true;
                }
                Ok((_, Io::Blocked)) => owned.writable = false,
                Ok((_, Io::Eof | Io::Failed)) | Err(_) => return abort(ends),
            }
        }
    }
    if !ends.fin_to_host && owned.unsent.is_empty() && guest_finished(socket) {
        // The host may be gone already; its reset will show on read.
        let _ = owned.stream.shutdown(std::net::Shutdown::Write);
        ends.fin_to_host = true;
        moved = true;
    }
    moved
}

fn pump_task(
    channels: &mut Channels,
    pending: &mut Vec<u8>,
    offset: &mut usize,
    gate: &mut Option<Gate>,
    ends: &mut Ends,
    traffic: &mut Traffic,
    socket: &mut tcp::Socket<'static>,
) -> bool {
    let mut moved = false;
    // Host to guest: what the task sent, as far as the socket takes it.
    loop {
        if *offset >= pending.len() {
            if ends.host_fin {
                break;
            }
            match channels.from_host.try_recv() {
                Ok(FromHost::Data(bytes)) => {
                    *pending = bytes;
                    *offset = 0;
                }
                Ok(FromHost::Fin) => {
                    ends.host_fin = true;
                    break;
                }
                Ok(FromHost::Reset) | Err(TryRecvError::Disconnected) => return abort(ends),
                Ok(FromHost::Connected(_) | FromHost::Failed(_)) => continue,
                Err(TryRecvError::Empty) => break,
            }
        }
        if !socket.can_send() {
            break;
        }
        let rest = pending.get(*offset..).unwrap_or_default();
        match socket.send_slice(rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                *offset += n;
                traffic.to_guest += n as u64;
                moved = true;
            }
        }
    }
    if ends.host_fin && !ends.fin_to_guest && *offset >= pending.len() {
        socket.close();
        ends.fin_to_guest = true;
        moved = true;
    }
    // Guest to host through the channel, only while the task has room, so a
    // slow host closes the guest's window instead of growing a queue; a
    // gated flow's bytes go through its gate first.
    loop {
        let permit = match channels.to_host.try_reserve() {
            Ok(p) => p,
            Err(TrySendError::Full(())) => break,
            Err(TrySendError::Closed(())) => return abort(ends),
        };
        let bytes = match gate.as_mut() {
            Some(g) => match g.take(socket, CHUNK_BYTES) {
                Outcome::Wait => break,
                Outcome::Denied => return abort(ends),
                Outcome::Pass(bytes) => bytes,
            },
            None if socket.can_recv() => {
                let Ok(bytes) = socket.recv(|buf| {
                    let n = buf.len().min(CHUNK_BYTES);
                    (n, buf.get(..n).unwrap_or_default().to_vec())
                }) else {
                    break;
                };
                bytes
            }
            None => break,
        };
        traffic.from_guest += bytes.len() as u64;
        permit.send(ToHost::Data(bytes));
        moved = true;
    }
    if let Some(g) = gate.as_ref() {
        if g.is_done() {
            *gate = None;
        } else if !g.may_finish() {
            // Held bytes (and the FIN after them) wait for their decision.
            return moved;
        }
    }
    if !ends.fin_to_host && guest_finished(socket) && channels.to_host.try_send(ToHost::Fin).is_ok()
    {
        ends.fin_to_host = true;
        moved = true;
    }
    moved
}

/// Whether a flow idled out or stalled in its handshake.
pub fn expired(
    socket: &tcp::Socket<'static>,
    last_active: Instant,
    now: Instant,
    (idle, handshake): (Duration, Duration),
) -> (bool, bool) {
    let quiet = now.saturating_duration_since(last_active);
    let stalled = matches!(
        socket.state(),
        State::Listen | State::SynReceived | State::SynSent
    ) && quiet > handshake;
    (stalled, quiet > idle)
}
