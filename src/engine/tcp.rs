//! Guest TCP flows on the engine side: the flow table, the held SYN, and the
//! pump between each smoltcp socket and its host task's channels.
//!
//! Runs on the engine thread; never awaits (`try_send`/`try_recv` only). A
//! guest SYN to a new destination is held while the host task dials; only a
//! connected upstream makes the engine open a listening smoltcp socket and
//! replay the SYN into it, so the guest's SYN-ACK means the far end is really
//! there. A refused, unreachable, timed-out or disallowed destination gets a
//! RST at once. The flow's slot is freed when its socket closes or reaches
//! TIME-WAIT, when it idles out, or when either side resets.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::Ctx;
use super::gate::Outcome;
use crate::config::Tcp as TcpConfig;
use crate::metrics::{Counter, Metrics};
use crate::proxy::tcp::{CHUNK_BYTES, Channels, FromHost, ToHost, spawn_inbound, spawn_outbound};
use crate::services::LocalService;

/// A flow: guest endpoint and the endpoint it talks to.
pub type Key = (SocketAddr, SocketAddr);

struct Flow {
    socket: Option<SocketHandle>,
    held_syn: Vec<u8>,
    syn_seq: u32,
    channels: Channels,
    pending: Vec<u8>,
    pending_off: usize,
    host_fin: bool,
    fin_to_guest: bool,
    fin_to_host: bool,
    last_active: Instant,
    /// We aborted the socket; its RST has yet to go out.
    aborted: bool,
    /// One poll has passed since the abort.
    abort_flushed: bool,
    /// The guest's first bytes wait for a name check.
    gate: Option<super::gate::Gate>,
}

impl Flow {
    fn new(channels: Channels, socket: Option<SocketHandle>, now: Instant) -> Self {
        Self {
            socket,
            held_syn: Vec::new(),
            syn_seq: 0,
            channels,
            pending: Vec::new(),
            pending_off: 0,
            host_fin: false,
            fin_to_guest: false,
            fin_to_host: false,
            last_active: now,
            aborted: false,
            abort_flushed: false,
            gate: None,
        }
    }
}

/// How a new flow reaches its far end.
pub enum Opener {
    /// Dial this address (the host mapping applied).
    Dial(SocketAddr),
    /// An in-process service answers instead (`services`).
    Local(LocalService),
}

/// What to do with a guest SYN.
#[derive(Debug, PartialEq, Eq)]
pub enum Syn {
    /// Taken: held for a new flow, or a retransmission of a held one.
    Held,
    /// The flow has a socket: let smoltcp see it.
    Pass,
    /// Refused: answer with a RST.
    Refuse,
}

/// Side effects of servicing flows, applied by the engine.
#[derive(Default)]
pub struct Effects {
    /// Frames to feed to smoltcp (released SYNs).
    pub inject: Vec<Vec<u8>>,
    /// SYNs to refuse: (guest endpoint, destination, SYN sequence).
    pub refuse: Vec<(SocketAddr, SocketAddr, u32)>,
    /// Whether any socket got data or a state change to send.
    pub progress: bool,
}

/// The TCP flow table.
pub struct Flows {
    flows: HashMap<Key, Flow>,
    config: TcpConfig,
    next_port: u16,
}

/// First ephemeral port for connections the gateway opens to the guest.
const EPHEMERAL_FIRST: u16 = 49_152;

impl Flows {
    /// An empty table.
    pub fn new(config: TcpConfig) -> Self {
        Self {
            flows: HashMap::new(),
            config,
            next_port: EPHEMERAL_FIRST,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Whether a SYN belongs to a flow that already exists (a retransmit
    /// or a SYN smoltcp must see), which keeps its first decision.
    pub fn has_socket_for(&self, kind: &super::classify::Kind<'_>) -> bool {
        match kind {
            super::classify::Kind::TcpSyn { src, dst, .. } => {
                self.flows.contains_key(&(*src, *dst))
            }
            _ => false,
        }
    }

    /// A guest SYN (`frame`) from `src` to `dst` with sequence `seq`, of a
    /// flow that is opened with `opener` (None: only a retransmission of a
    /// known flow is expected). A local service's task answers `Connected`
    /// like a dialled upstream; with `gate`, the guest's first bytes are
    /// checked before they go on.
    pub fn on_syn(
        &mut self,
        ctx: &Ctx<'_>,
        frame: &[u8],
        (src, dst): (SocketAddr, SocketAddr),
        seq: u32,
        opener: Option<Opener>,
        gate: Option<super::gate::Gate>,
    ) -> Syn {
        let metrics = ctx.metrics;
        if let Some(flow) = self.flows.get_mut(&(src, dst)) {
            if flow.socket.is_some() {
                return Syn::Pass;
            }
            // A retransmitted SYN while dialling: keep the newest copy.
            flow.held_syn.clear();
            flow.held_syn.extend_from_slice(frame);
            flow.syn_seq = seq;
            return Syn::Held;
        }
        let Some(opener) = opener else {
            return Syn::Refuse;
        };
        if self.flows.len() >= self.config.max_connections {
            metrics.inc(Counter::tcp_over_limit);
            return Syn::Refuse;
        }
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let channels = match opener {
            Opener::Local(serve) => serve(ctx.host),
            Opener::Dial(upstream) => spawn_outbound(ctx.host, upstream, timeout),
        };
        metrics.inc(Counter::tcp_flows);
        let mut flow = Flow::new(channels, None, ctx.now);
        flow.gate = gate;
        flow.held_syn = frame.to_vec();
        flow.syn_seq = seq;
        self.flows.insert((src, dst), flow);
        Syn::Held
    }

    /// Opens a connection from the gateway (`local_ip`, an ephemeral port)
    /// to `guest` for an accepted host connection (a published port).
    pub fn open_inbound(
        &mut self,
        ctx: &Ctx<'_>,
        iface: &mut smoltcp::iface::Interface,
        sockets: &mut SocketSet<'static>,
        stream: tokio::net::TcpStream,
        local_ip: IpAddr,
        guest: SocketAddr,
    ) -> bool {
        let metrics = ctx.metrics;
        if self.flows.len() >= self.config.max_connections {
            metrics.inc(Counter::tcp_over_limit);
            return false;
        }
        let Some(port) = self.free_port(local_ip, guest) else {
            return false;
        };
        let local = SocketAddr::new(local_ip, port);
        let mut socket = tcp_socket(self.config.buffer_bytes);
        if socket
            .connect(
                iface.context(),
                IpEndpoint::from(guest),
                IpEndpoint::from(local),
            )
            .is_err()
        {
            return false;
        }
        let handle = sockets.add(socket);
        metrics.inc(Counter::tcp_inbound);
        self.flows.insert(
            (guest, local),
            Flow::new(spawn_inbound(ctx.host, stream), Some(handle), ctx.now),
        );
        true
    }

    fn free_port(&mut self, local_ip: IpAddr, guest: SocketAddr) -> Option<u16> {
        for _ in EPHEMERAL_FIRST..=u16::MAX {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                port + 1
            };
            if !self
                .flows
                .contains_key(&(guest, SocketAddr::new(local_ip, port)))
            {
                return Some(port);
            }
        }
        None
    }

    /// Moves data and state between sockets and host tasks; drops finished
    /// flows.
    pub fn service(
        &mut self,
        sockets: &mut SocketSet<'static>,
        metrics: &Metrics,
        now: Instant,
        effects: &mut Effects,
    ) {
        let idle = Duration::from_secs(self.config.idle_timeout_seconds);
        let handshake = Duration::from_millis(self.config.connect_timeout_ms);
        let mut finished: Vec<Key> = Vec::new();
        for (key, flow) in &mut self.flows {
            let Some(handle) = flow.socket else {
                match flow.channels.from_host.try_recv() {
                    Ok(FromHost::Connected(direct)) => {
                        flow.channels.direct = direct;
                        let mut socket = tcp_socket(self.config.buffer_bytes);
                        let listen = IpListenEndpoint {
                            addr: Some(key.1.ip().into()),
                            port: key.1.port(),
                        };
                        if socket.listen(listen).is_err() {
                            effects.refuse.push((key.0, key.1, flow.syn_seq));
                            finished.push(*key);
                            continue;
                        }
                        flow.socket = Some(sockets.add(socket));
                        effects.inject.push(std::mem::take(&mut flow.held_syn));
                        flow.last_active = now;
                        effects.progress = true;
                    }
                    Ok(FromHost::Failed(kind)) => {
                        tracing::debug!(dst = %key.1, ?kind, "upstream connect failed");
                        metrics.inc(Counter::tcp_connect_failed);
                        effects.refuse.push((key.0, key.1, flow.syn_seq));
                        finished.push(*key);
                    }
                    Ok(_) | Err(TryRecvError::Disconnected) => {
                        effects.refuse.push((key.0, key.1, flow.syn_seq));
                        finished.push(*key);
                    }
                    Err(TryRecvError::Empty) => {}
                }
                continue;
            };
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            if pump(flow, socket, now) {
                effects.progress = true;
            }
            // An aborted socket stays one more poll so smoltcp sends its RST;
            // removed right away, the guest would never hear of the reset.
            if flow.aborted {
                if flow.abort_flushed {
                    finished.push(*key);
                } else {
                    flow.abort_flushed = true;
                    effects.progress = true;
                }
                continue;
            }
            let state = socket.state();
            let stalled_handshake =
                matches!(state, State::Listen | State::SynReceived | State::SynSent)
                    && now.saturating_duration_since(flow.last_active) > handshake;
            let idle_out = now.saturating_duration_since(flow.last_active) > idle;
            if stalled_handshake || idle_out {
                if idle_out {
                    metrics.inc(Counter::tcp_idle_timeouts);
                }
                socket.abort();
                flow.aborted = true;
                effects.progress = true;
            }
            if matches!(state, State::Closed | State::TimeWait) || flow.aborted {
                if !(flow.fin_to_host && flow.host_fin) {
                    // Not a clean close on both sides: the host must see a
                    // reset, not a FIN.
                    let _ = flow.channels.to_host.try_send(ToHost::Reset);
                }
                if !flow.aborted {
                    finished.push(*key);
                }
            }
        }
        for key in finished {
            if let Some(flow) = self.flows.remove(&key)
                && let Some(handle) = flow.socket
            {
                sockets.remove(handle);
            }
        }
    }
}

fn tcp_socket(buffer_bytes: usize) -> tcp::Socket<'static> {
    // The guest's own stack does its coalescing; a proxy adding Nagle or
    // delayed ACKs only adds round trips.
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
    );
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket
}

/// One flow's data both ways; true when anything moved.
fn pump(flow: &mut Flow, socket: &mut tcp::Socket<'static>, now: Instant) -> bool {
    // An aborted flow waits only for its RST to go out: whatever its
    // socket still holds (a denied request, say) goes nowhere.
    if flow.aborted {
        return false;
    }
    let mut moved = false;
    // Host to guest: what the host task sent, as far as the socket takes it.
    loop {
        if flow.pending_off >= flow.pending.len() {
            if flow.host_fin {
                break;
            }
            match flow.channels.from_host.try_recv() {
                Ok(FromHost::Data(bytes)) => {
                    flow.pending = bytes;
                    flow.pending_off = 0;
                }
                Ok(FromHost::Fin) => {
                    flow.host_fin = true;
                    break;
                }
                Ok(FromHost::Reset) | Err(TryRecvError::Disconnected) => {
                    socket.abort();
                    flow.aborted = true;
                    return true;
                }
                Ok(FromHost::Connected(_) | FromHost::Failed(_)) => continue,
                Err(TryRecvError::Empty) => break,
            }
        }
        if !socket.can_send() {
            break;
        }
        let rest = flow.pending.get(flow.pending_off..).unwrap_or_default();
        match socket.send_slice(rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                flow.pending_off += n;
                flow.last_active = now;
                moved = true;
            }
        }
    }
    if flow.host_fin && !flow.fin_to_guest && flow.pending_off >= flow.pending.len() {
        socket.close();
        flow.fin_to_guest = true;
        moved = true;
    }
    // Guest to host: straight into the host socket when nothing is queued
    // for the task and no gate checks the bytes (no copy, no thread hop).
    if let Some(direct) = flow
        .channels
        .direct
        .as_ref()
        .filter(|_| flow.gate.is_none())
    {
        while socket.can_recv() {
            let Ok(written) = socket.recv(|buf| {
                let n = direct.try_write(buf);
                (n, n)
            }) else {
                break;
            };
            if written == 0 {
                break;
            }
            flow.last_active = now;
            moved = true;
        }
    }
    // The rest through the channel, only while the task has room, so a
    // slow host closes the guest's window instead of growing a queue; a
    // gated flow's bytes go through its gate first.
    loop {
        let permit = match flow.channels.to_host.try_reserve() {
            Ok(p) => p,
            Err(TrySendError::Full(())) => break,
            Err(TrySendError::Closed(())) => {
                socket.abort();
                flow.aborted = true;
                return true;
            }
        };
        let bytes = match &mut flow.gate {
            Some(gate) => match gate.take(socket, CHUNK_BYTES) {
                Outcome::Wait => break,
                Outcome::Denied => {
                    socket.abort();
                    flow.aborted = true;
                    return true;
                }
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
        if let Some(direct) = &flow.channels.direct {
            direct.queue(bytes.len());
        }
        permit.send(ToHost::Data(bytes));
        flow.last_active = now;
        moved = true;
    }
    if let Some(gate) = &flow.gate {
        if gate.is_done() {
            flow.gate = None;
        } else if !gate.may_finish() {
            // Held bytes (and the FIN after them) wait for their decision.
            return moved;
        }
    }
    // The guest's FIN, once everything before it went to the host.
    if !flow.fin_to_host
        && !socket.may_recv()
        && socket.recv_queue() == 0
        && matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        )
        && flow.channels.to_host.try_send(ToHost::Fin).is_ok()
    {
        flow.fin_to_host = true;
        moved = true;
    }
    moved
}
